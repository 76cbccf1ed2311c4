//! Verification ladder, rung (c) (DESIGN.md §6): packets run through the generated programs in
//! the kernel (BPF_PROG_TEST_RUN) get exactly the reference evaluator's verdict, for every
//! example policy set, every pair of parties, every protocol and every port boundary.

use cnpc_codegen_bpf::check::check;
use cnpc_codegen_bpf::gen::{self, PROXY_MARK, TC_ACT_OK, TC_ACT_SHOT};
use cnpc_compiler::eval::{evaluate, parse_peer, Decision, DirVerdict, Flow, Party};
use cnpc_compiler::tables::{peer_universe, TableCompiler};
use cnpc_compiler::{check as check_policies, lower, Cluster, PolicySet};
use cnpc_ir::{Direction, NumericIdentity, Protocol};
use cnpc_runtime_loader::sys;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// An ipcache key: prefix length (family word + address bits), family, address.
fn key(ip: IpAddr, prefix: u8) -> Vec<u8> {
    let mut k = vec![0u8; 24];
    match ip {
        IpAddr::V4(a) => {
            k[0..4].copy_from_slice(&(32 + u32::from(prefix)).to_le_bytes());
            k[4..8].copy_from_slice(&4u32.to_le_bytes());
            k[8..12].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            k[0..4].copy_from_slice(&(32 + u32::from(prefix)).to_le_bytes());
            k[4..8].copy_from_slice(&6u32.to_le_bytes());
            k[8..24].copy_from_slice(&a.octets());
        }
    }
    k
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: Protocol, port: u16) -> Vec<u8> {
    let (num, l4len) = match proto {
        Protocol::Tcp => (6, 20),
        Protocol::Udp => (17, 8),
        Protocol::Sctp => (132, 12),
        Protocol::Icmp => (1, 8),
        Protocol::Icmpv6 => (58, 8),
    };
    let mut p = vec![0u8; 14 + 20 + l4len];
    p[12..14].copy_from_slice(&[0x08, 0x00]);
    p[14] = 0x45;
    p[16..18].copy_from_slice(&((20 + l4len) as u16).to_be_bytes());
    p[22] = 64;
    p[23] = num;
    p[26..30].copy_from_slice(&src.octets());
    p[30..34].copy_from_slice(&dst.octets());
    match proto {
        Protocol::Icmp | Protocol::Icmpv6 => p[34] = port as u8,
        _ => {
            p[34..36].copy_from_slice(&40000u16.to_be_bytes());
            p[36..38].copy_from_slice(&port.to_be_bytes());
        }
    }
    p
}

/// FQDN parties: a name and the address DNS gave for it.
const LEARNED: [(&str, &str); 2] = [
    ("api.github.com", "140.82.112.5"),
    ("support.github.com", "140.82.112.6"),
];

fn expected(d: &Decision) -> (u32, u32) {
    match (d.verdict, &d.l7) {
        (DirVerdict::Denied, _) => (TC_ACT_SHOT as u32, 0),
        (_, Some(_)) => (TC_ACT_OK as u32, PROXY_MARK as u32),
        _ => (TC_ACT_OK as u32, 0),
    }
}

