//! The proxy against the reference evaluator: the Star Wars L7 policy plus generated policies
//! with random HTTP rules, compiled the way the loader compiles a generation, and thousands of
//! random requests sent through the proxy over keep-alive connections. Every request's outcome
//! (forwarded or 403, and whether the upstream saw it) must be what `eval::evaluate` says for
//! the same flow, direction by direction.

mod common;

use bytes::Bytes;
use cnpc_compiler::eval::{self, DirVerdict, Flow, HttpRequest};
use cnpc_compiler::lower;
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_compiler::{check_errors, Cluster, PolicySet};
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::{Direction, Program, Protocol};
use cnpc_proxy::{ConnContext, Proxy, ProxyConfig};
use common::{spawn_proxy, Client, Upstream};
use http_body_util::Full;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// SplitMix64: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const METHOD_RES: &[&str] = &["GET", "POST", "GET|HEAD", "P.*", "(PUT|DELETE)", "[A-Z]+"];
const PATH_RES: &[&str] = &[
    "/v1/request-landing",
    "/v1/.*",
    "/v[0-9]+/status",
    "/public(/.*)?",
    r"/api/[a-z]+\?id=[0-9]+",
    "/",
    ".*exhaust.*",
    "/[^/]*",
];
const HOST_RES: &[&str] = &[
    "deathstar",
    r"deathstar(\.default)?(:80)?",
    r".*\.empire\.org",
    "[a-z]+",
];
/// Header terms as policies write them (`headers:` entries).
const HEADER_TERMS: &[&str] = &["X-Ship: tie", "X-Token", "x-empire: yes", "X-Ship"];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "get",
];
const PATHS: &[&str] = &[
    "/v1/request-landing",
    "/v1/request-landing?x=1",
    "/v1/exhaust-port",
    "/v2/status",
    "/v10/status",
    "/public",
    "/public/x/y",
    "/publicity",
    "/api/ships?id=42",
    "/api/ships?id=x",
    "/",
    "/index.html",
    "/a/../v1/status",
    "/%7Euser",
];
const HOSTS: &[&str] = &[
    "deathstar",
    "deathstar.default:80",
    "deathstar:8080",
    "x.empire.org",
    "DEATHSTAR",
    "10.0.1.10",
];
const HEADERS: &[(&str, &str)] = &[
    ("X-Ship", "tie"),
    ("x-ship", "xwing"),
    ("X-Token", "abc"),
    ("x-empire", "yes"),
    ("X-Empire", "no"),
];

