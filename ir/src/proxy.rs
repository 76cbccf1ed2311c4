//! What the L7 proxies need of a generation (DESIGN.md §6a): the [`ProxyPolicy`].
//!
//! A packet whose table row says `Proxy` is handed to a local proxy; the proxy then has only the
//! connection's addresses to go on. To judge a request it needs the same facts the datapath used:
//! which local endpoint the connection belongs to (its subject, found by address), the peer's
//! identity (the ipcache: longest matching prefix, a miss is the world), the decision table of
//! (subject, direction), and the L7 rules of the rules a `Proxy` verdict names. This module
//! gathers exactly that, as plain data the loader hands to the proxy process with each
//! generation; the proxy never sees a policy file, and nothing here parses or compiles one.

use crate::{
    DecisionTable, Direction, IpNet, L7Rules, NumericIdentity, Origin, Program, Protocol, Reserved,
    RuleRef, TableVerdict,
};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// The contract between the datapath, the loader and the proxies: ports and packet marks.
///
/// - The endpoint's egress program hands a proxied connection to the socket listening on
///   [`EGRESS_PROXY_PORT`]; its ingress program hands it (through the loader's proxy device,
///   where `bpf_sk_assign` is allowed) to [`INGRESS_PROXY_PORT`]. The listener a connection
///   arrived on tells the proxy the direction.
/// - Packets assigned to a proxy socket carry [`TO_PROXY_MARK`], or'ed on the ingress path with
///   the source's identity when it fits in 16 bits (0 otherwise). The loader turns on
///   `net.ipv4.tcp_fwmark_accept`, so an accepted socket's mark is its SYN's, and the ingress
///   proxy takes the source identity from it: the source address alone would name the node
///   for a connection an egress proxy opened (see below). The loader routes that mark to
///   a local table (`ip rule fwmark TO_PROXY_MARK lookup PROXY_ROUTE_TABLE`, `local default dev
///   lo table PROXY_ROUTE_TABLE`, both families), which is what delivers them to the socket.
/// - The proxy's upstream connections leave from the node's own address and carry
///   [`FROM_EGRESS_PROXY`] or [`FROM_INGRESS_PROXY`] in their socket mark, or'ed with the
///   original source's identity (16 bits: proxied sources are local pods, whose identities are
///   cluster identities below 65,536). A destination endpoint's ingress program takes the
///   source identity from that mark instead of the ipcache (which would say "host"), and passes
///   traffic its own ingress proxy already judged.
///
/// DNS (issue 10) uses the egress port too: UDP on [`EGRESS_PROXY_PORT`] is the DNS proxy
/// (the only L7 protocol cnpc proxies over UDP), and a TCP connection the egress listener
/// accepts is DNS or HTTP by the L7 rules of its table row (Cilium, too, refuses HTTP and DNS
/// rules on one port). The datapath therefore needs no per-row proxy kind. The UDP listener is
/// transparent with `IP_RECVORIGDSTADDR`: the original destination comes with each datagram.
pub mod contract {
    pub const EGRESS_PROXY_PORT: u16 = 15001;
    pub const INGRESS_PROXY_PORT: u16 = 15002;
    pub const TO_PROXY_MARK: u32 = 0x0c70_0000;
    pub const FROM_EGRESS_PROXY: u32 = 0x0c71_0000;
    pub const FROM_INGRESS_PROXY: u32 = 0x0c72_0000;
    /// The part of a mark that says which of the above it is.
    pub const MARK_MAGIC_MASK: u32 = 0xffff_0000;
    /// The part of a `FROM_*` mark that holds the source identity.
    pub const MARK_IDENTITY_MASK: u32 = 0x0000_ffff;
    pub const PROXY_ROUTE_TABLE: u32 = 3184;
}

/// The L7 rules of one lowered rule, with where it came from (for 403s and events).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyRule {
    pub origin: Origin,
    pub l7: L7Rules,
}

/// One generation's L7 view. Serialised as JSON between the loader and the proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyPolicy {
    /// The loader's generation number (0 when built outside the loader).
    pub generation: u64,
    /// Addresses of the endpoints this node enforces on, and their identities.
    pub endpoints: Vec<(IpAddr, NumericIdentity)>,
    /// Address prefixes and their identities, as in the datapath's ipcache.
    pub ipcache: Vec<(IpNet, NumericIdentity)>,
    /// Decision tables of the local endpoints' identities, both directions.
    pub tables: Vec<DecisionTable>,
    /// Every rule a `Proxy` verdict of `tables` names, by its [`RuleRef`].
    pub rules: BTreeMap<RuleRef, ProxyRule>,
    /// Every toFQDNs selector of the generation: the DNS proxy asks the loader to learn the
    /// addresses of a name only when one of these matches it.
    #[serde(default)]
    pub fqdn_selectors: Vec<crate::DnsMatcher>,
    /// Addresses learned from DNS answers and their FQDN identities, as in the datapath's
    /// `fqdn` map when the loader wrote this file. The datapath looks them up after the host
    /// entries (endpoints, nodes) and before the prefixes; [`AddressIndex`] does the same.
    #[serde(default)]
    pub learned: Vec<(IpAddr, NumericIdentity)>,
}

