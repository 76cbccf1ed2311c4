//! `cnpc diff`: which flows a policy change flips.
//!
//! Both versions are lowered over the same cluster snapshot, so identities agree. For every
//! pair of peers (at least one a pod identity) and every protocol, the port space is cut at every
//! row boundary of the four tables that decide the pair (source egress and destination ingress,
//! old and new); within a piece every table is constant, so one representative flow per piece,
//! judged by the reference evaluator in both versions, decides the whole piece. The result is
//! exactly the set of flows whose evaluator verdict differs, grouped into port ranges.

use crate::eval::{evaluate, Decision, Flow, Party, Verdict};
use crate::tables::{decision_table, peer_universe_of, PeerIdentity, FIRST_LOCAL_IDENTITY};
use cnpc_ir::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What happens to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Allowed,
    /// Allowed at L3/L4 and filtered by L7 rules.
    Proxied,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Proxied => "allowed (L7)",
            Outcome::Denied => "denied",
        }
    }

    pub fn of(v: &Verdict) -> Outcome {
        if !v.allowed {
            Outcome::Denied
        } else if v.l7().is_some() {
            Outcome::Proxied
        } else {
            Outcome::Allowed
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub protocol: Protocol,
    pub ports: PortRange,
    pub before: Outcome,
    pub after: Outcome,
    /// Policies whose rules decided the flow in either version.
    pub policies: Vec<String>,
}

/// A party standing for a peer identity, with a name for reports; `None` when no flow can have
/// this identity (a CIDR prefix entirely covered by longer ones).
fn representative(
    program: &Program,
    universe: &[PeerIdentity],
    p: &PeerIdentity,
) -> Option<(String, Party)> {
    if let (Some(net), true) = (p.cidr, p.fqdn.is_empty()) {
        let lpm = |ip: IpAddr| {
            universe
                .iter()
                .filter(|q| q.fqdn.is_empty() && q.cidr.is_some_and(|c| c.contains(&ip)))
                .max_by_key(|q| q.cidr.map(|c| c.prefix_len()))
                .map(|q| q.numeric)
        };
        let candidates = [net.network(), net.broadcast(), midpoint(net)];
        let ip = candidates
            .into_iter()
            .find(|ip| lpm(*ip) == Some(p.numeric))?;
        return Some((
            net.to_string(),
            world_party(program, format!("{net}"), ip, None),
        ));
    }
    if let Some(m) = p
        .fqdn
        .first()
        .filter(|_| p.fqdn.len() == 1 && p.cidr.is_none())
    {
        let name = match m {
            DnsMatcher::Name(n) => n.clone(),
            DnsMatcher::Pattern(pat) if pat == "*" => "any.example".to_string(),
            DnsMatcher::Pattern(pat) => pat.replace('*', "x"),
        };
        // An address in TEST-NET-1 (RFC 5737), standing for whatever DNS returned.
        let ip: IpAddr = [192, 0, 2, 1].into();
        return Some((
            format!("fqdn:{name}"),
            world_party(program, name.clone(), ip, Some(name)),
        ));
    }
    let r = program.identity_by_numeric(p.numeric)?;
    let id = &program.identities[r];
    if let IdentityKind::Reserved(res) = id.kind {
        if res == Reserved::World {
            let ip: IpAddr = [203, 0, 113, 1].into();
            return Some((
                "world".into(),
                world_party(program, "world".into(), ip, None),
            ));
        }
        let party = Party {
            name: res.name().into(),
            labels: id.labels.clone(),
            identity: Some(id.numeric),
            ip: None,
            endpoint: None,
            fqdn: None,
            world: false,
        };
        return Some((res.name().into(), party));
    }
    let mut eps: Vec<&Endpoint> = program
        .endpoints
        .values()
        .filter(|e| e.is_pod && e.identity == r)
        .collect();
    eps.sort_by(|a, b| a.name.cmp(&b.name));
    let e = eps.first()?;
    let party = Party {
        name: e.name.clone(),
        labels: id.labels.clone(),
        identity: Some(id.numeric),
        ip: e.ips.first().copied(),
        endpoint: Some((*e).clone()),
        fqdn: None,
        world: false,
    };
    Some((e.workload.clone(), party))
}

fn midpoint(net: IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let lo = u32::from(n.network());
            let hi = u32::from(n.broadcast());
            IpAddr::V4((lo + (hi - lo) / 2 + 1).min(hi).into())
        }
        IpNet::V6(n) => IpAddr::V6(n.network()),
    }
}

