//! Verification ladder, rung (c) (DESIGN.md §6): packets run through the generated programs in
//! the kernel (BPF_PROG_TEST_RUN) get exactly the reference evaluator's verdict, for every
//! example policy set, every pair of parties (IPv4 and IPv6), every protocol and every port
//! boundary; and the reply of every connection a packet opens passes.

use cnpc_codegen_bpf::gen::{self, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TO_PROXY_MARK};
use cnpc_compiler::eval::{evaluate, parse_peer, Decision, DirVerdict, Flow, Party};
use cnpc_compiler::tables::{peer_universe, TableCompiler};
use cnpc_compiler::{check as check_policies, lower, Cluster, PolicySet};
use cnpc_ir::proxy::contract::MARK_IDENTITY_MASK;
use cnpc_ir::{Direction, NumericIdentity, Protocol};
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft, craft_ports, Kernel};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// FQDN parties: a name and the address DNS gave for it.
const LEARNED: [(&str, &str); 2] = [
    ("api.github.com", "140.82.112.5"),
    ("support.github.com", "140.82.112.6"),
];

/// The ifindex the tests put in `proxy_config` (the loopback device: any non-zero index makes
/// the ingress programs redirect; nothing is redirected in a test run).
const PROXY_DEVICE: u32 = 1;

/// The return code and mark a packet gets. Proxied packets carry the mark and fail closed when
/// no proxy takes them: the egress programs hand TCP and UDP over, but find no proxy socket in
/// a test run (nothing listens on the proxy port, and `bpf_sk_assign` needs tc ingress), so
/// they drop; the ingress programs redirect TCP to the proxy device. Other protocols (and UDP
/// at ingress) are not proxied: dropped with the mark, which says the table proxies them. On
/// the ingress path the mark carries the source's identity when it fits 16 bits.
fn expected(d: &Decision, dir: Direction, proto: Protocol, src: Option<u32>) -> (u32, u32) {
    let mark = match dir {
        Direction::Egress => TO_PROXY_MARK as u32,
        Direction::Ingress => {
            TO_PROXY_MARK as u32 | src.filter(|id| *id <= MARK_IDENTITY_MASK).unwrap_or(0)
        }
    };
    match (d.verdict, &d.l7) {
        (DirVerdict::Denied, _) => (TC_ACT_SHOT as u32, 0),
        (_, Some(_)) if proto == Protocol::Tcp && dir == Direction::Ingress => {
            (TC_ACT_REDIRECT as u32, mark)
        }
        (_, Some(_)) => (TC_ACT_SHOT as u32, mark),
        _ => (TC_ACT_OK as u32, 0),
    }
}

struct Loaded {
    kernel: Kernel,
    tables: Vec<cnpc_ir::DecisionTable>,
    programs: BTreeMap<(NumericIdentity, Direction), OwnedFd>,
}

