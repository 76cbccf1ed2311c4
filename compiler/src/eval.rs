//! The reference evaluator: the verdict of one flow, per direction, with the rules that decided
//! it. It reads the IR directly and is the oracle every other engine (decision tables, BPF) is
//! tested against.
//!
//! Semantics (Cilium's, DESIGN.md §4):
//! - a flow passes the egress policy of its source and the ingress policy of its destination;
//! - in each direction a matching deny rule wins over every allow (docs: "Deny policies ... take
//!   precedence over allow policies", across CNP, CCNP and NetworkPolicy);
//! - otherwise a matching allow rule allows; if every matching allow carries L7 rules the flow
//!   is proxied and the request must match one of them (an allow without L7 on the same peer and
//!   port lets every request through, as Cilium merges it into an allow-all L7 rule);
//! - otherwise the direction is denied if any policy enabled default deny for it on the endpoint
//!   (Rule.Sanitize, `enableDefaultDeny`; NetworkPolicy `policyTypes`), and not enforced if none
//!   did;
//! - CIDR and FQDN peers only ever match addresses outside the cluster (Cilium's CIDR identities
//!   are world identities; docs: "CIDR rules do not apply to traffic where both sides of the
//!   connection are either managed by Cilium or use an IP belonging to a node in the cluster").

use crate::cluster::{Cluster, DEFAULT_CLUSTER};
use crate::labels::{
    LabelSet, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL,
};
use cnpc_ir::*;
use std::net::IpAddr;

/// One side of a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct Party {
    /// What the user named (`default/tiefighter`, `world 1.1.1.1`).
    pub name: String,
    /// The labels of its identity, which peer selectors match.
    pub labels: LabelSet,
    pub identity: Option<NumericIdentity>,
    pub ip: Option<IpAddr>,
    /// The endpoint whose policy applies to it, if cnpc enforces on it.
    pub endpoint: Option<Endpoint>,
    /// A DNS name its address was learned from (toFQDNs).
    pub fqdn: Option<String>,
    /// Outside the cluster: only such peers can match CIDR and FQDN rules.
    pub world: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub src: Party,
    pub dst: Party,
    pub protocol: Protocol,
    /// Destination port, or ICMP type.
    pub port: u16,
    pub http: Option<HttpRequest>,
    pub dns_query: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirVerdict {
    Allowed,
    Denied,
    NotEnforced,
}

impl DirVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            DirVerdict::Allowed => "allowed",
            DirVerdict::Denied => "denied",
            DirVerdict::NotEnforced => "not-enforced",
        }
    }
}

/// A rule that took part in a decision, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    pub origin: Origin,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct L7Decision {
    pub protocol: &'static str,
    /// `None` when the flow is proxied but no request was given to judge.
    pub allowed: Option<bool>,
    pub rules: Vec<Reason>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: DirVerdict,
    pub rules: Vec<Reason>,
    pub l7: Option<L7Decision>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: Decision,
    pub ingress: Decision,
}

impl Verdict {
    /// The L7 decision of whichever direction proxied the flow.
    pub fn l7(&self) -> Option<&L7Decision> {
        self.egress.l7.as_ref().or(self.ingress.l7.as_ref())
    }

    /// Whether another engine's verdict (`self`, say from the BPF programs) agrees with the
    /// reference evaluator's: in each direction both deny or neither does, both hand the flow
    /// to L7 or neither does, and where this engine judged a request at L7, it judged it alike.
    /// A disagreement is a bug in cnpc (`cnpc trace --engine bpf`, `cnpc test --engine bpf`).
    pub fn agrees_with(&self, reference: &Verdict) -> bool {
        let same = |b: &Decision, r: &Decision| {
            let l7 = |d: &Decision| d.l7.as_ref().and_then(|l| l.allowed);
            (b.verdict == DirVerdict::Denied) == (r.verdict == DirVerdict::Denied)
                && b.l7.is_some() == r.l7.is_some()
                && (l7(b).is_none() || l7(b) == l7(r))
        };
        same(&self.egress, &reference.egress) && same(&self.ingress, &reference.ingress)
    }

    /// This verdict with the L7 parts it could not judge (no request went through a proxy:
    /// none given, or not HTTP) explained by the reference evaluator's reading of the rules.
    pub fn explained_by(mut self, reference: &Verdict) -> Verdict {
        for (b, r) in [
            (&mut self.egress, &reference.egress),
            (&mut self.ingress, &reference.ingress),
        ] {
            if b.l7.as_ref().is_some_and(|l| l.allowed.is_none()) {
                b.l7 = r.l7.clone();
            }
        }
        self
    }
}

