//! Golden snapshot (insta) of `cnpc diff -o markdown`, the pull-request comment, for the demo
//! edit of runtime-loader/tests/e2e.rs that `graph.rs` draws: rule1 lets every endpoint of its
//! namespace land (`fromEndpoints: [{}]`) and the xwing's egress deny policy is deleted. Accept
//! intended changes with `INSTA_UPDATE=always cargo test -p cnpc-golden --test diff_markdown`.

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

fn demo_edit() -> cnpc_ir::Program {
    let (_, rule1) = read("policies/starwars-l4/deathstar.yaml");
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, rule1);
    program(&[
        ("edited/deathstar.yaml", open),
        read("policies/starwars-l4/tiefighter-egress.yaml"),
    ])
}

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