/// A policy file of `n` random HTTP rules: ingress to deathstar, egress from tiefighter.
fn random_policies(rng: &mut Rng, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let mut http = String::new();
        for _ in 0..1 + rng.below(3) {
            let mut fields = Vec::new();
            if rng.chance(70) {
                fields.push(format!("method: '{}'", rng.pick(METHOD_RES)));
            }
            if rng.chance(70) {
                fields.push(format!("path: '{}'", rng.pick(PATH_RES)));
            }
            if rng.chance(25) {
                fields.push(format!("host: '{}'", rng.pick(HOST_RES)));
            }
            if rng.chance(25) {
                fields.push(format!("headers: [\"{}\"]", rng.pick(HEADER_TERMS)));
            }
            if rng.chance(10) {
                fields.push("headerMatches: [{name: X-Token, value: abc}]".to_string());
            }
            if fields.is_empty() {
                fields.push("method: 'GET'".to_string());
            }
            let _ = write!(http, "\n        - {{{}}}", fields.join(", "));
        }
        let ports = if rng.chance(85) { "80" } else { "8080" };
        let (selector, section, peer) = match rng.below(4) {
            0 => (
                "class: deathstar",
                "ingress",
                "fromEndpoints: [{matchLabels: {org: empire}}]",
            ),
            1 => (
                "class: deathstar",
                "ingress",
                "fromEndpoints: [{matchLabels: {class: tiefighter}}]",
            ),
            2 => ("class: deathstar", "ingress", "fromEndpoints: [{}]"),
            _ => (
                "class: tiefighter",
                "egress",
                "toEndpoints: [{matchLabels: {class: deathstar}}]",
            ),
        };
        let _ = write!(
            out,
            "---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: random-{i}
  namespace: default
spec:
  endpointSelector:
    matchLabels: {{{selector}}}
  {section}:
  - {peer}
    toPorts:
    - ports: [{{port: \"{ports}\", protocol: TCP}}]
      rules:
        http:{http}
"
        );
    }
    out
}

struct Compiled {
    program: Program,
    /// Holds the cluster snapshot the peers are parsed against.
    checked: cnpc_compiler::CheckReport,
    proxy_policy: ProxyPolicy,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Loads, checks, lowers and builds tables as runtime-loader/src/generation.rs does.
fn compile(extra: &Path) -> Compiled {
    let policies = vec![repo().join("policies/starwars-l7"), extra.to_path_buf()];
    let mut set = PolicySet::load(&policies).expect("policies load");
    let snapshot =
        Cluster::load(&[repo().join("policies/cluster.yaml")], &mut set.sources).expect("cluster");
    let checked = check_errors(set, Some(snapshot));
    assert_eq!(
        checked.errors(),
        0,
        "{}",
        cnpc_compiler::report::human(&checked, false)
    );
    let program = lower::build(
        &checked.set.policies,
        &checked.set.sources,
        checked.cluster.as_ref().expect("checked with a cluster"),
        &Default::default(),
    );
    let compiler = TableCompiler::new(&program);
    let tables = compiler.all(&program);
    let ipcache = ipcache_entries(&program, &compiler.universe);
    let proxy_policy = ProxyPolicy::build(&program, &tables, &ipcache);
    Compiled {
        program,
        checked,
        proxy_policy,
    }
}

/// The evaluator's verdict of one direction: passes unless denied or its L7 decision refused.
fn direction_passes(d: &eval::Decision) -> bool {
    d.verdict != DirVerdict::Denied && d.l7.as_ref().is_none_or(|l| l.allowed != Some(false))
}

#[derive(Default, Debug)]
struct Counts {
    requests: usize,
    forwarded: usize,
    denied: usize,
    proxied_by_l7: usize,
    mismatches: Vec<String>,
}

struct Case {
    method: &'static str,
    path: &'static str,
    host: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
}

fn random_case(rng: &mut Rng) -> Case {
    let mut headers = Vec::new();
    for h in HEADERS {
        if rng.chance(20) {
            headers.push(*h);
        }
    }
    Case {
        method: rng.pick(METHODS),
        path: rng.pick(PATHS),
        host: rng.chance(80).then(|| rng.pick(HOSTS)),
        headers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_agrees_with_the_evaluator() {
    let started = Instant::now();
    let budget = Duration::from_secs(90);
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut total = Counts::default();
    let seeds = [1u64, 2, 3, 4, 5, 6, 7, 8];
    let per_seed = 700;
    for seed in seeds {
        let mut rng = Rng(seed);
        let file = dir.path().join(format!("random-{seed}.yaml"));
        let n = 3 + rng.below(5);
        std::fs::write(&file, random_policies(&mut rng, n)).expect("write");
        let c = compile(&file);
        // A fresh proxy per policy set; the same upstream.
        let proxy = Proxy::with_config(
            c.proxy_policy.clone(),
            ProxyConfig {
                connect_override: Some(upstream.addr),
                ..ProxyConfig::default()
            },
        );
        // Sources: tiefighter (both families), xwing, mediabot; the destination deathstar.
        let pairs: [(&str, &str); 4] = [
            ("10.0.1.20", "10.0.1.10"),
            ("fd00:10:0:1::20", "fd00:10:0:1::10"),
            ("10.0.1.30", "10.0.1.10"),
            ("10.0.1.40", "10.0.1.11"),
        ];
        let cluster = c.checked.cluster.as_ref().expect("checked with a cluster");
        let mut conns = Vec::new();
        for (src, dst) in pairs {
            let src: IpAddr = src.parse().expect("literal");
            let dst: IpAddr = dst.parse().expect("literal");
            for port in [80u16, 8080] {
                let mut both = Vec::new();
                for direction in [Direction::Egress, Direction::Ingress] {
                    let ctx = ConnContext {
                        direction,
                        source: SocketAddr::new(src, 41000),
                        original_dst: SocketAddr::new(dst, port),
                        source_identity: None,
                    };
                    let addr = spawn_proxy(&proxy, ctx).await;
                    both.push(Client::connect(addr).await);
                }
                let flow_base = Flow {
                    src: eval::parse_peer(&c.program, cluster, &format!("ip:{src}"))
                        .expect("source party"),
                    dst: eval::parse_peer(&c.program, cluster, &format!("ip:{dst}"))
                        .expect("destination party"),
                    protocol: Protocol::Tcp,
                    port,
                    http: None,
                    dns_query: None,
                };
                conns.push((flow_base, both));
            }
        }
        let before = upstream.seen().len();
        let mut forwarded_seqs = BTreeSet::new();
        let mut counts = Counts::default();
        for i in 0..per_seed {
            if started.elapsed() > budget {
                break;
            }
            let case = random_case(&mut rng);
            let k = rng.below(conns.len());
            let (flow_base, clients) = &mut conns[k];
            let mut headers: Vec<(String, String)> = case
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            if let Some(h) = case.host {
                headers.push(("host".into(), h.into()));
            }
            let mut flow = flow_base.clone();
            flow.http = Some(HttpRequest {
                method: case.method.to_string(),
                path: case.path.to_string(),
                host: case.host.map(str::to_string),
                headers: headers.clone(),
            });
            let verdict = eval::evaluate(&c.program, &flow);
            let mut outcome = Vec::new();
            for (d, client) in [Direction::Egress, Direction::Ingress]
                .into_iter()
                .zip(clients.iter_mut())
            {
                let seq = format!("{seed}-{i}-{}", d.as_str());
                let mut b = http::Request::builder()
                    .method(case.method)
                    .uri(case.path)
                    .header("x-seq", &seq);
                for (n, v) in &headers {
                    b = b.header(n.as_str(), v.as_str());
                }
                let req = b.body(Full::new(Bytes::new())).expect("valid request");
                // x-seq is the proxy's only extra header; no rule names it.
                let got = client.send(req).await.expect("a response");
                let decision = match d {
                    Direction::Egress => &verdict.egress,
                    Direction::Ingress => &verdict.ingress,
                };
                let want = direction_passes(decision);
                let forwarded = got.from_upstream;
                if decision.l7.is_some() {
                    counts.proxied_by_l7 += 1;
                }
                counts.requests += 1;
                if forwarded {
                    counts.forwarded += 1;
                    forwarded_seqs.insert(seq.clone());
                    if got.status != 200 {
                        counts
                            .mismatches
                            .push(format!("{seq}: upstream status {}", got.status));
                    }
                } else {
                    counts.denied += 1;
                    // A response to HEAD has no body.
                    let body = if case.method == "HEAD" {
                        ""
                    } else {
                        "Access denied"
                    };
                    if got.status != 403 || got.body != body {
                        counts
                            .mismatches
                            .push(format!("{seq}: local answer {} {:?}", got.status, got.body));
                    }
                }
                if forwarded != want {
                    counts.mismatches.push(format!(
                        "{seq}: {} {} {:?} host {:?} headers {:?} on {} -> {}:{}: proxy {}, \
                         evaluator {} ({:?})",
                        d.as_str(),
                        case.method,
                        case.path,
                        case.host,
                        case.headers,
                        flow.src.name,
                        flow.dst.name,
                        flow.port,
                        if forwarded { "forwarded" } else { "denied" },
                        if want { "allows" } else { "denies" },
                        decision
                    ));
                }
                outcome.push(forwarded);
            }
            // Chained, the two proxies let through exactly what the evaluator allows.
            if outcome.iter().all(|x| *x) != verdict.allowed {
                counts.mismatches.push(format!(
                    "{seed}-{i}: both directions {outcome:?}, evaluator overall {}",
                    verdict.allowed
                ));
            }
        }
        // The upstream saw exactly the forwarded requests, each once.
        let seen: Vec<String> = upstream.seen()[before..]
            .iter()
            .filter_map(|s| s.seq.clone())
            .collect();
        let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            seen.len(),
            seen_set.len(),
            "a request reached the upstream twice"
        );
        assert_eq!(
            seen_set, forwarded_seqs,
            "the upstream saw other requests than forwarded"
        );
        println!(
            "seed {seed}: {} requests, {} forwarded, {} denied, {} judged by L7 rules, {} mismatches",
            counts.requests,
            counts.forwarded,
            counts.denied,
            counts.proxied_by_l7,
            counts.mismatches.len()
        );
        total.requests += counts.requests;
        total.forwarded += counts.forwarded;
        total.denied += counts.denied;
        total.proxied_by_l7 += counts.proxied_by_l7;
        total.mismatches.extend(counts.mismatches);
    }
    println!(
        "total: {} requests, {} forwarded, {} denied, {} judged by L7 rules, {} mismatches, {:?}",
        total.requests,
        total.forwarded,
        total.denied,
        total.proxied_by_l7,
        total.mismatches.len(),
        started.elapsed()
    );
    assert!(
        total.mismatches.is_empty(),
        "{} mismatches, first: {:#?}",
        total.mismatches.len(),
        &total.mismatches[..total.mismatches.len().min(10)]
    );
    // The comparison only means something if both outcomes occur often, and L7 rules decide.
    assert!(
        total.requests >= 2000,
        "only {} requests in the time budget",
        total.requests
    );
    assert!(total.forwarded > total.requests / 10, "{total:?}");
    assert!(total.denied > total.requests / 10, "{total:?}");
    assert!(total.proxied_by_l7 > total.requests / 5, "{total:?}");
}
