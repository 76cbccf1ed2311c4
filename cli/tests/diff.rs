//! `cnpc diff` end to end: JSON shape, exit codes, and `git:REV:PATH` sources.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cnpc(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn adding_the_l7_rule_proxies_landing_traffic() {
    let (code, out, err) = cnpc(
        &root(),
        &[
            "diff",
            "policies/starwars-l4/deathstar.yaml",
            "policies/starwars-l7/deathstar.yaml",
            "--cluster",
            "policies/cluster.yaml",
            "-o",
            "json",
            "--exit-code",
        ],
    );
    assert_eq!(code, 1, "changes with --exit-code exit 1: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let changes = v["changes"].as_array().unwrap();
    let landing = changes
        .iter()
        .find(|c| c["from"] == "default/tiefighter" && c["to"] == "default/deathstar")
        .expect("tiefighter -> deathstar changes");
    assert_eq!(landing["port"], "80/TCP");
    assert_eq!(landing["before"], "allowed");
    assert_eq!(landing["after"], "allowed");
    assert_eq!(landing["l7"]["after"], true);
    assert!(landing["policies"].to_string().contains("rule1-l7"));
    // The xwing was denied before and after: not a change.
    assert!(!changes
        .iter()
        .any(|c| c["from"] == "default/xwing" && c["to"] == "default/deathstar"));
}

#[test]
fn removing_a_policy_opens_traffic_and_same_sets_print_nothing() {
    let (code, out, _) = cnpc(
        &root(),
        &[
            "diff",
            "policies/starwars-l4",
            "policies/starwars-l4",
            "--cluster",
            "policies/cluster.yaml",
            "--exit-code",
        ],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, ""),
        "no change prints nothing and exits 0"
    );
    let empty = std::env::temp_dir().join(format!("cnpc-diff-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out, err) = cnpc(
        &root(),
        &[
            "diff",
            "policies/starwars-l4",
            empty.to_str().unwrap(),
            "--cluster",
            "policies/cluster.yaml",
        ],
    );
    std::fs::remove_dir_all(&empty).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default/xwing -> default/deathstar"), "{out}");
    assert!(out.contains("denied -> allowed"), "{out}");
    assert!(
        out.contains("--- old tables"),
        "a unified view of the tables follows: {out}"
    );
}

#[test]
fn git_revisions_are_sources() {
    let dir = std::env::temp_dir().join(format!("cnpc-diff-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("p")).unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .args([
                "-c",
                "user.name=cnpc",
                "-c",
                "user.email=cnpc@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::copy(
        root().join("policies/starwars-l4/deathstar.yaml"),
        dir.join("p/deathstar.yaml"),
    )
    .unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "l4"]);
    std::fs::copy(
        root().join("policies/starwars-l7/deathstar.yaml"),
        dir.join("p/deathstar.yaml"),
    )
    .unwrap();
    let cluster = root().join("policies/cluster.yaml");
    let (code, out, err) = cnpc(
        &dir,
        &[
            "diff",
            "git:HEAD:p",
            "p",
            "--cluster",
            cluster.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let (bad, _, bad_err) = cnpc(
        &dir,
        &[
            "diff",
            "git:no-such-rev:p",
            "p",
            "--cluster",
            cluster.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["l7"]["after"] == true),
        "{v:#}"
    );
    assert_eq!(bad, 2);
    assert!(bad_err.contains("no-such-rev"), "{bad_err}");
}

/// A directory holding the L4 demo with the xwing's egress deny policy left out: the xwing may
/// land (denied → allowed) and nothing is closed.
fn without_xwing_deny(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnpc-diff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(root().join("policies/starwars-l4/deathstar.yaml")).unwrap();
    let open = text.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, text);
    std::fs::write(dir.join("deathstar.yaml"), open).unwrap();
    std::fs::copy(
        root().join("policies/starwars-l4/tiefighter-egress.yaml"),
        dir.join("tiefighter-egress.yaml"),
    )
    .unwrap();
    dir
}

#[test]
fn markdown_tables_the_flipped_flows_for_a_pull_request() {
    let new = without_xwing_deny("markdown");
    let (code, out, err) = cnpc(
        &root(),
        &[
            "diff",
            "policies/starwars-l4",
            new.to_str().unwrap(),
            "--cluster",
            "policies/cluster.yaml",
            "-o",
            "markdown",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("<!-- cnpc-diff -->\n### cnpc diff: 1 flow changes in 1 workload pair\n"),
        "{out}"
    );
    assert!(
        out.contains("| From | To | Flows | Policies |\n|---|---|---|---|\n"),
        "{out}"
    );
    assert!(
        out.contains("| `default/xwing` | `default/deathstar` | `80/TCP`: denied → **allowed** |"),
        "{out}"
    );
    // The count of what stayed, the same as the JSON's.
    let (_, json, _) = cnpc(
        &root(),
        &[
            "diff",
            "policies/starwars-l4",
            new.to_str().unwrap(),
            "--cluster",
            "policies/cluster.yaml",
            "-o",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&json).unwrap();
    let unchanged = v["unchanged"].as_u64().expect("an unchanged count");
    assert!(unchanged > 100, "{v}");
    assert!(
        out.contains(&format!("; {unchanged} flows unchanged.")),
        "{out}"
    );
    std::fs::remove_dir_all(&new).unwrap();
}

#[test]
fn fail_on_gates_one_direction() {
    let new = without_xwing_deny("fail-on");
    let new = new.to_str().unwrap();
    let run = |old: &str, new: &str, gate: &str| {
        cnpc(
            &root(),
            &[
                "diff",
                old,
                new,
                "--cluster",
                "policies/cluster.yaml",
                "-o",
                "markdown",
                "--fail-on",
                gate,
            ],
        )
        .0
    };
    let base = "policies/starwars-l4";
    // Opening the deathstar to the xwing flips denied → allowed only.
    assert_eq!(run(base, new, "denied-to-allowed"), 1);
    assert_eq!(run(base, new, "allowed-to-denied"), 0);
    assert_eq!(run(base, new, "any"), 1);
    // The same change backwards closes it again: allowed → denied only.
    assert_eq!(run(new, base, "denied-to-allowed"), 0);
    assert_eq!(run(new, base, "allowed-to-denied"), 1);
    // Adding L7 rules only filters requests of a flow that stays allowed: `any` alone gates it.
    let l7 = [
        "policies/starwars-l4/deathstar.yaml",
        "policies/starwars-l7/deathstar.yaml",
    ];
    assert_eq!(run(l7[0], l7[1], "allowed-to-denied"), 0);
    assert_eq!(run(l7[0], l7[1], "denied-to-allowed"), 0);
    assert_eq!(run(l7[0], l7[1], "any"), 1);
    // No change passes every gate; the gate works with the pictures too.
    assert_eq!(run(base, base, "any"), 0);
    let (code, out, _) = cnpc(
        &root(),
        &[
            "diff",
            base,
            new,
            "--cluster",
            "policies/cluster.yaml",
            "-o",
            "dot",
            "--fail-on",
            "denied-to-allowed",
        ],
    );
    assert_eq!(code, 1);
    assert!(out.starts_with("digraph"), "{out}");
    let (code, _, err) = cnpc(
        &root(),
        &[
            "diff",
            base,
            new,
            "--cluster",
            "policies/cluster.yaml",
            "--fail-on",
            "sideways",
        ],
    );
    assert_eq!(code, 2, "{err}");
    std::fs::remove_dir_all(new).unwrap();
}
