//! Random clusters and policy sets for property tests, generated as YAML so that every test
//! goes through the real front end.

#![allow(dead_code)]

use cnpc_compiler::eval::{parse_peer, Party};
use cnpc_compiler::{check, load_str, lower, Cluster};
use cnpc_ir::{Program, Protocol};
use proptest::prelude::*;
use std::path::Path;

const APPS: [&str; 3] = ["a", "b", "c"];
const ENTITIES: [&str; 5] = ["world", "cluster", "host", "all", "remote-node"];
const CIDRS: [&str; 6] = [
    "0.0.0.0/0",
    "1.0.0.0/8",
    "1.2.0.0/16",
    "10.0.0.0/8",
    "2001:db8::/32",
    "::/0",
];
const EXCEPTS: [&str; 2] = ["1.2.3.0/24", "1.9.0.0/16"];
pub const WORLD_IPS: [&str; 7] = [
    "1.2.3.4",
    "1.2.9.9",
    "1.9.1.1",
    "8.8.8.8",
    "10.9.9.9",
    "2001:db8::1",
    "2001:db9::1",
];

#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: usize,
    pub app: usize,
    pub tier: Option<bool>,
}

pub fn pod() -> impl Strategy<Value = Pod> {
    (0..2usize, 0..3usize, prop::option::of(any::<bool>())).prop_map(|(ns, app, tier)| Pod {
        ns,
        app,
        tier,
    })
}

