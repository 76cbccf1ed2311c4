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
