//! Verification ladder, rung (c), for the two ways large tables are laid out in maps
//! (`gen::MapKeys`): map records keyed by the peer's identity, or by its class after an
//! identity-to-class lookup. Packets run through the loaded programs in the kernel
//! (BPF_PROG_TEST_RUN) get the reference evaluator's verdict
//! - on random clusters and policy sets (the compiler's property-test generator, shared by
//!   path) with every table forced into maps, once keyed each way;
//! - on a cluster of large label groups with egress and ingress port ranges (allow and deny),
//!   where the generator picks the keys by size: class keys for the large tables, and every
//!   table's images then grow with its classes and port prefixes, not with its peers.
//!
//! Root and bpffs are needed; without them the tests say SKIPPED (or fail under
//! CNPC_REQUIRE_KERNEL=1). It lives with the loader, whose test runner it uses (codegen-bpf
//! does not reach up to the loader).

#[path = "../../compiler/tests/common/mod.rs"]
mod common;

use cnpc_codegen_bpf::gen::{self, MapKeys, Strategy};
use cnpc_compiler::eval::{evaluate, parse_peer, Decision, DirVerdict, Flow, Party};
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_compiler::{check, load_str, lower, Cluster};
use cnpc_ir::{DecisionTable, Direction, NumericIdentity, Program, Protocol};
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft, craft_ports, Kernel};
use common::*;
use proptest::strategy::{Strategy as _, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

/// (passed, redirected, proxied). Proxied packets fail closed when no proxy takes them: the
/// egress programs find no proxy socket in a test run and drop; the ingress programs redirect
/// TCP to the proxy device (`proxy_config` names one here). Other protocols, and UDP at
/// ingress, are dropped with the mark.
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

/// The kernel with the program's ipcache and a proxy device; `None` after `skip_or_fail`.
fn kernel(program: &Program, compiler: &TableCompiler) -> Option<Kernel> {
    match Kernel::new(&ipcache_entries(program, &compiler.universe)) {
        Ok(k) => {
            k.set_proxy_device(1).expect("proxy_config");
            Some(k)
        }
        Err(e) => {
            sys::skip_or_fail(&e.to_string());
            None
        }
    }
}

/// Loads every table, decided as `form` says; `None` after `skip_or_fail`.
fn load_all(
    kernel: &mut Kernel,
    tables: &[DecisionTable],
    mut form: impl FnMut(&DecisionTable, bool) -> gen::Generated,
    what: &str,
) -> Option<BTreeMap<(NumericIdentity, Direction), OwnedFd>> {
    let mut programs = BTreeMap::new();
    for t in tables {
        let track = gen::needs_tracking(tables.iter().filter(|o| o.subject == t.subject));
        let generated = form(t, track);
        match kernel.load_generated(&generated) {
            Ok(fd) => {
                programs.insert((t.subject, t.direction), fd);
            }
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&e.to_string());
                return None;
            }
            Err(e) => panic!(
                "the program of {:?} was rejected: {e}\n{what}",
                (t.subject, t.direction)
            ),
        }
    }
    Some(programs)
}

/// Runs the flow's packet through the programs of each pod side in the kernel and compares
/// with the evaluator; returns the packets run.
fn run_flow(
    program: &Program,
    kernel: &Kernel,
    programs: &BTreeMap<(NumericIdentity, Direction), OwnedFd>,
    flow: &Flow,
    what: &dyn Fn() -> String,
) -> usize {
    let (Some(sip), Some(dip)) = (flow.src.ip, flow.dst.ip) else {
        return 0;
    };
    let v = evaluate(program, flow);
    let packet = craft(sip, dip, flow.protocol, flow.port);
    let reply = craft_ports(dip, sip, flow.protocol, flow.port, 40000);
    let mut packets = 0;
    for (party, dir, decision) in [
        (&flow.src, Direction::Egress, &v.egress),
        (&flow.dst, Direction::Ingress, &v.ingress),
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
            .expect("BPF_PROG_TEST_RUN");
        packets += 1 + usize::from(back.is_some());
        assert_eq!(
            (out.passed(), out.redirected(), out.proxied()),
            expected(decision, dir, flow.protocol),
            "{} -> {} {}/{} {dir:?}: kernel {out:?}, evaluator {decision:?}\n{}",
            flow.src.name,
            flow.dst.name,
            flow.port,
            flow.protocol.as_str(),
            what()
        );
        if let Some(back) = back {
            assert!(
                back.passed(),
                "the reply of {} -> {} {}/{} was dropped\n{}",
                flow.src.name,
                flow.dst.name,
                flow.port,
                flow.protocol.as_str(),
                what()
            );
        }
    }
    packets
}