/// The DNS proxy's request to the loader (one JSON object per line on the loader's learning
/// socket, `fqdn.sock` in its state directory): the addresses an allowed answer gave for
/// `name` (its A/AAAA records, reached from the question through the answer's CNAME chain).
/// The proxy holds the answer until the reply comes (or its bound passes), so the pod's first
/// packet to an address finds it in the datapath.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnRequest {
    /// Echoed in the reply.
    pub id: u64,
    /// The question's name, lower case, without the trailing dot.
    pub name: String,
    /// The endpoint that asked (for events and, later, per-endpoint caches).
    pub source: IpAddr,
    pub addresses: Vec<LearnedAddress>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnedAddress {
    pub ip: IpAddr,
    /// The record's TTL in seconds (the loader applies its minimum).
    pub ttl: u32,
}

/// The loader's answer to a [`LearnRequest`]: `ok` once the datapath holds the addresses;
/// `identities` are what it gave them (an address that is an endpoint or node keeps that
/// identity and is not listed).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnReply {
    pub id: u64,
    pub ok: bool,
    #[serde(default)]
    pub identities: Vec<(IpAddr, NumericIdentity)>,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The address lookups of a [`ProxyPolicy`], indexed once per generation: a proxy asks them
/// for every request, and a node's ipcache holds every pod of the cluster.
#[derive(Clone, Debug, Default)]
pub struct AddressIndex {
    endpoints: HashMap<IpAddr, NumericIdentity>,
    /// Addresses learned from DNS ([`ProxyPolicy::learned`]).
    learned: HashMap<IpAddr, NumericIdentity>,
    /// Host entries (/32, /128) of endpoints and nodes: always the longest prefix for their
    /// address.
    hosts: HashMap<IpAddr, NumericIdentity>,
    /// The other prefixes, shortest first (later entries win among equal lengths).
    prefixes: Vec<(IpNet, NumericIdentity)>,
}

impl AddressIndex {
    pub fn new(policy: &ProxyPolicy) -> AddressIndex {
        let mut endpoints = HashMap::new();
        for (ip, id) in &policy.endpoints {
            endpoints.entry(*ip).or_insert(*id);
        }
        // As the datapath's host map: endpoints and nodes; a CIDR rule's /32 (local scope)
        // is a prefix, looked up after the learned addresses.
        let is_host = |net: &IpNet, id: &NumericIdentity| {
            net.prefix_len() == net.max_prefix_len() && id.0 < crate::FIRST_LOCAL_IDENTITY
        };
        let hosts = policy
            .ipcache
            .iter()
            .filter(|(net, id)| is_host(net, id))
            .map(|(net, id)| (net.addr(), *id))
            .collect();
        let mut prefixes: Vec<(IpNet, NumericIdentity)> = policy
            .ipcache
            .iter()
            .filter(|(net, id)| !is_host(net, id))
            .copied()
            .collect();
        prefixes.sort_by_key(|(net, _)| net.prefix_len());
        AddressIndex {
            endpoints,
            learned: policy.learned.iter().copied().collect(),
            hosts,
            prefixes,
        }
    }

    /// The identity of the local endpoint at `ip`, if this node enforces on one there.
    pub fn endpoint(&self, ip: IpAddr) -> Option<NumericIdentity> {
        self.endpoints.get(&ip).copied()
    }

    /// Records an address the loader learned after this index was built (a [`LearnReply`]).
    pub fn learn(&mut self, ip: IpAddr, identity: NumericIdentity) {
        self.learned.insert(ip, identity);
    }

    /// The identity the datapath gives `ip`: a host entry, else a learned address, else the
    /// longest ipcache prefix holding it, else the world (gen.rs: "a miss is the world").
    pub fn identity_of(&self, ip: IpAddr) -> NumericIdentity {
        self.hosts
            .get(&ip)
            .or_else(|| self.learned.get(&ip))
            .or_else(|| {
                self.prefixes
                    .iter()
                    .rev()
                    .find(|(net, _)| net.contains(&ip))
                    .map(|(_, id)| id)
            })
            .copied()
            .unwrap_or(Reserved::World.numeric())
    }
}

