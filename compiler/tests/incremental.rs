//! Property test: relabelling one workload incrementally gives exactly the tables of a full
//! rebuild of the changed cluster (with the previous identity allocation, as the loader keeps it).

mod common;

use cnpc_compiler::tables::{all_tables, TableSet};
use cnpc_ir::{EndpointRef, EntityRef};
use common::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn relabel_equals_full_rebuild(
        pods in prop::collection::vec(pod(), 1..7),
        policies in prop::collection::vec(policy_gen(), 0..4),
        which in any::<prop::sample::Index>(),
        changes in prop::collection::vec((0..3usize, prop::option::of(any::<bool>())), 1..4),
    ) {
        let (program, _, yaml) = build(&pods, &policies);
        let mut set = TableSet::build(program);
        let mut pods = pods;
        let i = which.index(pods.len());
        // Several relabels in a row, each checked against a rebuild.
        for (app, tier) in changes {
            let previous = set.allocation();
            pods[i].app = app;
            pods[i].tier = tier;
            let (rebuilt, _, _) = build_with(&pods, &policies, &previous);
            let e = &rebuilt.endpoints[EndpointRef::new(i)];
            set.update_endpoint(EndpointRef::new(i), e.labels.clone(), e.named_ports.clone());
            prop_assert_eq!(&set.tables, &all_tables(&rebuilt), "pod {} -> app {} tier {:?}\n{}", i, app, tier, yaml);
        }
    }
}

/// A cluster of `pods` (name, app label, named port `svc`'s number) in namespace `ns0`, with
/// a client pod whose egress reaches app `web` on the named port, and a server policy letting
/// every cluster peer reach `web` on it.
fn named_port_world(
    pods: &[(&str, &str, u16)],
    previous: &cnpc_compiler::lower::Allocation,
) -> cnpc_ir::Program {
    use cnpc_compiler::{check, load_str, lower, Cluster};
    let policies = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: client, namespace: ns0}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: svc, protocol: TCP}]}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: ns0}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: svc, protocol: TCP}]}]\n";
    let mut cluster = String::from("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns0}}\n- {apiVersion: v1, kind: Pod, metadata: {name: c, namespace: ns0, labels: {app: client}}, status: {podIPs: [{ip: 10.0.9.1}]}}\n");
    for (i, (name, app, port)) in pods.iter().enumerate() {
        cluster.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: ns0, labels: {{app: {app}}}}}\n  spec: {{containers: [{{name: c, ports: [{{name: svc, containerPort: {port}}}]}}]}}\n  status: {{podIPs: [{{ip: 10.0.0.{}}}]}}\n",
            i + 1
        ));
    }
    let mut set = load_str("p.yaml", policies);
    let mut c = Cluster::default();
    c.add_str(&mut set.sources, std::path::Path::new("c.yaml"), &cluster);
    let r = check(set, Some(c));
    assert_eq!(r.errors(), 0, "{}", cnpc_compiler::report::human(&r, false));
    lower::build(
        &r.set.policies,
        &r.set.sources,
        r.cluster.as_ref().expect("checked with a cluster"),
        previous,
    )
}

/// Moves pod `i` of `before` to `after[i]` incrementally and compares with a rebuild.
fn relabel_matches_rebuild(before: &[(&str, &str, u16)], after: &[(&str, &str, u16)], i: usize) {
    let mut set = TableSet::build(named_port_world(before, &Default::default()));
    let rebuilt = named_port_world(after, &set.allocation());
    // The cluster lists the client first, then `pods` in order.
    let ep = EndpointRef::new(i + 1);
    let e = &rebuilt.endpoints[ep];
    assert_eq!(e.name, format!("ns0/{}", after[i].0));
    set.update_endpoint(ep, e.labels.clone(), e.named_ports.clone());
    assert_eq!(set.tables, all_tables(&rebuilt), "{before:?} -> {after:?}");
}

#[test]
fn an_identity_left_by_a_pod_loses_its_named_ports_in_other_tables() {
    // `web` declares svc as 80 and 81 through its two pods; when w1 leaves, the client's
    // egress table keeps only 80 for `web` (the identity stays, with other named ports).
    relabel_matches_rebuild(
        &[("w0", "web", 80), ("w1", "web", 81)],
        &[("w0", "web", 80), ("w1", "other", 81)],
        1,
    );
    // And back: `web` gains 81 again, `other` disappears.
    relabel_matches_rebuild(
        &[("w0", "web", 80), ("w1", "other", 81)],
        &[("w0", "web", 80), ("w1", "web", 81)],
        1,
    );
}

#[test]
fn a_pod_changing_only_its_named_ports_changes_other_tables() {
    // Same labels, other container port: the identity stays, its rows in the client's table
    // (and its own ingress table) change.
    relabel_matches_rebuild(
        &[("w0", "web", 80), ("w1", "web", 81)],
        &[("w0", "web", 80), ("w1", "web", 82)],
        1,
    );
}

#[test]
fn a_pod_joining_an_existing_identity_is_placed_in_every_table() {
    // w1 moves from its own identity to `web`'s: it leaves the client's and web's tables as
    // `other` (gone) and `web` gains its port.
    relabel_matches_rebuild(
        &[("w0", "web", 80), ("w1", "other", 80)],
        &[("w0", "web", 80), ("w1", "web", 80)],
        1,
    );
    relabel_matches_rebuild(
        &[("w0", "web", 80), ("w1", "other", 81)],
        &[("w0", "web", 80), ("w1", "web", 81)],
        1,
    );
}
