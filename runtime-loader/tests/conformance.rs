//! Kubernetes NetworkPolicy conformance: the test cases of the upstream e2e suite
//! (kubernetes/kubernetes test/e2e/network/netpol/network_policy.go), each as the policies it
//! applies and the truth table it expects, run through cnpc's three engines: the reference
//! evaluator, the decision tables, and the generated programs in the kernel
//! (BPF_PROG_TEST_RUN, the source's egress program then the destination's ingress program).
//!
//! Data: `tests/conformance/cluster.yaml` is the suite's model (namespaces x, y, z; pods a, b, c
//! in each, serving 80 and 81 on TCP, UDP and SCTP, dual stack). Each other file is one case:
//!
//! - `it`: the `It("...")` name it reproduces (the file's comment names the Describe/Context);
//! - `steps`: one per state the test validates (a policy created, updated or deleted, a label
//!   added), each with the complete `policies` in force then (YAML, `---` between objects), an
//!   optional `cluster` patch (`namespaceLabels: {ns: {k: v}}`, `podLabels: {ns/pod: {k: v}}`,
//!   labels added to the snapshot), and its `checks`;
//! - a check: `port` (`80/TCP`), `families` (`[4]`, `[6]`; both by default), `upstream` (the
//!   test's own `Expect*` calls on a table that starts all-allowed, transcribed by hand, with x,
//!   y, z for nsX, nsY, nsZ), and `table`, the truth table those calls give, printed as the
//!   suite prints it (`.` allowed, `X` denied; rows are sources, columns destinations). The
//!   test replays `upstream` and requires it to give `table`.
//! - `cnpc-differs` (on a check): cells where cnpc, following Cilium, answers otherwise than
//!   Kubernetes, with the reason. The expectation stays upstream's; the test requires cnpc to
//!   differ on exactly these cells, so the divergence stays visible and pinned.
//!
//! As upstream (`ignoreLoopback`), a pod's traffic to itself is not held to the table; the
//! three engines must still agree on it.

use cnpc_codegen_bpf::gen;
use cnpc_compiler::eval::{evaluate, parse_peer, DirVerdict, Flow, Party};
use cnpc_compiler::tables::{ipcache_entries, peer_of, TableCompiler};
use cnpc_compiler::{check as check_policies, load_str, lower, Cluster};
use cnpc_ir::{DecisionTable, Direction, NumericIdentity, Protocol, TableVerdict};
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft, Kernel};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const POD_NAMES: [&str; 3] = ["a", "b", "c"];

fn pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|n| POD_NAMES.iter().map(move |p| format!("{n}/{p}")))
        .collect()
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// A pod's address in `cluster.yaml`.
fn address(pod: usize, family: u8) -> String {
    let (ns, p) = (pod / 3, pod % 3 + 1);
    match family {
        4 => format!("10.10.{ns}.{p}"),
        _ => format!("fd00:10:10:{ns}::{p}"),
    }
}

struct Check {
    port: u16,
    protocol: Protocol,
    families: Vec<u8>,
    /// expected[from][to]: allowed.
    expected: Vec<Vec<bool>>,
    differs: BTreeSet<(usize, usize)>,
}

struct Step {
    cluster: String,
    policies: String,
    checks: Vec<Check>,
}

struct Case {
    file: String,
    it: String,
    steps: Vec<Step>,
}

fn str_of<'a>(y: &'a Yaml, what: &str, file: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{file}: `{what}` must be a string, found {y:?}"))
}

fn pod_index(name: &str, file: &str) -> usize {
    pods()
        .iter()
        .position(|p| p == name.trim())
        .unwrap_or_else(|| panic!("{file}: no pod {name:?}"))
}

