//! Every row of every table of the example sets is explained by rules (issue 11: a verdict
//! event names its table row, and `cnpc observe` names the policy, file and line behind it):
//! rules of the subject's direction that select the row's peers, cover its ports, and act as
//! the row does. Checked against the reference evaluator's own reasons for a flow of the row.

use cnpc_compiler::eval::{self, Flow};
use cnpc_compiler::tables::TableCompiler;
use cnpc_compiler::{check, lower, Cluster, PolicySet};
use cnpc_ir::{Action, Direction, TableVerdict};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

#[test]
fn every_row_of_the_examples_names_the_rules_behind_it() {
    let mut rows = 0;
    for dir in [
        "policies/starwars-l4",
        "policies/starwars-l7",
        "policies/dns/match-name",
        "policies/dns/match-pattern-443",
    ] {
        let mut set = PolicySet::load(&[root().join(dir)]).unwrap();
        let cluster =
            Cluster::load(&[root().join("policies/cluster.yaml")], &mut set.sources).unwrap();
        let r = check(set, Some(cluster));
        assert_eq!(r.errors(), 0, "{dir}");
        let cluster = r.cluster.as_ref().unwrap();
        let program = lower::build(
            &r.set.policies,
            &r.set.sources,
            cluster,
            &Default::default(),
        );
        let compiler = TableCompiler::new(&program);
        for table in compiler.all(&program) {
            let subject = program
                .endpoints
                .values()
                .find(|e| e.is_pod && program.identities[e.identity].numeric == table.subject)
                .unwrap();
            let explained = compiler.row_rules(&program, subject, &table);
            assert_eq!(explained.len(), table.rows.len());
            for (row, refs) in table.rows.iter().zip(&explained) {
                rows += 1;
                assert!(
                    !refs.is_empty(),
                    "{dir}: {table:?} row {row:?} names no rule"
                );
                for r in refs {
                    let rule = &program.rules[*r];
                    assert_eq!(rule.direction, table.direction);
                    assert_eq!(
                        rule.action == Action::Deny,
                        row.verdict == TableVerdict::Deny,
                        "{dir}: {row:?} explained by {rule:?}"
                    );
                }
                // Where a pod of the row's class exists, the evaluator gives the same reasons.
                let peer = table.classes[row.class as usize].members[0];
                let Some(peer_ep) = program
                    .endpoints
                    .values()
                    .find(|e| e.is_pod && program.identities[e.identity].numeric == peer)
                else {
                    continue;
                };
                let party = |e: &cnpc_ir::Endpoint| {
                    eval::parse_peer(&program, cluster, &format!("pod:{}", e.name)).unwrap()
                };
                let (src, dst) = match table.direction {
                    Direction::Egress => (party(subject), party(peer_ep)),
                    Direction::Ingress => (party(peer_ep), party(subject)),
                };
                let flow = Flow {
                    src,
                    dst,
                    protocol: row.protocol,
                    port: row.ports.lo,
                    http: None,
                    dns_query: None,
                };
                let v = eval::evaluate(&program, &flow);
                let decision = match table.direction {
                    Direction::Egress => &v.egress,
                    Direction::Ingress => &v.ingress,
                };
                for r in refs {
                    let origin = &program.rules[*r].origin;
                    assert!(
                        decision.rules.iter().any(|reason| &reason.origin == origin),
                        "{dir}: {origin:?} behind {row:?}, the evaluator says {:?}",
                        decision.rules
                    );
                }
            }
        }
    }
    assert!(rows > 10, "{rows} rows");
}