fn world_party(program: &Program, name: String, ip: IpAddr, fqdn: Option<String>) -> Party {
    let id = &program.identities[program.reserved(Reserved::World)];
    Party {
        name,
        labels: id.labels.clone(),
        identity: Some(id.numeric),
        ip: Some(ip),
        endpoint: None,
        fqdn,
        world: true,
    }
}

fn origins(d: &Decision, out: &mut BTreeSet<String>) {
    out.extend(d.rules.iter().map(|r| r.origin.policy.clone()));
    if let Some(l7) = &d.l7 {
        out.extend(l7.rules.iter().map(|r| r.origin.policy.clone()));
    }
}

/// The flow space of one or more versions of a policy set over the same cluster: a named
/// representative party per peer identity, and each pod party's decision tables in every version.
/// `cnpc diff` and `cnpc graph` both walk it, so they name peers and cut ports alike.
pub(crate) struct FlowSpace {
    pub(crate) universe: Vec<PeerIdentity>,
    /// (report name, party), in universe order.
    pub(crate) parties: Vec<(String, Party)>,
    /// The universe entry each party stands for.
    pub(crate) peers: Vec<usize>,
    /// Per party: its egress table in every version, then its ingress table in every version
    /// (`None` for parties no endpoint stands for).
    tables: Vec<Vec<Option<DecisionTable>>>,
    versions: usize,
}

impl FlowSpace {
    /// The flow space of `programs` (at least one); peers are named after the last one.
    pub(crate) fn new(programs: &[&Program]) -> FlowSpace {
        let last = programs.last().expect("at least one program");
        let universe = peer_universe_of(last, programs);
        let (peers, parties): (Vec<usize>, Vec<(String, Party)>) = universe
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, representative(last, &universe, p)?)))
            .unzip();
        let tables = parties
            .iter()
            .map(|(_, party)| {
                [Direction::Egress, Direction::Ingress]
                    .into_iter()
                    .flat_map(|dir| programs.iter().map(move |program| (dir, program)))
                    .map(|(dir, program)| {
                        party
                            .endpoint
                            .as_ref()
                            .map(|e| decision_table(program, &universe, e, dir))
                    })
                    .collect()
            })
            .collect();
        FlowSpace {
            universe,
            parties,
            peers,
            tables,
            versions: programs.len(),
        }
    }

    /// Calls `f` for every ordered pair of parties (at least one enforced on) and every protocol
    /// with the pieces of the port space within which every table of every version that decides
    /// the pair (source egress, destination ingress) is constant, in ascending order. One
    /// representative flow per piece decides the whole piece.
    pub(crate) fn for_each(
        &self,
        mut f: impl FnMut(&(String, Party), &(String, Party), Protocol, &[PortRange]),
    ) {
        let n = self.versions;
        for (si, src) in self.parties.iter().enumerate() {
            for (di, dst) in self.parties.iter().enumerate() {
                if src.1.endpoint.is_none() && dst.1.endpoint.is_none() {
                    continue;
                }
                let (Some(src_id), Some(dst_id)) = (
                    src.1.identity.map(|_| peer_number(&self.universe, &src.1)),
                    dst.1.identity.map(|_| peer_number(&self.universe, &dst.1)),
                ) else {
                    continue;
                };
                for proto in Protocol::ALL {
                    let max = u32::from(proto.max_port());
                    let mut cuts: BTreeSet<u32> = [0, max + 1].into();
                    let relevant = self.tables[si][..n]
                        .iter()
                        .map(|t| (t, dst_id))
                        .chain(self.tables[di][n..].iter().map(|t| (t, src_id)));
                    for (t, peer) in relevant {
                        let Some(t) = t else { continue };
                        let Some(class) = t
                            .classes
                            .iter()
                            .position(|c| c.members.binary_search(&peer).is_ok())
                        else {
                            continue;
                        };
                        for row in t
                            .rows
                            .iter()
                            .filter(|r| r.class == class as u32 && r.protocol == proto)
                        {
                            cuts.insert(u32::from(row.ports.lo));
                            cuts.insert(u32::from(row.ports.hi) + 1);
                        }
                    }
                    let cuts: Vec<u32> = cuts.into_iter().filter(|c| *c <= max + 1).collect();
                    let pieces: Vec<PortRange> = cuts
                        .windows(2)
                        .map(|w| PortRange {
                            lo: w[0] as u16,
                            hi: (w[1] - 1) as u16,
                        })
                        .collect();
                    f(src, dst, proto, &pieces);
                }
            }
        }
    }
}