/// Every toFQDNs selector of `program`'s rules, sorted, without repeats.
pub fn fqdn_selectors(program: &Program) -> Vec<crate::DnsMatcher> {
    let mut out: Vec<crate::DnsMatcher> = program
        .rules
        .values()
        .flat_map(|r| &r.peers)
        .filter_map(|p| match p {
            crate::Peer::Fqdn(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What applies to one proxied connection: allow everything, deny everything, or judge each
/// request by these rules (a request passes when any of them allows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionVerdict<'a> {
    Allow,
    Deny,
    L7(Vec<(RuleRef, &'a ProxyRule)>),
}

impl ProxyPolicy {
    /// Gathers the L7 view of `tables` (built from `program`) with the generation's ipcache.
    /// `local` keeps the endpoints whose tables are here (this node's); tables whose subject
    /// no local endpoint carries are still included, since a proxy may see any of them.
    pub fn build(
        program: &Program,
        tables: &[DecisionTable],
        ipcache: &[(IpNet, NumericIdentity)],
    ) -> ProxyPolicy {
        let subjects: std::collections::BTreeSet<NumericIdentity> =
            tables.iter().map(|t| t.subject).collect();
        let mut endpoints: Vec<(IpAddr, NumericIdentity)> = program
            .endpoints
            .values()
            .filter(|e| e.is_pod)
            .map(|e| (e, program.identities[e.identity].numeric))
            .filter(|(_, id)| subjects.contains(id))
            .flat_map(|(e, id)| e.ips.iter().map(move |ip| (*ip, id)))
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let mut rules = BTreeMap::new();
        for t in tables {
            let verdicts = t.rows.iter().map(|r| &r.verdict).chain([&t.default]);
            for v in verdicts {
                if let TableVerdict::Proxy(refs) = v {
                    for r in refs {
                        let rule = &program.rules[*r];
                        if let Some(l7) = &rule.l7 {
                            rules.entry(*r).or_insert_with(|| ProxyRule {
                                origin: rule.origin.clone(),
                                l7: l7.clone(),
                            });
                        }
                    }
                }
            }
        }
        ProxyPolicy {
            generation: 0,
            endpoints,
            ipcache: ipcache.to_vec(),
            tables: tables.to_vec(),
            rules,
            fqdn_selectors: fqdn_selectors(program),
            learned: Vec::new(),
        }
    }

    /// What applies to a TCP/UDP connection between a local endpoint and a peer, as the
    /// datapath would decide its first packet. `None` when no table covers the subject: the
    /// proxy must then refuse (fail closed).
    pub fn connection(
        &self,
        direction: Direction,
        subject: NumericIdentity,
        peer: NumericIdentity,
        protocol: Protocol,
        port: u16,
    ) -> Option<ConnectionVerdict<'_>> {
        let table = self
            .tables
            .iter()
            .find(|t| t.subject == subject && t.direction == direction)?;
        Some(match table.lookup(peer, protocol, port) {
            TableVerdict::Allow => ConnectionVerdict::Allow,
            TableVerdict::Deny => ConnectionVerdict::Deny,
            TableVerdict::Proxy(refs) => ConnectionVerdict::L7(
                refs.iter()
                    .filter_map(|r| Some((*r, self.rules.get(r)?)))
                    .collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntityRef, IdentityClass, PortRange, TableRow};

    #[test]
    fn identity_is_the_longest_prefix_and_a_miss_is_the_world() {
        let p = AddressIndex::new(&ProxyPolicy {
            ipcache: vec![
                ("10.0.1.5/32".parse().unwrap(), NumericIdentity(300)),
                ("10.0.0.0/8".parse().unwrap(), NumericIdentity(16_777_217)),
                ("10.9.0.0/16".parse().unwrap(), NumericIdentity(16_777_218)),
            ],
            endpoints: vec![("10.0.1.5".parse().unwrap(), NumericIdentity(300))],
            ..ProxyPolicy::default()
        });
        assert_eq!(p.identity_of("10.0.1.5".parse().unwrap()).0, 300);
        assert_eq!(p.identity_of("10.9.1.5".parse().unwrap()).0, 16_777_218);
        assert_eq!(p.identity_of("10.8.1.5".parse().unwrap()).0, 16_777_217);
        assert_eq!(p.identity_of("192.0.2.1".parse().unwrap()).0, 2);
        assert_eq!(
            p.endpoint("10.0.1.5".parse().unwrap()),
            Some(NumericIdentity(300))
        );
        assert_eq!(p.endpoint("10.0.1.6".parse().unwrap()), None);
    }

    #[test]
    fn connection_follows_the_table_and_a_missing_table_is_none() {
        let table = DecisionTable {
            subject: NumericIdentity(300),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(400)],
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
                verdict: TableVerdict::Proxy(vec![RuleRef::new(0)]),
            }],
        };
        let mut rules = BTreeMap::new();
        rules.insert(
            RuleRef::new(0),
            ProxyRule {
                origin: Origin {
                    policy: "p".into(),
                    file: "f".into(),
                    line: 1,
                },
                l7: L7Rules::Http(Vec::new()),
            },
        );
        let p = ProxyPolicy {
            tables: vec![table],
            rules,
            ..ProxyPolicy::default()
        };
        let id = NumericIdentity;
        let v = p.connection(Direction::Ingress, id(300), id(400), Protocol::Tcp, 80);
        assert!(matches!(v, Some(ConnectionVerdict::L7(r)) if r.len() == 1));
        let v = p.connection(Direction::Ingress, id(300), id(400), Protocol::Tcp, 81);
        assert_eq!(v, Some(ConnectionVerdict::Deny));
        assert_eq!(
            p.connection(Direction::Egress, id(300), id(400), Protocol::Tcp, 80),
            None
        );
        let json = serde_json::to_string(&p).unwrap();
        let back: ProxyPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }
}
