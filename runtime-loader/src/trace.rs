//! `cnpc trace --engine bpf`: one flow decided by what a node runs instead of the reference
//! evaluator. The source's egress program and the destination's ingress program each run on a
//! packet crafted from the flow (BPF_PROG_TEST_RUN); where a program hands the flow to the L7
//! stage and the trace names an HTTP request, the request goes through the real proxy code
//! ([`cnpc_proxy::probe`]) with the generation's proxy policy, so the L7 answer too comes from
//! what enforces on a node.

use crate::testrun::{craft, Kernel};
use cnpc_compiler::eval::{self, Decision, DirVerdict, Flow, L7Decision, Party, Reason, Verdict};
use cnpc_compiler::tables::{decision_table, ipcache_entries, peer_of, peer_universe};
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::{Direction, IpNet, Program, Protocol, Reserved};
use cnpc_proxy::probe::{probe, ProbeRequest};
use cnpc_proxy::ConnContext;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--engine bpf needs an address on both sides (pod:, ip:, fqdn:, entity:host or entity:remote-node peers)")]
    NoAddress,
    #[error("--engine bpf: {0}")]
    NoNode(String),
    #[error("--engine bpf: {0} (it needs root and bpf(2))")]
    Kernel(String),
    #[error("--engine bpf: {0}")]
    Run(String),
    #[error("--engine bpf: the L7 proxy: {0}")]
    Proxy(#[from] cnpc_proxy::probe::ProbeError),
}

/// The address `party` sends from or is reached at. Parties named by address have theirs; the
/// `host` and `remote-node` entities are given a node's InternalIP from the snapshot, as seen
/// from the node of the `other` party (a pod): Cilium's ipcache gives that node's own addresses
/// the host identity and every other node's the remote-node identity, so the host is the pod's
/// own node (its entry in `entries` becomes host) and a remote node any other. A pod with no
/// node in the snapshot is taken to run on the first node by name.
fn address(
    program: &Program,
    party: &Party,
    other: &Party,
    entries: &mut [(IpNet, cnpc_ir::NumericIdentity)],
) -> Result<std::net::IpAddr, TraceError> {
    if let Some(ip) = party.ip {
        return Ok(ip);
    }
    let host = Reserved::Host.numeric();
    let remote = Reserved::RemoteNode.numeric();
    let wanted = match party.identity {
        Some(id) if id == host || id == remote => id,
        _ => return Err(TraceError::NoAddress),
    };
    // A pod the snapshot places on no node is taken to run on its first node.
    let local_node = other
        .endpoint
        .as_ref()
        .and_then(|e| e.node.clone())
        .or_else(|| {
            program
                .endpoints
                .values()
                .filter(|e| !e.is_pod)
                .map(|e| e.name.clone())
                .min()
        });
    let v4 = other.ip.is_none_or(|ip| ip.is_ipv4());
    let node = program
        .endpoints
        .values()
        .filter(|e| !e.is_pod)
        .find(|n| (Some(&n.name) == local_node.as_ref()) == (wanted == host))
        .ok_or_else(|| {
            TraceError::NoNode(match (&local_node, wanted == host) {
                (Some(n), true) => format!("node {n} is not in the cluster snapshot"),
                (Some(n), false) => format!("no node other than {n} in the cluster snapshot"),
                (None, _) => "no node in the cluster snapshot for this entity".into(),
            })
        })?;
    let ip = node
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == v4)
        .copied()
        .ok_or_else(|| {
            TraceError::NoNode(format!("node {} has no address of that family", node.name))
        })?;
    if wanted == host {
        for (net, id) in entries.iter_mut() {
            if *net == IpNet::from(ip) {
                *id = host;
            }
        }
    }
    Ok(ip)
}

