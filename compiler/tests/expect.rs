//! Property tests for `cnpc test`: over random clusters and policy sets, a case over a whole
//! port space (`any`, `any/TCP`, a range) fails on exactly the ports whose evaluator verdict
//! is not the expected one, so cutting the range into pieces never hides a port; and the
//! bundled expectations files with any line replaced by junk read, expand and run without a
//! panic (problems are diagnostics).

mod common;

use cnpc_compiler::eval::{evaluate, Flow};
use cnpc_compiler::expect::{run, Expectations, Expected};
use common::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// What a mutation puts in place of a value or a line.
const JUNK: &[&str] = &[
    "",
    "~",
    "{}",
    "[]",
    "[{}]",
    "80",
    "-1",
    "70000",
    "any/any",
    "0-0/ICMP",
    "65535-0",
    "pod:",
    "pod:/",
    "labels:",
    "labels:default:",
    "labels:default:=",
    "ip:",
    "ip:::1",
    "fqdn:x=",
    "entity:",
    "{workloads: }",
    "{workloads: {namespace: []}}",
    "{labels: 5}",
    "{labels: {a: {b: c}}}",
    "[pod:default/xwing, ~]",
    "allowed",
    "denied",
    "'",
    "\"",
    "[",
    "{",
    "- x",
    "&a x",
    "*a",
    "é",
    "\t",
    "|\n  x",
    "http: {method: GET, path: /}",
    "dns: ''",
    "expect:",
    "cases:",
    "- from:",
];

/// The Star Wars demo and its snapshot, checked and lowered.
fn demo() -> (cnpc_ir::Program, cnpc_compiler::Cluster) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut set = cnpc_compiler::PolicySet::load(&[root.join("policies/starwars-l4")]).unwrap();
    let cluster =
        cnpc_compiler::Cluster::load(&[root.join("policies/cluster.yaml")], &mut set.sources)
            .unwrap();
    let r = cnpc_compiler::check(set, Some(cluster));
    assert_eq!(r.errors(), 0);
    let cluster = r.cluster.unwrap();
    let program = cnpc_compiler::lower::build(
        &r.set.policies,
        &r.set.sources,
        &cluster,
        &Default::default(),
    );
    (program, cluster)
}

fn bundled() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("policies/expect"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(texts.len() >= 2, "the bundled expectations");
    texts
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_case_fails_on_exactly_the_ports_with_another_verdict(
        pods in prop::collection::vec(pod(), 1..5),
        policies in prop::collection::vec(policy_gen(), 0..4),
        expect_allowed in any::<bool>(),
    ) {
        let (program, cluster, yaml) = build(&pods, &policies);
        let peers: Vec<String> = (0..pods.len())
            .map(|i| format!("pod:ns{}/p{i}", pods[i].ns))
            .chain(["ip:1.2.3.4".to_string(), "ip:2001:db8::1".into(), "entity:host".into()])
            .collect();
        let verdict = if expect_allowed { "allowed" } else { "denied" };
        let mut text = String::from("cases:\n");
        for from in &peers {
            for to in peers.iter().filter(|t| t.starts_with("pod:") || from.starts_with("pod:")) {
                text.push_str(&format!(
                    "- from: {from}\n  to: {to}\n  port: [any, any/TCP, 50-8010/UDP]\n  expect: {verdict}\n"
                ));
            }
        }
        let mut e = Expectations::default();
        e.add_bytes(PathBuf::from("e.yaml"), text.as_bytes());
        prop_assert!(e.diagnostics.is_empty(), "{:?}", e.diagnostics);
        let (checks, diags) = e.expand(&program, &cluster);
        prop_assert!(diags.is_empty(), "{diags:?}");
        let outcomes = run(&program, &e, &checks, None).unwrap();
        let expected = if expect_allowed { Expected::Allowed } else { Expected::Denied };
        for o in &outcomes {
            let c = &checks[o.check];
            for (protocol, port) in probe_ports() {
                let covered = c.port.ranges().iter().any(|(p, r)| *p == protocol && r.contains(port));
                if !covered {
                    continue;
                }
                let flow = Flow { src: c.src.clone(), dst: c.dst.clone(), protocol, port, http: None, dns_query: None };
                let allowed = evaluate(&program, &flow).allowed;
                let wrong = (allowed && expected == Expected::Denied) || (!allowed && expected == Expected::Allowed);
                let listed = o.mismatches.iter().find(|m| m.protocol == protocol && m.ports.contains(port));
                prop_assert_eq!(
                    listed.is_some(),
                    wrong,
                    "{} {}/{}: evaluator allowed={}, listed {:?}\n{}",
                    c.name, port, protocol.as_str(), allowed, listed, yaml
                );
            }
            prop_assert_eq!(o.passed(), o.mismatches.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_expectations_never_panic(
        file in any::<prop::sample::Index>(),
        line in any::<prop::sample::Index>(),
        junk in prop::sample::select(JUNK),
        whole_line in any::<bool>(),
    ) {
        let texts = bundled();
        let text = &texts[file.index(texts.len())];
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let at = line.index(lines.len());
        lines[at] = match lines[at].split_once(": ") {
            Some((key, _)) if !whole_line => format!("{key}: {junk}"),
            _ => junk.to_string(),
        };
        let mutated = lines.join("\n");
        let mut e = Expectations::default();
        e.add_bytes(PathBuf::from("m.yaml"), mutated.as_bytes());
        let (program, cluster) = demo();
        let (checks, diags) = e.expand(&program, &cluster);
        for d in e.diagnostics.iter().chain(&diags) {
            prop_assert!(!d.help.is_empty(), "{d:?}");
            prop_assert!(d.span.line >= 1);
        }
        let outcomes = run(&program, &e, &checks, None).unwrap();
        prop_assert_eq!(outcomes.len(), checks.len());
    }
}
