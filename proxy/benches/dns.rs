//! DNS proxy benchmark: UDP queries straight to a loopback DNS server and through the proxy
//! (parsed, judged, forwarded on a fresh upstream socket, answer matched and relayed), plus
//! queries the proxy refuses locally. For each: queries/s and p50/p99 latency with several
//! clients asking at once (each waits for its answer before the next query), and the latency
//! the proxy adds. Clients, proxy and server share this machine's cores; the proxy's socket
//! is a plain one on 127.0.0.53 (no privilege), answering from the listener, so the figures
//! leave out the datapath's handover and the raw-socket reply.
//!
//!     cargo bench -p cnpc-proxy --bench dns                  # 3 s per row
//!     CNPC_DNS_BENCH_SECS=10 cargo bench -p cnpc-proxy --bench dns

#[path = "../tests/common/dns.rs"]
mod fixture;

use cnpc_proxy::udp::{self, Replier};
use cnpc_proxy::{DnsConfig, Proxy, ProxyConfig};
use fixture::{dns_policy, query, DnsUpstream, POD_IP, SERVER_IP};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Targets from the task: throughput through the proxy, and the p99 it may add.
const TARGET_QPS: f64 = 20_000.0;
const TARGET_ADDED_P99: Duration = Duration::from_millis(1);

struct Row {
    name: String,
    clients: usize,
    qps: f64,
    p50: Duration,
    p99: Duration,
}

/// `clients` sockets from the pod's address, each asking `name` in a loop for `secs`.
async fn run(
    label: &str,
    to: SocketAddr,
    name: &str,
    want: ResponseCode,
    clients: usize,
    secs: Duration,
) -> Row {
    let mut tasks = Vec::new();
    let deadline = Instant::now() + secs;
    for c in 0..clients {
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            let s = UdpSocket::bind(format!("{POD_IP}:0"))
                .await
                .expect("bind client");
            s.connect(to).await.expect("connect");
            let mut buf = vec![0u8; 4096];
            let mut lat = Vec::new();
            let mut id = (c as u16).wrapping_mul(4099);
            // Warm up.
            for _ in 0..50 {
                id = id.wrapping_add(1);
                s.send(&query(id, &name, RecordType::A))
                    .await
                    .expect("send");
                s.recv(&mut buf).await.expect("answer");
            }
            while Instant::now() < deadline {
                id = id.wrapping_add(1);
                let q = query(id, &name, RecordType::A);
                let t = Instant::now();
                s.send(&q).await.expect("send");
                let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
                    .await
                    .expect("an answer within 2 s")
                    .expect("recv");
                lat.push(t.elapsed());
                let m = Message::from_vec(&buf[..n]).expect("a DNS message");
                assert_eq!((m.metadata.id, m.metadata.response_code), (id, want));
            }
            lat
        }));
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client ran"));
    }
    let total = start.elapsed();
    lat.sort();
    Row {
        name: label.to_string(),
        clients,
        qps: lat.len() as f64 / total.as_secs_f64(),
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
    }
}

fn print(r: &Row) {
    println!(
        "{:<34} {:>3} clients {:>9.0} q/s   p50 {:>7.1} µs   p99 {:>7.1} µs",
        r.name,
        r.clients,
        r.qps,
        r.p50.as_secs_f64() * 1e6,
        r.p99.as_secs_f64() * 1e6
    );
}

fn main() {
    let secs = Duration::from_secs(
        std::env::var("CNPC_DNS_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let upstream = DnsUpstream::start().await;
        let proxy = Proxy::with_config(
            dns_policy(1, Vec::new()),
            ProxyConfig {
                dns: DnsConfig {
                    upstream_override: Some(upstream.addr),
                    ..DnsConfig::default()
                },
                ..ProxyConfig::default()
            },
        );
        let socket = udp::dns_socket(format!("{SERVER_IP}:0").parse().expect("literal"), false)
            .expect("bind the DNS listener");
        let listener = socket.local_addr().expect("bound");
        tokio::spawn(udp::serve(socket, Replier::FromListener, proxy.clone()));

        println!("DNS proxy benchmark, {secs:?} per row (UDP, loopback)");
        let mut added = Vec::new();
        for clients in [1usize, 4, 16] {
            let direct = run(
                "direct to the server",
                upstream.addr,
                "www.example.com.",
                ResponseCode::NoError,
                clients,
                secs,
            )
            .await;
            let proxied = run(
                "through the proxy (allowed)",
                listener,
                "www.example.com.",
                ResponseCode::NoError,
                clients,
                secs,
            )
            .await;
            let refused = run(
                "through the proxy (refused)",
                listener,
                "evil.org.",
                ResponseCode::Refused,
                clients,
                secs,
            )
            .await;
            for r in [&direct, &proxied, &refused] {
                print(r);
            }
            let p50 = proxied.p50.saturating_sub(direct.p50);
            let p99 = proxied.p99.saturating_sub(direct.p99);
            println!(
                "  added by the proxy: p50 {:.1} µs, p99 {:.1} µs",
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            );
            added.push((clients, proxied.qps, p99));
        }
        let c = proxy.counters().snapshot().dns;
        println!(
            "counters: allowed {}, refused {}, malformed {}, upstream timeouts {}, overloaded {}",
            c.allowed, c.refused, c.malformed, c.upstream_timeouts, c.overloaded
        );
        let best = added.iter().map(|a| a.1).fold(0.0, f64::max);
        println!(
            "target: >= {TARGET_QPS:.0} q/s through the proxy: best {best:.0} q/s ({})",
            if best >= TARGET_QPS { "met" } else { "NOT met" }
        );
        for (clients, _, p99) in &added {
            println!(
                "target: p99 added <= {:?} with {clients} clients: {:.1} µs ({})",
                TARGET_ADDED_P99,
                p99.as_secs_f64() * 1e6,
                if *p99 <= TARGET_ADDED_P99 {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    });
}
