//! `cnpc trace`: one flow, rule by rule.

use crate::common::{fail, load_program, print, usage};
use crate::{Engine, TraceFormat};
use cnpc_compiler::eval::{self, Flow, HttpRequest};
use cnpc_compiler::report;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub struct TraceArgs {
    pub identities: Option<PathBuf>,
    pub fqdn_cache: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
    pub cluster: Vec<PathBuf>,
    pub from: String,
    pub to: String,
    pub dport: String,
    pub http: Option<HttpRequest>,
    pub dns_query: Option<String>,
    pub engine: Engine,
    pub output: TraceFormat,
    pub vars: crate::vars::VarArgs,
}

/// `fqdn:NAME` (no address) becomes `fqdn:NAME=ADDRESS` with the lowest address a node
/// learned for NAME and has not let expire (a loader's `fqdn.json`); other peers are kept.
fn learned_peer(spec: &str, cache: Option<&Path>) -> Result<String, String> {
    let Some(name) = spec.strip_prefix("fqdn:").filter(|n| !n.contains('=')) else {
        return Ok(spec.to_string());
    };
    let path = cache.unwrap_or(Path::new("/run/cnpc/fqdn.json"));
    if !path.exists() {
        return Err(format!(
            "--from/--to `{spec}`: no learned addresses at {} (a node's loader writes them to \
             fqdn.json in its state directory): pass --fqdn-cache FILE or write \
             fqdn:{name}=ADDRESS",
            path.display()
        ));
    }
    let state = cnpc_runtime_loader::fqdn::FqdnState::load(path, 0).map_err(|e| e.to_string())?;
    let now = cnpc_runtime_loader::fqdn::now();
    match state.addresses_of(name, now).first() {
        Some(ip) => Ok(format!("fqdn:{name}={ip}")),
        None => Err(format!(
            "--from/--to `{spec}`: {} holds no unexpired address for {name}: write \
             fqdn:{name}=ADDRESS",
            path.display()
        )),
    }
}

pub fn run_trace(a: TraceArgs) -> ExitCode {
    let Some((port, protocol)) = eval::parse_port(&a.dport) else {
        return usage(&format!(
            "--dport `{}`: write PORT or PORT/PROTO (TCP, UDP, SCTP, ICMP, ICMPv6)",
            a.dport
        ));
    };
    let (report, program) = match load_program(&a.paths, &a.cluster, &a.identities, &a.vars) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let Some(cluster) = report.cluster.as_ref() else {
        return usage("cnpc trace needs --cluster FILE");
    };
    let (from, to) = match (
        learned_peer(&a.from, a.fqdn_cache.as_deref()),
        learned_peer(&a.to, a.fqdn_cache.as_deref()),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return usage(&e),
    };
    let party = |spec: &str| eval::parse_peer(&program, cluster, spec);
    let (src, dst) = match (party(&from), party(&to)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let flow = Flow {
        src,
        dst,
        protocol,
        port,
        http: a.http,
        dns_query: a.dns_query,
    };
    let mut verdict = eval::evaluate(&program, &flow);
    if a.engine == Engine::Bpf {
        verdict = match cnpc_runtime_loader::trace::bpf_verdict(&program, &flow) {
            // The kernel must agree with the reference engine; a disagreement is a bug. Where
            // the proxy judged a request, its answer must be the reference's too.
            Ok(bpf) if !bpf.agrees_with(&verdict) => {
                eprintln!(
                    "error: the BPF engine and the reference engine disagree (a bug in cnpc):\nbpf:\n{}reference:\n{}",
                    report::trace_text(&flow, &bpf),
                    report::trace_text(&flow, &verdict)
                );
                return ExitCode::from(1);
            }
            Ok(bpf) => bpf.explained_by(&verdict),
            Err(e) => return usage(&e.to_string()),
        };
    }
    match a.output {
        TraceFormat::Text => print(&report::trace_text(&flow, &verdict)),
        TraceFormat::Json => print(&format!("{:#}\n", report::trace_json(&flow, &verdict))),
    }
}