struct Loaded {
    _ipcache: OwnedFd,
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

/// Compiles, checks and loads every table of a policy set; `None` when the kernel refuses us.
fn load_set(source: &str) -> Option<(cnpc_ir::Program, Cluster, Loaded, usize)> {
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
    let ipcache = match sys::lpm_map(gen::IPCACHE_KEY_SIZE, gen::IPCACHE_VALUE_SIZE, 4096) {
        Ok(m) => m,
        Err(e) => {
            sys::skip_or_fail(&format!("cannot create an LPM map: {e}"));
            return None;
        }
    };
    for e in program.endpoints.values() {
        let id = program.identities[e.identity].numeric.0;
        // Nodes' addresses are remote nodes to the endpoints (the evaluator's reading of ip:).
        let id = if e.is_pod {
            id
        } else {
            cnpc_ir::Reserved::RemoteNode as u32
        };
        for ip in &e.ips {
            sys::map_update(
                &ipcache,
                &key(*ip, if ip.is_ipv4() { 32 } else { 128 }),
                &id.to_le_bytes(),
            )
            .unwrap();
        }
    }
    for p in &universe {
        if let Some(net) = p.cidr {
            sys::map_update(
                &ipcache,
                &key(net.network(), net.prefix_len()),
                &p.numeric.0.to_le_bytes(),
            )
            .unwrap();
        }
    }
    // An address learned from a DNS answer carries the identity of the names' selectors, as
    // Cilium's DNS proxy records it.
    for (name, ip) in LEARNED {
        let party = parse_peer(&program, &cluster, &format!("fqdn:{name}={ip}")).unwrap();
        if let Some(id) = cnpc_compiler::tables::peer_of(&universe, &party) {
            sys::map_update(&ipcache, &key(ip.parse().unwrap(), 32), &id.0.to_le_bytes()).unwrap();
        }
    }
    let tables = TableCompiler::new(&program).all(&program);
    let mut programs = BTreeMap::new();
    let mut insns = 0;
    for t in &tables {
        let bpf = gen::generate(t)
            .with_map_fds(|name| (name == gen::IPCACHE_MAP).then(|| ipcache.as_raw_fd()))
            .unwrap();
        if let Err(e) = check(&bpf) {
            panic!(
                "cnpc's checker rejects the program of {:?}: {e:?}\n{}",
                (t.subject, t.direction),
                cnpc_codegen_bpf::disasm::listing(&bpf)
            );
        }
        insns += bpf.slot_count();
        match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &bpf.bytes()) {
            Ok(fd) => {
                programs.insert((t.subject, t.direction), fd);
            }
            Err(e) if e.contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                return None;
            }
            Err(e) => panic!(
                "the kernel verifier rejected the program of {:?}:\n{e}\n{}",
                (t.subject, t.direction),
                cnpc_codegen_bpf::disasm::listing(&bpf)
            ),
        }
    }
    Some((
        program,
        cluster,
        Loaded {
            _ipcache: ipcache,
            programs,
        },
        insns,
    ))
}

#[test]
fn generated_programs_agree_with_the_evaluator_on_every_example_set() {
    let mut total = 0usize;
    for dir in [
        "policies/starwars-l4",
        "policies/starwars-l7",
        "policies/dns/match-name",
        "policies/dns/match-pattern",
        "policies/dns/match-pattern-443",
        WORLD_POLICIES,
    ] {
        let Some((program, cluster, loaded, insns)) = load_set(dir) else {
            return;
        };
        let mut parties: Vec<Party> = program
            .endpoints
            .values()
            .filter(|e| e.is_pod)
            .map(|e| parse_peer(&program, &cluster, &format!("pod:{}", e.name)).unwrap())
            .collect();
        for ip in ["1.1.1.1", "192.168.56.10"] {
            parties.push(parse_peer(&program, &cluster, &format!("ip:{ip}")).unwrap());
        }
        for (name, ip) in LEARNED {
            parties.push(parse_peer(&program, &cluster, &format!("fqdn:{name}={ip}")).unwrap());
        }
        let ports: Vec<(Protocol, u16)> = [0u16, 1, 52, 53, 54, 79, 80, 81, 442, 443, 444, 65535]
            .iter()
            .flat_map(|p| [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|pr| (pr, *p)))
            .chain([(Protocol::Icmp, 0), (Protocol::Icmp, 8)])
            .collect();
        let mut mismatches = Vec::new();
        for src in &parties {
            for dst in &parties {
                let (Some(IpAddr::V4(s)), Some(IpAddr::V4(d))) = (src.ip, dst.ip) else {
                    continue;
                };
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
                    let packet = ipv4_packet(s, d, proto, port);
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
                        let fd = &loaded.programs[&(id, dir_)];
                        let got = sys::test_run(fd, &packet).expect("BPF_PROG_TEST_RUN");
                        total += 1;
                        if got != expected(decision) {
                            mismatches.push(format!("{dir}: {} -> {} {port}/{} {:?}: kernel {got:?}, evaluator {:?} {:?}", src.name, dst.name, proto.as_str(), dir_, decision.verdict, decision.rules));
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