/// A `--dport` of `cnpc trace`: `80`, `53/UDP`, `8/ICMP` (an ICMP type); TCP by default.
pub fn parse_port(spec: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "TCP"));
    Some((port.parse().ok()?, Protocol::parse(proto)?))
}

pub fn evaluate(program: &Program, flow: &Flow) -> Verdict {
    let egress = match &flow.src.endpoint {
        Some(ep) => direction(program, Direction::Egress, ep, &flow.dst, flow),
        None => not_enforced(),
    };
    let ingress = match &flow.dst.endpoint {
        Some(ep) => direction(program, Direction::Ingress, ep, &flow.src, flow),
        None => not_enforced(),
    };
    let l7_ok = |d: &Decision| d.l7.as_ref().is_none_or(|l| l.allowed != Some(false));
    let allowed = egress.verdict != DirVerdict::Denied
        && ingress.verdict != DirVerdict::Denied
        && l7_ok(&egress)
        && l7_ok(&ingress);
    Verdict {
        allowed,
        egress,
        ingress,
    }
}

fn not_enforced() -> Decision {
    Decision {
        verdict: DirVerdict::NotEnforced,
        rules: Vec::new(),
        l7: None,
    }
}

fn peer_matches(peer: &Peer, remote: &Party) -> bool {
    match peer {
        Peer::Any => true,
        Peer::Selector(s) => s.matches(&remote.labels),
        Peer::Nodes(s) => remote
            .endpoint
            .as_ref()
            .is_some_and(|e| !e.is_pod && s.matches(&e.labels)),
        Peer::Cidr { net, except } => {
            remote.world
                && remote
                    .ip
                    .is_some_and(|ip| net.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
        }
        Peer::Fqdn(m) => remote.world && remote.fqdn.as_ref().is_some_and(|n| m.matches(n)),
    }
}

fn l4_matches(terms: &[L4Term], flow: &Flow) -> bool {
    if terms.is_empty() {
        return true;
    }
    terms.iter().any(|t| match t {
        L4Term::Ports { protocols, range } => {
            protocols_cover(protocols, flow.protocol) && range.contains(flow.port)
        }
        // Named ports resolve against the destination's container ports.
        L4Term::Named { protocols, name } => flow.dst.endpoint.as_ref().is_some_and(|e| {
            e.named_ports.iter().any(|(n, p, num)| {
                n == name
                    && *num == flow.port
                    && *p == flow.protocol
                    && protocols_cover(protocols, *p)
            })
        }),
        L4Term::Icmp {
            protocol,
            icmp_type,
        } => flow.protocol == *protocol && flow.port == u16::from(*icmp_type),
    })
}

fn anchored(re: &str, value: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(value))
}

fn http_matches(rule: &HttpRule, req: &HttpRequest) -> bool {
    rule.method
        .as_ref()
        .is_none_or(|m| anchored(m, &req.method))
        && rule.path.as_ref().is_none_or(|p| anchored(p, &req.path))
        && rule
            .host
            .as_ref()
            .is_none_or(|h| req.host.as_ref().is_some_and(|host| anchored(h, host)))
        && rule.headers.iter().all(|(name, value)| {
            req.headers.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case(name) && value.as_ref().is_none_or(|want| want == v)
            })
        })
}

fn reason(r: &Rule, what: impl Into<String>) -> Reason {
    Reason {
        origin: r.origin.clone(),
        what: what.into(),
    }
}

