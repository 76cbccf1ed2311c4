//! Property tests for `cnpc diff`: a policy set against itself changes nothing, and between two
//! random policy sets the diff lists exactly the flows whose evaluator verdict differs.

mod common;

use cnpc_compiler::diff::{diff, Outcome};
use cnpc_compiler::eval::{evaluate, Flow, Party};
use cnpc_ir::Program;
use common::*;
use proptest::prelude::*;

/// The name the diff gives a pod party: the workload of the first endpoint of its identity.
fn diff_name(program: &Program, p: &Party) -> Option<String> {
    let e = p.endpoint.as_ref()?;
    let mut same: Vec<_> = program
        .endpoints
        .values()
        .filter(|x| x.is_pod && x.identity == e.identity)
        .collect();
    same.sort_by(|a, b| a.name.cmp(&b.name));
    Some(same.first()?.workload.clone())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_policy_set_against_itself_changes_nothing(
        pods in prop::collection::vec(pod(), 1..6),
        policies in prop::collection::vec(policy_gen(), 0..4),
    ) {
        let (program, _, yaml) = build(&pods, &policies);
        let changes = diff(&program, &program);
        prop_assert!(changes.is_empty(), "{changes:?}\n{yaml}");
    }

    #[test]
    fn diff_lists_exactly_the_flows_whose_verdict_differs(
        pods in prop::collection::vec(pod(), 1..6),
        a in prop::collection::vec(policy_gen(), 0..3),
        b in prop::collection::vec(policy_gen(), 0..3),
    ) {
        let (old, cluster, yaml_a) = build(&pods, &a);
        let (new, _, yaml_b) = build(&pods, &b);
        let changes = diff(&old, &new);
        let parties = parties(&new, &cluster, &pods);
        let pods_only: Vec<&Party> = parties.iter().filter(|p| p.endpoint.is_some()).collect();
        for src in &pods_only {
            for dst in &pods_only {
                let (Some(from), Some(to)) = (diff_name(&new, src), diff_name(&new, dst)) else { continue };
                for (protocol, port) in probe_ports() {
                    let flow = Flow { src: (*src).clone(), dst: (*dst).clone(), protocol, port, http: None, dns_query: None };
                    let (before, after) = (Outcome::of(&evaluate(&old, &flow)), Outcome::of(&evaluate(&new, &flow)));
                    let listed = changes.iter().find(|c| c.from == from && c.to == to && c.protocol == protocol && c.ports.contains(port));
                    match listed {
                        Some(c) => prop_assert!(c.before == before && c.after == after, "{from} -> {to} {port}/{}: listed {c:?}, evaluator {before:?} -> {after:?}\nA:\n{yaml_a}\nB:\n{yaml_b}", protocol.as_str()),
                        None => prop_assert_eq!(before, after, "{} -> {} {}/{} flipped but is not listed\nA:\n{}\nB:\n{}", from, to, port, protocol.as_str(), yaml_a, yaml_b),
                    }
                }
            }
        }
    }
}
