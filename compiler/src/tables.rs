//! Decision tables (DESIGN.md §5): for each identity and direction, what every peer identity may
//! do on every protocol and port, derived from the IR with the reference evaluator's precedence
//! (deny, then allow — proxied when every matching allow carries L7 — then the default).
//!
//! The peer universe: every reserved and cluster identity; one CIDR identity (local scope, from
//! 1<<24) per distinct prefix named by a CIDR rule, since under longest-prefix lookup whether a
//! CIDR rule (with its excepts) matches an address depends only on the longest of those
//! prefixes that contains it; and one FQDN identity per DNS matcher (Cilium gives addresses
//! learned from DNS identities labelled by the selectors that match their names).
//!
//! Named ports resolve per identity: against the subject's endpoints on ingress and the peer's
//! endpoints on egress (the union over endpoints of that identity).

use crate::eval::{DirVerdict, Party};
use cnpc_ir::*;
use std::collections::{BTreeMap, BTreeSet};

/// First local-scope identity (pkg/identity: LocalIdentityFlag).
pub const FIRST_LOCAL_IDENTITY: u32 = 1 << 24;

/// A possible peer of a flow, as tables see it.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub numeric: NumericIdentity,
    pub labels: LabelSet,
    /// For CIDR identities, the prefix; an address belongs to the longest one containing it.
    pub cidr: Option<IpNet>,
    /// For FQDN identities, the matcher.
    pub fqdn: Option<DnsMatcher>,
    pub named_ports: Vec<(String, Protocol, u16)>,
}

/// Every peer identity of a program, sorted by number.
pub fn peer_universe(program: &Program) -> Vec<PeerIdentity> {
    peer_universe_of(program, &[program])
}

/// The peer identities of `program`'s cluster together with the CIDR and FQDN peers named by
/// any of `rule_sources` (for comparing two policy versions over one cluster).
pub fn peer_universe_of(program: &Program, rule_sources: &[&Program]) -> Vec<PeerIdentity> {
    let mut out = Vec::new();
    for (r, id) in program.identities.iter() {
        let mut named_ports: Vec<(String, Protocol, u16)> = program
            .endpoints
            .values()
            .filter(|e| e.identity == r && e.is_pod)
            .flat_map(|e| e.named_ports.clone())
            .collect();
        named_ports.sort();
        named_ports.dedup();
        out.push(PeerIdentity {
            numeric: id.numeric,
            labels: id.labels.clone(),
            cidr: None,
            fqdn: None,
            named_ports,
        });
    }
    let mut prefixes = BTreeSet::new();
    let mut matchers = BTreeSet::new();
    for rule in rule_sources.iter().flat_map(|p| p.rules.values()) {
        for p in &rule.peers {
            match p {
                Peer::Cidr { net, except } => {
                    prefixes.insert(*net);
                    prefixes.extend(except.iter().map(|e| e.trunc()));
                }
                Peer::Fqdn(m) => {
                    matchers.insert(m.clone());
                }
                _ => {}
            }
        }
    }
    let mut next = FIRST_LOCAL_IDENTITY;
    let world = |extra: (&str, &str)| {
        let mut l = LabelSet::default();
        l.insert("reserved", "world", "");
        l.insert(extra.0, extra.1, "");
        l
    };
    for net in prefixes {
        out.push(PeerIdentity {
            numeric: NumericIdentity(next),
            labels: world(("cidr", &net.to_string())),
            cidr: Some(net),
            fqdn: None,
            named_ports: Vec::new(),
        });
        next += 1;
    }
    for m in matchers {
        let text = match &m {
            DnsMatcher::Name(n) | DnsMatcher::Pattern(n) => n.clone(),
        };
        out.push(PeerIdentity {
            numeric: NumericIdentity(next),
            labels: world(("fqdn", &text)),
            cidr: None,
            fqdn: Some(m),
            named_ports: Vec::new(),
        });
        next += 1;
    }
    out.sort_by_key(|p| p.numeric);
    out
}

