//! Golden snapshots (insta) of `cnpc graph` and of `cnpc diff -o dot`: the connectivity of the
//! Star Wars L4 demo, and the picture of the end-to-end test's demo edit. Accept intended
//! changes with `INSTA_UPDATE=always cargo test -p cnpc-golden --test graph`.

mod demo;

use demo::{demo_edit, starwars_l4};

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
    let picture = cnpc_compiler::graph::diff(&starwars_l4(), &demo_edit());
    insta::assert_snapshot!("starwars-l4-demo-edit.diff.dot", picture.to_dot());
}