fn flow(src: &Party, dst: &Party, protocol: Protocol, port: u16) -> Flow {
    Flow {
        src: src.clone(),
        dst: dst.clone(),
        protocol,
        port,
        http: None,
        dns_query: None,
    }
}

#[test]
fn random_policy_sets_agree_with_the_evaluator_in_both_map_layouts() {
    let cases: u32 = std::env::var("CNPC_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(pod(), 1..7),
        proptest::collection::vec(policy_gen(), 1..4),
    );
    let (mut packets, mut class_keyed) = (0usize, 0usize);
    for _ in 0..cases {
        let (pods, policies) = strategy.new_tree(&mut runner).expect("a value").current();
        let (program, cluster, yaml) = build(&pods, &policies);
        let compiler = TableCompiler::new(&program);
        let tables = compiler.all(&program);
        let parties = dual_stack(
            parties(&program, &cluster, &pods)
                .into_iter()
                .filter(|p| p.ip.is_some())
                .collect(),
        );
        for keys in [MapKeys::Identity, MapKeys::Class] {
            let Some(mut kernel) = kernel(&program, &compiler) else {
                return;
            };
            let form = |t: &DecisionTable, track| {
                let g = gen::build_keyed(t, track, Strategy::Maps, keys);
                if g.map_keys() == Some(MapKeys::Class) {
                    class_keyed += 1;
                }
                g
            };
            let Some(programs) = load_all(&mut kernel, &tables, form, &yaml) else {
                return;
            };
            let what = || format!("{keys:?} keys; policies:\n{yaml}");
            for src in &parties {
                for dst in &parties {
                    if src.ip.map(|i| i.is_ipv4()) != dst.ip.map(|i| i.is_ipv4()) {
                        continue;
                    }
                    for (protocol, port) in probe_ports() {
                        packets += run_flow(
                            &program,
                            &kernel,
                            &programs,
                            &flow(src, dst, protocol, port),
                            &what,
                        );
                    }
                }
            }
        }
    }
    eprintln!(
        "{packets} packets over {cases} random policy sets in both map layouts ({class_keyed} class-keyed programs) agreed with the evaluator"
    );
    assert!(class_keyed > 0, "no program was keyed by class");
    assert!(cases < 24 || packets >= 50_000, "only {packets} packets");
}

/// Pods in large label groups across two namespaces; egress to groups on port ranges (with a
/// denied range inside an allowed one, and single ports beside them), ingress from a group on a
/// range.
const GROUPS: usize = 3;
const PODS: usize = 150;

fn group_cluster() -> String {
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: {env: prod}}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {env: dev}}}\n");
    for i in 0..PODS {
        y.push_str(&format!(
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: {}, labels: {{app: a{i}, group: g{}, tier: t{}}}}}, status: {{podIPs: [{{ip: 10.7.{}.{}}}]}}}}\n",
            if i.is_multiple_of(2) { "a" } else { "b" },
            i % GROUPS,
            i % 5,
            i / 200,
            i % 200 + 1,
        ));
    }
    y
}