/// The peer identity of a flow's party, in the universe's terms.
pub fn peer_of(universe: &[PeerIdentity], party: &Party) -> Option<NumericIdentity> {
    if party.world {
        if let Some(name) = &party.fqdn {
            // Only a name matched by exactly one matcher has a single identity here.
            let mut hits = universe
                .iter()
                .filter(|p| p.fqdn.as_ref().is_some_and(|m| m.matches(name)));
            return match (hits.next(), hits.next()) {
                (Some(p), None) => Some(p.numeric),
                (None, _) => Some(Reserved::World.numeric()),
                _ => None,
            };
        }
        if let Some(ip) = party.ip {
            let best = universe
                .iter()
                .filter(|p| p.cidr.is_some_and(|c| c.contains(&ip)))
                .max_by_key(|p| p.cidr.map(|c| c.prefix_len()));
            return Some(best.map_or(Reserved::World.numeric(), |p| p.numeric));
        }
    }
    party.identity
}

fn peer_matches(peer: &Peer, p: &PeerIdentity) -> bool {
    match peer {
        Peer::Any => true,
        Peer::Selector(s) => s.matches(&p.labels),
        // Node selectors need node labels, which identities do not carry (Cilium needs
        // --enable-node-selector-labels for them); tables treat them as matching no identity.
        Peer::Nodes(_) => false,
        Peer::Cidr { net, except } => p
            .cidr
            .is_some_and(|c| net.contains(&c) && !except.iter().any(|e| e.contains(&c))),
        Peer::Fqdn(m) => p.fqdn.as_ref() == Some(m),
    }
}

const PROTOCOLS: [Protocol; 5] = [
    Protocol::Tcp,
    Protocol::Udp,
    Protocol::Sctp,
    Protocol::Icmp,
    Protocol::Icmpv6,
];

fn max_port(p: Protocol) -> u16 {
    if matches!(p, Protocol::Icmp | Protocol::Icmpv6) {
        255
    } else {
        u16::MAX
    }
}

/// The port ranges of `terms` that apply to `proto` (named ports resolved in `named`).
fn ranges(terms: &[L4Term], proto: Protocol, named: &[(String, Protocol, u16)]) -> Vec<PortRange> {
    if terms.is_empty() {
        return vec![PortRange {
            lo: 0,
            hi: max_port(proto),
        }];
    }
    let any = |ps: &[Protocol]| {
        if ps.is_empty() {
            matches!(proto, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
        } else {
            ps.contains(&proto)
        }
    };
    let mut out = Vec::new();
    for t in terms {
        match t {
            L4Term::Ports { protocols, range } if any(protocols) => out.push(*range),
            L4Term::Named { protocols, name } if any(protocols) => {
                out.extend(
                    named
                        .iter()
                        .filter(|(n, p, _)| n == name && *p == proto)
                        .map(|(_, _, num)| PortRange::single(*num)),
                );
            }
            L4Term::Icmp {
                protocol,
                icmp_type,
            } if *protocol == proto => out.push(PortRange::single(u16::from(*icmp_type))),
            _ => {}
        }
    }
    out
}

/// A peer's rows before grouping: (protocol, ports, verdict).
type PeerRows = Vec<(Protocol, PortRange, TableVerdict)>;

struct Applicable<'a> {
    rule: RuleRef,
    r: &'a Rule,
}

