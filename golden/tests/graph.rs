//! Golden snapshots (insta) of `cnpc graph` and of `cnpc diff -o dot`: the connectivity of the
//! Star Wars L4 demo, and the picture of the end-to-end test's demo edit. Accept intended
//! changes with `INSTA_UPDATE=always cargo test -p cnpc-golden --test graph`.

use cnpc_compiler::{check, Cluster, PolicySet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Lowers (name, text) policy files over the demo cluster, named as a user at the repository
/// root would name them.
fn program(files: &[(&str, String)]) -> cnpc_ir::Program {
    let mut set = PolicySet::default();
    for (name, text) in files {
        set.add_bytes(PathBuf::from(name), text.as_bytes());
    }
    set.finish_notes();
    let path = "policies/cluster.yaml";
    let mut cluster = Cluster::default();
    cluster.add_str(
        &mut set.sources,
        Path::new(path),
        &std::fs::read_to_string(root().join(path)).unwrap(),
    );
    let r = check(set, Some(cluster));
    assert_eq!(r.errors(), 0);
    cnpc_compiler::lower::build(
        &r.set.policies,
        &r.set.sources,
        r.cluster.as_ref().unwrap(),
        &Default::default(),
    )
}

fn read(name: &str) -> (&str, String) {
    (name, std::fs::read_to_string(root().join(name)).unwrap())
}

fn starwars_l4() -> cnpc_ir::Program {
    program(&[
        read("policies/starwars-l4/deathstar.yaml"),
        read("policies/starwars-l4/tiefighter-egress.yaml"),
        read("policies/starwars-l4/xwing-egress-deny.yaml"),
    ])
}

/// `cnpc graph policies/starwars-l4 --cluster policies/cluster.yaml -o dot`
#[test]
fn starwars_l4_graph() {
    let dot = cnpc_compiler::graph::connectivity(&starwars_l4()).to_dot();
    insta::assert_snapshot!("starwars-l4.dot", dot);
}

/// The demo edit of runtime-loader/tests/e2e.rs ("Editing the policy changes verdicts"): rule1
/// lets every endpoint of its namespace land (`fromEndpoints: [{}]`) and the xwing's egress
/// deny policy is deleted. It flips the xwing's landing on the deathstar (80/TCP) from denied
/// to allowed: a green 80/TCP edge, and the red dashed deny edge removed.
#[test]
fn starwars_l4_demo_edit_diff() {
    let (_, rule1) = read("policies/starwars-l4/deathstar.yaml");
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, rule1);
    let new = program(&[
        ("edited/deathstar.yaml", open),
        read("policies/starwars-l4/tiefighter-egress.yaml"),
    ]);
    let picture = cnpc_compiler::graph::diff(&starwars_l4(), &new);
    insta::assert_snapshot!("starwars-l4-demo-edit.diff.dot", picture.to_dot());
}