pub fn cluster_yaml(pods: &[Pod]) -> String {
    let mut s = String::from("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns0, labels: {env: prod}}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns1, labels: {env: dev}}}\n");
    for (i, p) in pods.iter().enumerate() {
        let tier = p.tier.map_or(String::new(), |t| {
            format!(", tier: {}", if t { "front" } else { "back" })
        });
        // Named ports follow the app label, so every endpoint of an identity declares the same.
        let port = 8000 + p.app;
        s.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: p{i}, namespace: ns{}, labels: {{app: {}{tier}}}}}\n  spec: {{containers: [{{name: c, ports: [{{name: svc, containerPort: {port}}}]}}]}}\n  status: {{podIPs: [{{ip: 10.0.{i}.1}}, {{ip: \"fd00:0:0:{i}::1\"}}]}}\n",
            p.ns, APPS[p.app]
        ));
    }
    s
}

#[derive(Debug, Clone)]
enum PeerGen {
    None,
    Endpoints(usize, bool),
    Entity(usize),
    Cidr(usize, Option<usize>),
    NamespaceLabel(bool),
}

fn peer_gen() -> impl Strategy<Value = PeerGen> {
    prop_oneof![
        Just(PeerGen::None),
        (0..3usize, any::<bool>()).prop_map(|(a, any_ns)| PeerGen::Endpoints(a, any_ns)),
        (0..ENTITIES.len()).prop_map(PeerGen::Entity),
        (0..CIDRS.len(), prop::option::of(0..EXCEPTS.len())).prop_map(|(c, e)| PeerGen::Cidr(c, e)),
        any::<bool>().prop_map(PeerGen::NamespaceLabel),
    ]
}

#[derive(Debug, Clone)]
enum PortGen {
    None,
    Single(u16, usize),
    Range(u16, u16, usize),
    Named,
    Icmp(u8),
}

const PROTOS: [&str; 4] = ["TCP", "UDP", "ANY", "SCTP"];

fn port_gen() -> impl Strategy<Value = PortGen> {
    prop_oneof![
        Just(PortGen::None),
        (
            prop::sample::select(vec![0u16, 53, 80, 443, 8000, 8001]),
            0..PROTOS.len()
        )
            .prop_map(|(p, pr)| PortGen::Single(p, pr)),
        (
            prop::sample::select(vec![70u16, 440, 8000]),
            0..20u16,
            0..PROTOS.len()
        )
            .prop_map(|(lo, w, pr)| PortGen::Range(lo, lo + w, pr)),
        Just(PortGen::Named),
        prop::sample::select(vec![0u8, 8]).prop_map(PortGen::Icmp),
    ]
}

#[derive(Debug, Clone)]
struct RuleGen {
    deny: bool,
    peer: PeerGen,
    port: PortGen,
    http: bool,
}

fn rule_gen() -> impl Strategy<Value = RuleGen> {
    (
        prop::bool::weighted(0.25),
        peer_gen(),
        port_gen(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(deny, peer, port, http)| RuleGen {
            deny,
            peer,
            port,
            http,
        })
}

#[derive(Debug, Clone)]
pub struct PolicyGen {
    clusterwide: bool,
    ns: usize,
    subject_app: Option<usize>,
    ingress: Vec<RuleGen>,
    egress: Vec<RuleGen>,
    default_deny_off: bool,
}

pub fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    (
        any::<bool>(),
        0..2usize,
        prop::option::of(0..3usize),
        prop::collection::vec(rule_gen(), 0..4),
        prop::collection::vec(rule_gen(), 0..3),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(clusterwide, ns, subject_app, ingress, egress, default_deny_off)| PolicyGen {
                clusterwide,
                ns,
                subject_app,
                ingress,
                egress,
                default_deny_off,
            },
        )
}

fn rule_yaml(r: &RuleGen, ingress: bool) -> String {
    let dir = if ingress { "from" } else { "to" };
    let mut s = String::from("  - ");
    let mut first = true;
    let mut field = |s: &mut String, text: String| {
        if !first {
            s.push_str("    ");
        }
        first = false;
        s.push_str(&text);
        s.push('\n');
    };
    match &r.peer {
        PeerGen::None => {}
        PeerGen::Endpoints(a, any_ns) => {
            let ns = if *any_ns {
                ", k8s:io.kubernetes.pod.namespace: ns1"
            } else {
                ""
            };
            field(
                &mut s,
                format!(
                    "{dir}Endpoints: [{{matchLabels: {{app: {}{ns}}}}}]",
                    APPS[*a]
                ),
            );
        }
        PeerGen::Entity(e) => field(&mut s, format!("{dir}Entities: [{}]", ENTITIES[*e])),
        PeerGen::Cidr(c, e) => match e {
            Some(e) if CIDRS[*c] != "1.2.0.0/16" || EXCEPTS[*e] == "1.2.3.0/24" => {
                let (cidr, ex) = (CIDRS[*c], EXCEPTS[*e]);
                let ok = cidr == "0.0.0.0/0"
                    || (cidr == "1.0.0.0/8")
                    || (cidr == "1.2.0.0/16" && ex == "1.2.3.0/24");
                if ok {
                    field(
                        &mut s,
                        format!("{dir}CIDRSet: [{{cidr: {cidr}, except: [{ex}]}}]"),
                    );
                } else {
                    field(&mut s, format!("{dir}CIDR: [{cidr}]"));
                }
            }
            _ => field(&mut s, format!("{dir}CIDR: [{}]", CIDRS[*c])),
        },
        PeerGen::NamespaceLabel(prod) => field(
            &mut s,
            format!(
                "{dir}Endpoints: [{{matchLabels: {{io.cilium.k8s.namespace.labels.env: {}}}}}]",
                if *prod { "prod" } else { "dev" }
            ),
        ),
    }
    let http_ok = !r.deny && r.http;
    match &r.port {
        PortGen::None => {}
        PortGen::Single(p, pr) => {
            let l7 = if http_ok && PROTOS[*pr] == "TCP" && *p != 0 {
                "\n      rules: {http: [{method: GET}]}"
            } else {
                ""
            };
            field(
                &mut s,
                format!(
                    "toPorts:\n    - ports: [{{port: \"{p}\", protocol: {}}}]{l7}",
                    PROTOS[*pr]
                ),
            );
        }
        PortGen::Range(lo, hi, pr) => field(
            &mut s,
            format!(
                "toPorts: [{{ports: [{{port: \"{lo}\", endPort: {hi}, protocol: {}}}]}}]",
                PROTOS[*pr]
            ),
        ),
        PortGen::Named => field(
            &mut s,
            "toPorts: [{ports: [{port: svc, protocol: TCP}]}]".to_string(),
        ),
        PortGen::Icmp(t) => field(&mut s, format!("icmps: [{{fields: [{{type: {t}}}]}}]")),
    }
    if first {
        s.push_str("{}\n");
    }
    s
}

pub fn policies_yaml(ps: &[PolicyGen]) -> String {
    let mut out = String::new();
    for (i, p) in ps.iter().enumerate() {
        let kind = if p.clusterwide {
            "CiliumClusterwideNetworkPolicy"
        } else {
            "CiliumNetworkPolicy"
        };
        let ns = if p.clusterwide {
            String::new()
        } else {
            format!(", namespace: ns{}", p.ns)
        };
        let sel = p.subject_app.map_or("{}".to_string(), |a| {
            format!("{{matchLabels: {{app: {}}}}}", APPS[a])
        });
        out.push_str(&format!("---\napiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{name: p{i}{ns}}}\nspec:\n  endpointSelector: {sel}\n"));
        if p.default_deny_off {
            out.push_str("  enableDefaultDeny: {ingress: false, egress: false}\n");
        }
        for (dir, rules) in [("ingress", &p.ingress), ("egress", &p.egress)] {
            let (allow, deny): (Vec<&RuleGen>, Vec<&RuleGen>) = rules.iter().partition(|r| !r.deny);
            if !allow.is_empty() {
                out.push_str(&format!("  {dir}:\n"));
                for r in allow {
                    out.push_str(&rule_yaml(r, dir == "ingress"));
                }
            }
            if !deny.is_empty() {
                out.push_str(&format!("  {dir}Deny:\n"));
                for r in deny {
                    out.push_str(&rule_yaml(r, dir == "ingress"));
                }
            }
        }
    }
    out
}

/// A checked, lowered world: the cluster of `pods` and the policies of `policies`.
pub fn build(pods: &[Pod], policies: &[PolicyGen]) -> (Program, Cluster, String) {
    build_with(pods, policies, &Default::default())
}

/// [`build`] with a previous identity allocation.
pub fn build_with(
    pods: &[Pod],
    policies: &[PolicyGen],
    previous: &cnpc_compiler::lower::Allocation,
) -> (Program, Cluster, String) {
    let yaml = policies_yaml(policies);
    let mut set = load_str("p.yaml", &yaml);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("c.yaml"), &cluster_yaml(pods));
    let r = check(set, Some(cluster));
    assert_eq!(
        r.errors(),
        0,
        "{}\n{}",
        yaml,
        cnpc_compiler::report::human(&r, false)
    );
    let program = lower::build(
        &r.set.policies,
        &r.set.sources,
        r.cluster.as_ref().unwrap(),
        previous,
    );
    (program, r.cluster.unwrap(), yaml)
}

