//! The ipcache cnpc programs: one identity per address, and an endpoint's address keeps the
//! endpoint's identity when a policy names exactly that address as a CIDR (Cilium: endpoint
//! state overwrites the `generated` CIDR identities, pkg/source/source.go `AllowOverwrite`).
//! Found by the Kubernetes conformance cases (runtime-loader/tests/conformance, "should allow
//! egress access to server in CIDR block"): the pod got the CIDR identity in the kernel.

use cnpc_compiler::tables::{ipcache_entries, peer_universe};
use cnpc_compiler::{check, load_str, lower, Cluster};
use std::collections::BTreeMap;
use std::path::Path;

const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: x}}
- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x, labels: {pod: a}}, status: {podIPs: [{ip: 10.10.0.1}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: x, labels: {pod: b}}, status: {podIPs: [{ip: 10.10.0.2}, {ip: "fd00::2"}]}}
- {apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}}
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.10.0.2/32}
    - ipBlock: {cidr: "fd00::2/128"}
    - ipBlock: {cidr: 192.168.0.1/32}
    - ipBlock: {cidr: 10.10.0.0/24, except: [10.10.0.1/32]}
"#;

#[test]
fn an_endpoint_address_keeps_its_identity_when_a_cidr_names_it() {
    let mut set = load_str("p.yaml", POLICY);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), CLUSTER);
    let r = check(set, Some(cluster));
    assert_eq!(r.errors(), 0, "{}", cnpc_compiler::report::human(&r, false));
    let cluster = r.cluster.unwrap();
    let program = lower::build(
        &r.set.policies,
        &r.set.sources,
        &cluster,
        &Default::default(),
    );
    let universe = peer_universe(&program);
    let entries = ipcache_entries(&program, &universe);
    let mut by_net = BTreeMap::new();
    for (net, id) in &entries {
        assert!(
            by_net.insert(*net, *id).is_none(),
            "two identities for {net}: {entries:?}"
        );
    }
    let pod_b = program
        .endpoints
        .values()
        .find(|e| e.name == "x/b")
        .map(|e| program.identities[e.identity].numeric)
        .unwrap();
    assert_eq!(by_net[&"10.10.0.2/32".parse().unwrap()], pod_b);
    assert_eq!(by_net[&"fd00::2/128".parse().unwrap()], pod_b);
    assert_eq!(
        by_net[&"192.168.0.1/32".parse().unwrap()],
        cnpc_ir::Reserved::RemoteNode.numeric()
    );
    // Prefixes that are no endpoint's address still get their CIDR identity.
    let wide = by_net[&"10.10.0.0/24".parse().unwrap()];
    assert!(wide.0 >= cnpc_compiler::tables::FIRST_LOCAL_IDENTITY);
}