/// Replays the suite's `Expect*` calls (reachability.go) on an all-allowed table.
fn replay(calls: &[String], file: &str) -> Vec<Vec<bool>> {
    let pods = pods();
    let mut t = vec![vec![true; 9]; 9];
    // A Peer: `{}`, `{Namespace: x}`, `{Namespace: x, Pod: a}`; empty fields match everything.
    let peer = |s: &str| -> Box<dyn Fn(&str) -> bool> {
        let inner = s
            .trim()
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{file}: not a Peer: {s:?}"));
        let (mut ns, mut pod) = (None, None);
        for kv in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once(':').expect("Peer field");
            match k.trim() {
                "Namespace" => ns = Some(v.trim().to_string()),
                "Pod" => pod = Some(v.trim().to_string()),
                other => panic!("{file}: Peer field {other}"),
            }
        }
        Box::new(move |p: &str| {
            let (n, name) = p.split_once('/').unwrap();
            ns.as_deref().is_none_or(|x| x == n) && pod.as_deref().is_none_or(|x| x == name)
        })
    };
    for call in calls {
        let (name, rest) = call
            .split_once('(')
            .unwrap_or_else(|| panic!("{file}: {call:?}"));
        let args = rest.strip_suffix(')').expect("closing parenthesis");
        // Split on commas outside braces.
        let mut parts = Vec::new();
        let (mut depth, mut cur) = (0, String::new());
        for ch in args.chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if ch == ',' && depth == 0 {
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(ch);
            }
        }
        parts.push(cur);
        let value = match parts.last().map(|s| s.trim()) {
            Some("true") => true,
            Some("false") => false,
            v => panic!("{file}: {call:?}: last argument {v:?}"),
        };
        match (name.trim(), parts.len()) {
            ("ExpectPeer", 3) => {
                let (from, to) = (peer(&parts[0]), peer(&parts[1]));
                for (i, f) in pods.iter().enumerate() {
                    for (j, d) in pods.iter().enumerate() {
                        if from(f) && to(d) {
                            t[i][j] = value;
                        }
                    }
                }
            }
            ("Expect", 3) => t[pod_index(&parts[0], file)][pod_index(&parts[1], file)] = value,
            ("ExpectAllIngress", 2) => {
                let j = pod_index(&parts[0], file);
                t.iter_mut().for_each(|row| row[j] = value);
            }
            ("ExpectAllEgress", 2) => t[pod_index(&parts[0], file)] = vec![value; 9],
            _ => panic!("{file}: unknown call {call:?}"),
        }
    }
    t
}

/// The grid as the suite prints it: a header of destinations, then one row per source.
fn parse_table(text: &str, file: &str) -> Vec<Vec<bool>> {
    let pods = pods();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .expect("table header")
        .split_whitespace()
        .collect();
    assert_eq!(header[0], "-", "{file}: table header");
    assert_eq!(header[1..], pods, "{file}: table columns");
    let rows: Vec<Vec<bool>> = lines
        .enumerate()
        .map(|(i, l)| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cells[0], pods[i], "{file}: table row {i}");
            assert_eq!(cells.len(), 10, "{file}: row {}", cells[0]);
            cells[1..]
                .iter()
                .map(|c| match *c {
                    "." => true,
                    "X" => false,
                    other => panic!("{file}: cell {other:?}"),
                })
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 9, "{file}: table rows");
    rows
}

/// A table as `parse_table` reads it.
fn render(t: &[Vec<bool>]) -> String {
    let pods = pods();
    let mut out = format!("-   {}\n", pods.join(" "));
    for (i, row) in t.iter().enumerate() {
        let cells: Vec<&str> = row.iter().map(|&b| if b { ".  " } else { "X  " }).collect();
        out.push_str(&format!("{} {}\n", pods[i], cells.join(" ").trim_end()));
    }
    out
}

/// cluster.yaml with labels added (a step's `cluster` patch).
fn patched_cluster(base: &str, patch: &Yaml, file: &str) -> String {
    let mut doc = YamlLoader::load_from_str(base).unwrap().remove(0);
    let items = doc["items"].as_mut_vec().expect("items");
    let mut add = |kind: &str, ns: Option<&str>, name: &str, labels: &Yaml| {
        let item = items
            .iter_mut()
            .find(|i| {
                i["kind"].as_str() == Some(kind)
                    && i["metadata"]["name"].as_str() == Some(name)
                    && i["metadata"]["namespace"].as_str() == ns
            })
            .unwrap_or_else(|| panic!("{file}: no {kind} {ns:?}/{name} to patch"));
        let target = item["metadata"]["labels"].as_mut_hash().expect("labels");
        for (k, v) in labels.as_hash().expect("labels to add") {
            target.insert(k.clone(), v.clone());
        }
    };
    for (ns, labels) in patch["namespaceLabels"].as_hash().into_iter().flatten() {
        add("Namespace", None, str_of(ns, "namespace", file), labels);
    }
    for (pod, labels) in patch["podLabels"].as_hash().into_iter().flatten() {
        let (ns, name) = str_of(pod, "pod", file).split_once('/').expect("ns/pod");
        add("Pod", Some(ns), name, labels);
    }
    let mut out = String::new();
    YamlEmitter::new(&mut out).dump(&doc).unwrap();
    out
}

