//! Decision tables (DESIGN.md §5): for each identity and direction, what every peer identity may
//! do on every protocol and port, derived from the IR with the reference evaluator's precedence
//! (deny, then allow — proxied when every matching allow carries L7 — then the default).
//!
//! The peer universe: every reserved and cluster identity; one CIDR identity (local scope, from
//! 1<<24) per distinct prefix named by a CIDR rule, since under longest-prefix lookup whether a
//! CIDR rule (with its excepts) matches an address depends only on the longest of those
//! prefixes that contains it; and FQDN identities for addresses learned from DNS
//! ([`FqdnIdentity`]: the toFQDNs selectors matching the names an address was learned for, and
//! the longest of those prefixes holding it, as Cilium labels such an address with both its
//! `fqdn:` and `cidr:` labels). Without a node's learned state (`cnpc compile`, `tables`,
//! `diff`) there is one per selector, alone and outside every prefix
//! ([`default_fqdn_identities`]); a loader passes the ones its learned addresses need.
//!
//! Named ports resolve per identity: against the subject's endpoints on ingress and the peer's
//! endpoints on egress (the union over endpoints of that identity).

use crate::eval::{DirVerdict, Party};
use cnpc_ir::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use cnpc_ir::FIRST_LOCAL_IDENTITY;

/// A possible peer of a flow, as tables see it.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub numeric: NumericIdentity,
    pub labels: LabelSet,
    /// For CIDR identities, the prefix; an address belongs to the longest one containing it.
    /// For FQDN identities, the longest policy prefix holding their addresses, if any.
    pub cidr: Option<IpNet>,
    /// For FQDN identities, the selectors matching their names (never empty); empty for every
    /// other identity.
    pub fqdn: Vec<DnsMatcher>,
    pub named_ports: Vec<(String, Protocol, u16)>,
}

/// Every peer identity of a program, sorted by number.
pub fn peer_universe(program: &Program) -> Vec<PeerIdentity> {
    peer_universe_of(program, &[program])
}

/// The peer identities of `program`'s cluster together with the CIDR and FQDN peers named by
/// any of `rule_sources` (for comparing two policy versions over one cluster).
pub fn peer_universe_of(program: &Program, rule_sources: &[&Program]) -> Vec<PeerIdentity> {
    let fqdn = default_fqdn_identities(rule_sources);
    peer_universe_with(program, rule_sources, &fqdn)
}

/// Every toFQDNs selector of `programs`, sorted, without repeats.
pub fn fqdn_selectors(programs: &[&Program]) -> Vec<DnsMatcher> {
    let mut out: Vec<DnsMatcher> = programs
        .iter()
        .flat_map(|p| cnpc_ir::proxy::fqdn_selectors(p))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One FQDN identity per selector, alone and outside every CIDR prefix, numbered from
/// [`FIRST_FQDN_IDENTITY`] in selector order: the universe when no node has learned anything.
pub fn default_fqdn_identities(programs: &[&Program]) -> Vec<FqdnIdentity> {
    fqdn_selectors(programs)
        .into_iter()
        .zip(FIRST_FQDN_IDENTITY..)
        .map(|(m, n)| FqdnIdentity {
            numeric: NumericIdentity(n),
            selectors: vec![m],
            cidr: None,
        })
        .collect()
}

/// The CIDR prefixes the rules of `rule_sources` name (with their excepts): the prefixes of
/// the CIDR identities, and the ones an FQDN identity's `cidr` is chosen from.
pub fn cidr_prefixes(rule_sources: &[&Program]) -> BTreeSet<IpNet> {
    let mut prefixes = BTreeSet::new();
    for rule in rule_sources.iter().flat_map(|p| p.rules.values()) {
        for p in &rule.peers {
            if let Peer::Cidr { net, except } = p {
                prefixes.insert(*net);
                prefixes.extend(except.iter().map(|e| e.trunc()));
            }
        }
    }
    prefixes
}

/// The FQDN identity key of an address learned for `names`: the `selectors` matching any of
/// them, and the longest of `prefixes` holding `ip`. `None` when no selector matches.
pub fn fqdn_key<'n>(
    selectors: &[DnsMatcher],
    prefixes: &BTreeSet<IpNet>,
    names: impl IntoIterator<Item = &'n str> + Clone,
    ip: IpAddr,
) -> Option<(Vec<DnsMatcher>, Option<IpNet>)> {
    let matching: Vec<DnsMatcher> = selectors
        .iter()
        .filter(|m| names.clone().into_iter().any(|n| m.matches(n)))
        .cloned()
        .collect();
    if matching.is_empty() {
        return None;
    }
    let cidr = prefixes
        .iter()
        .filter(|net| net.contains(&ip))
        .max_by_key(|net| net.prefix_len())
        .copied();
    Some((matching, cidr))
}