const GROUP_POLICIES: &str = "
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: group-egress}
spec:
  endpointSelector: {matchLabels: {group: g0}}
  egress:
  - toEndpoints: [{matchLabels: {group: g1}}]
    toPorts: [{ports: [{port: \"1025\", endPort: 9000, protocol: TCP}, {port: \"53\", protocol: UDP}]}]
  - toEndpoints: [{matchLabels: {group: g2}}]
    toPorts: [{ports: [{port: \"30000\", endPort: 32767, protocol: TCP}, {port: \"5001\", endPort: 5038, protocol: UDP}]}]
  - toEndpoints: [{matchLabels: {tier: t1}}]
    toPorts: [{ports: [{port: \"443\", protocol: TCP}, {port: \"7000\", endPort: 7777, protocol: TCP}, {port: \"9443\", protocol: TCP}, {port: \"10443\", protocol: TCP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {group: g1, tier: t3}}]
    toPorts: [{ports: [{port: \"2000\", endPort: 2999, protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: group-ingress}
spec:
  endpointSelector: {matchLabels: {group: g1}}
  ingress:
  - fromEndpoints: [{matchLabels: {group: g0}}]
    toPorts: [{ports: [{port: \"1025\", endPort: 9000, protocol: TCP}, {port: \"53\", protocol: UDP}]}]
  - fromEndpoints: [{matchLabels: {group: g2}}]
    toPorts: [{ports: [{port: \"8080\", endPort: 8089, protocol: TCP}]}]
";

/// Ports at and beside every range boundary the policies use.
fn boundary_ports() -> Vec<(Protocol, u16)> {
    let mut out = Vec::new();
    for p in [
        52u16, 53, 54, 442, 443, 444, 1024, 1025, 1999, 2000, 2500, 2999, 3000, 6999, 7000, 7777,
        7778, 8079, 8080, 8089, 8090, 9000, 9001, 9442, 9443, 9444, 10443, 29999, 30000, 32767,
        32768,
    ] {
        out.push((Protocol::Tcp, p));
    }
    for p in [52u16, 53, 54, 5000, 5001, 5038, 5039] {
        out.push((Protocol::Udp, p));
    }
    out.push((Protocol::Sctp, 2000));
    out
}

#[test]
fn large_tables_with_port_ranges_agree_with_the_evaluator_keyed_by_class() {
    let mut set = load_str("groups.yaml", GROUP_POLICIES);
    let mut cluster = Cluster::default();
    cluster.add_str(
        &mut set.sources,
        Path::new("cluster.yaml"),
        &group_cluster(),
    );
    let report = check(set, Some(cluster));
    assert_eq!(report.errors(), 0);
    let cluster = report.cluster.as_ref().expect("checked with a cluster");
    let program = lower::build(
        &report.set.policies,
        &report.set.sources,
        cluster,
        &Default::default(),
    );
    let compiler = TableCompiler::new(&program);
    let tables = compiler.all(&program);
    // The generator's own choice: the group tables are too large for code, and their ranges
    // make class keys the smaller layout; the images grow with classes, not peers.
    let mut by_class = 0;
    for t in &tables {
        let g = gen::generate(t, true);
        if g.strategy != Strategy::Maps {
            continue;
        }
        assert_eq!(g.map_keys(), Some(MapKeys::Class), "{:?}", t.subject);
        by_class += 1;
        let members: usize = t.classes.iter().map(|c| c.members.len()).sum();
        let records: usize = g.maps.iter().map(|m| m.records.len()).sum();
        let flat: usize = gen::build_keyed(t, true, Strategy::Maps, MapKeys::Identity)
            .maps
            .iter()
            .map(|m| m.records.len())
            .sum();
        assert!(
            records <= members + t.rows.len() * 32,
            "{records} records for {members} members and {} rows",
            t.rows.len()
        );
        assert!(records * 4 < flat, "{records} by class, {flat} by identity");
    }
    assert!(
        by_class >= 2,
        "the egress and ingress group tables are decided by maps"
    );

    let Some(mut kernel) = kernel(&program, &compiler) else {
        return;
    };
    let Some(programs) = load_all(&mut kernel, &tables, gen::generate, GROUP_POLICIES) else {
        return;
    };
    // As the loader generates them: the group tables' peers (150 pods in 10.7.0.1-150, too
    // many for code) found in address windows, and their classes' many port segments (more
    // than a class record holds) decided past the record by the table's maps.
    let hosts = gen::HostAddresses::new(&ipcache_entries(&program, &compiler.universe));
    let (mut windowed, mut partial) = (0, 0);
    let by_address = |t: &DecisionTable, track| {
        let g = gen::generate_inlined(t, track, &gen::Inline::new(&hosts));
        if let Some(classes) = g
            .maps
            .iter()
            .find(|m| m.def.name.starts_with(gen::ADDRESS_CLASS_MAP_PREFIX))
        {
            windowed += 1;
            // Flag bit 0 of a class record: it holds all of the class's segments.
            partial += classes
                .records
                .iter()
                .filter(|(_, v)| v[0] & 1 == 0)
                .count();
        }
        g
    };
    let Some(inlined) = load_all(&mut kernel, &tables, by_address, GROUP_POLICIES) else {
        return;
    };
    assert!(
        windowed >= 2,
        "the group tables hold their peers in windows"
    );
    assert!(
        partial > 0,
        "some class has more segments than its record holds"
    );
    let party = |i: usize| {
        parse_peer(
            &program,
            cluster,
            &format!("pod:{}/p{i}", if i.is_multiple_of(2) { "a" } else { "b" }),
        )
        .expect("a pod party")
    };
    let parties: Vec<Party> = (0..PODS).map(party).collect();
    let mut packets = 0;
    // Every g0 pod of a few, to every pod (g1 and g2 peers of every tier, and the rest), on
    // every boundary port: both the egress (g0) and the ingress (g1) tables decide.
    for programs in [&programs, &inlined] {
        for src in parties.iter().step_by(GROUPS).take(6) {
            for dst in &parties {
                for (protocol, port) in boundary_ports() {
                    packets += run_flow(
                        &program,
                        &kernel,
                        programs,
                        &flow(src, dst, protocol, port),
                        &|| GROUP_POLICIES.to_string(),
                    );
                }
            }
        }
    }
    eprintln!(
        "{packets} packets through class-keyed tables, their peers looked up or in address \
         windows, agreed with the evaluator"
    );
    assert!(packets > 10_000, "only {packets} packets");
}
