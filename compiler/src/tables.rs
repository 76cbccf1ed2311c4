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
    let mut out = Vec::new();
    for_each_range(terms, proto, named, |r| out.push(r));
    out
}

/// Calls `f` with each port range of `terms` that applies to `proto`, as [`ranges`] lists them.
fn for_each_range(
    terms: &[L4Term],
    proto: Protocol,
    named: &[(String, Protocol, u16)],
    mut f: impl FnMut(PortRange),
) {
    if terms.is_empty() {
        return f(PortRange {
            lo: 0,
            hi: proto.max_port(),
        });
    }
    let any = |ps: &[Protocol]| protocols_cover(ps, proto);
    for t in terms {
        match t {
            L4Term::Ports { protocols, range } if any(protocols) => f(*range),
            L4Term::Named { protocols, name } if any(protocols) => {
                for (_, _, num) in named.iter().filter(|(n, p, _)| n == name && *p == proto) {
                    f(PortRange::single(*num));
                }
            }
            L4Term::Icmp {
                protocol,
                icmp_type,
            } if *protocol == proto => f(PortRange::single(u16::from(*icmp_type))),
            _ => {}
        }
    }
}

/// A peer's rows before grouping: (protocol, ports, verdict).
type PeerRows = Vec<(Protocol, PortRange, TableVerdict)>;

struct Applicable<'a> {
    rule: RuleRef,
    r: &'a Rule,
}

/// A deny rule as [`TableCompiler::deny_rules_among`] gives it.
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
    // Per protocol: the ranges of the matching rules (by their place in `matching`) and the
    // cuts they make. Flat vectors, reused: this runs once per class of every table.
    let mut term_ranges: Vec<(usize, PortRange)> = Vec::new();
    let mut cuts: Vec<u32> = Vec::new();
    let mut refs: Vec<RuleRef> = Vec::new();
    for proto in Protocol::ALL {
        term_ranges.clear();
        for (i, a) in matching.iter().enumerate() {
            for_each_range(&a.r.l4, proto, named, |r| term_ranges.push((i, r)));
        }
        // No rule covers this protocol: every piece takes the default, and no row differs.
        if term_ranges.is_empty() {
            continue;
        }
        // Cut the port space at every boundary of every matching rule.
        cuts.clear();
        cuts.extend([0, u32::from(proto.max_port()) + 1]);
        for (_, r) in &term_ranges {
            cuts.extend([u32::from(r.lo), u32::from(r.hi) + 1]);
        }
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
            let covering = term_ranges
                .iter()
                .filter(|(_, r)| r.lo <= lo && hi <= r.hi)
                .map(|&(i, _)| matching[i]);
            let (mut deny, mut plain_allow) = (false, false);
            refs.clear();
            for a in covering {
                match a.r.action {
                    Action::Deny => deny = true,
                    Action::Allow if reqs_ok => {
                        plain_allow |= a.r.l7.is_none();
                        refs.push(a.rule);
                    }
                    Action::Allow => {}
                }
            }
            let verdict = if deny {
                TableVerdict::Deny
            } else if refs.is_empty() {
                default.clone()
            } else if plain_allow {
                TableVerdict::Allow
            } else {
                // A rule with several ranges covering this piece counts once.
                refs.sort_unstable();
                refs.dedup();
                TableVerdict::Proxy(refs.clone())
            };
            if verdict != *default {
                rows.push((proto, PortRange { lo, hi }, verdict));
            }
        }
    }
    // Merge adjacent ranges with equal verdicts.
    let mut merged: PeerRows = Vec::with_capacity(rows.len());
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
    let classes: Vec<(Vec<NumericIdentity>, PeerRows)> = classes
        .into_iter()
        .map(|(mut members, rows)| {
            members.sort_unstable();
            (members, rows)
        })
        .collect();
    assemble_sorted(subject, direction, default, classes)
}

/// [`assemble`] of classes whose members are sorted already. Classes are disjoint (a peer has
/// one set of rows), so ordering them by their first member orders them as a whole.
fn assemble_sorted(
    subject: NumericIdentity,
    direction: Direction,
    default: TableVerdict,
    classes: Vec<(Vec<NumericIdentity>, PeerRows)>,
) -> DecisionTable {
    let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> =
        classes.into_iter().filter(|(m, _)| !m.is_empty()).collect();
    // Indexing cannot fail: empty classes were just dropped.
    classes.sort_unstable_by_key(|(m, _)| m[0]);
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

/// Label sets with their index ([`crate::labels::LabelIndex`]): the rule subjects the table
/// compiler matches selectors against.
struct IndexedSets<'a> {
    sets: Vec<&'a LabelSet>,
    index: crate::labels::LabelIndex<'a>,
}