/// Policies where the world and learned FQDN addresses decide verdicts.
const WORLD_POLICIES: &str = "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world-out, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world-in, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEntities: [world]
    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: mediabot}}
  egress:
  - toFQDNs: [{matchName: api.github.com}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: \"53\", protocol: ANY}]
      rules: {dns: [{matchPattern: \"*\"}]}
";

/// How the programs find the peers their tables tell apart: looked up (gen::generate), or by
/// address (gen::generate_inlined, as the loader generates) within these bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Peers {
    LookedUp,
    /// The generator's default bounds: the example sets' tables are small, so in code.
    ByAddress,
    /// No address in code: address windows, which every example set's addresses fit.
    InWindows,
    /// Neither in code nor in windows: the address map.
    InAddressMap,
}

/// Compiles, checks and loads every table of a policy set, with the peers its tables tell
/// apart found as `peers` says; `None` when the kernel refuses us.
fn load_set(source: &str, peers: Peers) -> Option<(cnpc_ir::Program, Cluster, Loaded, usize)> {
    let mut set = if source.starts_with("policies/") {
        PolicySet::load(&[root().join(source)]).unwrap()
    } else {
        cnpc_compiler::load_str("world.yaml", source)
    };
    let cluster = Cluster::load(&[root().join("policies/cluster.yaml")], &mut set.sources).unwrap();
    let r = check_policies(set, Some(cluster));
    assert_eq!(r.errors(), 0);
    let cluster = r.cluster.unwrap();
    let program = lower::build(
        &r.set.policies,
        &r.set.sources,
        &cluster,
        &Default::default(),
    );
    let universe = peer_universe(&program);
    let compiler = TableCompiler::new(&program);
    let entries = cnpc_compiler::tables::ipcache_entries(&program, &universe);
    let mut kernel = match Kernel::new(&entries) {
        Ok(k) => k,
        Err(e) => {
            sys::skip_or_fail(&e.to_string());
            return None;
        }
    };
    // An address learned from a DNS answer carries the identity of the names' selectors, in the
    // node's `fqdn` map, where the loader writes what the DNS proxy learns.
    for (name, ip) in LEARNED {
        let party = parse_peer(&program, &cluster, &format!("fqdn:{name}={ip}")).unwrap();
        if let Some(id) = cnpc_compiler::tables::peer_of(&universe, &party) {
            kernel
                .insert_fqdn(ip.parse::<IpAddr>().unwrap(), id)
                .expect("the fqdn map");
        }
    }
    kernel.set_proxy_device(PROXY_DEVICE).expect("proxy_config");
    let hosts = gen::HostAddresses::new(&entries);
    let mut programs = BTreeMap::new();
    let mut insns = 0;
    // Peer addresses the programs hold, and programs holding them in the form asked for.
    let (mut held, mut in_form) = (0, 0);
    let tables = compiler.all(&program);
    for t in &tables {
        let track = gen::needs_tracking(tables.iter().filter(|o| o.subject == t.subject));
        let defaults = gen::Inline::new(&hosts);
        let (inline, prefix) = match peers {
            Peers::LookedUp => (None, None),
            Peers::ByAddress => (Some(defaults), None),
            Peers::InWindows => (
                Some(gen::Inline {
                    max_code_addresses: 0,
                    ..defaults
                }),
                Some(gen::ADDRESS_WINDOW_MAP_PREFIX),
            ),
            Peers::InAddressMap => (
                Some(gen::Inline {
                    max_code_addresses: 0,
                    max_window_slots: 0,
                    ..defaults
                }),
                Some(gen::ADDRESS_MAP_PREFIX),
            ),
        };
        let loaded = if let Some(inline) = inline {
            let g = gen::generate_inlined(t, track, &inline);
            held += g.inlined.len();
            in_form += usize::from(
                prefix.is_some_and(|p| g.maps.iter().any(|m| m.def.name.starts_with(p))),
            );
            insns += g.program.slot_count();
            kernel.load_generated(&g)
        } else {
            insns += gen::generate(t, track).program.slot_count();
            kernel.load(t, track)
        };
        match loaded {
            Ok(fd) => {
                programs.insert((t.subject, t.direction), fd);
            }
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                return None;
            }
            Err(e) => panic!(
                "the program of {:?} was rejected: {e}\n{}",
                (t.subject, t.direction),
                cnpc_codegen_bpf::disasm::listing(&gen::generate(t, track).program)
            ),
        }
    }
    if peers != Peers::LookedUp {
        assert!(held > 0, "no program holds a peer's address");
    }
    if matches!(peers, Peers::InWindows | Peers::InAddressMap) {
        assert!(in_form > 0, "no program holds peers {peers:?}");
    }
    Some((
        program,
        cluster,
        Loaded {
            kernel,
            tables,
            programs,
        },
        insns,
    ))
}

#[test]
fn generated_programs_agree_with_the_evaluator_on_every_example_set() {
    agree_on_every_example_set(Peers::LookedUp);
}

/// The same with the peers the tables tell apart decided by address, as the loader may
/// generate programs (gen::generate_inlined).
#[test]
fn programs_holding_peer_addresses_agree_with_the_evaluator_on_every_example_set() {
    agree_on_every_example_set(Peers::ByAddress);
}

/// The same with the peers' addresses in the forms large tables take: address windows, and
/// the address map.
#[test]
fn programs_holding_peer_addresses_in_windows_or_a_map_agree_on_every_example_set() {
    agree_on_every_example_set(Peers::InWindows);
    agree_on_every_example_set(Peers::InAddressMap);
}

fn agree_on_every_example_set(peers: Peers) {
    let mut total = 0usize;
    for dir in [
        "policies/starwars-l4",
        "policies/starwars-l7",
        "policies/dns/match-name",
        "policies/dns/match-pattern",
        "policies/dns/match-pattern-443",
        WORLD_POLICIES,
    ] {
        let Some((program, cluster, loaded, insns)) = load_set(dir, peers) else {
            return;
        };
        let mut parties: Vec<Party> = Vec::new();
        for e in program.endpoints.values().filter(|e| e.is_pod) {
            let party = parse_peer(&program, &cluster, &format!("pod:{}", e.name)).unwrap();
            // Dual stack: the pod at each of its addresses.
            for ip in &e.ips {
                parties.push(Party {
                    ip: Some(*ip),
                    name: format!("{} [{ip}]", party.name),
                    ..party.clone()
                });
            }
        }
        for ip in ["1.1.1.1", "192.168.56.10", "2001:db8::1", "fd00:99::1"] {
            parties.push(parse_peer(&program, &cluster, &format!("ip:{ip}")).unwrap());
        }
        for (name, ip) in LEARNED {
            parties.push(parse_peer(&program, &cluster, &format!("fqdn:{name}={ip}")).unwrap());
        }
        let ports: Vec<(Protocol, u16)> = [0u16, 1, 52, 53, 54, 79, 80, 81, 442, 443, 444, 65535]
            .iter()
            .flat_map(|p| [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|pr| (pr, *p)))
            .chain([
                (Protocol::Icmp, 0),
                (Protocol::Icmp, 8),
                (Protocol::Icmpv6, 128),
            ])
            .collect();
        let mut mismatches = Vec::new();
        for src in &parties {
            for dst in &parties {
                let (Some(s), Some(d)) = (src.ip, dst.ip) else {
                    continue;
                };
                if s.is_ipv4() != d.is_ipv4() {
                    continue;
                }
                for &(proto, port) in &ports {
                    let flow = Flow {
                        src: src.clone(),
                        dst: dst.clone(),
                        protocol: proto,
                        port,
                        http: None,
                        dns_query: None,
                    };
                    let v = evaluate(&program, &flow);
                    let packet = craft(s, d, proto, port);
                    let reply = craft_ports(d, s, proto, port, 40000);
                    for (party, dir_, decision) in [
                        (src, Direction::Egress, &v.egress),
                        (dst, Direction::Ingress, &v.ingress),
                    ] {
                        let Some(id) = party
                            .endpoint
                            .as_ref()
                            .filter(|e| e.is_pod)
                            .map(|_| party.identity.unwrap())
                        else {
                            continue;
                        };
                        let (o, back) = loaded
                            .kernel
                            .run_with_reply(
                                &loaded.programs[&(id, dir_)],
                                &loaded.programs[&(id, dir_.reverse())],
                                &packet,
                                &reply,
                            )
                            .expect("BPF_PROG_TEST_RUN");
                        let got = (o.code, o.mark);
                        total += 1 + usize::from(back.is_some());
                        let source = src.identity.map(|i| i.0);
                        if got != expected(decision, dir_, proto, source) {
                            let table = loaded
                                .tables
                                .iter()
                                .find(|t| t.subject == id && t.direction == dir_);
                            mismatches.push(format!("{dir}: {} -> {} {port}/{} {:?}: kernel {got:?}, evaluator {:?} {:?}\ntable: {table:#?}", src.name, dst.name, proto.as_str(), dir_, decision.verdict, decision.rules));
                        }
                        if o.opened.is_some() && !o.handed_on() {
                            mismatches.push(format!(
                                "{dir}: {} -> {} {port}/{} {dir_:?}: kernel {o:?} recorded a connection for a packet it dropped",
                                src.name,
                                dst.name,
                                proto.as_str()
                            ));
                        }
                        if back.is_some_and(|b| !b.passed()) {
                            mismatches.push(format!(
                                "{dir}: the reply of {} -> {} {port}/{} was dropped",
                                src.name,
                                dst.name,
                                proto.as_str()
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "{} mismatches, first:\n{}",
            mismatches.len(),
            mismatches
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        eprintln!(
            "{}: {} programs, {insns} instructions",
            dir.lines().nth(2).unwrap_or(dir),
            loaded.programs.len()
        );
    }
    eprintln!("{total} packets agreed with the evaluator");
    assert!(total > 1000);
}