/// Every pod, some world addresses and some reserved identities, as flow parties.
pub fn parties(program: &Program, cluster: &Cluster, pods: &[Pod]) -> Vec<Party> {
    let mut parties: Vec<Party> = (0..pods.len())
        .map(|i| parse_peer(program, cluster, &format!("pod:ns{}/p{i}", pods[i].ns)).unwrap())
        .collect();
    parties.extend(
        WORLD_IPS
            .iter()
            .map(|ip| parse_peer(program, cluster, &format!("ip:{ip}")).unwrap()),
    );
    parties.extend(
        ["entity:host", "entity:remote-node", "entity:health"]
            .iter()
            .map(|e| parse_peer(program, cluster, e).unwrap()),
    );
    parties
}

/// Every party, and for each pod party with an IPv6 address, the same party at that address.
pub fn dual_stack(parties: Vec<Party>) -> Vec<Party> {
    let mut out = parties.clone();
    for p in parties {
        let v6 = p
            .endpoint
            .as_ref()
            .and_then(|e| e.ips.iter().find(|ip| ip.is_ipv6()).copied());
        if let (Some(ip), Some(_)) = (v6, &p.endpoint) {
            if p.ip != Some(ip) {
                out.push(Party {
                    ip: Some(ip),
                    name: format!("{} [{ip}]", p.name),
                    ..p
                });
            }
        }
    }
    out
}

/// Ports at and around every boundary the generator uses, for every protocol.
pub fn probe_ports() -> Vec<(Protocol, u16)> {
    [
        0u16, 1, 52, 53, 54, 69, 70, 79, 80, 81, 89, 90, 439, 440, 443, 459, 460, 7999, 8000, 8001,
        8002, 8019, 8020, 65535,
    ]
    .iter()
    .flat_map(|p| [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|pr| (pr, *p)))
    .chain([
        (Protocol::Icmp, 0),
        (Protocol::Icmp, 8),
        (Protocol::Icmp, 3),
        (Protocol::Icmpv6, 8),
    ])
    .collect()
}