/// The flow's verdict from the generated programs (and, for proxied HTTP, the proxy).
pub fn bpf_verdict(program: &Program, flow: &Flow) -> Result<Verdict, TraceError> {
    let universe = peer_universe(program);
    let mut entries = ipcache_entries(program, &universe);
    let src = address(program, &flow.src, &flow.dst, &mut entries)?;
    let dst = address(program, &flow.dst, &flow.src, &mut entries)?;
    // An address learned from DNS carries its names' identity in the node's `fqdn` map, where
    // the loader writes what the DNS proxy learns: the programs find it there, after the host
    // entries and before the prefixes, as on a node.
    let mut learned = Vec::new();
    for party in [&flow.src, &flow.dst] {
        if let (Some(_), Some(ip), Some(id)) = (&party.fqdn, party.ip, peer_of(&universe, party)) {
            learned.push((ip, id));
        }
    }
    let mut kernel = Kernel::new(&entries).map_err(|e| TraceError::Kernel(e.to_string()))?;
    for (ip, id) in &learned {
        kernel
            .insert_fqdn(*ip, *id)
            .map_err(|e| TraceError::Kernel(e.to_string()))?;
    }
    let packet = craft(src, dst, flow.protocol, flow.port);
    let mut decide = |party: &Party, dir: Direction| -> Result<Decision, TraceError> {
        let Some(e) = party
            .endpoint
            .as_ref()
            .filter(|e| e.is_pod && party.identity.is_some())
        else {
            return Ok(Decision {
                verdict: DirVerdict::NotEnforced,
                rules: Vec::new(),
                l7: None,
            });
        };
        let tables = [Direction::Ingress, Direction::Egress]
            .map(|d| decision_table(program, &universe, e, d));
        let track = cnpc_codegen_bpf::gen::needs_tracking(&tables);
        let table = &tables[usize::from(dir == Direction::Egress)];
        let prog = kernel
            .load(table, track)
            .map_err(|e| TraceError::Run(e.to_string()))?;
        let out = kernel
            .run(&prog, &packet)
            .map_err(|e| TraceError::Run(e.to_string()))?;
        let verdict = if out.allowed() {
            DirVerdict::Allowed
        } else {
            DirVerdict::Denied
        };
        let l7 = if !out.proxied() {
            None
        } else {
            match (&flow.http, flow.protocol) {
                (Some(req), Protocol::Tcp) => {
                    let policy = ProxyPolicy {
                        learned: learned.clone(),
                        ..ProxyPolicy::build(program, &tables, &entries)
                    };
                    let ctx = ConnContext {
                        direction: dir,
                        source: SocketAddr::new(src, 40000),
                        original_dst: SocketAddr::new(dst, flow.port),
                        source_identity: None,
                    };
                    let request = ProbeRequest {
                        method: req.method.clone(),
                        target: req.path.clone(),
                        host: req.host.clone(),
                        headers: req.headers.clone(),
                    };
                    let answer = probe(policy, ctx, &request)?;
                    let rules = answer
                        .event
                        .and_then(|e| e.rule)
                        .map(|origin| Reason {
                            origin,
                            what: "HTTP rule matches the request (the proxy)".into(),
                        })
                        .into_iter()
                        .collect();
                    Some(L7Decision {
                        protocol: "http",
                        allowed: Some(answer.status != 403 && answer.forwarded),
                        rules,
                    })
                }
                _ => Some(L7Decision {
                    protocol: "proxy",
                    allowed: None,
                    rules: Vec::new(),
                }),
            }
        };
        Ok(Decision {
            verdict,
            rules: Vec::new(),
            l7,
        })
    };
    let egress = decide(&flow.src, Direction::Egress)?;
    let ingress = decide(&flow.dst, Direction::Ingress)?;
    let l7_ok = |d: &Decision| d.l7.as_ref().is_none_or(|l| l.allowed != Some(false));
    let allowed = egress.verdict != DirVerdict::Denied
        && ingress.verdict != DirVerdict::Denied
        && l7_ok(&egress)
        && l7_ok(&ingress);
    Ok(eval::Verdict {
        allowed,
        egress,
        ingress,
    })
}
