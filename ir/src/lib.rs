//! cnpc's intermediate representation.
//!
//! The entity-indexed data model between the policy front end (`cnpc-compiler`) and the BPF back
//! end (`cnpc-codegen-bpf`), in the style of cranelift's IR: tables of entities addressed by small
//! typed indices (`PrimaryMap<IdentityRef, Identity>`), so passes share data without pointers.
//!
//! A [`Program`] holds the identities of one cluster snapshot, the endpoints that carry them, and
//! every policy rule lowered to direction, subjects, peers, L4 and L7 terms, each rule keeping a
//! link to the policy, file and line it came from. Decision tables (DESIGN.md §5) are derived
//! from it. This crate parses no YAML and touches no kernel.

pub mod labels;
pub mod proxy;

pub use cranelift_entity::EntityRef;
use cranelift_entity::{entity_impl, PrimaryMap};
pub use ipnet::IpNet;
pub use labels::{LabelSet, Selector};
use std::net::IpAddr;

/// Index of an [`Identity`] in [`Program::identities`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityRef(u32);
entity_impl!(IdentityRef, "id");

/// Index of a [`Rule`] in [`Program::rules`].
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct RuleRef(u32);
entity_impl!(RuleRef, "rule");

/// Index of an [`Endpoint`] in [`Program::endpoints`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointRef(u32);
entity_impl!(EndpointRef, "ep");

/// Cilium's numeric security identity.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NumericIdentity(pub u32);

/// First local-scope identity (pkg/identity: LocalIdentityFlag): CIDR and FQDN identities,
/// which only this node's ipcache gives out.
pub const FIRST_LOCAL_IDENTITY: u32 = 1 << 24;

/// First identity of addresses learned from DNS (`cnpc_ir::FqdnIdentity`): local scope like
/// the CIDR identities, which count up from `1 << 24`, in a range of its own so the numbers a
/// running loader hands out never collide with the CIDR identities a recompile renumbers.
pub const FIRST_FQDN_IDENTITY: u32 = 0x0180_0000;

/// The identity of addresses learned from DNS answers. Cilium labels such an address with the
/// `fqdn:` selectors matching the names it was learned for, beside the `cidr:` labels of its
/// prefixes (pkg/ipcache metadata), so toFQDNs and CIDR rules both select it: here, the
/// selectors and the longest CIDR prefix of the policies holding the address (whether a CIDR
/// rule matches depends only on that prefix, as for CIDR identities).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FqdnIdentity {
    pub numeric: NumericIdentity,
    /// Sorted, without repeats, never empty.
    pub selectors: Vec<DnsMatcher>,
    pub cidr: Option<IpNet>,
}

/// Reserved identities with Cilium's numbers (pkg/identity/numericidentity.go).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    Host = 1,
    World = 2,
    Unmanaged = 3,
    Health = 4,
    Init = 5,
    RemoteNode = 6,
    KubeApiserver = 7,
    Ingress = 8,
    WorldIpv4 = 9,
    WorldIpv6 = 10,
}

impl Reserved {
    pub const ALL: [Reserved; 10] = [
        Reserved::Host,
        Reserved::World,
        Reserved::Unmanaged,
        Reserved::Health,
        Reserved::Init,
        Reserved::RemoteNode,
        Reserved::KubeApiserver,
        Reserved::Ingress,
        Reserved::WorldIpv4,
        Reserved::WorldIpv6,
    ];

    /// The label Cilium gives the identity (`reserved:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Reserved::Host => "host",
            Reserved::World => "world",
            Reserved::Unmanaged => "unmanaged",
            Reserved::Health => "health",
            Reserved::Init => "init",
            Reserved::RemoteNode => "remote-node",
            Reserved::KubeApiserver => "kube-apiserver",
            Reserved::Ingress => "ingress",
            Reserved::WorldIpv4 => "world-ipv4",
            Reserved::WorldIpv6 => "world-ipv6",
        }
    }

    pub fn numeric(self) -> NumericIdentity {
        NumericIdentity(self as u32)
    }
}