fn direction(
    program: &Program,
    dir: Direction,
    subject: &Endpoint,
    remote: &Party,
    flow: &Flow,
) -> Decision {
    let applies = |r: &&Rule| r.direction == dir && r.subject.selects(subject);
    let matching =
        |r: &Rule| r.peers.iter().any(|p| peer_matches(p, remote)) && l4_matches(&r.l4, flow);
    let rules: Vec<&Rule> = program.rules.values().filter(applies).collect();

    let denies: Vec<Reason> = rules
        .iter()
        .filter(|r| r.action == Action::Deny && matching(r))
        .map(|r| reason(r, "deny rule matches"))
        .collect();
    if !denies.is_empty() {
        return Decision {
            verdict: DirVerdict::Denied,
            rules: denies,
            l7: None,
        };
    }
    let enforcers: Vec<&Enforcement> = program
        .enforcement
        .iter()
        .filter(|e| e.direction == dir && e.subject.selects(subject))
        .collect();
    let default_deny = |mut rules: Vec<Reason>| {
        if enforcers.is_empty() {
            return Decision {
                verdict: DirVerdict::NotEnforced,
                rules,
                l7: None,
            };
        }
        rules.extend(enforcers.iter().map(|e| Reason {
            origin: e.origin.clone(),
            what: format!("selects the endpoint, so {} is default-deny", dir.as_str()),
        }));
        Decision {
            verdict: DirVerdict::Denied,
            rules,
            l7: None,
        }
    };
    let failed: Vec<Reason> = program
        .requirements
        .iter()
        .filter(|q| {
            q.direction == dir && q.subject.selects(subject) && !q.selector.matches(&remote.labels)
        })
        .map(|q| Reason {
            origin: q.origin.clone(),
            what: format!("requires peers to match {}", q.selector),
        })
        .collect();
    if !failed.is_empty() {
        return default_deny(failed);
    }
    let allows: Vec<&Rule> = rules
        .iter()
        .copied()
        .filter(|r| r.action == Action::Allow && matching(r))
        .collect();
    if allows.is_empty() {
        return default_deny(Vec::new());
    }
    let plain: Vec<Reason> = allows
        .iter()
        .filter(|r| r.l7.is_none())
        .map(|r| reason(r, "allow rule matches"))
        .collect();
    if !plain.is_empty() {
        return Decision {
            verdict: DirVerdict::Allowed,
            rules: plain,
            l7: None,
        };
    }
    let mut l7 = L7Decision {
        protocol: "l7",
        allowed: None,
        rules: Vec::new(),
    };
    for r in &allows {
        match r.l7.as_ref() {
            Some(L7Rules::Http(http)) => {
                l7.protocol = "http";
                if let Some(req) = &flow.http {
                    let ok = http.iter().any(|h| http_matches(h, req));
                    if ok {
                        l7.rules.push(reason(r, "HTTP rule matches the request"));
                    }
                    l7.allowed = Some(l7.allowed.unwrap_or(false) || ok);
                } else {
                    l7.rules
                        .push(reason(r, "HTTP rules apply; no request given"));
                }
            }
            Some(L7Rules::Dns(names)) => {
                l7.protocol = "dns";
                if let Some(q) = &flow.dns_query {
                    let ok = names.iter().any(|m| m.matches(q));
                    if ok {
                        l7.rules.push(reason(r, format!("DNS rule allows `{q}`")));
                    }
                    l7.allowed = Some(l7.allowed.unwrap_or(false) || ok);
                } else {
                    l7.rules.push(reason(r, "DNS rules apply; no query given"));
                }
            }
            Some(L7Rules::Other(p)) => l7
                .rules
                .push(reason(r, format!("{p} rules apply (not modelled)"))),
            None => {}
        }
    }
    if l7.allowed == Some(false) {
        l7.rules = allows
            .iter()
            .map(|r| reason(r, "L7 rules here do not match the request"))
            .collect();
    }
    let rules = allows
        .iter()
        .map(|r| reason(r, "allow rule matches; traffic is proxied"))
        .collect();
    Decision {
        verdict: DirVerdict::Allowed,
        rules,
        l7: Some(l7),
    }
}

/// Why a PEER argument could not be understood.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum PeerError {
    #[error("unknown peer form `{0}`")]
    #[diagnostic(code(cnpc::peer), help("write pod:NAMESPACE/NAME, labels:NAMESPACE:key=value,..., ip:ADDRESS, fqdn:NAME=ADDRESS or entity:NAME"))]
    Form(String),
    #[error("no pod or workload `{0}` in the cluster snapshot")]
    #[diagnostic(code(cnpc::peer), help("check the name with `kubectl get pods -n NAMESPACE`; workloads are named by their controller (deployment) name"))]
    NoSuchPod(String),
    #[error("`{0}` is not an IP address")]
    #[diagnostic(
        code(cnpc::peer),
        help("write an IPv4 or IPv6 address, like 10.0.1.10")
    )]
    BadIp(String),
    #[error("unknown entity `{0}`")]
    #[diagnostic(
        code(cnpc::peer),
        help(
            "entities: world, host, remote-node, kube-apiserver, init, health, unmanaged, ingress"
        )
    )]
    Entity(String),
}

fn world_labels() -> LabelSet {
    let mut l = LabelSet::default();
    l.insert("reserved", "world", "");
    l
}

