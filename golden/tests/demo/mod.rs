//! The Star Wars demo and its edit, lowered as the golden tests of `cnpc graph` and `cnpc diff`
//! draw them.

use cnpc_compiler::{check, Cluster, PolicySet};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Lowers (name, text) policy files over the demo cluster, named as a user at the repository
/// root would name them.
pub fn program(files: &[(&str, String)]) -> cnpc_ir::Program {
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

pub fn read(name: &str) -> (&str, String) {
    (name, std::fs::read_to_string(root().join(name)).unwrap())
}

/// The Star Wars L4 demo as `policies/starwars-l4` holds it.
pub fn starwars_l4() -> cnpc_ir::Program {
    program(&[
        read("policies/starwars-l4/deathstar.yaml"),
        read("policies/starwars-l4/tiefighter-egress.yaml"),
        read("policies/starwars-l4/xwing-egress-deny.yaml"),
    ])
}

/// The demo edit of runtime-loader/tests/e2e.rs ("Editing the policy changes verdicts"): rule1
/// lets every endpoint of its namespace land (`fromEndpoints: [{}]`) and the xwing's egress
/// deny policy is deleted.
pub fn demo_edit() -> cnpc_ir::Program {
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
