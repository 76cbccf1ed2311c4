//! End to end, the L7 stage (issue 9): the Star Wars L7 demo on one machine, in network
//! namespaces the test creates (see `netns`), with `cnpc-loader` supervising the real
//! `cnpc-proxy`. Checked in both directions: the deathstar's ingress L7 rules (its own ingress
//! proxy, reached through the proxy device) and a tiefighter egress L7 policy (the egress proxy,
//! reached by `bpf_sk_assign` at the tiefighter's tc ingress). Allowed requests get the server's
//! own answer; denied ones get Cilium's `403 Access denied` and never reach the server (its log
//! is read); the xwing is dropped at L3/L4; requests on one keep-alive connection are judged
//! one by one, and by the new rules once an edit is applied; without a proxy, proxied flows fail.

mod netns;

use cnpc_runtime_loader::sys;
use netns::{Net, PODS};
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SHORT: Duration = Duration::from_millis(400);

/// The deathstar's ingress: empire ships may land and read the status; nothing else (the
/// getting-started L7 demo, with Cilium's `GET /v1/status/.*` beside the landing).
const DEATHSTAR: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing}
        - {method: GET, path: "/v1/status/.*"}
"#;

/// The tiefighter's egress towards deathstars: only status reads.
const TIEFIGHTER: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {org: empire, class: deathstar}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/v1/status/.*"}
"#;

#[test]
fn l7_rules_are_enforced_by_the_proxy_on_tcx() {
    l7_demo("tcx");
}

#[test]
fn l7_rules_are_enforced_by_the_proxy_on_clsact() {
    l7_demo("clsact");
}

/// The loader's /healthz and /metrics, inside the node's namespace.
const METRICS: &str = "127.0.0.1:9963";

/// A metric's value from the Prometheus text, by its name and labels as printed.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn proxy_log(net: &Net) -> String {
    std::fs::read_to_string(net.tmp.join("state/proxy.log")).unwrap_or_default()
}

fn seen_count(seen: &Mutex<Vec<String>>, line: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(line))
        .count()
}

