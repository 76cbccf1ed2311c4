//! Proxy benchmark: N sequential GET requests over one keep-alive connection, straight to a
//! loopback upstream (the L4-only path: what a connection the table allows costs) and through
//! the proxy (judged per request, forwarded over its one upstream connection), plus requests
//! the proxy denies locally. Prints p50/p99 latency, requests/s and the p50 the proxy adds;
//! then throughput with 16 connections sending at once, direct and through the proxy. Client,
//! proxy and upstream share this machine's cores.
//!
//!     cargo bench -p cnpc-proxy --bench proxy            # N = 10000 per row
//!     CNPC_PROXY_BENCH_N=20000 cargo bench -p cnpc-proxy --bench proxy

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use cnpc_ir::HttpRule;
use common::{ingress_ctx, policy, proxy_for, spawn_proxy, Client, Upstream};
use http_body_util::Full;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct Row {
    name: String,
    p50: Duration,
    p99: Duration,
    rps: f64,
}

async fn run(name: &str, addr: SocketAddr, path: &str, want: u16, n: usize) -> Row {
    let mut c = Client::connect(addr).await;
    let req = || {
        http::Request::get(path)
            .header("host", "deathstar")
            .header("x-token", "abc")
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    };
    // Warm up: connections, upstream connection, caches.
    for _ in 0..200 {
        let got = c.send(req()).await.expect("response");
        assert_eq!(got.status, want, "{name}");
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let got = c.send(req()).await.expect("response");
        lat.push(t.elapsed());
        assert_eq!(got.status, want, "{name}");
    }
    let total = start.elapsed();
    lat.sort();
    Row {
        name: name.to_string(),
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
        rps: n as f64 / total.as_secs_f64(),
    }
}

/// Requests/s with `conns` keep-alive connections sending at once (n requests in all): the
/// proxy's throughput, where the sequential rows measure its latency.
async fn throughput(addr: SocketAddr, path: &'static str, conns: usize, n: usize) -> f64 {
    let per = n / conns;
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                for _ in 0..per {
                    let req = http::Request::get(path)
                        .header("host", "deathstar")
                        .header("x-token", "abc")
                        .body(Full::new(Bytes::new()))
                        .expect("valid request");
                    let got = c.send(req).await.expect("response");
                    assert_eq!(got.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    (per * conns) as f64 / start.elapsed().as_secs_f64()
}

fn rule(path: &str) -> HttpRule {
    HttpRule {
        method: Some("GET".into()),
        path: Some(path.into()),
        host: Some(r"deathstar(\.default)?".into()),
        headers: vec![("X-Token".into(), Some("abc".into()))],
    }
}

fn main() {
    let n: usize = std::env::var("CNPC_PROXY_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let upstream = Upstream::start().await;
        let one = proxy_for(&upstream, policy(1, vec![rule("/v1/status")]));
        // 100 HTTP rules, the request matching only the last.
        let many_rules: Vec<HttpRule> = (0..100)
            .map(|i| rule(&format!("/v1/other-{i}/.*")))
            .chain([rule("/v1/status")])
            .collect();
        let many = proxy_for(&upstream, policy(1, many_rules));
        let one_addr = spawn_proxy(&one, ingress_ctx()).await;
        let many_addr = spawn_proxy(&many, ingress_ctx()).await;
        let rows = vec![
            run("direct (L4-only path)", upstream.addr, "/v1/status", 200, n).await,
            run("proxy, 1 rule, allowed", one_addr, "/v1/status", 200, n).await,
            run(
                "proxy, 101 rules, last allows",
                many_addr,
                "/v1/status",
                200,
                n,
            )
            .await,
            run(
                "proxy, denied (local 403)",
                one_addr,
                "/v1/exhaust-port",
                403,
                n,
            )
            .await,
        ];
        let base = rows[0].p50;
        println!(
            "\ncnpc-proxy: {n} sequential requests per row, one keep-alive connection, loopback\n"
        );
        println!(
            "{:<32} {:>10} {:>10} {:>12} {:>14}",
            "path", "p50 µs", "p99 µs", "requests/s", "added p50 µs"
        );
        for r in &rows {
            let added = r.p50.as_secs_f64() * 1e6 - base.as_secs_f64() * 1e6;
            println!(
                "{:<32} {:>10.1} {:>10.1} {:>12.0} {:>14.1}",
                r.name,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                r.rps,
                added
            );
        }
        const CONNS: usize = 16;
        let direct = throughput(upstream.addr, "/v1/status", CONNS, n).await;
        let proxied = throughput(one_addr, "/v1/status", CONNS, n).await;
        println!(
            "\n{CONNS} connections at once, {n} requests: direct {direct:.0} requests/s, through the proxy (1 rule) {proxied:.0} requests/s ({:.2}x)",
            proxied / direct
        );
        let c = one.counters().snapshot();
        println!(
            "\n1-rule proxy counters: {} allowed, {} denied, {} upstream errors",
            c.allowed, c.denied, c.upstream_errors
        );
    });
}
