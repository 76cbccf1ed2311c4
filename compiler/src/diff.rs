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

/// The flows whose verdict differs between `old` and `new` (built over the same cluster).
pub fn diff(old: &Program, new: &Program) -> Vec<Change> {
    let universe = peer_universe_of(new, &[old, new]);
    let parties: Vec<(String, Party)> = universe
        .iter()
        .filter_map(|p| representative(new, &universe, p))
        .collect();
    let tables = |program: &Program, party: &Party, dir: Direction| {
        party
            .endpoint
            .as_ref()
            .map(|e| decision_table(program, &universe, e, dir))
    };
    let table_cache: Vec<[Option<DecisionTable>; 4]> = parties
        .iter()
        .map(|(_, p)| {
            [
                tables(old, p, Direction::Egress),
                tables(new, p, Direction::Egress),
                tables(old, p, Direction::Ingress),
                tables(new, p, Direction::Ingress),
            ]
        })
        .collect();
    let mut changes = Vec::new();
    for (si, (src_name, src)) in parties.iter().enumerate() {
        for (di, (dst_name, dst)) in parties.iter().enumerate() {
            if src.endpoint.is_none() && dst.endpoint.is_none() {
                continue;
            }
            let (Some(src_id), Some(dst_id)) = (
                src.identity.map(|_| peer_number(&universe, src)),
                dst.identity.map(|_| peer_number(&universe, dst)),
            ) else {
                continue;
            };
            for proto in Protocol::ALL {
                let max = u32::from(proto.max_port());
                let mut cuts: BTreeSet<u32> = [0, max + 1].into();
                let relevant = table_cache[si][..2]
                    .iter()
                    .map(|t| (t, dst_id))
                    .chain(table_cache[di][2..].iter().map(|t| (t, src_id)));
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
                let mut pending: Option<Change> = None;
                for w in cuts.windows(2) {
                    let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
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
                        continue;
                    }
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
            }
        }
    }
    changes.sort();
    changes.dedup();
    changes
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
