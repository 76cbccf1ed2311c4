//! `cnpc identities` and `--identities`: with the previous allocation as input, adding workloads
//! never renumbers existing identities.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn cnpc(args: &[&str]) -> (i32, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn previous_allocation_keeps_numbers_when_workloads_are_added() {
    let dir = std::env::temp_dir().join(format!("cnpc-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (code, before, err) = cnpc(&["identities", "--cluster", "policies/cluster.yaml"]);
    assert_eq!(code, 0, "{err}");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, &before).unwrap();
    // The same cluster plus many new workloads, each with its own label set.
    let mut bigger = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/cluster.yaml"),
    )
    .unwrap();
    for i in 0..200 {
        bigger.push_str(&format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: new{i}, namespace: default, labels: {{app: new{i}}}}}}}\n"));
    }
    let bigger_path = dir.join("bigger.yaml");
    std::fs::write(&bigger_path, bigger).unwrap();
    let (code, after, err) = cnpc(&[
        "identities",
        "--cluster",
        bigger_path.to_str().unwrap(),
        "--identities",
        ids.to_str().unwrap(),
    ]);
    let (bad_code, _, bad_err) = cnpc(&[
        "identities",
        "--cluster",
        "policies/cluster.yaml",
        "--identities",
        bigger_path.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{err}");
    let (before, after): (Value, Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    let (before, after) = (before.as_object().unwrap(), after.as_object().unwrap());
    assert_eq!(after.len(), before.len() + 200);
    for (labels, n) in before {
        assert_eq!(&after[labels], n, "{labels} was renumbered");
    }
    let numbers: std::collections::BTreeSet<u64> =
        after.values().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(numbers.len(), after.len(), "numbers are unique");
    assert_eq!(bad_code, 2);
    assert!(bad_err.contains("not an identity allocation"), "{bad_err}");
}