fn load_cases() -> Vec<Case> {
    let base = std::fs::read_to_string(data_dir().join("cluster.yaml")).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("cluster.yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc = &YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))[0];
        let mut steps = Vec::new();
        for s in doc["steps"].as_vec().expect("steps") {
            let cluster = match &s["cluster"] {
                Yaml::BadValue => base.clone(),
                patch => patched_cluster(&base, patch, &file),
            };
            let mut checks = Vec::new();
            for c in s["checks"].as_vec().expect("checks") {
                let (port, proto) = str_of(&c["port"], "port", &file)
                    .split_once('/')
                    .expect("PORT/PROTOCOL");
                let upstream: Vec<String> = c["upstream"]
                    .as_vec()
                    .unwrap_or_else(|| panic!("{file}: `upstream` must be a list"))
                    .iter()
                    .map(|u| str_of(u, "upstream", &file).to_string())
                    .collect();
                let expected = parse_table(str_of(&c["table"], "table", &file), &file);
                let replayed = replay(&upstream, &file);
                assert!(
                    replayed == expected,
                    "{file}: the table is not what the upstream calls give; they give\n{}",
                    render(&replayed)
                );
                let families = match c["families"].as_vec() {
                    Some(v) => v.iter().map(|f| f.as_i64().unwrap() as u8).collect(),
                    None => vec![4, 6],
                };
                let differs = c["cnpc-differs"]["pairs"]
                    .as_vec()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        let (f, t) = str_of(p, "pair", &file).split_once("->").expect("A -> B");
                        (pod_index(f, &file), pod_index(t, &file))
                    })
                    .collect();
                checks.push(Check {
                    port: port.parse().unwrap(),
                    protocol: Protocol::parse(proto).unwrap(),
                    families,
                    expected,
                    differs,
                });
            }
            steps.push(Step {
                cluster,
                policies: str_of(&s["policies"], "policies", &file).to_string(),
                checks,
            });
        }
        cases.push(Case {
            it: str_of(&doc["it"], "it", &file).to_string(),
            file,
            steps,
        });
    }
    cases
}

/// One engine's answer for a flow: (egress of the source, ingress of the destination).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Answer(bool, bool);

impl Answer {
    fn allowed(self) -> bool {
        self.0 && self.1
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let w = |b: bool| if b { "allowed" } else { "denied" };
        write!(
            f,
            "{} (egress {}, ingress {})",
            w(self.allowed()),
            w(self.0),
            w(self.1)
        )
    }
}

/// The kernel, and the loaded programs of every identity; `None` when BPF is not permitted.
struct Loaded {
    kernel: Kernel,
    programs: BTreeMap<(NumericIdentity, Direction), OwnedFd>,
}

fn load(tables: &[DecisionTable], entries: &[(cnpc_ir::IpNet, NumericIdentity)]) -> Option<Loaded> {
    let mut kernel = match Kernel::new(entries) {
        Ok(k) => k,
        Err(e) => {
            sys::skip_or_fail(&e.to_string());
            return None;
        }
    };
    let mut programs = BTreeMap::new();
    for t in tables {
        let track = gen::needs_tracking(tables.iter().filter(|o| o.subject == t.subject));
        match kernel.load(t, track) {
            Ok(fd) => {
                programs.insert((t.subject, t.direction), fd);
            }
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                return None;
            }
            Err(e) => panic!(
                "the program of {:?} was rejected: {e}",
                (t.subject, t.direction)
            ),
        }
    }
    Some(Loaded { kernel, programs })
}

#[derive(Default)]
struct Totals {
    cases: usize,
    steps: usize,
    checks: usize,
    rows: usize,
    compared: usize,
    divergent: usize,
    packets: usize,
    kernel_skipped: bool,
}