/// The table of `subject` in `direction`.
pub fn decision_table(
    program: &Program,
    universe: &[PeerIdentity],
    subject: &Endpoint,
    direction: Direction,
) -> DecisionTable {
    let rules: Vec<Applicable> = program
        .rules
        .iter()
        .filter(|(_, r)| r.direction == direction && r.subject.selects(subject))
        .map(|(rule, r)| Applicable { rule, r })
        .collect();
    let enforced = program
        .enforcement
        .iter()
        .any(|e| e.direction == direction && e.subject.selects(subject));
    let requirements: Vec<&Requirement> = program
        .requirements
        .iter()
        .filter(|q| q.direction == direction && q.subject.selects(subject))
        .collect();
    let default = if enforced {
        TableVerdict::Deny
    } else {
        TableVerdict::Allow
    };
    let subject_ports = universe
        .iter()
        .find(|p| p.numeric == program.identities[subject.identity].numeric)
        .map(|p| p.named_ports.clone())
        .unwrap_or_default();

    // Rows per peer, before grouping into classes.
    let mut per_peer: BTreeMap<NumericIdentity, PeerRows> = BTreeMap::new();
    for peer in universe {
        let named = if direction == Direction::Ingress {
            &subject_ports
        } else {
            &peer.named_ports
        };
        let reqs_ok = requirements
            .iter()
            .all(|q| q.selector.matches(&peer.labels));
        let matching: Vec<&Applicable> = rules
            .iter()
            .filter(|a| a.r.peers.iter().any(|p| peer_matches(p, peer)))
            .collect();
        let mut rows = Vec::new();
        for proto in PROTOCOLS {
            // Cut the port space at every boundary of every matching rule.
            let mut cuts: BTreeSet<u32> = [0, u32::from(max_port(proto)) + 1].into();
            let mut term_ranges = Vec::new();
            for a in &matching {
                let rs = ranges(&a.r.l4, proto, named);
                for r in &rs {
                    cuts.insert(u32::from(r.lo));
                    cuts.insert(u32::from(r.hi) + 1);
                }
                term_ranges.push((a, rs));
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
                let covering: Vec<&Applicable> = term_ranges
                    .iter()
                    .filter(|(_, rs)| rs.iter().any(|r| r.lo <= lo && hi <= r.hi))
                    .map(|(a, _)| **a)
                    .collect();
                let verdict = if covering.iter().any(|a| a.r.action == Action::Deny) {
                    TableVerdict::Deny
                } else {
                    let allows: Vec<&Applicable> = if reqs_ok {
                        covering
                            .iter()
                            .copied()
                            .filter(|a| a.r.action == Action::Allow)
                            .collect()
                    } else {
                        Vec::new()
                    };
                    if allows.is_empty() {
                        default.clone()
                    } else if allows.iter().any(|a| a.r.l7.is_none()) {
                        TableVerdict::Allow
                    } else {
                        let mut refs: Vec<RuleRef> = allows.iter().map(|a| a.rule).collect();
                        refs.sort();
                        TableVerdict::Proxy(refs)
                    }
                };
                if verdict != default {
                    rows.push((proto, PortRange { lo, hi }, verdict));
                }
            }
        }
        // Merge adjacent ranges with equal verdicts.
        let mut merged: PeerRows = Vec::new();
        for row in rows {
            match merged.last_mut() {
                Some(last)
                    if last.0 == row.0
                        && last.2 == row.2
                        && u32::from(last.1.hi) + 1 == u32::from(row.1.lo) =>
                {
                    last.1.hi = row.1.hi
                }
                _ => merged.push(row),
            }
        }
        per_peer.insert(peer.numeric, merged);
    }
    // Group peers with equal rows; peers with no rows need no class.
    let mut classes: BTreeMap<PeerRows, Vec<NumericIdentity>> = BTreeMap::new();
    for (peer, rows) in per_peer {
        if !rows.is_empty() {
            classes.entry(rows).or_default().push(peer);
        }
    }
    let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> = classes
        .into_iter()
        .map(|(rows, members)| (members, rows))
        .collect();
    classes.sort();
    let mut table = DecisionTable {
        subject: program.identities[subject.identity].numeric,
        direction,
        default,
        classes: Vec::new(),
        rows: Vec::new(),
    };
    for (i, (members, rows)) in classes.into_iter().enumerate() {
        table.classes.push(IdentityClass { members });
        table
            .rows
            .extend(rows.into_iter().map(|(protocol, ports, verdict)| TableRow {
                class: i as u32,
                protocol,
                ports,
                verdict,
            }));
    }
    table
}

/// Tables for every pod identity of the program (one endpoint stands for its identity), in
/// identity order: ingress then egress.
pub fn all_tables(program: &Program) -> Vec<DecisionTable> {
    let universe = peer_universe(program);
    let mut seen = BTreeSet::new();
    let mut reps: Vec<&Endpoint> = program
        .endpoints
        .values()
        .filter(|e| e.is_pod && seen.insert(e.identity))
        .collect();
    reps.sort_by_key(|e| program.identities[e.identity].numeric);
    reps.iter()
        .flat_map(|e| {
            [Direction::Ingress, Direction::Egress]
                .map(|d| decision_table(program, &universe, e, d))
        })
        .collect()
}

/// What the reference evaluator's answer means at L3/L4, in table terms.
pub fn table_verdict_of(d: &crate::eval::Decision) -> Option<bool> {
    match d.verdict {
        DirVerdict::Denied => Some(false),
        DirVerdict::Allowed | DirVerdict::NotEnforced => Some(true),
    }
}
