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
use cnpc_ir::{Direction, IpNet, Program, Protocol};
use cnpc_proxy::probe::{probe, ProbeRequest};
use cnpc_proxy::ConnContext;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--engine bpf needs an address on both sides (pod:, ip: or fqdn: peers)")]
    NoAddress,
    #[error("--engine bpf: {0} (it needs root and bpf(2))")]
    Kernel(String),
    #[error("--engine bpf: {0}")]
    Run(String),
    #[error("--engine bpf: the L7 proxy: {0}")]
    Proxy(#[from] cnpc_proxy::probe::ProbeError),
}

/// The flow's verdict from the generated programs (and, for proxied HTTP, the proxy).
pub fn bpf_verdict(program: &Program, flow: &Flow) -> Result<Verdict, TraceError> {
    let (Some(src), Some(dst)) = (flow.src.ip, flow.dst.ip) else {
        return Err(TraceError::NoAddress);
    };
    let universe = peer_universe(program);
    let mut entries = ipcache_entries(program, &universe);
    for party in [&flow.src, &flow.dst] {
        // An address learned from DNS carries its names' identity, as the DNS proxy records it.
        if let (Some(_), Some(ip), Some(id)) = (&party.fqdn, party.ip, peer_of(&universe, party)) {
            entries.push((IpNet::from(ip), id));
        }
    }
    let mut kernel = Kernel::new(&entries).map_err(|e| TraceError::Kernel(e.to_string()))?;
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
                    let policy = ProxyPolicy::build(program, &tables, &entries);
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