fn run_case(case: &Case, totals: &mut Totals, mismatches: &mut Vec<String>) {
    let pods = pods();
    for (si, step) in case.steps.iter().enumerate() {
        let name = format!("{} step {}", case.file, si + 1);
        let mut set = load_str(&format!("{name}.yaml"), &step.policies);
        let mut cluster = Cluster::default();
        cluster.add_str(
            &mut set.sources,
            Path::new("conformance/cluster.yaml"),
            &step.cluster,
        );
        let r = check_policies(set, Some(cluster));
        assert_eq!(
            r.errors(),
            0,
            "{name}: {}",
            cnpc_compiler::report::human(&r, false)
        );
        // Every object of the step is a NetworkPolicy that must be in force.
        let objects = step.policies.matches("kind: NetworkPolicy").count();
        assert_eq!(r.set.policies.len(), objects, "{name}: policies loaded");
        let cluster = r.cluster.unwrap();
        let program = lower::build(
            &r.set.policies,
            &r.set.sources,
            &cluster,
            &Default::default(),
        );
        let compiler = TableCompiler::new(&program);
        let tables = compiler.all(&program);
        let by_subject: BTreeMap<(NumericIdentity, Direction), &DecisionTable> = tables
            .iter()
            .map(|t| ((t.subject, t.direction), t))
            .collect();
        let entries = ipcache_entries(&program, &compiler.universe);
        let loaded = if totals.kernel_skipped {
            None
        } else {
            let l = load(&tables, &entries);
            totals.kernel_skipped = l.is_none();
            l
        };
        // Each pod at each of its addresses.
        let party = |pod: usize, family: u8| -> (Party, NumericIdentity) {
            let ip = address(pod, family);
            let p = parse_peer(&program, &cluster, &format!("ip:{ip}")).unwrap();
            assert_eq!(
                p.endpoint.as_ref().map(|e| e.name.as_str()),
                Some(pods[pod].as_str()),
                "{name}: {ip}"
            );
            let id = peer_of(&compiler.universe, &p).expect("a pod's identity");
            (p, id)
        };
        for check in &step.checks {
            totals.checks += 1;
            let (port, proto) = (check.port, check.protocol);
            for &family in &check.families {
                for from in 0..9 {
                    for to in 0..9 {
                        let ((src, src_id), (dst, dst_id)) =
                            (party(from, family), party(to, family));
                        let v = evaluate(
                            &program,
                            &Flow {
                                src: src.clone(),
                                dst: dst.clone(),
                                protocol: proto,
                                port,
                                http: None,
                                dns_query: None,
                            },
                        );
                        let reference = Answer(
                            v.egress.verdict != DirVerdict::Denied,
                            v.ingress.verdict != DirVerdict::Denied,
                        );
                        assert_eq!(reference.allowed(), v.allowed, "{name}: no L7 here");
                        let lookup = |id, dir, peer| {
                            by_subject[&(id, dir)].lookup(peer, proto, port) != &TableVerdict::Deny
                        };
                        let table = Answer(
                            lookup(src_id, Direction::Egress, dst_id),
                            lookup(dst_id, Direction::Ingress, src_id),
                        );
                        let kernel = loaded.as_ref().map(|l| {
                            let packet = craft(src.ip.unwrap(), dst.ip.unwrap(), proto, port);
                            let mut run = |id, dir| {
                                totals.packets += 1;
                                l.kernel
                                    .run(&l.programs[&(id, dir)], &packet)
                                    .expect("BPF_PROG_TEST_RUN")
                                    .allowed()
                            };
                            Answer(
                                run(src_id, Direction::Egress),
                                run(dst_id, Direction::Ingress),
                            )
                        });
                        totals.rows += 1;
                        let flow = format!(
                            "{name} ({}): {} -> {} {port}/{} IPv{family}",
                            case.it,
                            pods[from],
                            pods[to],
                            proto.as_str()
                        );
                        let kernel_text = kernel.map_or("not run".to_string(), |k| k.to_string());
                        if table != reference || kernel.is_some_and(|k| k != reference) {
                            mismatches.push(format!(
                                "{flow}: engines disagree: evaluator {reference}, tables {table}, kernel {kernel_text}"
                            ));
                            continue;
                        }
                        if from == to {
                            continue; // upstream ignoreLoopback
                        }
                        totals.compared += 1;
                        let expected = check.expected[from][to];
                        let word = |b: bool| if b { "allowed" } else { "denied" };
                        if check.differs.contains(&(from, to)) {
                            totals.divergent += 1;
                            if reference.allowed() == expected {
                                mismatches.push(format!(
                                    "{flow}: listed in cnpc-differs, but every engine now gives Kubernetes' answer ({}); remove it from the list",
                                    word(expected)
                                ));
                            }
                        } else if reference.allowed() != expected {
                            mismatches.push(format!(
                                "{flow}: Kubernetes expects {}; evaluator {reference}, tables {table}, kernel {kernel_text}",
                                word(expected)
                            ));
                        }
                    }
                }
            }
        }
        totals.steps += 1;
    }
    totals.cases += 1;
}

#[test]
fn upstream_network_policy_cases_hold_in_every_engine() {
    let cases = load_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut totals = Totals::default();
    let mut mismatches = Vec::new();
    for case in &cases {
        run_case(case, &mut totals, &mut mismatches);
    }
    eprintln!(
        "conformance: {} cases, {} steps, {} checks, {} rows (pairs x port x family) through 3 engines{}, \
         {} held to the upstream table ({} of them documented divergences), {} packets in the kernel",
        totals.cases,
        totals.steps,
        totals.checks,
        totals.rows,
        if totals.kernel_skipped { " (kernel SKIPPED)" } else { "" },
        totals.compared,
        totals.divergent,
        totals.packets
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
