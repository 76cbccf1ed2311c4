//! Golden snapshot (insta) of `cnpc diff -o markdown`, the pull-request comment, for the demo
//! edit of runtime-loader/tests/e2e.rs that `graph.rs` draws: rule1 lets every endpoint of its
//! namespace land (`fromEndpoints: [{}]`) and the xwing's egress deny policy is deleted. Accept
//! intended changes with `INSTA_UPDATE=always cargo test -p cnpc-golden --test diff_markdown`.

mod demo;

use demo::{demo_edit, starwars_l4};

/// `cnpc diff OLD NEW --cluster policies/cluster.yaml -o markdown` for the demo edit.
#[test]
fn starwars_l4_demo_edit_markdown() {
    let d = cnpc_compiler::diff::diff_summary(&starwars_l4(), &demo_edit());
    // The edit opens the deathstar's landing to the xwing (its deny policy is gone too).
    assert!(d
        .changes
        .iter()
        .any(|c| c.from == "default/xwing" && c.to == "default/deathstar"));
    assert!(d.unchanged > 0);
    insta::assert_snapshot!(
        "starwars-l4-demo-edit.diff.md",
        cnpc_compiler::diff::markdown(&d)
    );
}

/// No change: one line with the count of flows that stayed.
#[test]
fn no_change_markdown() {
    let d = cnpc_compiler::diff::diff_summary(&starwars_l4(), &starwars_l4());
    assert!(d.changes.is_empty());
    insta::assert_snapshot!(
        "starwars-l4-unchanged.diff.md",
        cnpc_compiler::diff::markdown(&d)
    );
}
