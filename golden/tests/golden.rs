//! Golden snapshots (insta): the diagnostics of every broken and warning fixture, in human and
//! JSON form, and the AST of every example policy. A change to any of them shows up as a diff
//! in review; accept intended ones with `INSTA_UPDATE=always cargo test -p cnpc-golden` (or
//! `cargo insta review`).

use cnpc_compiler::{check, report, Cluster, PolicySet};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Files of a fixture directory, relative to the repository root (so snapshots name them the
/// way a user at the root would).
fn files(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    v.sort();
    v
}

fn load(paths: &[&str]) -> PolicySet {
    let mut set = PolicySet::default();
    for p in paths {
        let bytes = std::fs::read(root().join(p)).unwrap();
        set.add_bytes(PathBuf::from(p), &bytes);
    }
    set.finish_notes();
    set
}

fn demo_cluster(set: &mut PolicySet) -> Cluster {
    let path = "policies/cluster.yaml";
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let mut c = Cluster::default();
    c.add_str(&mut set.sources, Path::new(path), &text);
    c
}

fn snapshot_name(path: &str) -> String {
    path.trim_start_matches("policies/")
        .trim_end_matches(".yaml")
        .replace('/', "__")
}

#[test]
fn diagnostics_of_broken_and_warning_fixtures() {
    let fixtures: Vec<String> = files("policies/broken")
        .into_iter()
        .chain(files("policies/warnings"))
        .collect();
    assert!(fixtures.len() > 25);
    for f in fixtures {
        // Warning fixtures are checked beside the L4 demo rule, which name-clash needs.
        let mut paths = vec![f.as_str()];
        if f.contains("/warnings/") {
            paths.insert(0, "policies/starwars-l4/deathstar.yaml");
        }
        let mut set = load(&paths);
        let cluster = demo_cluster(&mut set);
        let r = check(set, Some(cluster));
        assert!(!r.diagnostics.is_empty(), "{f} must produce a diagnostic");
        let name = snapshot_name(&f);
        insta::assert_snapshot!(format!("{name}.human"), report::human(&r, false));
        insta::assert_json_snapshot!(format!("{name}.json"), report::json(&r));
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[test]
fn ast_of_every_example() {
    let set = PolicySet::load(&[root().join("policies")]).unwrap();
    let mut examples: Vec<String> = set
        .sources
        .files()
        .map(|(_, f)| f.path.strip_prefix(root()).unwrap().display().to_string())
        .filter(|p| !p.ends_with("cluster.yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 6, "{examples:?}");
    for f in examples {
        let set = load(&[&f]);
        assert!(set.diagnostics.is_empty(), "{f}: {:?}", set.diagnostics);
        let ast = strip_nulls(serde_json::to_value(&set.policies).unwrap());
        insta::assert_json_snapshot!(format!("{}.ast", snapshot_name(&f)), ast);
    }
}

/// The example policy sets, each meant to be applied on its own.
const EXAMPLE_SETS: [&str; 5] = [
    "policies/starwars-l4",
    "policies/starwars-l7",
    "policies/dns/match-name",
    "policies/dns/match-pattern",
    "policies/dns/match-pattern-443",
];

/// An example set, checked against the demo cluster and lowered.
fn example_program(dir: &str) -> cnpc_ir::Program {
    let files: Vec<String> = files(dir);
    let paths: Vec<&str> = files.iter().map(String::as_str).collect();
    let mut set = load(&paths);
    let cluster = demo_cluster(&mut set);
    let r = check(set, Some(cluster));
    assert_eq!(r.errors(), 0, "{dir}");
    cnpc_compiler::lower::build(
        &r.set.policies,
        &r.set.sources,
        r.cluster.as_ref().unwrap(),
        &Default::default(),
    )
}

#[test]
fn decision_tables_of_every_example_set() {
    for dir in EXAMPLE_SETS {
        let program = example_program(dir);
        let universe = cnpc_compiler::tables::peer_universe(&program);
        let tables = cnpc_compiler::tables::all_tables(&program);
        insta::assert_snapshot!(
            format!("{}.tables", snapshot_name(dir)),
            report::tables_text(&program, &universe, &tables)
        );
    }
}

#[test]
fn bpf_listing_of_every_example_set() {
    for dir in EXAMPLE_SETS {
        let program = example_program(dir);
        let mut listing = String::new();
        let tables = cnpc_compiler::tables::all_tables(&program);
        for t in &tables {
            let track = cnpc_codegen_bpf::gen::needs_tracking(
                tables.iter().filter(|o| o.subject == t.subject),
            );
            let g = cnpc_codegen_bpf::gen::generate(t, track);
            let bpf = g.program;
            cnpc_codegen_bpf::check::check(&bpf).unwrap();
            listing.push_str(&format!(
                "; identity {} {}: {} instructions, {}\n",
                t.subject.0,
                t.direction.as_str(),
                bpf.slot_count(),
                g.strategy.as_str()
            ));
            listing.push_str(&cnpc_codegen_bpf::disasm::listing(&bpf));
        }
        insta::assert_snapshot!(format!("{}.bpf", snapshot_name(dir)), listing);
    }
}
