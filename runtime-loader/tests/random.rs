//! Verification ladder, rung (c), on random input: for random clusters and policy sets (the
//! compiler's property-test generator, shared by path), every generated program loads, and every
//! packet of every pair of parties, protocol and boundary port gets the reference evaluator's
//! verdict in the kernel, over IPv4 and IPv6 and with every form of decision (and of finding
//! peers by address: in code, the address map, address windows); a packet that opens a
//! connection creates exactly one conntrack entry, and its reply passes. At least 100,000
//! packets per run.

#[path = "../../compiler/tests/common/mod.rs"]
mod common;

use cnpc_codegen_bpf::gen;
use cnpc_compiler::eval::{evaluate, Decision, DirVerdict, Flow};
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_ir::{Direction, Protocol};
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft, craft_ports, Kernel};
use common::*;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeMap;

/// (passed, redirected, proxied). Proxied packets fail closed when no proxy takes them: in a
/// test run the egress programs (which hand TCP and UDP over) find no proxy socket, or cannot
/// assign one, and drop; the ingress programs redirect TCP to the proxy device (`proxy_config`
/// names one here). Other protocols, and UDP at ingress, are not proxied: dropped with the
/// mark, which says the table proxies them.
fn expected(d: &Decision, dir: Direction, protocol: Protocol) -> (bool, bool, bool) {
    match (d.verdict, &d.l7) {
        (DirVerdict::Denied, _) => (false, false, false),
        (_, Some(_)) => (
            false,
            dir == Direction::Ingress && protocol == Protocol::Tcp,
            true,
        ),
        _ => (true, false, false),
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
    // Addresses the inlined forms held: they must hold some for the test to mean anything.
    let mut inlined = 0usize;
    // Programs that held addresses in windows, and in the address map.
    let (mut windowed, mut mapped) = (0usize, 0usize);
    // Each form of decision the generator has, in turn: small random tables would otherwise
    // never reach the binary-search and map forms. The last four find the peers the tables
    // tell apart by address (gen::generate_inlined): compared in code, in the address map, or
    // in address windows (which small tables reach only when code is allowed no address; the
    // address map only when windows are refused too). Inline bounds: (max_code_addresses,
    // max_window_slots).
    let windows = gen::INLINE_MAX_WINDOW_SLOTS;
    let forms = [
        (None, None),
        (Some(gen::Strategy::BinarySearch), None),
        (Some(gen::Strategy::Maps), None),
        (None, Some((gen::INLINE_MAX_ADDRESSES, windows))),
        (Some(gen::Strategy::Maps), Some((0, 0))),
        (None, Some((0, windows))),
        (Some(gen::Strategy::Maps), Some((0, windows))),
    ];
    // Random sets reach the address map only now and then (a small table with single-port
    // rows, under the form that refuses code and windows): past `cases`, sets keep coming,
    // up to four times as many, until every inlined form has been seen.
    let mut case = 0;
    while case < cases || (inlined == 0 || windowed == 0 || mapped == 0) && case < cases * 4 {
        case += 1;
        let form = forms[(case - 1) as usize % forms.len()];
        let (pods, policies) = strategy.new_tree(&mut runner).expect("a value").current();
        let (program, cluster, yaml) = build(&pods, &policies);
        let compiler = TableCompiler::new(&program);
        let entries = ipcache_entries(&program, &compiler.universe);
        let hosts = gen::HostAddresses::new(&entries);
        let mut kernel = match Kernel::new(&entries) {
            Ok(k) => k,
            Err(e) => return sys::skip_or_fail(&e.to_string()),
        };
        // A proxy device, so that ingress Proxy verdicts redirect (the index is never used in
        // a test run).
        kernel.set_proxy_device(1).expect("proxy_config");
        let tables = compiler.all(&program);
        let mut programs = BTreeMap::new();
        let mut tracking = BTreeMap::new();
        for t in &tables {
            let track = gen::needs_tracking(tables.iter().filter(|o| o.subject == t.subject));
            tracking.insert(t.subject, track);
            let generated = match form {
                (None, None) => gen::generate(t, track),
                (Some(s), None) => gen::build(t, track, s),
                (strategy, Some((max_code_addresses, max_window_slots))) => {
                    let inline = gen::Inline {
                        max_code_addresses,
                        max_window_slots,
                        ..gen::Inline::new(&hosts)
                    };
                    match strategy {
                        None => gen::generate_inlined(t, track, &inline),
                        Some(s) => gen::build_inlined(t, track, s, &inline),
                    }
                }
            };
            if form.1.is_some() {
                inlined += generated.inlined.len();
                let has = |prefix| {
                    generated
                        .maps
                        .iter()
                        .any(|m| m.def.name.starts_with(prefix))
                };
                windowed += usize::from(has(gen::ADDRESS_WINDOW_MAP_PREFIX));
                mapped += usize::from(has(gen::ADDRESS_MAP_PREFIX));
            }
            match kernel.load_generated(&generated) {
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
        let parties = dual_stack(
            parties(&program, &cluster, &pods)
                .into_iter()
                .filter(|p| p.ip.is_some())
                .collect(),
        );
        for src in &parties {
            for dst in &parties {
                let (Some(sip), Some(dip)) = (src.ip, dst.ip) else {
                    continue;
                };
                if sip.is_ipv4() != dip.is_ipv4() {
                    continue;
                }
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
                    let packet = craft(sip, dip, protocol, port);
                    let reply = craft_ports(dip, sip, protocol, port, 40000);
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
                        let (out, back) = kernel
                            .run_with_reply(
                                &programs[&(id, dir)],
                                &programs[&(id, dir.reverse())],
                                &packet,
                                &reply,
                            )
                            .unwrap();
                        packets += 1 + usize::from(back.is_some());
                        let what = || {
                            format!(
                                "{} -> {} {port}/{} {dir:?}: kernel {out:?}, evaluator {:?}\ntable: {:#?}\npolicies:\n{yaml}",
                                src.name,
                                dst.name,
                                protocol.as_str(),
                                decision,
                                tables.iter().find(|t| t.subject == id && t.direction == dir)
                            )
                        };
                        assert_eq!(
                            (out.passed(), out.redirected(), out.proxied()),
                            expected(decision, dir, protocol),
                            "{}",
                            what()
                        );
                        // Endpoints that allow everything both ways track nothing.
                        let tracked = tracking[&id]
                            && matches!(protocol, Protocol::Tcp | Protocol::Udp | Protocol::Sctp);
                        let opener = match dir {
                            Direction::Egress => gen::CT_OPENED_BY_EGRESS,
                            Direction::Ingress => gen::CT_OPENED_BY_INGRESS,
                        };
                        assert_eq!(
                            out.opened,
                            (out.handed_on() && tracked).then_some(opener),
                            "conntrack: {}",
                            what()
                        );
                        if let Some(back) = back {
                            assert!(back.passed(), "the reply was dropped: {}", what());
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{packets} packets over {case} random policy sets agreed with the evaluator \
         ({inlined} peer addresses held by programs; {windowed} programs held them in \
         address windows, {mapped} in the address map)"
    );
    assert!(
        cases < 32 || (inlined > 0 && windowed > 0 && mapped > 0),
        "no program held a peer's address in one of the forms"
    );
    assert!(cases < 32 || packets >= 100_000, "only {packets} packets");
}