impl<'a> IndexedSets<'a> {
    fn new(sets: Vec<&'a LabelSet>) -> IndexedSets<'a> {
        let index = crate::labels::LabelIndex::new(sets.iter().copied());
        IndexedSets { sets, index }
    }

    /// Positions of the sets `sel` matches.
    fn select(&self, sel: &Selector) -> Vec<u32> {
        select_in(
            sel,
            |k, v| self.index.positions(k, v),
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
        let mut index = UniverseIndex::default();
        for (i, p) in universe.iter().enumerate() {
            index.add(i as u32, &p.labels);
        }
        index
    }

    /// Files position `i`, whose labels are `labels`, under its labels.
    fn add(&mut self, i: u32, labels: &LabelSet) {
        for (k, (_, v)) in &labels.0 {
            self.by_kv
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(i);
        }
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
use std::sync::{Arc, Mutex, OnceLock};

/// A set of peer positions in the universe, stored by density: a sorted list when that takes
/// fewer bytes than a bitmap over the universe (a rule naming an app or two), a bitmap otherwise
/// (`cluster`, a namespace's team). Kept as both, one per rule, they took 2 GiB for the 100,000
/// rules of the benchmark's 10× set; by density, and shared between rules naming the same peers
/// ([`TableCompiler::rule_peers`]), a few megabytes.
#[derive(Clone, Debug)]
enum PeerSet {
    /// Sorted, without repeats.
    Sparse(Vec<u32>),
    /// A bit per position, and how many are set.
    Dense { bits: Vec<u64>, len: usize },
}

impl PeerSet {
    fn new(mut members: Vec<u32>, n: usize) -> PeerSet {
        members.sort_unstable();
        members.dedup();
        // A list entry takes 32 bits, the bitmap one bit per position of the universe.
        if members.len() * 32 <= n {
            members.shrink_to_fit();
            return PeerSet::Sparse(members);
        }
        let mut bits = vec![0u64; n.div_ceil(64)];
        for &m in &members {
            bits[m as usize / 64] |= 1 << (m % 64);
        }
        PeerSet::Dense {
            bits,
            len: members.len(),
        }
    }

    fn len(&self) -> usize {
        match self {
            PeerSet::Sparse(m) => m.len(),
            PeerSet::Dense { len, .. } => *len,
        }
    }

    fn contains(&self, i: u32) -> bool {
        match self {
            PeerSet::Sparse(m) => m.binary_search(&i).is_ok(),
            PeerSet::Dense { bits, .. } => bits
                .get(i as usize / 64)
                .is_some_and(|w| w >> (i % 64) & 1 == 1),
        }
    }

    /// The members, ascending.
    fn iter(&self) -> Members<'_> {
        match self {
            PeerSet::Sparse(m) => Members::Sparse(m.iter()),
            PeerSet::Dense { bits, .. } => Members::Dense {
                bits,
                next: 0,
                base: 0,
                word: 0,
            },
        }
    }

    /// Sets the bits of the members in `bits` (a bitmap over the universe).
    fn add_to(&self, bits: &mut [u64]) {
        match self {
            PeerSet::Sparse(m) => {
                for &i in m {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
            }
            PeerSet::Dense { bits: own, .. } => {
                for (b, o) in bits.iter_mut().zip(own) {
                    *b |= o;
                }
            }
        }
    }

    /// Adds position `i` (one past every position so far) with the given membership.
    fn push(&mut self, i: u32, member: bool) {
        match self {
            PeerSet::Sparse(m) => {
                if member {
                    m.push(i);
                }
            }
            PeerSet::Dense { bits, len } => {
                let word = i as usize / 64;
                if bits.len() <= word {
                    bits.resize(word + 1, 0);
                }
                if member {
                    bits[word] |= 1 << (i % 64);
                    *len += 1;
                }
            }
        }
    }
}

/// The members of a [`PeerSet`], ascending.
enum Members<'a> {
    Sparse(std::slice::Iter<'a, u32>),
    Dense {
        bits: &'a [u64],
        /// The next word to load, the position of the current word's bit 0, and the bits of
        /// the current word not yet returned.
        next: usize,
        base: u32,
        word: u64,
    },
}

impl Iterator for Members<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Members::Sparse(it) => it.next().copied(),
            Members::Dense {
                bits,
                next,
                base,
                word,
            } => loop {
                if *word != 0 {
                    let b = word.trailing_zeros();
                    *word &= *word - 1;
                    return Some(*base + b);
                }
                *word = *bits.get(*next)?;
                *base = (*next * 64) as u32;
                *next += 1;
            },
        }
    }
}

/// Everything shared by the tables of one program: the peer universe and, for every rule and
/// requirement, the set of peers it matches.
pub struct TableCompiler {
    pub universe: Vec<PeerIdentity>,
    /// Per rule, the peers it matches: worked out when a table first needs the rule, so a
    /// node's loader, which builds the tables of its own few endpoints, pays only for the rules
    /// that apply to them (issue 12).
    rule_peers: Vec<OnceLock<Arc<PeerSet>>>,
    /// Peer sets by the peers they were worked out from: rules naming the same peers (every
    /// rule allowing `cluster`, every deny of one namespace team) share one set.
    interned: Mutex<Interned>,
    /// The interned peer lists indexed by their selectors' requirements, for finding the sets
    /// a new or changed peer belongs to ([`TableSet`]); made when first needed.
    list_index: Option<RequirementIndex>,
    /// For working out `rule_peers`: the universe's labels indexed, and each selector's matches
    /// (many rules name the same selector: an entity, a namespace).
    index: UniverseIndex,
    selector_memo: Mutex<HashMap<Selector, Arc<[u32]>>>,
    positions: OnceLock<HashMap<NumericIdentity, usize>>,
    requirement_peers: Vec<PeerSet>,
    /// By position: identities that no longer exist (their positions stay, so the peer sets
    /// stay valid). Empty until a [`TableSet`] removes one.
    removed: Vec<bool>,
}

/// The distinct peer lists of a program's rules, each with its set: `ids` by list, `sets` by
/// id.
#[derive(Default)]
struct Interned {
    ids: FxHashMap<Vec<Peer>, u32>,
    sets: Vec<InternedSet>,
}

struct InternedSet {
    set: Arc<PeerSet>,
    /// The rules naming this list, never empty.
    rules: Vec<RuleRef>,
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
            rule_peers: program.rules.keys().map(|_| OnceLock::new()).collect(),
            interned: Default::default(),
            list_index: None,
            index,
            selector_memo: Default::default(),
            positions: Default::default(),
            universe,
            requirement_peers,
            removed: Vec::new(),
        }
    }

    /// The peers rule `r` of `program` (the program this compiler was built for) matches.
    fn rule_peers(&self, program: &Program, r: RuleRef) -> &PeerSet {
        self.rule_peers[r.index()].get_or_init(|| {
            let peers = &program.rules[r].peers;
            let mut interned = self.interned.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(&id) = interned.ids.get(peers.as_slice()) {
                let entry = &mut interned.sets[id as usize];
                entry.rules.push(r);
                return entry.set.clone();
            }
            let set = Arc::new(self.peer_set(peers));
            let id = interned.sets.len() as u32;
            interned.ids.insert(peers.clone(), id);
            interned.sets.push(InternedSet {
                set: set.clone(),
                rules: vec![r],
            });
            set
        })
    }

    /// The interned sets (by id) whose peer lists match `peer`: every set `peer`'s position
    /// belongs to, when its position is in the universe. Needs every rule's set worked out.
    fn lists_matching(&mut self, program: &Program, peer: &PeerIdentity) -> Vec<u32> {
        let interned = self.interned.get_mut().unwrap_or_else(|p| p.into_inner());
        // A set is interned for the rule that first needs it, so `rules[0]` exists.
        let lists = |id: u32| &program.rules[interned.sets[id as usize].rules[0]].peers;
        let index = self.list_index.get_or_insert_with(|| {
            // A list is filed under each of its selectors; a list with a peer no label
            // requirement narrows (the wildcard, CIDR, FQDN) is checked every time.
            let mut entries = Vec::new();
            for id in 0..interned.sets.len() as u32 {
                for p in lists(id) {
                    match p {
                        Peer::Selector(s) => entries.push((id, Some(s))),
                        Peer::Nodes(_) => {}
                        Peer::Any | Peer::Cidr { .. } | Peer::Fqdn(_) => entries.push((id, None)),
                    }
                }
            }
            RequirementIndex::new(entries)
        });
        index
            .candidates(&peer.labels)
            .into_iter()
            .filter(|&id| lists(id).iter().any(|p| peer_matches(p, peer)))
            .collect()
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
                        let m: Arc<[u32]> = self.index.select(s, &self.universe).into();
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

    fn is_removed(&self, i: u32) -> bool {
        self.removed.get(i as usize).copied().unwrap_or(false)
    }

    /// Adds `peer` to the universe, after every position so far, and to the peer sets of the
    /// rules and requirements that match it. Its position.
    fn push_peer(&mut self, program: &Program, peer: PeerIdentity) -> u32 {
        let i = self.universe.len() as u32;
        // Every rule's set must hold the new position: work them all out first.
        self.all_rule_peers(program);
        // Only the sets the peer belongs to change: a set without it answers `contains` for a
        // position past its end with false already. Each grows once, and every rule holding it
        // takes the grown one.
        for id in self.lists_matching(program, &peer) {
            let interned = self.interned.get_mut().unwrap_or_else(|p| p.into_inner());
            let entry = &mut interned.sets[id as usize];
            let mut bigger = PeerSet::clone(&entry.set);
            bigger.push(i, true);
            entry.set = Arc::new(bigger);
            for r in &entry.rules {
                if let Some(set) = self.rule_peers[r.index()].get_mut() {
                    *set = entry.set.clone();
                }
            }
        }
        for (set, q) in self.requirement_peers.iter_mut().zip(&program.requirements) {
            set.push(i, q.selector.matches(&peer.labels));
        }
        self.index.add(i, &peer.labels);
        // Selector matches were worked out over the old universe (every rule's set is known
        // by now, so none will be needed again until the next program).
        self.selector_memo
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(positions) = self.positions.get_mut() {
            positions.insert(peer.numeric, i as usize);
        }
        if !self.removed.is_empty() {
            self.removed.push(false);
        }
        self.universe.push(peer);
        i
    }

    /// Marks position `i` as removed or not.
    fn set_removed(&mut self, i: u32, removed: bool) {
        if self.removed.len() < self.universe.len() {
            if !removed {
                return;
            }
            self.removed.resize(self.universe.len(), false);
        }
        self.removed[i as usize] = removed;
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

    /// The named ports of `subject` (empty for an identity outside the universe).
    fn named_ports_of(&self, subject: NumericIdentity) -> &[(String, Protocol, u16)] {
        self.positions()
            .get(&subject)
            .map(|&i| self.universe[i].named_ports.as_slice())
            .unwrap_or_default()
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
                    .iter()
                    .map(|i| self.universe[i as usize].numeric)
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
        let index = IndexedSets::new(reps.iter().map(|e| &e.labels).collect());
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
        let mut scratch = Vec::new();
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
                out.push((self.table(p, e, dir, &inputs, &mut scratch), inputs));
            }
        }
        out
    }

    /// The rows of the peer at `rep` in a table of `subject` with `inputs` (whose rules' sets
    /// are `sets`).
    #[allow(clippy::too_many_arguments)]
    fn peer_rows(
        &self,
        program: &Program,
        subject: NumericIdentity,
        direction: Direction,
        inputs: &TableInputs,
        sets: &[&PeerSet],
        default: &TableVerdict,
        rep: u32,
    ) -> PeerRows {
        let named_ports = if direction == Direction::Ingress {
            self.named_ports_of(subject)
        } else {
            &self.universe[rep as usize].named_ports
        };
        let reqs_ok = inputs
            .reqs
            .iter()
            .all(|q| self.requirement_peers[*q].contains(rep));
        let matching: Vec<Applicable> = inputs
            .rules
            .iter()
            .zip(sets)
            .filter(|(_, set)| set.contains(rep))
            .map(|(&rule, _)| Applicable {
                rule,
                r: &program.rules[rule],
            })
            .collect();
        let matching: Vec<&Applicable> = matching.iter().collect();
        rows_for(&matching, reqs_ok, named_ports, default)
    }

    /// The table of `subject` in `direction`. `group` is scratch space: all zeros, of any
    /// length, and left all zeros.
    fn table(
        &self,
        program: &Program,
        subject: &Endpoint,
        direction: Direction,
        inputs: &TableInputs,
        group: &mut Vec<u32>,
    ) -> DecisionTable {
        let p = program;
        let n = self.universe.len();
        let default = if inputs.enforced {
            TableVerdict::Deny
        } else {
            TableVerdict::Allow
        };
        let subject_numeric = p.identities[subject.identity].numeric;
        let sets: Vec<&PeerSet> = inputs
            .rules
            .iter()
            .map(|r| self.rule_peers(p, *r))
            .collect();
        // Only peers some rule matches can have rows (a row is a port range some rule covers),
        // so only they are partitioned: a table costs what its rules' sets hold, not the
        // universe (which at 20,000 identities and 40,000 tables was most of the time).
        let candidates: Vec<u32> = if sets.iter().any(|s| s.len() == n) {
            (0..n as u32).collect()
        } else if sets.iter().all(|s| matches!(s, PeerSet::Sparse(_)))
            && sets.iter().map(|s| s.len()).sum::<usize>() <= n / 64
        {
            let mut all: Vec<u32> = sets.iter().flat_map(|s| s.iter()).collect();
            all.sort_unstable();
            all.dedup();
            all
        } else {
            let mut union = vec![0u64; n.div_ceil(64)];
            for s in &sets {
                s.add_to(&mut union);
            }
            PeerSet::Dense {
                bits: union,
                len: 0,
            }
            .iter()
            .collect()
        };
        // Partition the candidates: peers in one group are matched by exactly the same rules
        // and requirements (and, on egress with named ports, declare the same named ports).
        if group.len() < n {
            group.resize(n, 0);
        }
        // Splitting by a set moves its members of group `g` to a child group, one per `g` and
        // set: `child[g]`, valid while `stamp[g]` is that set's number (arrays by group, not a
        // map: this runs for every member of every set of every table). Rules naming the same
        // peers share a set, which splits nothing the second time, so each set counts once.
        let mut child: Vec<u32> = vec![0];
        let mut stamp: Vec<u32> = vec![0];
        let mut refine = |group: &mut [u32], k: u32, m: u32| {
            let g = group[m as usize] as usize;
            if stamp[g] != k {
                stamp[g] = k;
                child[g] = child.len() as u32;
                child.push(0);
                stamp.push(0);
            }
            group[m as usize] = child[g];
        };
        let mut distinct: Vec<*const PeerSet> = Vec::with_capacity(sets.len());
        let mut k = 0;
        for set in sets.iter().filter(|s| s.len() != n) {
            let ptr: *const PeerSet = *set;
            if distinct.contains(&ptr) {
                continue;
            }
            distinct.push(ptr);
            k += 1;
            for m in set.iter() {
                refine(group, k, m);
            }
        }
        for q in &inputs.reqs {
            let set = &self.requirement_peers[*q];
            if set.len() == n {
                continue;
            }
            k += 1;
            for &m in candidates.iter().filter(|&&m| set.contains(m)) {
                refine(group, k, m);
            }
        }
        let groups = child.len();
        // Every position a set or requirement touched is a candidate: taking their groups
        // leaves the scratch all zeros again.
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); groups];
        for &m in &candidates {
            let g = std::mem::take(&mut group[m as usize]);
            if !self.is_removed(m) {
                buckets[g as usize].push(m);
            }
        }
        let named = direction == Direction::Egress
            && inputs.rules.iter().any(|r| {
                p.rules[*r]
                    .l4
                    .iter()
                    .any(|t| matches!(t, L4Term::Named { .. }))
            });
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
        let mut classes: BTreeMap<PeerRows, Vec<NumericIdentity>> = BTreeMap::new();
        for members in members_of {
            let rows = self.peer_rows(
                p,
                subject_numeric,
                direction,
                inputs,
                &sets,
                &default,
                members[0],
            );
            if !rows.is_empty() {
                classes
                    .entry(rows)
                    .or_default()
                    .extend(members.iter().map(|&m| self.universe[m as usize].numeric));
            }
        }
        let classes: Vec<(Vec<NumericIdentity>, PeerRows)> = classes
            .into_iter()
            .map(|(rows, members)| (members, rows))
            .collect();
        assemble(subject_numeric, direction, default, classes)
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental recompilation.