/// First identity number for label sets of cluster endpoints (pkg/identity: MinimalAllocationIdentity).
pub const FIRST_CLUSTER_IDENTITY: u32 = 256;
/// Last identity number of the cluster-local range (16 bits; pkg/identity: MaximumAllocationIdentity).
pub const LAST_CLUSTER_IDENTITY: u32 = 65535;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    Reserved(Reserved),
    /// Endpoints of the cluster with this label set.
    Cluster,
}

/// A security identity: a number and the labels policies select it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub numeric: NumericIdentity,
    pub kind: IdentityKind,
    pub labels: LabelSet,
}

/// Something that sends or receives traffic and is known to the cluster snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `namespace/name` of the pod or workload, or a node's name.
    pub name: String,
    /// `namespace/name` of the workload it belongs to (the pod itself when it has no owner).
    pub workload: String,
    pub identity: IdentityRef,
    /// The labels policy selects it by: its identity's labels for pods, node labels for nodes.
    pub labels: LabelSet,
    /// The node it runs on, when known.
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Named container ports (`http` → 80/TCP), for named-port rules.
    pub named_ports: Vec<(String, Protocol, u16)>,
    /// Whether cnpc enforces policy on it (pods; nodes only through host policies).
    pub is_pod: bool,
    /// The host-side interface an annotation names (`cnpc.io/interface`), if any.
    pub interface: Option<String>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The other direction: where the replies of a connection opened in this one travel.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }
}

/// L4 protocol of a flow or a rule term.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::Icmp,
        Protocol::Icmpv6,
    ];

    /// The largest "port": 65535, or 255 for ICMP, whose type stands in the port's place.
    pub fn max_port(self) -> u16 {
        if matches!(self, Protocol::Icmp | Protocol::Icmpv6) {
            255
        } else {
            u16::MAX
        }
    }

    /// The IP protocol number (the IPv4 protocol / IPv6 next-header field).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
        }
    }

    /// The protocol of an IP protocol number, if it is one cnpc knows.
    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
            Protocol::Icmpv6 => "ICMPv6",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ICMPV6" => Protocol::Icmpv6,
            _ => return None,
        })
    }
}

/// An inclusive port range; for ICMP the "port" is the message type.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    pub fn single(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }

    pub fn contains(self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// One L4 term of a rule: which protocols and ports it covers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Term {
    /// `protocols` empty means TCP, UDP and SCTP (Cilium's ANY).
    Ports {
        protocols: Vec<Protocol>,
        range: PortRange,
    },
    /// A named port, resolved against the destination endpoint's container ports.
    Named {
        protocols: Vec<Protocol>,
        name: String,
    },
    Icmp {
        protocol: Protocol,
        icmp_type: u8,
    },
}

/// Whether a term's protocol list applies to `p`: an empty list is Cilium's ANY, which covers
/// TCP, UDP and SCTP but not ICMP (pkg/policy/api/l4.go).
pub fn protocols_cover(protocols: &[Protocol], p: Protocol) -> bool {
    if protocols.is_empty() {
        matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    } else {
        protocols.contains(&p)
    }
}

/// Who a rule allows or denies, as the rule names them. Hashable, so rules naming the same
/// peers can share what is worked out from them (the table compiler's peer sets).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Endpoints and reserved identities selected by labels (fromEndpoints, entities, services
    /// resolved to their backends' selector).
    Selector(Selector),
    /// Addresses outside the cluster (fromCIDR, CIDRSet, ipBlock).
    Cidr { net: IpNet, except: Vec<IpNet> },
    /// Addresses learned from DNS answers for matching names.
    Fqdn(DnsMatcher),
    /// Nodes selected by their labels (fromNodes/toNodes).
    Nodes(Selector),
    /// Every peer (an L4-only rule, or the `all` entity).
    Any,
}

