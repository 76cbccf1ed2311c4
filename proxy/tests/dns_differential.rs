//! The DNS proxy against the reference evaluator: generated policies with random matchName /
//! matchPattern rules on the pods' egress to kube-dns, compiled the way the loader compiles a
//! generation, and thousands of random names asked through the proxy's query path (the wire
//! query parsed by hickory, judged, forwarded to a test server or refused). Whether a query
//! reached the server must be what `eval::evaluate` says for the same flow (its egress
//! decision with `dns_query` set); a query that did not must have been answered REFUSED.

mod common;

use cnpc_compiler::eval::{self, DirVerdict, Flow};
use cnpc_compiler::lower;
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_compiler::{check_errors, Cluster, PolicySet};
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::{Direction, Program, Protocol};
use cnpc_proxy::dns_proxy::{handle_query, Outcome, Transport, Upstream};
use cnpc_proxy::{ConnContext, DnsConfig, Proxy, ProxyConfig};
use common::dns::DnsUpstream;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

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

const LABELS: &[&str] = &[
    "api", "www", "cilium", "io", "example", "com", "github", "sub", "a", "ab", "a-b", "x1",
    "_srv", "cdn", "b",
];
/// Pattern labels: literal ones and `*` within a label.
const PATTERN_LABELS: &[&str] = &[
    "*", "*", "a*", "*b", "*-*", "x*1", "api", "io", "com", "github",
];
/// What a `*` may stand for when a name is made from a pattern.
const FILLS: &[&str] = &["", "a", "api", "x-y", "b1", "_s"];

fn random_name(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    (0..n)
        .map(|_| rng.pick(LABELS))
        .collect::<Vec<_>>()
        .join(".")
}

fn random_pattern(rng: &mut Rng) -> String {
    if rng.chance(8) {
        return "*".into();
    }
    let n = 1 + rng.below(3);
    (0..n)
        .map(|_| rng.pick(PATTERN_LABELS))
        .collect::<Vec<_>>()
        .join(".")
}