/// [`peer_universe_of`] with the given FQDN identities instead of the default ones.
pub fn peer_universe_with(
    program: &Program,
    rule_sources: &[&Program],
    fqdn: &[FqdnIdentity],
) -> Vec<PeerIdentity> {
    let mut out = Vec::new();
    // Named ports by identity, in one walk over the endpoints (there are thousands of each).
    let mut ports_of: HashMap<IdentityRef, Vec<(String, Protocol, u16)>> = HashMap::new();
    for e in program.endpoints.values().filter(|e| e.is_pod) {
        ports_of
            .entry(e.identity)
            .or_default()
            .extend(e.named_ports.iter().cloned());
    }
    for (r, id) in program.identities.iter() {
        let mut named_ports = ports_of.remove(&r).unwrap_or_default();
        named_ports.sort();
        named_ports.dedup();
        out.push(PeerIdentity {
            numeric: id.numeric,
            labels: id.labels.clone(),
            cidr: None,
            fqdn: Vec::new(),
            named_ports,
        });
    }
    let prefixes = cidr_prefixes(rule_sources);
    let world = || {
        let mut l = LabelSet::default();
        l.insert("reserved", "world", "");
        l
    };
    for (next, net) in (FIRST_LOCAL_IDENTITY..).zip(prefixes) {
        let mut labels = world();
        labels.insert("cidr", &net.to_string(), "");
        out.push(PeerIdentity {
            numeric: NumericIdentity(next),
            labels,
            cidr: Some(net),
            fqdn: Vec::new(),
            named_ports: Vec::new(),
        });
    }
    for f in fqdn {
        let mut labels = world();
        for m in &f.selectors {
            let text = match m {
                DnsMatcher::Name(n) | DnsMatcher::Pattern(n) => n.as_str(),
            };
            labels.insert("fqdn", text, "");
        }
        if let Some(net) = f.cidr {
            labels.insert("cidr", &net.to_string(), "");
        }
        out.push(PeerIdentity {
            numeric: f.numeric,
            labels,
            cidr: f.cidr,
            fqdn: f.selectors.clone(),
            named_ports: Vec::new(),
        });
    }
    out.sort_by_key(|p| p.numeric);
    out
}

/// What the ipcache must hold for `program`: every endpoint address (pods with their identity,
/// node addresses as remote nodes) and every CIDR prefix policies name, with its local identity.
/// Addresses learned from DNS are added at run time by the loader.
///
/// A CIDR prefix that is exactly an endpoint's address (an ipBlock `10.0.1.5/32` naming a pod)
/// gets no entry: the address keeps the endpoint's identity, as in Cilium, whose ipcache lets
/// endpoint state overwrite the `generated` CIDR identities of policies but not the reverse
/// (pkg/source/source.go `AllowOverwrite`). Both entries would land on the same exact-match key,
/// and the later one would give the pod a CIDR identity, which only CIDR rules match.
pub fn ipcache_entries(
    program: &Program,
    universe: &[PeerIdentity],
) -> Vec<(IpNet, NumericIdentity)> {
    let mut out = Vec::new();
    for e in program.endpoints.values() {
        let id = if e.is_pod {
            program.identities[e.identity].numeric
        } else {
            Reserved::RemoteNode.numeric()
        };
        out.extend(e.ips.iter().map(|ip| (IpNet::from(*ip), id)));
    }
    let addresses: BTreeSet<IpNet> = out.iter().map(|(net, _)| *net).collect();
    out.extend(
        universe
            .iter()
            .filter(|p| p.fqdn.is_empty())
            .filter_map(|p| Some((p.cidr?, p.numeric)))
            .filter(|(net, _)| !addresses.contains(net)),
    );
    out.sort();
    out.dedup();
    out
}