/// Which way a change goes, for gating (`cnpc diff --fail-on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flip {
    /// Allowed (with or without L7 rules) before, denied after.
    AllowedToDenied,
    /// Denied before, allowed (with or without L7 rules) after.
    DeniedToAllowed,
    /// Allowed both times, with L7 rules added or removed.
    L7,
}

impl Change {
    pub fn flip(&self) -> Flip {
        match (self.before, self.after) {
            (Outcome::Denied, _) => Flip::DeniedToAllowed,
            (_, Outcome::Denied) => Flip::AllowedToDenied,
            _ => Flip::L7,
        }
    }

    /// `80/TCP`, `8000-8080/UDP`.
    pub fn port_text(&self) -> String {
        if self.ports.lo == self.ports.hi {
            format!("{}/{}", self.ports.lo, self.protocol.as_str())
        } else {
            format!(
                "{}-{}/{}",
                self.ports.lo,
                self.ports.hi,
                self.protocol.as_str()
            )
        }
    }
}

/// A diff with the size of what stayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub changes: Vec<Change>,
    /// Flows whose verdict is the same in both versions, counted in the unit of `changes`: a
    /// (source, destination, protocol, port range) with one verdict before and after, as long
    /// as that verdict lasts.
    pub unchanged: usize,
}

/// The flows whose verdict differs between `old` and `new` (built over the same cluster).
pub fn diff(old: &Program, new: &Program) -> Vec<Change> {
    diff_summary(old, new).changes
}

/// [`diff`], with the count of flows that did not change.
pub fn diff_summary(old: &Program, new: &Program) -> Diff {
    let space = FlowSpace::new(&[old, new]);
    let mut changes = Vec::new();
    let mut unchanged = 0;
    space.for_each(|(src_name, src), (dst_name, dst), proto, pieces| {
        let mut pending: Option<Change> = None;
        // The verdict and last port of the unchanged flow being extended, if any.
        let mut same: Option<(Outcome, u16)> = None;
        for &PortRange { lo, hi } in pieces {
            let flow = Flow {
                src: src.clone(),
                dst: dst.clone(),
                protocol: proto,
                port: lo,
                http: None,
                dns_query: None,
            };
            let (b, a) = (evaluate(old, &flow), evaluate(new, &flow));
            let (before, after) = (Outcome::of(&b), Outcome::of(&a));
            if before == after {
                changes.extend(pending.take());
                match &mut same {
                    Some((o, last)) if *o == before && u32::from(*last) + 1 == u32::from(lo) => {
                        *last = hi
                    }
                    _ => {
                        unchanged += 1;
                        same = Some((before, hi));
                    }
                }
                continue;
            }
            same = None;
            let mut policies = BTreeSet::new();
            for v in [&b, &a] {
                origins(&v.egress, &mut policies);
                origins(&v.ingress, &mut policies);
            }
            match &mut pending {
                Some(c)
                    if c.before == before
                        && c.after == after
                        && u32::from(c.ports.hi) + 1 == u32::from(lo) =>
                {
                    c.ports.hi = hi;
                    c.policies.extend(policies);
                    c.policies.sort();
                    c.policies.dedup();
                }
                _ => {
                    changes.extend(pending.take());
                    pending = Some(Change {
                        from: src_name.clone(),
                        to: dst_name.clone(),
                        protocol: proto,
                        ports: PortRange { lo, hi },
                        before,
                        after,
                        policies: policies.into_iter().collect(),
                    });
                }
            }
        }
        changes.extend(pending);
    });
    changes.sort();
    changes.dedup();
    Diff { changes, unchanged }
}

