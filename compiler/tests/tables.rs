//! Property test (DESIGN.md §5): for random clusters and policies, every decision table answers
//! every flow exactly as the reference evaluator does. Policies are generated as YAML and go
//! through the real front end, so lowering is exercised too.

mod common;

use cnpc_compiler::eval::{evaluate, DirVerdict, Flow};
use cnpc_compiler::tables::{decision_table, peer_of, peer_universe};
use cnpc_ir::{Direction, TableVerdict};
use common::*;
use proptest::prelude::*;

fn expected(d: &cnpc_compiler::eval::Decision) -> TableVerdict {
    match (d.verdict, &d.l7) {
        (DirVerdict::Denied, _) => TableVerdict::Deny,
        (_, Some(_)) => TableVerdict::Proxy(Vec::new()),
        _ => TableVerdict::Allow,
    }
}

fn same(table: &TableVerdict, want: &TableVerdict) -> bool {
    matches!(
        (table, want),
        (TableVerdict::Allow, TableVerdict::Allow)
            | (TableVerdict::Deny, TableVerdict::Deny)
            | (TableVerdict::Proxy(_), TableVerdict::Proxy(_))
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn tables_answer_every_flow_like_the_evaluator(
        pods in prop::collection::vec(pod(), 1..7),
        policies in prop::collection::vec(policy_gen(), 0..4),
    ) {
        let (program, cluster, yaml) = build(&pods, &policies);
        let universe = peer_universe(&program);
        // The fast table compiler builds exactly the reference tables.
        let fast = cnpc_compiler::tables::all_tables(&program);
        let reference = cnpc_compiler::tables::all_tables_reference(&program);
        prop_assert_eq!(&fast, &reference, "{}", yaml);

        let parties = parties(&program, &cluster, &pods);
        let ports = probe_ports();
        let mut checked = 0;
        for src in &parties {
            for dst in &parties {
                let egress_table = src.endpoint.as_ref().map(|e| decision_table(&program, &universe, e, Direction::Egress));
                let ingress_table = dst.endpoint.as_ref().map(|e| decision_table(&program, &universe, e, Direction::Ingress));
                for &(protocol, port) in &ports {
                    let flow = Flow { src: src.clone(), dst: dst.clone(), protocol, port, http: None, dns_query: None };
                    let v = evaluate(&program, &flow);
                    for (table, decision, peer) in [(&egress_table, &v.egress, &flow.dst), (&ingress_table, &v.ingress, &flow.src)] {
                        let Some(table) = table else { continue };
                        let Some(peer_id) = peer_of(&universe, peer) else { continue };
                        let got = table.lookup(peer_id, protocol, port);
                        let want = expected(decision);
                        prop_assert!(same(got, &want), "{} -> {} {}/{}: table {:?}, evaluator {:?} ({:?})\npolicies:\n{}\ntable: {:#?}", src.name, dst.name, port, protocol.as_str(), got, want, decision, yaml, table);
                        checked += 1;
                    }
                }
            }
        }
        prop_assert!(checked > 0);
    }
}