/// Entries (rules' subjects, peer lists) indexed by label requirements, for asking which of
/// them may match one label set without matching every one: an entry with a selector is filed
/// under one of its single-value `In` requirements (a label set it matches must carry that
/// label), the one fewest entries share; an entry without one is a candidate for every label
/// set. Callers check the candidates.
struct RequirementIndex {
    by_kv: FxHashMap<String, FxHashMap<String, Vec<u32>>>,
    rest: Vec<u32>,
}

impl RequirementIndex {
    /// Files each `(id, selector)`; an id may come several times (a list of several peers).
    fn new(entries: Vec<(u32, Option<&Selector>)>) -> RequirementIndex {
        fn keys(s: &Selector) -> Vec<(&str, &str)> {
            s.requirements
                .iter()
                .filter(|(_, op, values)| *op == labels::Operator::In && values.len() == 1)
                .map(|(k, _, values)| (labels::split_source(k).1, values[0].as_str()))
                .collect()
        }
        let mut count: FxHashMap<(&str, &str), usize> = FxHashMap::default();
        for (_, s) in &entries {
            for kv in s.map(keys).unwrap_or_default() {
                *count.entry(kv).or_default() += 1;
            }
        }
        let mut index = RequirementIndex {
            by_kv: FxHashMap::default(),
            rest: Vec::new(),
        };
        for (id, s) in &entries {
            match s.and_then(|s| keys(s).into_iter().min_by_key(|kv| count[kv])) {
                Some((k, v)) => index
                    .by_kv
                    .entry(k.to_string())
                    .or_default()
                    .entry(v.to_string())
                    .or_default()
                    .push(*id),
                None => index.rest.push(*id),
            }
        }
        index
    }

