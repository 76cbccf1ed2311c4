//! `cnpc endpoints` reads the loader's state file and asks the kernel about each pinned link.

use std::process::Command;

fn cnpc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lists_recorded_hooks_and_marks_links_that_are_gone() {
    let dir = std::env::temp_dir().join(format!("cnpc-endpoints-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hook = |dir: &str| {
        serde_json::json!({
            "interface": "lxc1", "direction": dir, "endpoint": "default/tiefighter",
            "identity": 12685, "labels": ["k8s:class=tiefighter"], "generation": 3,
            "digest": "ab", "strategy": "branches"
        })
    };
    let state = serde_json::json!({
        "generation": 3,
        "hooks": {"ingress_lxc1": hook("ingress"), "egress_lxc1": hook("egress")}
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let state_dir = dir.to_str().unwrap();
    let (code, out, err) = cnpc(&[
        "endpoints",
        "--state-dir",
        state_dir,
        "--pin-dir",
        "/nonexistent",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one endpoint:\n{out}");
    assert!(lines[1].starts_with("default/tiefighter"), "{out}");
    assert!(lines[1].contains("lxc1") && lines[1].contains("12685"));
    assert!(lines[1].contains("DETACHED"), "no pinned link: {out}");
    let (code, out, _) = cnpc(&[
        "endpoints",
        "--state-dir",
        state_dir,
        "--pin-dir",
        "/nonexistent",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(v["endpoints"][0]["program_id"], serde_json::Value::Null);
    std::fs::remove_dir_all(&dir).unwrap();
    let (code, _, err) = cnpc(&["endpoints", "--state-dir", state_dir]);
    assert_eq!(code, 2);
    assert!(err.contains("state.json"), "{err}");
}