fn l7_demo(attach: &str) {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let proxy = match netns::proxy_binary(env!("CARGO_BIN_EXE_cnpc-loader")) {
        Ok(p) => p,
        Err(e) => return sys::skip_or_fail(&e),
    };
    let mut net = match Net::pods() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    for (pod, _, addr) in &PODS[..2] {
        net.serve_http(pod, addr, seen.clone()).unwrap();
    }
    let (tf, xw, ds1) = ("tf", "xw", PODS[0].2);
    std::fs::write(net.policies.join("deathstar.yaml"), DEATHSTAR).unwrap();
    net.loader_args = vec![
        "--attach".into(),
        attach.into(),
        "--proxy".into(),
        proxy.display().to_string(),
        "--metrics".into(),
        METRICS.into(),
    ];
    net.start_loader().unwrap();
    // Before the first generation nothing is enforced and the demo would pass on its own:
    // wait for the programs and the proxy's four listeners.
    assert!(
        net.until(Duration::from_secs(20), || net.generation() >= 1
            && proxy_log(&net).matches("listening").count() >= 4)
            .is_some(),
        "no generation or no proxy:\n{}\n{}",
        net.log(),
        proxy_log(&net)
    );
    let landed = |pod: &str| {
        net.requests(pod, ds1, &[("POST", "/v1/request-landing")], SHORT)
            .is_some_and(|a| {
                a.first()
                    .is_some_and(|(s, b)| *s == 200 && b == "Ship landed\n")
            })
    };
    assert!(
        net.until(Duration::from_secs(20), || landed(tf)).is_some(),
        "the tiefighter lands through the ingress proxy:\n{}\n{}",
        net.log(),
        proxy_log(&net)
    );

    // Ingress: one keep-alive connection, each request judged on its own.
    let answers = net
        .requests(
            tf,
            ds1,
            &[
                ("POST", "/v1/request-landing"),
                ("PUT", "/v1/exhaust-port"),
                ("GET", "/v1/status/alive"),
                ("PUT", "/v1/exhaust-port"),
                ("POST", "/v1/request-landing"),
            ],
            Duration::from_secs(2),
        )
        .expect("connected");
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses,
        [200, 403, 200, 403, 200],
        "{answers:?}\n{}\n{}\nserver saw {:?}",
        net.log(),
        proxy_log(&net),
        seen.lock().unwrap()
    );
    assert_eq!(answers[1].1, "Access denied");
    assert_eq!(answers[2].1, "Deathstar: /v1/status/alive (0 bytes)\n");
    assert_eq!(
        seen_count(&seen, "PUT /v1/exhaust-port"),
        0,
        "a denied request reached the server"
    );
    // The xwing is not org=empire: dropped at L3/L4, no answer at all.
    assert!(
        net.requests(xw, ds1, &[("POST", "/v1/request-landing")], SHORT)
            .is_none_or(|a| a.is_empty()),
        "the xwing must not land"
    );

    // Egress: the tiefighter's own L7 policy. Its egress proxy refuses the landing (allowed
    // by the deathstar) before the deathstar ever sees it; status reads pass both proxies.
    let before = net.generation();
    std::fs::write(net.policies.join("tiefighter.yaml"), TIEFIGHTER).unwrap();
    // The new generation first: a landing can fail for a moment on a loaded machine (a slow
    // answer), which is not the policy applying.
    assert!(
        net.until(Duration::from_secs(10), || net.generation() > before
            && !landed(tf))
            .is_some(),
        "the egress policy applies:\n{}",
        net.log()
    );
    let landings = seen_count(&seen, "POST /v1/request-landing");
    // The proxy had the new rules before the new programs handed it anything.
    assert!(
        net.until(Duration::from_secs(2), || net
            .log()
            .contains("proxy_acknowledged=Some(true)"))
            .is_some(),
        "{}",
        net.log()
    );
    let answers = net
        .requests(
            tf,
            ds1,
            &[
                ("GET", "/v1/status/alive"),
                ("POST", "/v1/request-landing"),
                ("GET", "/v1/status/shields"),
            ],
            Duration::from_secs(2),
        )
        .expect("connected");
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses,
        [200, 403, 200],
        "{answers:?}\n{}",
        proxy_log(&net)
            .lines()
            .filter(|l| l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        seen_count(&seen, "POST /v1/request-landing"),
        landings,
        "the egress proxy let a landing through"
    );

    // An edit flips an L7 verdict on an open connection within a second.
    let conn = net
        .connect(tf, ds1, Duration::from_secs(2))
        .expect("connected");
    let mut reader = BufReader::new(&conn);
    let status = |r: &mut BufReader<&std::net::TcpStream>, m: &str, p: &str| {
        netns::request(&conn, r, m, p).map(|(s, _)| s)
    };
    assert_eq!(status(&mut reader, "GET", "/v1/status/alive"), Some(200));
    std::fs::write(
        net.policies.join("tiefighter.yaml"),
        TIEFIGHTER.replace("/v1/status/.*", "/v1/status/shields"),
    )
    .unwrap();
    let edited = std::time::Instant::now();
    let mut flipped = false;
    while !flipped && edited.elapsed() < Duration::from_secs(1) {
        flipped = status(&mut reader, "GET", "/v1/status/alive") == Some(403);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        flipped,
        "the edit did not reach the open connection within a second:\n{}",
        net.log()
    );
    assert_eq!(status(&mut reader, "GET", "/v1/status/shields"), Some(200));
    drop(reader);
    drop(conn);

    // What /metrics and /healthz say of the L7 stage.
    let scrape = || net.loader_get(METRICS, "/metrics").expect("metrics");
    // The supervisor reads the proxy's listeners from /proc now and then: give it a moment.
    net.until(Duration::from_secs(2), || {
        metric(&scrape().1, "cnpc_proxy_up") == Some(1.0)
    });
    let (status, text) = scrape();
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&text, "cnpc_proxy_up"), Some(1.0), "{text}");
    let denied = |dir: &str| {
        metric(
            &text,
            &format!("cnpc_l7_requests_total{{direction=\"{dir}\",verdict=\"denied\"}}"),
        )
    };
    assert!(denied("ingress").is_some_and(|n| n >= 2.0), "{text}");
    assert!(denied("egress").is_some_and(|n| n >= 1.0), "{text}");
    assert!(net
        .loader_get(METRICS, "/healthz")
        .is_some_and(|(s, _)| s.contains("200")));

    // Without a proxy, proxied flows fail: never passed unfiltered.
    if let Some(mut c) = net.loader.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    net.loader_args = vec![
        "--attach".into(),
        attach.into(),
        "--proxy".into(),
        "/nonexistent/cnpc-proxy".into(),
        "--metrics".into(),
        METRICS.into(),
    ];
    net.start_loader().unwrap();
    assert!(
        net.until(Duration::from_secs(10), || net
            .log()
            .contains("cannot start the L7 proxy"))
            .is_some(),
        "{}",
        net.log()
    );
    let health = net.loader_get(METRICS, "/healthz").expect("healthz");
    assert!(
        health.0.contains("503") && health.1.contains("L7 proxy not listening"),
        "{health:?}"
    );
    let before = seen.lock().unwrap().len();
    assert!(
        net.requests(tf, ds1, &[("GET", "/v1/status/shields")], SHORT)
            .is_none_or(|a| a.is_empty()),
        "a proxied flow passed with no proxy"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "the server saw a request"
    );
}