    /// The ids that may match `labels`, ascending, without repeats.
    fn candidates(&self, labels: &LabelSet) -> Vec<u32> {
        let mut out: Vec<u32> = labels
            .0
            .iter()
            .filter_map(|(k, (_, v))| self.by_kv.get(k.as_str())?.get(v.as_str()))
            .flatten()
            .chain(&self.rest)
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Which entries of a list of subjects (the rules, enforcement or requirements of a program)
/// select a pod: the candidates of a [`RequirementIndex`] over their endpoint selectors (node
/// subjects never select a pod), checked.
struct SubjectIndex(RequirementIndex);

impl SubjectIndex {
    fn new<'a>(subjects: impl Iterator<Item = &'a Subject>) -> SubjectIndex {
        let entries = subjects
            .enumerate()
            .filter_map(|(i, s)| match s {
                Subject::Endpoints(sel) => Some((i as u32, Some(sel))),
                Subject::Nodes(_) => None,
            })
            .collect();
        SubjectIndex(RequirementIndex::new(entries))
    }

    /// Positions of the subjects (`subject(i)`) that select the pod `e`, ascending.
    fn select<'a>(&self, e: &Endpoint, subject: impl Fn(u32) -> &'a Subject) -> Vec<u32> {
        let mut out = self.0.candidates(&e.labels);
        out.retain(|&i| subject(i).selects(e));
        out
    }
}

