//! Verification ladder, rung (c), on random input: for random clusters and policy sets (the
//! compiler's property-test generator, shared by path), every generated program loads, and every
//! packet of every pair of parties, protocol and boundary port gets the reference evaluator's
//! verdict in the kernel. At least 100,000 packets per run.

#[path = "../../compiler/tests/common/mod.rs"]
mod common;

use cnpc_compiler::eval::{evaluate, Decision, DirVerdict, Flow};
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_ir::Direction;
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft, Kernel};
use common::*;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeMap;

fn expected(d: &Decision) -> (bool, bool) {
    match (d.verdict, &d.l7) {
        (DirVerdict::Denied, _) => (false, false),
        (_, Some(_)) => (true, true),
        _ => (true, false),
    }
}

#[test]
fn random_policy_sets_agree_with_the_evaluator_in_the_kernel() {
    let cases: u32 = std::env::var("CNPC_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(pod(), 1..7),
        proptest::collection::vec(policy_gen(), 0..4),
    );
    let mut packets = 0usize;
    for _ in 0..cases {
        let (pods, policies) = strategy.new_tree(&mut runner).expect("a value").current();
        let (program, cluster, yaml) = build(&pods, &policies);
        let compiler = TableCompiler::new(&program);
        let kernel = match Kernel::new(&ipcache_entries(&program, &compiler.universe)) {
            Ok(k) => k,
            Err(e) => return sys::skip_or_fail(&e.to_string()),
        };
        let mut programs = BTreeMap::new();
        for t in compiler.all(&program) {
            match kernel.load(&t) {
                Ok(fd) => {
                    programs.insert((t.subject, t.direction), fd);
                }
                Err(e) if e.to_string().contains("Operation not permitted") => {
                    return sys::skip_or_fail(&e.to_string())
                }
                Err(e) => panic!(
                    "program of {:?} rejected: {e}\n{yaml}",
                    (t.subject, t.direction)
                ),
            }
        }
        let parties: Vec<_> = parties(&program, &cluster, &pods)
            .into_iter()
            .filter(|p| p.ip.is_some())
            .collect();
        for src in &parties {
            for dst in &parties {
                for (protocol, port) in probe_ports() {
                    let flow = Flow {
                        src: src.clone(),
                        dst: dst.clone(),
                        protocol,
                        port,
                        http: None,
                        dns_query: None,
                    };
                    let v = evaluate(&program, &flow);
                    let packet = craft(src.ip.unwrap(), dst.ip.unwrap(), protocol, port);
                    for (party, dir, decision) in [
                        (src, Direction::Egress, &v.egress),
                        (dst, Direction::Ingress, &v.ingress),
                    ] {
                        let Some(id) = party
                            .endpoint
                            .as_ref()
                            .filter(|e| e.is_pod)
                            .and(party.identity)
                        else {
                            continue;
                        };
                        let out = kernel.run(&programs[&(id, dir)], &packet).unwrap();
                        packets += 1;
                        assert_eq!(
                            (out.allowed(), out.proxied()),
                            expected(decision),
                            "{} -> {} {port}/{} {dir:?}: kernel {out:?}, evaluator {:?}\npolicies:\n{yaml}",
                            src.name,
                            dst.name,
                            protocol.as_str(),
                            decision
                        );
                    }
                }
            }
        }
    }
    eprintln!("{packets} packets over {cases} random policy sets agreed with the evaluator");
    assert!(cases < 32 || packets >= 100_000, "only {packets} packets");
}