/// A DNS name matcher (matchName or matchPattern), normalised: lower case, no trailing dot.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum DnsMatcher {
    Name(String),
    Pattern(String),
}

impl DnsMatcher {
    /// Cilium's semantics (pkg/fqdn/matchpattern): names compare case-insensitively with the
    /// trailing dot ignored; in a pattern `*` stands for any run of the DNS characters
    /// `[-a-zA-Z0-9_]` (so never crosses a label), and a lone `*` matches every name.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            DnsMatcher::Name(n) => *n == name,
            DnsMatcher::Pattern(p) if p == "*" => true,
            DnsMatcher::Pattern(p) => glob_within_labels(p.as_bytes(), name.as_bytes()),
        }
    }

    pub fn name(s: &str) -> DnsMatcher {
        DnsMatcher::Name(s.trim_end_matches('.').to_ascii_lowercase())
    }

    pub fn pattern(s: &str) -> DnsMatcher {
        DnsMatcher::Pattern(s.trim_end_matches('.').to_ascii_lowercase())
    }
}

/// `*` matches any run of `[-a-z0-9_]` (names are lower-cased first); everything else
/// literally.
fn glob_within_labels(p: &[u8], s: &[u8]) -> bool {
    let dns_char = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len())
            .take_while(|&i| i == 0 || dns_char(s[i - 1]))
            .any(|i| glob_within_labels(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob_within_labels(rest, &s[1..]),
    }
}

/// One HTTP rule: every given field must match (Cilium PortRuleHTTP).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpRule {
    /// Anchored regular expressions (matched against the whole value).
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// Required headers: name and, if given, exact value.
    pub headers: Vec<(String, Option<String>)>,
}

/// The L7 part of an allow rule; traffic it covers goes through a proxy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum L7Rules {
    Http(Vec<HttpRule>),
    Dns(Vec<DnsMatcher>),
    /// Kafka and generic `l7proto` rules: proxied, but cnpc does not model their requests.
    Other(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// Where a rule came from, for trace output and diff blame.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Origin {
    /// `Kind namespace/name`.
    pub policy: String,
    pub file: String,
    pub line: u32,
}

/// One lowered rule: for its subject, in `direction`, traffic with any of `peers` on any of `l4`
/// (all L4 when empty) is allowed or denied; allows with `l7` are proxied and filtered. A rule
/// that names no peer has the single peer [`Peer::Any`]; an empty `peers` selects nobody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub origin: Origin,
    /// Which endpoints the rule applies to.
    pub subject: Subject,
    pub direction: Direction,
    pub action: Action,
    pub peers: Vec<Peer>,
    pub l4: Vec<L4Term>,
    pub l7: Option<L7Rules>,
}

/// A policy turning on default deny for its subject in one direction (Cilium: a rule with a
/// section for the direction, or `enableDefaultDeny`; NetworkPolicy: `policyTypes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enforcement {
    pub subject: Subject,
    pub direction: Direction,
    pub origin: Origin,
}

/// fromRequires/toRequires: every peer of the subject in this direction must also match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub subject: Subject,
    pub direction: Direction,
    pub selector: Selector,
    pub origin: Origin,
}

/// Whom a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Pods whose labels match.
    Endpoints(Selector),
    /// Nodes whose labels match (host policies).
    Nodes(Selector),
}

impl Subject {
    pub fn selects(&self, e: &Endpoint) -> bool {
        match self {
            Subject::Endpoints(s) => e.is_pod && s.matches(&e.labels),
            Subject::Nodes(s) => !e.is_pod && s.matches(&e.labels),
        }
    }
}

/// A lowered policy set over one cluster snapshot.
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub identities: PrimaryMap<IdentityRef, Identity>,
    pub endpoints: PrimaryMap<EndpointRef, Endpoint>,
    pub rules: PrimaryMap<RuleRef, Rule>,
    pub enforcement: Vec<Enforcement>,
    pub requirements: Vec<Requirement>,
}