/// A program with all its tables, kept up to date as endpoints change.
///
/// When an endpoint moves from identity `old` to `new`, the tables of those two subjects are
/// compiled again whole. In every other table only those two peers can change: the others keep
/// their labels and named ports, and so the rules matching them and their rows. A peer's rows
/// come from the rules matching it, so only tables with a rule matching `old` or `new` can hold
/// either; in those, the peer is taken out of its class and put into the class of its rows
/// (rows worked out again only where they can differ: a new or revived identity, or one whose
/// named ports changed). Subjects and peers are found through indexes, not by matching every
/// rule: a relabel costs the tables it touches, not the program.
pub struct TableSet {
    pub program: Program,
    peers: TableCompiler,
    /// Per table, what applies to its subject; in the order of `tables`.
    inputs: Vec<TableInputs>,
    /// Sorted by (subject, direction), as [`all_tables`] returns them.
    pub tables: Vec<DecisionTable>,
    /// The subjects of the program's rules, enforcement and requirements, indexed.
    rule_subjects: SubjectIndex,
    enforcement_subjects: SubjectIndex,
    requirement_subjects: SubjectIndex,
    /// Cluster identities by their labels.
    by_labels: HashMap<LabelSet, IdentityRef>,
    /// Zeros, for [`TableCompiler::table`].
    scratch: Vec<u32>,
}