/// The universe number of a representative party (its CIDR or FQDN identity when it has one).
fn peer_number(universe: &[PeerIdentity], p: &Party) -> NumericIdentity {
    crate::tables::peer_of(universe, p).unwrap_or(NumericIdentity(FIRST_LOCAL_IDENTITY - 1))
}

/// Changes as (from, to) → list, for grouped reports.
pub fn by_pair(changes: &[Change]) -> BTreeMap<(&str, &str), Vec<&Change>> {
    let mut m: BTreeMap<(&str, &str), Vec<&Change>> = BTreeMap::new();
    for c in changes {
        m.entry((c.from.as_str(), c.to.as_str()))
            .or_default()
            .push(c);
    }
    m
}

/// Largest markdown report: GitHub refuses comments over 65,536 characters.
const MARKDOWN_LIMIT: usize = 60_000;

/// A table cell: pipes escaped (they would end the cell), HTML brackets neutralised.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `cnpc diff -o markdown`: a compact report to post as a pull-request comment. A heading with
/// the counts (each direction, and the unchanged flows), then one table row per workload pair
/// with its flipped flows and the policies that decide them. Starts with an HTML comment
/// (`<!-- cnpc-diff -->`) a bot can find to update its earlier comment.
pub fn markdown(d: &Diff) -> String {
    let mut out = String::from("<!-- cnpc-diff -->\n");
    let pairs = by_pair(&d.changes);
    if d.changes.is_empty() {
        out.push_str(&format!(
            "### cnpc diff: no flow changes\n\n{} unchanged.\n",
            count(d.unchanged, "flow", "flows")
        ));
        return out;
    }
    let of = |f: Flip| d.changes.iter().filter(|c| c.flip() == f).count();
    let mut kinds = vec![
        format!("{} denied → allowed", of(Flip::DeniedToAllowed)),
        format!("{} allowed → denied", of(Flip::AllowedToDenied)),
    ];
    if of(Flip::L7) > 0 {
        kinds.push(format!("{} L7 rules added or removed", of(Flip::L7)));
    }
    out.push_str(&format!(
        "### cnpc diff: {} in {}\n\n{}; {} unchanged.\n\n",
        count(d.changes.len(), "flow changes", "flows change"),
        count(pairs.len(), "workload pair", "workload pairs"),
        kinds.join(", "),
        count(d.unchanged, "flow", "flows"),
    ));
    out.push_str("| From | To | Flows | Policies |\n|---|---|---|---|\n");
    let total = pairs.len();
    for (shown, ((from, to), list)) in pairs.into_iter().enumerate() {
        // A pair whose every protocol and port flipped the same way reads as one line.
        let full = |c: &&Change| c.ports.lo == 0 && c.ports.hi == c.protocol.max_port();
        let everything = list.len() == Protocol::ALL.len()
            && list.iter().all(full)
            && list
                .windows(2)
                .all(|w| (w[0].before, w[0].after) == (w[1].before, w[1].after));
        // The pair's flows by (before, after), in order: one line per way they flip.
        let mut ways: Vec<((Outcome, Outcome), Vec<String>)> = Vec::new();
        if everything {
            ways.push(((list[0].before, list[0].after), vec!["all traffic".into()]));
        } else {
            for c in &list {
                let port = if full(c) {
                    format!("any/{}", c.protocol.as_str())
                } else {
                    c.port_text()
                };
                match ways.iter_mut().find(|(w, _)| *w == (c.before, c.after)) {
                    Some((_, ports)) => ports.push(port),
                    None => ways.push(((c.before, c.after), vec![port])),
                }
            }
        }
        let flows: Vec<String> = ways
            .iter()
            .map(|((before, after), ports)| {
                let ports: Vec<String> = ports
                    .iter()
                    .map(|p| match p.as_str() {
                        "all traffic" => p.clone(),
                        p => format!("`{}`", cell(p)),
                    })
                    .collect();
                format!(
                    "{}: {} → **{}**",
                    ports.join(", "),
                    before.as_str(),
                    after.as_str()
                )
            })
            .collect();
        let mut policies: Vec<&str> = list
            .iter()
            .flat_map(|c| c.policies.iter().map(String::as_str))
            .collect();
        policies.sort_unstable();
        policies.dedup();
        let row = format!(
            "| `{}` | `{}` | {} | {} |\n",
            cell(from),
            cell(to),
            flows.join("<br>"),
            cell(&policies.join(", "))
        );
        if out.len() + row.len() > MARKDOWN_LIMIT {
            let rest = total - shown;
            out.push_str(&format!(
                "\n… and {rest} more {}: run `cnpc diff` for the full list.\n",
                if rest == 1 {
                    "workload pair"
                } else {
                    "workload pairs"
                }
            ));
            return out;
        }
        out.push_str(&row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        from: &str,
        to: &str,
        protocol: Protocol,
        lo: u16,
        hi: u16,
        after: Outcome,
    ) -> Change {
        Change {
            from: from.into(),
            to: to.into(),
            protocol,
            ports: PortRange { lo, hi },
            before: Outcome::Denied,
            after,
            policies: vec!["CiliumNetworkPolicy a/p|q".into()],
        }
    }

    #[test]
    fn markdown_groups_a_pair_by_direction_and_collapses_all_traffic() {
        let mut changes: Vec<Change> = Protocol::ALL
            .iter()
            .map(|p| change("a/x", "a/y", *p, 0, p.max_port(), Outcome::Allowed))
            .collect();
        changes.push(change(
            "a/x",
            "b/z",
            Protocol::Tcp,
            80,
            80,
            Outcome::Allowed,
        ));
        changes.push(change(
            "a/x",
            "b/z",
            Protocol::Udp,
            0,
            65535,
            Outcome::Proxied,
        ));
        changes.push(change(
            "a/x",
            "b/z",
            Protocol::Tcp,
            8000,
            8080,
            Outcome::Allowed,
        ));
        let md = markdown(&Diff {
            changes,
            unchanged: 1,
        });
        assert!(
            md.starts_with(
                "<!-- cnpc-diff -->\n### cnpc diff: 8 flows change in 2 workload pairs\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("8 denied → allowed, 0 allowed → denied; 1 flow unchanged."),
            "{md}"
        );
        assert!(
            md.contains("| `a/x` | `a/y` | all traffic: denied → **allowed** |"),
            "{md}"
        );
        assert!(
            md.contains("| `a/x` | `b/z` | `80/TCP`, `8000-8080/TCP`: denied → **allowed**<br>`any/UDP`: denied → **allowed (L7)** |"),
            "{md}"
        );
        // A pipe would end the cell.
        assert!(md.contains("CiliumNetworkPolicy a/p\\|q |"), "{md}");
    }

    #[test]
    fn markdown_stays_within_a_comment() {
        let changes: Vec<Change> = (0..5000)
            .map(|i| {
                change(
                    &format!("ns/w{i:05}"),
                    "ns/db",
                    Protocol::Tcp,
                    5432,
                    5432,
                    Outcome::Allowed,
                )
            })
            .collect();
        let md = markdown(&Diff {
            changes,
            unchanged: 0,
        });
        assert!(md.len() <= MARKDOWN_LIMIT + 200, "{}", md.len());
        let last = md.lines().last().unwrap_or_default();
        assert!(
            last.ends_with("more workload pairs: run `cnpc diff` for the full list."),
            "{last}"
        );
        assert!(md.contains("| `ns/w00000` |"));
        let shown = md.lines().filter(|l| l.starts_with("| `ns/w")).count();
        let rest: usize = md
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert_eq!(shown + rest, 5000, "every pair is shown or counted");
    }
}