impl Program {
    pub fn reserved(&self, r: Reserved) -> IdentityRef {
        self.identities
            .iter()
            .find(|(_, i)| i.kind == IdentityKind::Reserved(r))
            .map(|(k, _)| k)
            .expect("every program holds all reserved identities")
    }

    pub fn identity_by_numeric(&self, n: NumericIdentity) -> Option<IdentityRef> {
        self.identities
            .iter()
            .find(|(_, i)| i.numeric == n)
            .map(|(k, _)| k)
    }

    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointRef> {
        self.endpoints
            .iter()
            .find(|(_, e)| e.ips.contains(&ip))
            .map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_pattern_star_stays_within_one_label() {
        // Cilium docs (DNS based policy): `*.cilium.io` matches `sub.cilium.io` but neither
        // `cilium.io` nor `a.b.cilium.io`; matching ignores case and the trailing dot.
        let p = DnsMatcher::pattern("*.cilium.io");
        assert!(p.matches("sub.cilium.io"));
        assert!(p.matches("SUB.Cilium.IO."));
        assert!(!p.matches("cilium.io"));
        assert!(!p.matches("a.b.cilium.io"));
        let mid = DnsMatcher::pattern("special*service.api.cilium.io");
        assert!(mid.matches("specialxservice.api.cilium.io"));
        assert!(mid.matches("specialservice.api.cilium.io"));
        assert!(!mid.matches("special.x.service.api.cilium.io"));
        assert!(DnsMatcher::pattern("*").matches("anything.example.com"));
        assert!(DnsMatcher::name("api.github.com.").matches("API.github.com"));
        assert!(!DnsMatcher::name("api.github.com").matches("x.api.github.com"));
        // `*` takes only DNS characters (matchpattern: `[-a-zA-Z0-9_]*`), not any byte.
        assert!(!p.matches("a b.cilium.io"));
        assert!(!p.matches("a\\046.cilium.io"));
        assert!(p.matches("a_b-1.cilium.io"));
    }
}

/// What a table row (or a table's default) does with a packet.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum TableVerdict {
    Allow,
    Deny,
    /// Allowed at L3/L4 and handed to the L7 proxy, which applies the L7 rules of these rules.
    Proxy(Vec<RuleRef>),
}

/// A group of peer identities that every row treats alike, so a table's size follows the number
/// of distinct behaviours, not the size of the cluster.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct IdentityClass {
    pub members: Vec<NumericIdentity>,
}

#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct TableRow {
    /// Index into [`DecisionTable::classes`].
    pub class: u32,
    pub protocol: Protocol,
    pub ports: PortRange,
    pub verdict: TableVerdict,
}

/// The behaviour of one identity in one direction: rows for (peer class, protocol, port range),
/// and the default for everything no row covers. Canonical: classes sorted by their first
/// member, rows sorted, adjacent equal ranges merged, no row equal to the default, so equal
/// tables mean equal behaviour (DESIGN.md §5).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DecisionTable {
    pub subject: NumericIdentity,
    pub direction: Direction,
    pub default: TableVerdict,
    pub classes: Vec<IdentityClass>,
    pub rows: Vec<TableRow>,
}

impl DecisionTable {
    /// The verdict for a packet from/to `peer` (the flow's other side's identity).
    pub fn lookup(&self, peer: NumericIdentity, protocol: Protocol, port: u16) -> &TableVerdict {
        let class = self
            .classes
            .iter()
            .position(|c| c.members.binary_search(&peer).is_ok());
        let Some(class) = class else {
            return &self.default;
        };
        self.rows
            .iter()
            .find(|r| r.class == class as u32 && r.protocol == protocol && r.ports.contains(port))
            .map_or(&self.default, |r| &r.verdict)
    }
}