impl TableSet {
    pub fn build(program: Program) -> TableSet {
        let peers = TableCompiler::new(&program);
        let (tables, inputs) = peers.all_with_inputs(&program, None).into_iter().unzip();
        // Rules no table uses yet may match the identity of a later relabel.
        peers.all_rule_peers(&program);
        let rule_subjects = SubjectIndex::new(program.rules.values().map(|r| &r.subject));
        let enforcement_subjects =
            SubjectIndex::new(program.enforcement.iter().map(|e| &e.subject));
        let requirement_subjects =
            SubjectIndex::new(program.requirements.iter().map(|q| &q.subject));
        let by_labels = program
            .identities
            .iter()
            .filter(|(_, i)| i.kind == IdentityKind::Cluster)
            .map(|(r, i)| (i.labels.clone(), r))
            .collect();
        TableSet {
            program,
            peers,
            inputs,
            tables,
            rule_subjects,
            enforcement_subjects,
            requirement_subjects,
            by_labels,
            scratch: Vec::new(),
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

    /// What applies to pod `e` as a subject in `direction`.
    fn inputs_of(&self, e: &Endpoint, dir: Direction) -> TableInputs {
        let p = &self.program;
        TableInputs {
            rules: self
                .rule_subjects
                .select(e, |i| &p.rules[RuleRef::new(i as usize)].subject)
                .into_iter()
                .map(|i| RuleRef::new(i as usize))
                .filter(|r| p.rules[*r].direction == dir)
                .collect(),
            reqs: self
                .requirement_subjects
                .select(e, |i| &p.requirements[i as usize].subject)
                .into_iter()
                .map(|i| i as usize)
                .filter(|q| p.requirements[*q].direction == dir)
                .collect(),
            enforced: self
                .enforcement_subjects
                .select(e, |i| &p.enforcement[i as usize].subject)
                .into_iter()
                .any(|i| p.enforcement[i as usize].direction == dir),
        }
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
        let new = match self.by_labels.get(&labels) {
            Some(&r) => r,
            None => {
                // What `lower::allocate` gives a new label set when given the current
                // allocation as `previous`: the first number from its hash that no cluster
                // identity has.
                let in_use: std::collections::HashSet<u32> = self
                    .program
                    .identities
                    .values()
                    .filter(|i| i.kind == IdentityKind::Cluster)
                    .map(|i| i.numeric.0)
                    .collect();
                let numeric = crate::lower::first_free(&labels, |n| in_use.contains(&n))
                    .expect("fewer label sets than identity numbers");
                let r = self.program.identities.push(Identity {
                    numeric,
                    kind: IdentityKind::Cluster,
                    labels: labels.clone(),
                });
                self.by_labels.insert(labels.clone(), r);
                r
            }
        };
        {
            let e = &mut self.program.endpoints[endpoint];
            e.identity = new;
            e.labels = labels;
            e.named_ports = named_ports;
        }
        // One walk over the endpoints: who still carries `old`, and the named ports of both.
        let mut old_rep = None;
        let (mut old_ports, mut new_ports) = (Vec::new(), Vec::new());
        for (r, e) in self.program.endpoints.iter().filter(|(_, e)| e.is_pod) {
            if e.identity == old && old != new {
                old_rep.get_or_insert(r);
                old_ports.extend(e.named_ports.iter().cloned());
            }
            if e.identity == new {
                new_ports.extend(e.named_ports.iter().cloned());
            }
        }
        for v in [&mut old_ports, &mut new_ports] {
            v.sort();
            v.dedup();
        }
        let old_numeric = self.program.identities[old].numeric;
        let new_numeric = self.program.identities[new].numeric;
        let old_gone = old != new && old_rep.is_none();

        // The universe: the new identity as a peer (with its endpoints' named ports), and the
        // old one marked removed when no pod carries it any more. Which of the two other
        // tables must place again: `new` unless it was there already with the same ports, and
        // `old` when it stays with other ports.
        let mut place: Vec<u32> = Vec::new();
        match self.peers.positions().get(&new_numeric).copied() {
            Some(i) => {
                let was_live = !self.peers.is_removed(i as u32);
                if !was_live || self.peers.universe[i].named_ports != new_ports {
                    place.push(i as u32);
                }
                self.peers.universe[i].named_ports = new_ports;
                self.peers.set_removed(i as u32, false);
            }
            None => {
                let peer = PeerIdentity {
                    numeric: new_numeric,
                    labels: self.program.identities[new].labels.clone(),
                    cidr: None,
                    fqdn: Vec::new(),
                    named_ports: new_ports,
                };
                let i = self.peers.push_peer(&self.program, peer);
                place.push(i);
            }
        }
        let old_pos = self.peers.positions().get(&old_numeric).map(|&i| i as u32);
        if let Some(i) = old_pos.filter(|_| old != new) {
            if old_gone {
                self.peers.set_removed(i, true);
            } else if self.peers.universe[i as usize].named_ports != old_ports {
                self.peers.universe[i as usize].named_ports = old_ports;
                place.push(i);
            }
        }

        // Tables of the two identities as subjects are compiled again whole. They sit side by
        // side in `tables` (sorted by subject, then direction): each pair is replaced in place,
        // dropped (an identity gone) or inserted (a new one), which moves the rest at most
        // once per identity.
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut subjects = vec![(new_numeric, Some(endpoint))];
        if old != new {
            subjects.push((old_numeric, old_rep));
        }
        for (numeric, rep) in subjects {
            let mut fresh = Vec::new();
            let mut fresh_inputs = Vec::new();
            if let Some(ep) = rep {
                let e = &self.program.endpoints[ep];
                for dir in [Direction::Ingress, Direction::Egress] {
                    let inputs = self.inputs_of(e, dir);
                    fresh.push(
                        self.peers
                            .table(&self.program, e, dir, &inputs, &mut scratch),
                    );
                    fresh_inputs.push(inputs);
                }
            }
            let from = self.tables.partition_point(|x| x.subject < numeric);
            let to = self.tables.partition_point(|x| x.subject <= numeric);
            self.tables.splice(from..to, fresh);
            self.inputs.splice(from..to, fresh_inputs);
        }
        self.scratch = scratch;

        // Every other table: only tables with a rule matching `old` or `new` can hold either,
        // the rules of the interned sets holding their positions.
        let mut touched: Vec<u32> = place.clone();
        if old_gone {
            touched.extend(old_pos);
        }
        if touched.is_empty() {
            return;
        }
        let mut affected = vec![false; self.program.rules.len()];
        for &i in &touched {
            let peer = self.peers.universe[i as usize].clone();
            for id in self.peers.lists_matching(&self.program, &peer) {
                let interned = self
                    .peers
                    .interned
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner());
                for r in &interned.sets[id as usize].rules {
                    affected[r.index()] = true;
                }
            }
        }
        let p = &self.program;
        let peers = &self.peers;
        let moved: Vec<NumericIdentity> = touched
            .iter()
            .map(|&i| peers.universe[i as usize].numeric)
            .collect();
        for (t, inputs) in self.tables.iter_mut().zip(&self.inputs) {
            if t.subject == new_numeric
                || t.subject == old_numeric
                || !inputs.rules.iter().any(|r| affected[r.index()])
            {
                continue;
            }
            let sets: Vec<&PeerSet> = inputs
                .rules
                .iter()
                .map(|r| peers.rule_peers(p, *r))
                .collect();
            let placed: Vec<(NumericIdentity, PeerRows)> = place
                .iter()
                .map(|&i| {
                    let rows =
                        peers.peer_rows(p, t.subject, t.direction, inputs, &sets, &t.default, i);
                    (peers.universe[i as usize].numeric, rows)
                })
                .collect();
            replace_peers(t, &moved, placed);
        }
    }
}

/// The rows of class `c` of `t` (rows are grouped by class, in class order).
fn class_rows(t: &DecisionTable, c: usize) -> &[TableRow] {
    let from = t.rows.partition_point(|r| (r.class as usize) < c);
    let to = t.rows.partition_point(|r| (r.class as usize) <= c);
    &t.rows[from..to]
}

/// Whether `rows` are the rows of a class.
fn same_rows(class: &[TableRow], rows: &PeerRows) -> bool {
    class.len() == rows.len()
        && class
            .iter()
            .zip(rows)
            .all(|(a, (protocol, ports, verdict))| {
                a.protocol == *protocol && a.ports == *ports && a.verdict == *verdict
            })
}

/// Takes `remove` out of `t`'s classes, then puts each peer of `placed` into the class with its
/// rows (a new class when none has them; none when its rows are empty), keeping `t` canonical.
///
/// The common case, every class keeping members and no new class, moves members within their
/// lists and leaves the rows alone (a relabel touches thousands of tables whose classes hold
/// thousands of members); anything else rebuilds the table from its classes.
fn replace_peers(
    t: &mut DecisionTable,
    remove: &[NumericIdentity],
    placed: Vec<(NumericIdentity, PeerRows)>,
) {
    let find = |t: &DecisionTable, peer: &NumericIdentity| {
        t.classes
            .iter()
            .position(|c| c.members.binary_search(peer).is_ok())
    };
    // Plan: where each peer leaves and where it goes.
    let mut size: Vec<isize> = t.classes.iter().map(|c| c.members.len() as isize).collect();
    let mut leaves = Vec::with_capacity(remove.len());
    for peer in remove {
        if let Some(c) = find(t, peer) {
            size[c] -= 1;
            leaves.push((c, *peer));
        }
    }
    let mut goes = Vec::with_capacity(placed.len());
    let mut in_place = true;
    for (peer, rows) in &placed {
        if rows.is_empty() {
            continue;
        }
        match (0..t.classes.len()).find(|&c| same_rows(class_rows(t, c), rows)) {
            Some(c) => {
                size[c] += 1;
                goes.push((c, *peer));
            }
            None => in_place = false,
        }
    }
    if in_place && size.iter().all(|&n| n > 0) {
        for (c, peer) in leaves {
            let members = &mut t.classes[c].members;
            if let Ok(k) = members.binary_search(&peer) {
                members.remove(k);
            }
        }
        for (c, peer) in goes {
            let members = &mut t.classes[c].members;
            if let Err(k) = members.binary_search(&peer) {
                members.insert(k, peer);
            }
        }
        // Classes are ordered by their first members, which a move can change. (Every class
        // kept a member, so indexing cannot fail.)
        if t.classes
            .windows(2)
            .all(|w| w[0].members[0] < w[1].members[0])
        {
            return;
        }
        reassemble(t, &[], Vec::new());
        return;
    }
    reassemble(t, remove, placed);
}

/// [`replace_peers`] by taking `t` apart into classes and assembling it again.
fn reassemble(
    t: &mut DecisionTable,
    remove: &[NumericIdentity],
    placed: Vec<(NumericIdentity, PeerRows)>,
) {
    let mut classes: Vec<(Vec<NumericIdentity>, PeerRows)> = std::mem::take(&mut t.classes)
        .into_iter()
        .map(|c| (c.members, Vec::new()))
        .collect();
    for r in std::mem::take(&mut t.rows) {
        classes[r.class as usize]
            .1
            .push((r.protocol, r.ports, r.verdict));
    }
    for peer in remove {
        for (members, _) in classes.iter_mut() {
            if let Ok(k) = members.binary_search(peer) {
                members.remove(k);
                break;
            }
        }
    }
    for (peer, rows) in placed {
        if rows.is_empty() {
            continue;
        }
        match classes.iter_mut().find(|(_, r)| *r == rows) {
            Some((members, _)) => {
                if let Err(k) = members.binary_search(&peer) {
                    members.insert(k, peer);
                }
            }
            None => classes.push((vec![peer], rows)),
        }
    }
    let default = std::mem::replace(&mut t.default, TableVerdict::Allow);
    *t = assemble_sorted(t.subject, t.direction, default, classes);
}