/// The peer identity of a flow's party, in the universe's terms.
pub fn peer_of(universe: &[PeerIdentity], party: &Party) -> Option<NumericIdentity> {
    if party.world {
        if let Some(name) = &party.fqdn {
            // The identity the node gives an address learned for this name: the selectors
            // matching it, with the prefix holding the address (when one is given).
            let selectors: Vec<DnsMatcher> = {
                let mut all: Vec<DnsMatcher> = universe
                    .iter()
                    .flat_map(|p| p.fqdn.iter().cloned())
                    .collect();
                all.sort();
                all.dedup();
                all
            };
            let prefixes: BTreeSet<IpNet> = universe
                .iter()
                .filter(|p| p.fqdn.is_empty())
                .filter_map(|p| p.cidr)
                .collect();
            let unspecified = IpAddr::from([0u8, 0, 0, 0]);
            let ip = party.ip.unwrap_or(unspecified);
            if let Some((matching, cidr)) = fqdn_key(&selectors, &prefixes, [name.as_str()], ip) {
                let cidr = if party.ip.is_some() { cidr } else { None };
                return universe
                    .iter()
                    .find(|p| p.fqdn == matching && p.cidr == cidr)
                    .map(|p| p.numeric);
            }
        }
        if let Some(ip) = party.ip {
            let best = universe
                .iter()
                .filter(|p| p.fqdn.is_empty() && p.cidr.is_some_and(|c| c.contains(&ip)))
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
        Peer::Fqdn(m) => p.fqdn.contains(m),
    }
}

/// The port ranges of `terms` that apply to `proto` (named ports resolved in `named`).
fn ranges(terms: &[L4Term], proto: Protocol, named: &[(String, Protocol, u16)]) -> Vec<PortRange> {
    if terms.is_empty() {
        return vec![PortRange {
            lo: 0,
            hi: proto.max_port(),
        }];
    }
    let any = |ps: &[Protocol]| protocols_cover(ps, proto);
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

/// A deny rule as [`TableCompiler::deny_rules`] gives it.
#[derive(Clone, Debug)]
pub struct DenyRule {
    pub rule: RuleRef,
    pub peers: std::collections::HashSet<NumericIdentity>,
    pub ports: Vec<(Protocol, PortRange)>,
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
        let merged = rows_for(&matching, reqs_ok, named, &default);
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
    assemble(
        program.identities[subject.identity].numeric,
        direction,
        default,
        classes,
    )
}

/// The rows of one peer: the port space of every protocol cut at every boundary of the rules
/// that match the peer, each piece decided deny > allow (proxied when every allow has L7) >
/// default, equal neighbours merged, pieces equal to the default dropped.
fn rows_for(
    matching: &[&Applicable],
    reqs_ok: bool,
    named: &[(String, Protocol, u16)],
    default: &TableVerdict,
) -> PeerRows {
    let mut rows = Vec::new();
    for proto in Protocol::ALL {
        // Cut the port space at every boundary of every matching rule.
        let mut cuts: BTreeSet<u32> = [0, u32::from(proto.max_port()) + 1].into();
        let mut term_ranges = Vec::new();
        for &a in matching {
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
                .map(|(a, _)| *a)
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
            if verdict != *default {
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
    merged
}

/// A canonical table from (members, rows) classes: members sorted, classes sorted, rows
/// numbered by class.
fn assemble(
    subject: NumericIdentity,
    direction: Direction,
    default: TableVerdict,
    classes: Vec<(Vec<NumericIdentity>, PeerRows)>,
) -> DecisionTable {
    let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> = classes
        .into_iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(mut members, rows)| {
            members.sort();
            (members, rows)
        })
        .collect();
    classes.sort();
    let mut table = DecisionTable {
        subject,
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
    TableCompiler::new(program).all(program)
}

/// [`all_tables`] through the reference [`decision_table`]: slow, obviously right, and what the
/// fast path is tested against.
pub fn all_tables_reference(program: &Program) -> Vec<DecisionTable> {
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

// ---------------------------------------------------------------------------------------------
// The fast path: all tables at once.
//
// `decision_table` above is the reference: clear, and quadratic (every peer against every rule
// for every subject). `TableCompiler` computes the same tables (the property test checks they
// are equal) by matching each selector once through a label index, and by partitioning the peer
// universe with the peer sets of a subject's rules, so rows are computed once per group of peers
// that every rule treats alike.

use rustc_hash::FxHashMap;
use std::collections::HashMap;

/// Label index over a list of label sets: key (without source) → value → positions. Its maps
/// hash with rustc's FxHash: every rule's subject is looked up in it at every compile, and the
/// keys are label strings of the program, not chosen to collide.
struct LabelIndex<'a> {
    sets: Vec<&'a LabelSet>,
    by_kv: FxHashMap<&'a str, FxHashMap<&'a str, Vec<u32>>>,
}

impl<'a> LabelIndex<'a> {
    fn new(sets: Vec<&'a LabelSet>) -> LabelIndex<'a> {
        let mut by_kv: FxHashMap<&str, FxHashMap<&str, Vec<u32>>> = FxHashMap::default();
        for (i, s) in sets.iter().enumerate() {
            for (k, (_, v)) in &s.0 {
                by_kv
                    .entry(k.as_str())
                    .or_default()
                    .entry(v.as_str())
                    .or_default()
                    .push(i as u32);
            }
        }
        LabelIndex { sets, by_kv }
    }

    /// Positions of the sets `sel` matches.
    fn select(&self, sel: &Selector) -> Vec<u32> {
        select_in(
            sel,
            |k, v| self.by_kv.get(k)?.get(v),
            self.sets.len(),
            |i| self.sets[i as usize],
        )
    }
}

/// The same index, owning its keys, over the peer universe (kept by a [`TableCompiler`]).
#[derive(Default)]
struct UniverseIndex {
    by_kv: FxHashMap<String, FxHashMap<String, Vec<u32>>>,
}

impl UniverseIndex {
    fn new(universe: &[PeerIdentity]) -> UniverseIndex {
        let mut by_kv: FxHashMap<String, FxHashMap<String, Vec<u32>>> = FxHashMap::default();
        for (i, p) in universe.iter().enumerate() {
            for (k, (_, v)) in &p.labels.0 {
                by_kv
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(i as u32);
            }
        }
        UniverseIndex { by_kv }
    }

    fn select(&self, sel: &Selector, universe: &[PeerIdentity]) -> Vec<u32> {
        select_in(
            sel,
            |k, v| self.by_kv.get(k)?.get(v),
            universe.len(),
            |i| &universe[i as usize].labels,
        )
    }
}

/// Positions (of `n` label sets, `set(i)`) that `sel` matches: candidates from the rarest
/// single-value `In` requirement (`lookup` gives the positions holding a key and value), each
/// verified in full.
fn select_in<'s>(
    sel: &Selector,
    lookup: impl Fn(&str, &str) -> Option<&'s Vec<u32>>,
    n: usize,
    set: impl Fn(u32) -> &'s LabelSet,
) -> Vec<u32> {
    let narrowest = sel
        .requirements
        .iter()
        .filter(|(_, op, values)| *op == labels::Operator::In && values.len() == 1)
        .map(|(k, _, values)| {
            lookup(labels::split_source(k).1, values[0].as_str()).map_or(&[][..], |v| &v[..])
        })
        .min_by_key(|v| v.len());
    match narrowest {
        Some(cands) => cands
            .iter()
            .copied()
            .filter(|&i| sel.matches(set(i)))
            .collect(),
        None => (0..n as u32).filter(|&i| sel.matches(set(i))).collect(),
    }
}

use cnpc_ir::labels;

/// A set of peer positions in the universe: sorted members and a membership bitmap.
struct PeerSet {
    members: Vec<u32>,
    bits: Vec<u64>,
}

impl PeerSet {
    fn new(mut members: Vec<u32>, n: usize) -> PeerSet {
        members.sort_unstable();
        members.dedup();
        let mut bits = vec![0u64; n.div_ceil(64)];
        for &m in &members {
            bits[m as usize / 64] |= 1 << (m % 64);
        }
        PeerSet { members, bits }
    }

    fn contains(&self, i: u32) -> bool {
        self.bits[i as usize / 64] >> (i % 64) & 1 == 1
    }
}

/// Everything shared by the tables of one program: the peer universe and, for every rule and
/// requirement, the set of peers it matches.
pub struct TableCompiler {
    pub universe: Vec<PeerIdentity>,
    /// Per rule, the peers it matches: worked out when a table first needs the rule, so a
    /// node's loader, which builds the tables of its own few endpoints, pays only for the rules
    /// that apply to them (issue 12).
    rule_peers: Vec<std::sync::OnceLock<PeerSet>>,
    /// For working out `rule_peers`: the universe's labels indexed, and each selector's matches
    /// (many rules name the same selector: an entity, a namespace).
    index: UniverseIndex,
    selector_memo: std::sync::Mutex<HashMap<Selector, std::sync::Arc<[u32]>>>,
    positions: std::sync::OnceLock<HashMap<NumericIdentity, usize>>,
    requirement_peers: Vec<PeerSet>,
    /// Identities that no longer exist (their positions stay, so the peer sets stay valid).
    removed: std::collections::HashSet<NumericIdentity>,
}

/// The rules, requirements and enforcement that apply to one table's subject.
#[derive(Clone, Debug, Default)]
struct TableInputs {
    rules: Vec<RuleRef>,
    reqs: Vec<usize>,
    enforced: bool,
}

impl TableCompiler {
    pub fn new(program: &Program) -> TableCompiler {
        TableCompiler::with_universe(program, peer_universe(program))
    }

    /// A compiler over `program` whose FQDN identities are `fqdn` (a node's learned
    /// addresses need, see [`FqdnIdentity`]) instead of the default one per selector.
    pub fn with_fqdn(program: &Program, fqdn: &[FqdnIdentity]) -> TableCompiler {
        let universe = peer_universe_with(program, &[program], fqdn);
        TableCompiler::with_universe(program, universe)
    }

    fn with_universe(program: &Program, universe: Vec<PeerIdentity>) -> TableCompiler {
        let n = universe.len();
        let index = UniverseIndex::new(&universe);
        let requirement_peers = program
            .requirements
            .iter()
            .map(|q| PeerSet::new(index.select(&q.selector, &universe), n))
            .collect();
        TableCompiler {
            rule_peers: program
                .rules
                .keys()
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            index,
            selector_memo: Default::default(),
            positions: Default::default(),
            universe,
            requirement_peers,
            removed: Default::default(),
        }
    }

    /// The peers rule `r` of `program` (the program this compiler was built for) matches.
    fn rule_peers(&self, program: &Program, r: RuleRef) -> &PeerSet {
        self.rule_peers[r.index()].get_or_init(|| self.peer_set(&program.rules[r].peers))
    }

    fn peer_set(&self, peers: &[Peer]) -> PeerSet {
        let n = self.universe.len();
        let mut members = Vec::new();
        for p in peers {
            match p {
                Peer::Any => members.extend(0..n as u32),
                Peer::Selector(s) => {
                    let known = self
                        .selector_memo
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(s)
                        .cloned();
                    let matched = known.unwrap_or_else(|| {
                        let m: std::sync::Arc<[u32]> = self.index.select(s, &self.universe).into();
                        self.selector_memo
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(s.clone(), m.clone());
                        m
                    });
                    members.extend(matched.iter().copied());
                }
                Peer::Nodes(_) => {}
                Peer::Cidr { .. } | Peer::Fqdn(_) => members
                    .extend((0..n as u32).filter(|&i| peer_matches(p, &self.universe[i as usize]))),
            }
        }
        PeerSet::new(members, n)
    }

    /// Works out every rule's peers (before the universe changes under them).
    fn all_rule_peers(&self, program: &Program) {
        for r in program.rules.keys() {
            self.rule_peers(program, r);
        }
    }

    /// The rules behind each row of `table`, whose subject is `subject`: the rules of its
    /// direction that select the row's class (by its first member), cover the row's first
    /// port and act as the row does (deny rules for a deny row, allow rules otherwise), in
    /// rule order. A verdict event names a row; this names the policy, file and line behind
    /// it (`cnpc observe`). A row no rule explains (cannot happen for a table this compiler
    /// built) gets none.
    pub fn row_rules(
        &self,
        program: &Program,
        subject: &Endpoint,
        table: &DecisionTable,
    ) -> Vec<Vec<RuleRef>> {
        let applicable: Vec<RuleRef> = program
            .rules
            .iter()
            .filter(|(_, r)| r.direction == table.direction && r.subject.selects(subject))
            .map(|(rr, _)| rr)
            .collect();
        self.row_rules_among(program, table, &applicable)
    }

    /// [`Self::row_rules`] given the rules of the table's subject and direction, in rule order
    /// (as [`Self::of_with_rules`] returns them), which saves a walk over every rule.
    pub fn row_rules_among(
        &self,
        program: &Program,
        table: &DecisionTable,
        applicable: &[RuleRef],
    ) -> Vec<Vec<RuleRef>> {
        let index = self.positions();
        let subject_ports = index
            .get(&table.subject)
            .map(|&i| self.universe[i].named_ports.as_slice())
            .unwrap_or_default();
        table
            .rows
            .iter()
            .map(|row| {
                let Some(&rep) = table
                    .classes
                    .get(row.class as usize)
                    .and_then(|c| c.members.first())
                    .and_then(|m| index.get(m))
                else {
                    return Vec::new();
                };
                let named = if table.direction == Direction::Ingress {
                    subject_ports
                } else {
                    self.universe[rep].named_ports.as_slice()
                };
                let deny = row.verdict == TableVerdict::Deny;
                applicable
                    .iter()
                    .map(|&rr| (rr, &program.rules[rr]))
                    .filter(|(rr, r)| {
                        (r.action == Action::Deny) == deny
                            && self.rule_peers(program, *rr).contains(rep as u32)
                            && ranges(&r.l4, row.protocol, named)
                                .iter()
                                .any(|p| p.lo <= row.ports.lo && row.ports.lo <= p.hi)
                    })
                    .map(|(rr, _)| rr)
                    .collect()
            })
            .collect()
    }

    /// Universe positions by identity number.
    fn positions(&self) -> &HashMap<NumericIdentity, usize> {
        self.positions.get_or_init(|| {
            self.universe
                .iter()
                .enumerate()
                .map(|(i, u)| (u.numeric, i))
                .collect()
        })
    }

    /// The deny rules among `applicable` (the rules of a table's subject and direction, as
    /// [`Self::of_with_rules`] returns them), each with the peer identities it selects and the
    /// (protocol, ports) it covers. A table folds a peer that deny rules drop everywhere into
    /// its default, so an event of the default row says "default" where an explicit deny
    /// decided; these name the rule (`cnpc observe`).
    pub fn deny_rules_among(&self, program: &Program, applicable: &[RuleRef]) -> Vec<DenyRule> {
        applicable
            .iter()
            .map(|&rr| (rr, &program.rules[rr]))
            .filter(|(_, r)| r.action == Action::Deny)
            .map(|(rr, r)| DenyRule {
                rule: rr,
                peers: self
                    .rule_peers(program, rr)
                    .members
                    .iter()
                    .map(|&i| self.universe[i as usize].numeric)
                    .collect(),
                ports: Protocol::ALL
                    .into_iter()
                    .flat_map(|p| ranges(&r.l4, p, &[]).into_iter().map(move |r| (p, r)))
                    .collect(),
            })
            .collect()
    }

    /// Tables for every pod identity (as [`all_tables`]).
    pub fn all(&self, program: &Program) -> Vec<DecisionTable> {
        self.all_with_inputs(program, None)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    /// [`Self::of`], each table with the rules of its subject and direction, in rule order.
    pub fn of_with_rules(
        &self,
        program: &Program,
        identities: &BTreeSet<NumericIdentity>,
    ) -> Vec<(DecisionTable, Vec<RuleRef>)> {
        self.all_with_inputs(program, Some(identities))
            .into_iter()
            .map(|(t, i)| (t, i.rules))
            .collect()
    }

    /// Tables of the given identities only (a node's loader needs its own endpoints' alone).
    pub fn of(
        &self,
        program: &Program,
        identities: &BTreeSet<NumericIdentity>,
    ) -> Vec<DecisionTable> {
        self.all_with_inputs(program, Some(identities))
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    fn all_with_inputs(
        &self,
        program: &Program,
        only: Option<&BTreeSet<NumericIdentity>>,
    ) -> Vec<(DecisionTable, TableInputs)> {
        let p = program;
        let mut seen = BTreeSet::new();
        let mut reps: Vec<&Endpoint> = p
            .endpoints
            .values()
            .filter(|e| e.is_pod && seen.insert(e.identity))
            .filter(|e| only.is_none_or(|o| o.contains(&p.identities[e.identity].numeric)))
            .collect();
        reps.sort_by_key(|e| p.identities[e.identity].numeric);
        // Subjects of each rule, found through the index over the representatives' labels.
        let index = LabelIndex::new(reps.iter().map(|e| &e.labels).collect());
        let mut rules_of: Vec<Vec<RuleRef>> = vec![Vec::new(); reps.len()];
        for (r, rule) in p.rules.iter() {
            if let Subject::Endpoints(sel) = &rule.subject {
                for i in index.select(sel) {
                    rules_of[i as usize].push(r);
                }
            }
        }
        let mut enforced_of = vec![[false; 2]; reps.len()];
        for e in &p.enforcement {
            if let Subject::Endpoints(sel) = &e.subject {
                for i in index.select(sel) {
                    enforced_of[i as usize][e.direction as usize] = true;
                }
            }
        }
        let mut reqs_of: Vec<Vec<usize>> = vec![Vec::new(); reps.len()];
        for (qi, q) in p.requirements.iter().enumerate() {
            if let Subject::Endpoints(sel) = &q.subject {
                for i in index.select(sel) {
                    reqs_of[i as usize].push(qi);
                }
            }
        }
        let mut out = Vec::with_capacity(reps.len() * 2);
        for (i, e) in reps.iter().enumerate() {
            for dir in [Direction::Ingress, Direction::Egress] {
                let inputs = TableInputs {
                    rules: rules_of[i]
                        .iter()
                        .copied()
                        .filter(|r| p.rules[*r].direction == dir)
                        .collect(),
                    reqs: reqs_of[i]
                        .iter()
                        .copied()
                        .filter(|q| p.requirements[*q].direction == dir)
                        .collect(),
                    enforced: enforced_of[i][dir as usize],
                };
                out.push((self.table(p, e, dir, &inputs), inputs));
            }
        }
        out
    }

    fn table(
        &self,
        program: &Program,
        subject: &Endpoint,
        direction: Direction,
        inputs: &TableInputs,
    ) -> DecisionTable {
        let p = program;
        let (rules, reqs, enforced) = (&inputs.rules[..], &inputs.reqs[..], inputs.enforced);
        let n = self.universe.len();
        let default = if enforced {
            TableVerdict::Deny
        } else {
            TableVerdict::Allow
        };
        let subject_numeric = p.identities[subject.identity].numeric;
        // Partition the universe: peers in one group are matched by exactly the same rules and
        // requirements (and, on egress with named ports, declare the same named ports).
        let mut group = vec![0u32; n];
        let mut groups = 1u32;
        let mut split: HashMap<u32, u32> = HashMap::new();
        let sets = rules
            .iter()
            .map(|r| self.rule_peers(p, *r))
            .chain(reqs.iter().map(|q| &self.requirement_peers[*q]));
        for set in sets {
            if set.members.len() == n {
                continue;
            }
            split.clear();
            for &m in &set.members {
                let g = group[m as usize];
                let child = *split.entry(g).or_insert_with(|| {
                    groups += 1;
                    groups - 1
                });
                group[m as usize] = child;
            }
        }
        let named = direction == Direction::Egress
            && rules.iter().any(|r| {
                p.rules[*r]
                    .l4
                    .iter()
                    .any(|t| matches!(t, L4Term::Named { .. }))
            });
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); groups as usize];
        for i in 0..n as u32 {
            if !self.removed.contains(&self.universe[i as usize].numeric) {
                buckets[group[i as usize] as usize].push(i);
            }
        }
        // On egress, named ports resolve against the peer: split groups by declared ports.
        let mut members_of: Vec<Vec<u32>> = Vec::new();
        for b in buckets.into_iter().filter(|b| !b.is_empty()) {
            if named {
                let mut by_ports: BTreeMap<&[(String, Protocol, u16)], Vec<u32>> = BTreeMap::new();
                for i in b {
                    by_ports
                        .entry(&self.universe[i as usize].named_ports)
                        .or_default()
                        .push(i);
                }
                members_of.extend(by_ports.into_values());
            } else {
                members_of.push(b);
            }
        }
        let subject_ports = self
            .universe
            .iter()
            .find(|u| u.numeric == subject_numeric)
            .map(|u| u.named_ports.clone())
            .unwrap_or_default();
        let mut classes: BTreeMap<PeerRows, Vec<NumericIdentity>> = BTreeMap::new();
        for members in members_of {
            let rep = members[0];
            let peer = &self.universe[rep as usize];
            let named_ports = if direction == Direction::Ingress {
                &subject_ports
            } else {
                &peer.named_ports
            };
            let reqs_ok = reqs
                .iter()
                .all(|q| self.requirement_peers[*q].contains(rep));
            let matching: Vec<Applicable> = rules
                .iter()
                .filter(|r| self.rule_peers(p, **r).contains(rep))
                .map(|&rule| Applicable {
                    rule,
                    r: &p.rules[rule],
                })
                .collect();
            let matching: Vec<&Applicable> = matching.iter().collect();
            let rows = rows_for(&matching, reqs_ok, named_ports, &default);
            if !rows.is_empty() {
                classes
                    .entry(rows)
                    .or_default()
                    .extend(members.iter().map(|&m| self.universe[m as usize].numeric));
            }
        }
        let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> = classes
            .into_iter()
            .map(|(rows, mut members)| {
                members.sort();
                (members, rows)
            })
            .collect();
        classes.sort();
        assemble(subject_numeric, direction, default, classes)
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental recompilation.

/// A program with all its tables, kept up to date as endpoints change.
pub struct TableSet {
    pub program: Program,
    peers: TableCompiler,
    /// Per table, what applies to its subject; in the order of `tables`.
    inputs: Vec<TableInputs>,
    /// Sorted by (subject, direction), as [`all_tables`] returns them.
    pub tables: Vec<DecisionTable>,
}

impl TableSet {
    pub fn build(program: Program) -> TableSet {
        let peers = TableCompiler::new(&program);
        let (tables, inputs) = peers.all_with_inputs(&program, None).into_iter().unzip();
        TableSet {
            program,
            peers,
            inputs,
            tables,
        }
    }

    /// The current allocation, for [`crate::lower::allocate`]'s `previous`.
    pub fn allocation(&self) -> crate::lower::Allocation {
        self.program
            .identities
            .values()
            .filter(|i| i.kind == IdentityKind::Cluster)
            .map(|i| (i.labels.to_strings().join(";"), i.numeric.0))
            .collect()
    }

    /// One endpoint changed (its pods were relabelled, or its container ports changed): give it
    /// the identity of its new label set and update every table, without recompiling the rest.
    pub fn update_endpoint(
        &mut self,
        endpoint: EndpointRef,
        labels: LabelSet,
        named_ports: Vec<(String, Protocol, u16)>,
    ) {
        let old = self.program.endpoints[endpoint].identity;
        let existing = self
            .program
            .identities
            .iter()
            .find(|(_, i)| i.kind == IdentityKind::Cluster && i.labels == labels)
            .map(|(r, _)| r);
        let new = match existing {
            Some(r) => r,
            None => {
                let mut sets: BTreeSet<LabelSet> = self
                    .program
                    .identities
                    .values()
                    .filter(|i| i.kind == IdentityKind::Cluster)
                    .map(|i| i.labels.clone())
                    .collect();
                sets.insert(labels.clone());
                let numeric = crate::lower::allocate(&sets, &self.allocation())[&labels];
                self.program.identities.push(Identity {
                    numeric,
                    kind: IdentityKind::Cluster,
                    labels: labels.clone(),
                })
            }
        };
        {
            let e = &mut self.program.endpoints[endpoint];
            e.identity = new;
            e.labels = labels;
            e.named_ports = named_ports;
        }
        let has_pods =
            |p: &Program, r: IdentityRef| p.endpoints.values().any(|e| e.is_pod && e.identity == r);
        let old_numeric = self.program.identities[old].numeric;
        let new_numeric = self.program.identities[new].numeric;
        let old_gone = old != new && !has_pods(&self.program, old);
        self.peers.removed.remove(&new_numeric);
        if old_gone {
            self.peers.removed.insert(old_numeric);
        }

        // The universe: the new identity as a peer (with its endpoints' named ports), and the old
        // one dropped from every class when no pod carries it any more.
        let named = |p: &Program, r: IdentityRef| {
            let mut v: Vec<(String, Protocol, u16)> = p
                .endpoints
                .values()
                .filter(|e| e.is_pod && e.identity == r)
                .flat_map(|e| e.named_ports.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let pos = match self
            .peers
            .universe
            .iter()
            .position(|u| u.numeric == new_numeric)
        {
            Some(i) => {
                self.peers.universe[i].named_ports = named(&self.program, new);
                i as u32
            }
            None => {
                let id = &self.program.identities[new];
                let peer = PeerIdentity {
                    numeric: new_numeric,
                    labels: id.labels.clone(),
                    cidr: None,
                    fqdn: Vec::new(),
                    named_ports: named(&self.program, new),
                };
                let i = self.peers.universe.len() as u32;
                // Every rule's set gains the new position: work them all out first.
                self.peers.all_rule_peers(&self.program);
                for (set, rule) in self
                    .peers
                    .rule_peers
                    .iter_mut()
                    .zip(self.program.rules.values())
                {
                    if let Some(set) = set.get_mut() {
                        set.push(i, rule.peers.iter().any(|p| peer_matches(p, &peer)));
                    }
                }
                for (set, q) in self
                    .peers
                    .requirement_peers
                    .iter_mut()
                    .zip(&self.program.requirements)
                {
                    set.push(i, q.selector.matches(&peer.labels));
                }
                self.peers.universe.push(peer);
                // What was worked out over the old universe: positions, and the index and
                // selector matches later rule sets would be worked out with.
                self.peers.positions = Default::default();
                self.peers.index = UniverseIndex::new(&self.peers.universe);
                self.peers
                    .selector_memo
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                i
            }
        };
        if let Some(u) = self
            .peers
            .universe
            .iter_mut()
            .find(|u| u.numeric == old_numeric)
        {
            u.named_ports = named(&self.program, old);
        }

        // Tables of the two identities as subjects are recomputed whole.
        let mut i = 0;
        while i < self.tables.len() {
            if self.tables[i].subject == old_numeric || self.tables[i].subject == new_numeric {
                self.tables.remove(i);
                self.inputs.remove(i);
            } else {
                i += 1;
            }
        }
        let mut subjects = vec![(new, endpoint)];
        if !old_gone && old != new {
            let rep = self
                .program
                .endpoints
                .iter()
                .find(|(_, e)| e.is_pod && e.identity == old)
                .map(|(r, _)| r);
            subjects.extend(rep.map(|r| (old, r)));
        }
        for (_, ep) in subjects {
            let e = self.program.endpoints[ep].clone();
            for dir in [Direction::Ingress, Direction::Egress] {
                let inputs = TableInputs {
                    rules: self
                        .program
                        .rules
                        .iter()
                        .filter(|(_, r)| r.direction == dir && r.subject.selects(&e))
                        .map(|(r, _)| r)
                        .collect(),
                    reqs: self
                        .program
                        .requirements
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| q.direction == dir && q.subject.selects(&e))
                        .map(|(i, _)| i)
                        .collect(),
                    enforced: self
                        .program
                        .enforcement
                        .iter()
                        .any(|x| x.direction == dir && x.subject.selects(&e)),
                };
                let t = self.peers.table(&self.program, &e, dir, &inputs);
                let at = self
                    .tables
                    .partition_point(|x| (x.subject, x.direction) < (t.subject, t.direction));
                self.tables.insert(at, t);
                self.inputs.insert(at, inputs);
            }
        }

        // Every other table: the old identity leaves its class, the new one joins the class
        // with its rows.
        for (t, inputs) in self.tables.iter_mut().zip(&self.inputs) {
            if t.subject == new_numeric || (!old_gone && t.subject == old_numeric) {
                continue;
            }
            let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> = t
                .classes
                .iter()
                .enumerate()
                .map(|(ci, c)| {
                    (
                        c.members.clone(),
                        t.rows
                            .iter()
                            .filter(|r| r.class == ci as u32)
                            .map(|r| (r.protocol, r.ports, r.verdict.clone()))
                            .collect(),
                    )
                })
                .collect();
            for (members, _) in classes.iter_mut() {
                members.retain(|m| *m != new_numeric && !(old_gone && *m == old_numeric));
            }
            let peer = &self.peers.universe[pos as usize];
            let subject_ports = self
                .peers
                .universe
                .iter()
                .find(|u| u.numeric == t.subject)
                .map(|u| u.named_ports.clone())
                .unwrap_or_default();
            let named_ports = if t.direction == Direction::Ingress {
                &subject_ports
            } else {
                &peer.named_ports
            };
            let reqs_ok = inputs
                .reqs
                .iter()
                .all(|q| self.peers.requirement_peers[*q].contains(pos));
            let matching: Vec<Applicable> = inputs
                .rules
                .iter()
                .filter(|r| self.peers.rule_peers(&self.program, **r).contains(pos))
                .map(|&rule| Applicable {
                    rule,
                    r: &self.program.rules[rule],
                })
                .collect();
            let matching: Vec<&Applicable> = matching.iter().collect();
            let rows = rows_for(&matching, reqs_ok, named_ports, &t.default);
            if !rows.is_empty() {
                match classes.iter_mut().find(|(_, r)| *r == rows) {
                    Some((members, _)) => members.push(new_numeric),
                    None => classes.push((vec![new_numeric], rows)),
                }
            }
            *t = assemble(t.subject, t.direction, t.default.clone(), classes);
        }
    }
}

impl PeerSet {
    /// Adds position `i` (one past the last) with the given membership.
    fn push(&mut self, i: u32, member: bool) {
        if self.bits.len() * 64 <= i as usize {
            self.bits.push(0);
        }
        if member {
            self.members.push(i);
            self.bits[i as usize / 64] |= 1 << (i % 64);
        }
    }
}