fn reserved_party(program: &Program, r: Reserved) -> Party {
    let id = &program.identities[program.reserved(r)];
    Party {
        name: r.name().to_string(),
        labels: id.labels.clone(),
        identity: Some(id.numeric),
        ip: None,
        endpoint: None,
        fqdn: None,
        world: matches!(
            r,
            Reserved::World | Reserved::WorldIpv4 | Reserved::WorldIpv6
        ),
    }
}

fn endpoint_party(program: &Program, e: &Endpoint, ip: Option<IpAddr>) -> Party {
    let id = &program.identities[e.identity];
    Party {
        name: e.name.clone(),
        labels: id.labels.clone(),
        identity: Some(id.numeric),
        ip: ip.or_else(|| e.ips.first().copied()),
        endpoint: Some(e.clone()),
        fqdn: None,
        world: false,
    }
}

/// Parses a PEER of `cnpc trace` (DESIGN.md §7).
pub fn parse_peer(program: &Program, cluster: &Cluster, spec: &str) -> Result<Party, PeerError> {
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| PeerError::Form(spec.to_string()))?;
    match kind {
        "pod" => {
            let mut eps: Vec<&Endpoint> = program
                .endpoints
                .values()
                .filter(|e| e.is_pod && (e.name == rest || e.workload == rest))
                .collect();
            eps.sort_by(|a, b| a.name.cmp(&b.name));
            eps.first()
                .map(|e| endpoint_party(program, e, None))
                .ok_or_else(|| PeerError::NoSuchPod(rest.to_string()))
        }
        "labels" => {
            let (ns, pairs) = rest
                .split_once(':')
                .ok_or_else(|| PeerError::Form(spec.to_string()))?;
            let mut labels = LabelSet::default();
            for pair in pairs.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| PeerError::Form(spec.to_string()))?;
                labels.insert("k8s", k, v);
            }
            labels.insert("k8s", NAMESPACE_LABEL, ns);
            for (k, v) in cluster.namespace_labels(ns) {
                labels.insert("k8s", &format!("{NAMESPACE_LABELS_PREFIX}{k}"), &v);
            }
            labels.insert("k8s", SERVICE_ACCOUNT_LABEL, "default");
            labels.insert("k8s", CLUSTER_LABEL, DEFAULT_CLUSTER);
            let identity = program
                .identities
                .values()
                .find(|i| i.labels == labels)
                .map(|i| i.numeric);
            let endpoint = Endpoint {
                name: format!("{ns}/<{pairs}>"),
                workload: format!("{ns}/<{pairs}>"),
                identity: IdentityRef::from_u32(0),
                labels: labels.clone(),
                node: None,
                ips: Vec::new(),
                named_ports: Vec::new(),
                is_pod: true,
                interface: None,
            };
            Ok(Party {
                name: endpoint.name.clone(),
                labels,
                identity,
                ip: None,
                endpoint: Some(endpoint),
                fqdn: None,
                world: false,
            })
        }
        "ip" => {
            let ip: IpAddr = rest
                .parse()
                .map_err(|_| PeerError::BadIp(rest.to_string()))?;
            match program.endpoint_by_ip(ip) {
                Some(e) if program.endpoints[e].is_pod => {
                    Ok(endpoint_party(program, &program.endpoints[e], Some(ip)))
                }
                // A node's address: the remote-node identity (the host identity is the node an
                // endpoint runs on, which a bare address does not say).
                Some(e) => {
                    let mut p = reserved_party(program, Reserved::RemoteNode);
                    p.name = program.endpoints[e].name.clone();
                    p.ip = Some(ip);
                    p.endpoint = Some(program.endpoints[e].clone());
                    Ok(p)
                }
                None => {
                    let mut p = reserved_party(program, Reserved::World);
                    p.labels = world_labels();
                    p.name = format!("world {ip}");
                    p.ip = Some(ip);
                    Ok(p)
                }
            }
        }
        "fqdn" => {
            let (name, addr) = rest
                .split_once('=')
                .ok_or_else(|| PeerError::Form(spec.to_string()))?;
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| PeerError::BadIp(addr.to_string()))?;
            let mut p = reserved_party(program, Reserved::World);
            p.name = format!("{name} ({ip})");
            p.ip = Some(ip);
            p.fqdn = Some(name.to_string());
            Ok(p)
        }
        "entity" => {
            let r = Reserved::ALL
                .into_iter()
                .find(|r| r.name() == rest)
                .ok_or_else(|| PeerError::Entity(rest.to_string()))?;
            Ok(reserved_party(program, r))
        }
        _ => Err(PeerError::Form(spec.to_string())),
    }
}
