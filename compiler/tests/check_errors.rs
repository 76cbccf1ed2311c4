//! `check_errors` (what the loader runs) finds exactly the errors `check` finds, on every
//! broken and warning fixture, and none of the lint warnings.

use cnpc_compiler::{check, check_errors, Cluster, PolicySet, Severity};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn errors(r: &cnpc_compiler::CheckReport) -> Vec<(String, u32)> {
    r.diagnostics
        .iter()
        .filter(|d| d.severity() == Severity::Error)
        .map(|d| (d.code.as_str().to_string(), d.span.start))
        .collect()
}

#[test]
fn check_errors_finds_every_error_check_finds() {
    let mut files = 0;
    let mut warned = 0;
    for dir in [
        "policies/broken",
        "policies/warnings",
        "policies/starwars-l4",
    ] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let load = || {
                let mut set = PolicySet::load(std::slice::from_ref(&path)).unwrap();
                let cluster =
                    Cluster::load(&[root().join("policies/cluster.yaml")], &mut set.sources)
                        .unwrap();
                (set, cluster)
            };
            let (set, cluster) = load();
            let full = check(set, Some(cluster));
            let (set, cluster) = load();
            let lean = check_errors(set, Some(cluster));
            assert_eq!(errors(&full), errors(&lean), "{}", path.display());
            files += 1;
            warned += usize::from(full.warnings() > lean.warnings());
        }
    }
    assert!(files > 30);
    assert!(
        warned > 0,
        "some fixture has lint warnings that check_errors skips"
    );
}

/// A name used twice in one file is an error whatever other files hold: a third file naming it
/// first must not turn the in-file duplicate into a cross-file warning (the loader checks a
/// changed file alone and must find the same errors as a full check).
#[test]
fn duplicate_names_within_a_file_are_errors_whatever_other_files_hold() {
    let policy = |name: &str, port: u16| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: \"{port}\"\n"
        )
    };
    let mut set = PolicySet::default();
    set.add_bytes("a.yaml".into(), policy("x", 80).as_bytes());
    set.add_bytes(
        "b.yaml".into(),
        format!("{}---\n{}", policy("x", 81), policy("x", 82)).as_bytes(),
    );
    let codes: Vec<&str> = check_errors(set, None)
        .diagnostics
        .iter()
        .map(|d| d.code.as_str())
        .collect();
    assert_eq!(
        codes,
        ["cnpc::name-clash", "cnpc::duplicate-name"],
        "b.yaml's first x clashes with a.yaml's; its second duplicates its first"
    );
}