/// A name a pattern matches (most of the time: a fill may not fit a later literal).
fn instantiate(rng: &mut Rng, pattern: &str) -> String {
    if pattern == "*" {
        return random_name(rng);
    }
    let filled: String = pattern
        .chars()
        .map(|c| {
            if c == '*' {
                rng.pick(FILLS).to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    // A label `*` filled with nothing would be empty, which no DNS name has.
    filled
        .split('.')
        .map(|l| if l.is_empty() { "a" } else { l })
        .collect::<Vec<_>>()
        .join(".")
}

/// Random case and, half the time, a trailing dot: neither may change a verdict.
fn disguise(rng: &mut Rng, name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if rng.chance(30) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    if rng.chance(50) {
        out.push('.');
    }
    out
}

/// An A query for `name` as it goes on the wire: its labels as bytes, whatever they hold
/// (a label may start with `-` or `_`; the wire does not care, and neither may the proxy).
fn raw_query(id: u16, name: &str) -> Vec<u8> {
    let labels: Vec<&[u8]> = name
        .trim_end_matches('.')
        .split('.')
        .map(str::as_bytes)
        .collect();
    let mut n = Name::from_labels(labels).expect("labels of at most 63 bytes");
    n.set_fqdn(true);
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n, RecordType::A));
    m.to_vec().expect("encodable")
}

struct Generated {
    yaml: String,
    /// Every matcher written (names and patterns), to make names from.
    matchers: Vec<(bool, String)>,
}

/// `n` policies on the pods' egress to kube-dns with random DNS rules (a few without L7 rules,
/// a few on port 5353, protocols UDP, TCP or ANY).
fn random_policies(rng: &mut Rng, n: usize) -> Generated {
    let mut yaml = String::new();
    let mut matchers = Vec::new();
    for i in 0..n {
        let selector = rng.pick(&[
            "class: tiefighter",
            "class: xwing",
            "class: mediabot",
            "org: empire",
        ]);
        let port = if rng.chance(85) { "53" } else { "5353" };
        let protocol = rng.pick(&["UDP", "TCP", "ANY"]);
        let mut rules = String::new();
        if !rng.chance(10) {
            rules.push_str("\n      rules:\n        dns:");
            for _ in 0..1 + rng.below(3) {
                if rng.chance(50) {
                    let p = random_pattern(rng);
                    let _ = write!(rules, "\n        - matchPattern: \"{p}\"");
                    matchers.push((true, p));
                } else {
                    let name = random_name(rng);
                    let _ = write!(rules, "\n        - matchName: \"{name}\"");
                    matchers.push((false, name));
                }
            }
        }
        let _ = write!(
            yaml,
            "---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: dns-random-{i}
  namespace: default
spec:
  endpointSelector:
    matchLabels: {{{selector}}}
  egress:
  - toEndpoints:
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: kube-system
        k8s:k8s-app: kube-dns
    toPorts:
    - ports:
      - port: \"{port}\"
        protocol: {protocol}{rules}
"
        );
    }
    Generated { yaml, matchers }
}

struct Compiled {
    program: Program,
    checked: cnpc_compiler::CheckReport,
    proxy_policy: ProxyPolicy,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Loads, checks, lowers and builds tables as runtime-loader/src/generation.rs does.
fn compile(file: &Path) -> Compiled {
    let mut set = PolicySet::load(&[file.to_path_buf()]).expect("policies load");
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

#[derive(Default, Debug)]
struct Counts {
    queries: usize,
    forwarded: usize,
    refused: usize,
    judged_by_dns_rules: usize,
    mismatches: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_proxy_agrees_with_the_evaluator() {
    let upstream = DnsUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut total = Counts::default();
    let per_seed = 1000;
    for seed in 1..=16u64 {
        let mut rng = Rng(seed);
        let file = dir.path().join(format!("dns-random-{seed}.yaml"));
        let n = 2 + rng.below(5);
        let generated = random_policies(&mut rng, n);
        std::fs::write(&file, &generated.yaml).expect("write");
        let c = compile(&file);
        let proxy = Proxy::with_config(
            c.proxy_policy.clone(),
            ProxyConfig {
                dns: DnsConfig {
                    upstream_override: Some(upstream.addr),
                    ..DnsConfig::default()
                },
                ..ProxyConfig::default()
            },
        );
        let cluster = c.checked.cluster.as_ref().expect("checked with a cluster");
        let sources = [
            "10.0.1.20",
            "fd00:10:0:1::20",
            "10.0.1.30",
            "10.0.1.40",
            "fd00:10:0:1::40",
        ];
        let mut counts = Counts::default();
        for i in 0..per_seed {
            let src: IpAddr = rng.pick(&sources).parse().expect("literal");
            let dst: IpAddr = if src.is_ipv4() {
                "10.0.1.53"
            } else {
                "fd00:10:0:1::53"
            }
            .parse()
            .expect("literal");
            let port = if rng.chance(85) { 53 } else { 5353 };
            let transport = if rng.chance(60) {
                Transport::Udp
            } else {
                Transport::Tcp
            };
            let base = match (rng.below(3), generated.matchers.is_empty()) {
                (0, false) | (1, false) => {
                    let (pattern, m) =
                        generated.matchers[rng.below(generated.matchers.len())].clone();
                    if pattern {
                        instantiate(&mut rng, &m)
                    } else {
                        m
                    }
                }
                _ => random_name(&mut rng),
            };
            let name = disguise(&mut rng, &base);
            let protocol = match transport {
                Transport::Udp => Protocol::Udp,
                Transport::Tcp => Protocol::Tcp,
            };
            let flow = Flow {
                src: eval::parse_peer(&c.program, cluster, &format!("ip:{src}")).expect("source"),
                dst: eval::parse_peer(&c.program, cluster, &format!("ip:{dst}")).expect("server"),
                protocol,
                port,
                http: None,
                dns_query: Some(name.clone()),
            };
            let verdict = eval::evaluate(&c.program, &flow);
            let egress = &verdict.egress;
            let want = egress.verdict != DirVerdict::Denied
                && egress.l7.as_ref().is_none_or(|l| l.allowed != Some(false));
            if egress.l7.is_some() {
                counts.judged_by_dns_rules += 1;
            }
            let ctx = ConnContext {
                direction: Direction::Egress,
                source: SocketAddr::new(src, 40000),
                original_dst: SocketAddr::new(dst, port),
                source_identity: None,
            };
            let id = (i % 65_536) as u16;
            let bytes = raw_query(id, &name);
            let before = upstream.count();
            let mut up = Upstream::default();
            let outcome = handle_query(proxy.shared(), &ctx, transport, &mut up, &bytes).await;
            let forwarded = upstream.count() > before;
            counts.queries += 1;
            let Outcome::Reply(answer) = outcome else {
                counts
                    .mismatches
                    .push(format!("{seed}-{i}: no answer for {name:?}"));
                continue;
            };
            let answer = Message::from_vec(&answer).expect("a DNS message");
            if answer.metadata.id != id {
                counts
                    .mismatches
                    .push(format!("{seed}-{i}: answer id {}", answer.metadata.id));
            }
            if forwarded {
                counts.forwarded += 1;
            } else {
                counts.refused += 1;
                if answer.metadata.response_code != ResponseCode::Refused {
                    counts.mismatches.push(format!(
                        "{seed}-{i}: not forwarded but {:?}",
                        answer.metadata.response_code
                    ));
                }
            }
            if forwarded != want {
                counts.mismatches.push(format!(
                    "{seed}-{i}: {name:?} from {src} to {dst}:{port}/{protocol:?}: proxy {}, \
                     evaluator {} ({egress:?})",
                    if forwarded { "forwarded" } else { "refused" },
                    if want { "allows" } else { "refuses" },
                ));
            }
        }
        println!(
            "seed {seed}: {} queries, {} forwarded, {} refused, {} judged by DNS rules, {} mismatches",
            counts.queries,
            counts.forwarded,
            counts.refused,
            counts.judged_by_dns_rules,
            counts.mismatches.len()
        );
        total.queries += counts.queries;
        total.forwarded += counts.forwarded;
        total.refused += counts.refused;
        total.judged_by_dns_rules += counts.judged_by_dns_rules;
        total.mismatches.extend(counts.mismatches);
    }
    println!(
        "total: {} queries, {} forwarded, {} refused, {} judged by DNS rules, {} mismatches",
        total.queries,
        total.forwarded,
        total.refused,
        total.judged_by_dns_rules,
        total.mismatches.len()
    );
    assert!(
        total.mismatches.is_empty(),
        "{} mismatches, first: {:#?}",
        total.mismatches.len(),
        &total.mismatches[..total.mismatches.len().min(10)]
    );
    // The comparison only means something if both outcomes occur often and DNS rules decide.
    assert!(total.queries >= 10_000, "{total:?}");
    assert!(total.forwarded > total.queries / 10, "{total:?}");
    assert!(total.refused > total.queries / 10, "{total:?}");
    assert!(total.judged_by_dns_rules > total.queries / 4, "{total:?}");
}
