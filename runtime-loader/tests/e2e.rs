//! End to end (issue 5, item 8): the Star Wars demo on one machine. The test creates a node
//! network namespace and a namespace per pod (two deathstars, a tiefighter, an xwing) joined by
//! veth pairs, with the addresses of `policies/cluster.yaml`; HTTP servers in the deathstar pods
//! answer `POST /v1/request-landing` with "Ship landed"; `cnpc-loader` runs standalone in the
//! node namespace on a copy of `policies/starwars-l4`. Everything it creates (namespaces,
//! interfaces, the pin directory, temporary files) carries this process's id and is removed at
//! the end, whatever the outcome.

mod netns;

use cnpc_runtime_loader::sys;
use netns::{Net, PODS};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn the_demo_enforces_swaps_without_a_gap_and_survives_the_loader() {
    demo("tcx");
}

/// The same with clsact filters, the fallback for kernels without TCX links.
#[test]
fn the_demo_on_clsact_filters() {
    demo("clsact");
}

fn demo(attach: &str) {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let mut net = match Net::demo() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    net.loader_args = vec!["--attach".into(), attach.into()];
    let (tf, xw, ds1, ds2) = ("tf", "xw", PODS[0].2, PODS[1].2);
    // Without the loader nothing is enforced: the network itself works.
    assert!(
        net.land(xw, ds1, Duration::from_secs(2)),
        "the test network does not carry traffic"
    );
    // A policy set that does not compile, with no good generation before it: every endpoint
    // gets a deny-all program rather than none.
    let policies = net.policies.clone();
    let rule1 = std::fs::read_to_string(policies.join("deathstar.yaml")).unwrap();
    let broken = rule1.replace("protocol: TCP", "protocol: TPC");
    assert_ne!(broken, rule1);
    std::fs::write(policies.join("deathstar.yaml"), &broken).unwrap();
    net.start_loader().unwrap();
    let log = || net.log();
    assert!(
        net.until(Duration::from_secs(20), || log()
            .contains("deny-all attached"))
            .is_some(),
        "no deny-all before the first good generation:\n{}",
        log()
    );
    assert!(
        !net.land(tf, ds1, SHORT),
        "deny-all blocks even the tiefighter"
    );
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    assert!(
        net.until(Duration::from_secs(5), || net.land(tf, ds1, SHORT))
            .is_some(),
        "the fixed policy set enforces:\n{}",
        log()
    );
    assert!(!net.land(xw, ds1, SHORT), "xwing must not land");
    assert!(
        net.land(tf, ds2, Duration::from_secs(2)),
        "on either deathstar"
    );
    assert!(!net.land(xw, ds2, SHORT), "xwing must not land on either");
    // What `cnpc observe --last 50 -o json` shows of it (issue 11): the xwing's dropped SYN
    // with the deny rule that dropped it, and the tiefighter's allowed connection.
    {
        use cnpc_runtime_loader::events::{self, Filter, FlowRecord};
        let read = || -> Vec<FlowRecord> {
            let mut out = Vec::new();
            events::observe(
                &net.tmp.join("state/events.sock"),
                50,
                false,
                &Filter::default(),
                true,
                &mut out,
            )
            .expect("the loader's event stream");
            String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        // Events are read every 10 ms: the last drop may still be on the way.
        let xwing_dropped = |seen: &[FlowRecord]| {
            seen.iter()
                .any(|r| r.source.pod.as_deref() == Some("xwing") && r.verdict == "denied")
        };
        net.until(Duration::from_secs(2), || xwing_dropped(&read()));
        let seen = read();
        let dropped = seen
            .iter()
            .find(|r| {
                r.source.pod.as_deref() == Some("xwing")
                    && r.verdict == "denied"
                    && r.direction == "egress"
            })
            .unwrap_or_else(|| panic!("no xwing drop in {seen:#?}"));
        let policy = dropped
            .policy
            .as_ref()
            .unwrap_or_else(|| panic!("no deny rule in {dropped:#?} of {seen:#?}"));
        assert!(
            policy.name.ends_with("default/xwing-egress")
                && policy.file.ends_with("xwing-egress-deny.yaml")
                && policy.line == 16,
            "{policy:?}"
        );
        assert!(
            seen.iter()
                .any(|r| r.source.pod.as_deref() == Some("tiefighter")
                    && r.verdict == "allowed"
                    && r.port == "80/TCP"),
            "{seen:#?}"
        );
    }

    // Editing the policy changes verdicts within a second.
    let deny = std::fs::read_to_string(policies.join("xwing-egress-deny.yaml")).unwrap();
    std::fs::remove_file(policies.join("xwing-egress-deny.yaml")).unwrap();
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, rule1, "the edit applies to the demo policy");
    std::fs::write(policies.join("deathstar.yaml"), &open).unwrap();
    let took = net.until(Duration::from_secs(5), || net.land(xw, ds1, SHORT));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "xwing lands within a second of the edit (took {took:?}):\n{}",
        log()
    );
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    std::fs::write(policies.join("xwing-egress-deny.yaml"), &deny).unwrap();
    let took = net.until(Duration::from_secs(5), || !net.land(xw, ds1, SHORT));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "and is blocked again within a second (took {took:?})"
    );

    // A broken edit leaves the last good generation enforcing.
    let failures = log().matches("compile failed").count();
    std::fs::write(policies.join("deathstar.yaml"), &broken).unwrap();
    assert!(
        net.until(Duration::from_secs(5), || log()
            .matches("compile failed")
            .count()
            > failures)
            .is_some(),
        "the broken edit is reported"
    );
    assert!(
        net.land(tf, ds1, Duration::from_secs(2)),
        "the last good generation still lets the tiefighter land"
    );
    assert!(!net.land(xw, ds1, SHORT), "and still blocks the xwing");
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // 100 swaps to equivalent generations while ships keep trying.
    let net = Arc::new(net);
    let done = Arc::new(AtomicBool::new(false));
    let (landed, refused, wrongly) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let client = {
        let (net, done, landed, refused, wrongly) = (
            net.clone(),
            done.clone(),
            landed.clone(),
            refused.clone(),
            wrongly.clone(),
        );
        std::thread::spawn(move || {
            // Bounded: at most 2,000 attempts each.
            for _ in 0..2000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                if net.land(tf, ds1, Duration::from_secs(1)) {
                    landed.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                if net.land(xw, ds2, Duration::from_millis(50)) {
                    wrongly.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let pid = net.loader.as_ref().unwrap().id() as i32;
    let before = net.generation();
    for i in 1..=100 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        assert!(
            net.until(Duration::from_secs(5), || net.generation() >= before + i)
                .is_some(),
            "swap {i} did not happen:\n{}",
            net.log()
        );
    }
    done.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (landed, refused, wrongly) = (
        landed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        wrongly.load(Ordering::Relaxed),
    );
    eprintln!("during 100 swaps: {landed} landings, {refused} refused, {wrongly} xwing landings");
    assert!(landed > 10, "the client kept trying ({landed})");
    assert_eq!(refused, 0, "a tiefighter landing failed during a swap");
    assert_eq!(wrongly, 0, "an xwing landed during a swap");

    // kill -9: the pinned state keeps enforcing; a restarted loader adopts it without a gap.
    let mut net = Arc::try_unwrap(net).ok().expect("the client is done");
    let mut child = net.loader.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !net.land(xw, ds1, SHORT),
        "xwing is still blocked with the loader dead"
    );
    assert!(
        net.land(tf, ds1, Duration::from_secs(2)),
        "and tiefighter still lands"
    );
    let lines_before = net.log().lines().count();
    net.start_loader().unwrap();
    let adopted = net.until(Duration::from_secs(20), || {
        net.log()
            .lines()
            .skip(lines_before)
            .any(|l| l.contains("applied"))
    });
    let restart_log: String = net
        .log()
        .lines()
        .skip(lines_before)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        adopted.is_some(),
        "the restarted loader did not apply:\n{restart_log}"
    );
    assert!(restart_log.contains("adopted=8"), "{restart_log}");
    assert!(
        restart_log.contains("swapped=0")
            && restart_log.contains("attached=0")
            && restart_log.contains("unchanged=8"),
        "a restart with unchanged inputs switches nothing:\n{restart_log}"
    );
    assert!(!net.land(xw, ds1, SHORT));
    assert!(net.land(tf, ds2, Duration::from_secs(2)));

    // What `cnpc endpoints` shows: every hook with the program its pinned link runs.
    // Read in the node's namespace, where `cnpc endpoints` runs.
    let cfg = cnpc_runtime_loader::loader::Config {
        pin_dir: net.pin_dir.clone(),
        state_file: net.tmp.join("state/state.json"),
        ..Default::default()
    };
    let node = format!("/var/run/netns/{}", net.ns("node"));
    let hooks = std::thread::spawn(move || {
        netns::enter(&node).unwrap();
        cnpc_runtime_loader::loader::endpoints(&cfg).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(hooks.len(), 8);
    assert!(
        hooks
            .iter()
            .all(|h| h.attached && h.record.attach == attach),
        "{hooks:?}"
    );
    if attach == "tcx" {
        assert!(hooks.iter().all(|h| h.program_id.is_some()), "{hooks:?}");
    }
    let tiefighter: Vec<_> = hooks
        .iter()
        .filter(|h| h.record.endpoint == "default/tiefighter")
        .collect();
    assert_eq!(tiefighter.len(), 2);
    assert!(tiefighter[0].record.interface.ends_with("tf"));
}

/// The node's own traffic is the host entity (Cilium gives a node's addresses `reserved:host`,
/// other nodes' `reserved:remote-node`): with a deathstar policy allowing only the host, a
/// request from the node's namespace (as a kubelet probe would come) lands, the xwing's does not.
#[test]
fn traffic_from_the_node_is_the_host_entity() {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let mut net = match Net::pods() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ds1 = PODS[0].2;
    net.serve_http(PODS[0].0, ds1, seen).unwrap();
    std::fs::write(
        net.policies.join("host-only.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: host-only, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {class: deathstar}}\n  ingress:\n  - fromEntities: [host]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
    )
    .unwrap();
    net.loader_args = vec!["--no-l7".into()];
    net.start_loader().unwrap();
    assert!(
        net.until(Duration::from_secs(20), || net.generation() >= 1)
            .is_some(),
        "{}",
        net.log()
    );
    let lands = |from: &str| {
        net.requests(from, ds1, &[("GET", "/v1/status")], SHORT)
            .is_some_and(|a| a.first().is_some_and(|(s, _)| *s == 200))
    };
    assert!(lands("node"), "the node is the host entity:\n{}", net.log());
    assert!(!lands("xw"), "the xwing is not");
}
