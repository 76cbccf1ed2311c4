//! `cnpc graph` and `cnpc diff -o dot|html` end to end: DOT and HTML output, the demo edit's
//! picture, and the exit codes of bad input (the same as `cnpc diff`'s, DESIGN.md §7).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cnpc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.code().unwrap(), stdout, stderr)
}

const L4: &str = "policies/starwars-l4";
const CLUSTER: &str = "policies/cluster.yaml";

/// A temporary copy of the Star Wars L4 set with the end-to-end test's edit
/// (runtime-loader/tests/e2e.rs): rule1 lets every endpoint of its namespace land and the
/// xwing's egress deny is gone, so the xwing's landing flips from denied to allowed.
fn demo_edit(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnpc-graph-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rule1 = std::fs::read_to_string(root().join(L4).join("deathstar.yaml")).unwrap();
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, rule1);
    std::fs::write(dir.join("deathstar.yaml"), open).unwrap();
    std::fs::copy(
        root().join(L4).join("tiefighter-egress.yaml"),
        dir.join("tiefighter-egress.yaml"),
    )
    .unwrap();
    dir
}

#[test]
fn graph_prints_dot_by_default() {
    let (code, out, err) = cnpc(&["graph", L4, "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("digraph cnpc {"), "{out}");
    assert!(out.trim_end().ends_with('}'));
    assert!(out.contains("subgraph \"cluster_default\""), "{out}");
    assert!(
        out.contains("\"default/tiefighter\" -> \"default/deathstar\" [label=\"80/TCP\""),
        "{out}"
    );
    assert!(out.contains(
        "\"default/xwing\" -> \"default/deathstar\" [label=\"any denied by CiliumNetworkPolicy default/xwing-egress\", color=red, fontcolor=red, style=dashed"
    ), "{out}");
    assert!(
        out.contains("policies/starwars-l4/deathstar.yaml:15"),
        "{out}"
    );
    let (_, again, _) = cnpc(&["graph", L4, "--cluster", CLUSTER, "-o", "dot"]);
    assert_eq!(out, again, "deterministic");
    // L7 rules mark their ports.
    let (code, out, err) = cnpc(&["graph", "policies/starwars-l7", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[label=\"80/TCP (HTTP rules)\""), "{out}");
    let (code, out, err) = cnpc(&["graph", "policies/dns/match-name", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[label=\"53/ANY (DNS rules)\""), "{out}");
    assert!(out.contains("\"fqdn:api.github.com\""), "{out}");
}

#[test]
fn graph_html_is_one_offline_page() {
    let (code, out, err) = cnpc(&["graph", L4, "--cluster", CLUSTER, "-o", "html"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("<!DOCTYPE html>"));
    assert_eq!(out.matches("<svg").count(), 1);
    assert!(!out.contains("http://") && !out.contains("https://"));
    assert!(!out.contains("<script src"));
    for w in [
        "default/deathstar",
        "default/tiefighter",
        "default/xwing",
        "kube-system/coredns",
    ] {
        assert_eq!(out.matches(&format!("data-node=\"{w}\"")).count(), 1, "{w}");
    }
    assert!(out.contains("data-policy=\"CiliumNetworkPolicy default/xwing-egress\""));
}

#[test]
fn diff_draws_the_demo_edit() {
    let edited = demo_edit("dot");
    let new = edited.to_str().unwrap();
    let (code, out, err) = cnpc(&[
        "diff",
        L4,
        new,
        "--cluster",
        CLUSTER,
        "-o",
        "dot",
        "--exit-code",
    ]);
    let (hcode, html, herr) = cnpc(&["diff", L4, new, "--cluster", CLUSTER, "-o", "html"]);
    std::fs::remove_dir_all(&edited).unwrap();
    assert_eq!(code, 1, "a change with --exit-code exits 1: {err}");
    assert!(out.contains(
        "\"default/xwing\" -> \"default/deathstar\" [label=\"80/TCP\", color=green, fontcolor=green"
    ), "{out}");
    assert!(out.contains(
        "\"default/xwing\" -> \"default/deathstar\" [label=\"any denied by CiliumNetworkPolicy default/xwing-egress\", color=red, fontcolor=red, style=dashed"
    ), "{out}");
    assert!(
        out.contains(
            "\"default/tiefighter\" -> \"default/deathstar\" [label=\"80/TCP\", color=gray"
        ),
        "unchanged edges stay for context: {out}"
    );
    assert_eq!(hcode, 0, "{herr}");
    assert_eq!(html.matches("<svg").count(), 1);
    assert!(html.contains("data-status=\"added\""));
    assert!(!html.contains("http://") && !html.contains("https://"));
    // No change: nothing coloured, exit 0 even with --exit-code.
    let (code, out, err) = cnpc(&[
        "diff",
        L4,
        L4,
        "--cluster",
        CLUSTER,
        "-o",
        "dot",
        "--exit-code",
    ]);
    assert_eq!(code, 0, "{err}");
    for colour in ["green", "red", "orange"] {
        assert!(!out.contains(&format!("color={colour}")), "{out}");
    }
}

#[test]
fn bad_input_exits_like_diff() {
    // Unreadable policy path: I/O error, 2, for both commands.
    let (code, _, err) = cnpc(&["graph", "no/such/dir", "--cluster", CLUSTER]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no/such/dir"), "{err}");
    let (dcode, _, derr) = cnpc(&["diff", "no/such/dir", L4, "--cluster", CLUSTER, "-o", "dot"]);
    assert_eq!(dcode, 2, "{derr}");
    assert_eq!(err, derr, "the same diagnostic");
    // Unreadable cluster snapshot: 2.
    let (code, _, err) = cnpc(&["graph", L4, "--cluster", "no-such-cluster.yaml"]);
    assert_eq!(code, 2, "{err}");
    let (dcode, _, derr) = cnpc(&[
        "diff",
        L4,
        L4,
        "--cluster",
        "no-such-cluster.yaml",
        "-o",
        "html",
    ]);
    assert_eq!(dcode, 2, "{derr}");
    // Usage: no --cluster, an unknown format.
    assert_eq!(cnpc(&["graph", L4]).0, 2);
    assert_eq!(cnpc(&["graph", L4, "--cluster", CLUSTER, "-o", "svg"]).0, 2);
    // Invalid policies: their diagnostics and 1, as diff prints them.
    let broken = "policies/broken/port-out-of-range.yaml";
    let (code, out, err) = cnpc(&["graph", broken, "--cluster", CLUSTER]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("port-out-of-range.yaml"), "{err}");
    let (dcode, _, derr) = cnpc(&["diff", L4, broken, "--cluster", CLUSTER, "-o", "dot"]);
    assert_eq!(dcode, 1, "{derr}");
    assert_eq!(err, derr, "the same diagnostics");
}

/// With a headless Chromium on the machine (Debian: `apt-get install chromium`), clicking an
/// edge in the real page shows its deciding rules in the side panel. Skipped without one.
#[test]
fn clicking_an_edge_shows_its_rules_in_a_browser() {
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        eprintln!("SKIPPED: no headless chromium on this machine");
        return;
    };
    let (code, page, err) = cnpc(&["graph", L4, "--cluster", CLUSTER, "-o", "html"]);
    assert_eq!(code, 0, "{err}");
    // Click the xwing's denied edge once the page's own script has run.
    let click = r#"<script>
var e = document.querySelector('g.edge[data-from="default/xwing"][data-to="default/deathstar"]');
e.dispatchEvent(new MouseEvent('click', {bubbles: true}));
document.body.setAttribute('data-clicked', e.classList.contains('selected') ? 'yes' : 'no');
</script></body>"#;
    let page = page.replace("</body>", click);
    let dir = std::env::temp_dir().join(format!("cnpc-graph-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("graph.html");
    std::fs::write(&file, page).unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            &format!("--user-data-dir={}", dir.join("profile").display()),
        ])
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-clicked=\"yes\""), "{dom}");
    let shown = dom
        .split("<div id=\"shown\">")
        .nth(1)
        .and_then(|s| s.split("</div>").next())
        .unwrap_or_default();
    assert!(
        shown.contains("CiliumNetworkPolicy default/xwing-egress")
            && shown.contains("policies/starwars-l4/xwing-egress-deny.yaml:16"),
        "the panel shows the deciding rule: {shown}"
    );
}
