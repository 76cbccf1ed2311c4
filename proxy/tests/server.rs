//! The proxy as a client and an upstream see it: forwarding, 403s, generation swaps, and
//! malformed or hostile input (which must get a 4xx or a closed connection, never reach the
//! upstream, and never panic).

mod common;

use bytes::Bytes;
use cnpc_ir::{HttpRule, NumericIdentity};
use cnpc_proxy::listener::accept_loop;
use cnpc_proxy::{Proxy, ProxyConfig, Verdict};
use common::*;
use http_body_util::Full;
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_requests_are_forwarded_and_denied_ones_get_403() {
    let upstream = Upstream::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let proxy = Proxy::with_config(
        public_policy(5),
        ProxyConfig {
            connect_override: Some(upstream.addr),
            events: Some(tx),
            ..ProxyConfig::default()
        },
    );
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut c = Client::connect(addr).await;
    let ok = c.get("/public/x?y=1").await;
    assert_eq!((ok.status, ok.from_upstream), (200, true));
    let denied = c.get("/secret").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, "Access denied");
    assert_eq!(denied.content_type.as_deref(), Some("text/plain"));
    assert!(!denied.from_upstream);
    // Still the same connection, still usable.
    assert_eq!(c.get("/public").await.status, 200);
    let seen = upstream.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/public/x?y=1", "/public"]
    );
    assert_eq!(seen[0].host.as_deref(), Some("deathstar"));
    let counters = proxy.counters().snapshot();
    assert_eq!((counters.allowed, counters.denied), (2, 1));
    let events: Vec<_> = (0..3).map(|_| rx.try_recv().expect("an event")).collect();
    assert_eq!(events[0].verdict, Verdict::Allowed);
    assert_eq!(events[0].status, 200);
    assert_eq!(events[0].rule, Some(origin(10)));
    assert_eq!(events[0].path, "/public/x?y=1");
    assert_eq!(events[0].generation, 5);
    assert_eq!(events[1].verdict, Verdict::Denied);
    assert_eq!((events[1].status, events[1].rule.clone()), (403, None));
    assert_eq!(events[1].host.as_deref(), Some("deathstar"));
    let line = serde_json::to_string(&events[1]).expect("serialisable");
    assert!(line.contains(r#""verdict":"denied""#), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_applies_to_the_next_request_of_an_open_connection() {
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&upstream, public_policy(1));
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/public").await.status, 200);
    let old = proxy.swap(policy(2, vec![]));
    assert_eq!(old, 1);
    assert_eq!(c.get("/public").await.status, 403);
    proxy.swap(public_policy(3));
    assert_eq!(c.get("/public").await.status, 200);
    assert_eq!(upstream.seen().len(), 2);
    // One connection throughout, and one upstream connection.
    assert_eq!(proxy.counters().snapshot().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_hosts_are_judged_and_forwarded_intact() {
    let upstream = Upstream::start().await;
    let rule = HttpRule {
        method: Some("POST".into()),
        path: Some("/v1/request-landing".into()),
        host: Some("deathstar(:80)?".into()),
        headers: vec![("X-Has-Force".into(), Some("true".into()))],
    };
    let proxy = proxy_for(&upstream, policy(1, vec![rule]));
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut c = Client::connect(addr).await;
    let post = |host: &str, force: Option<&str>| {
        let mut b = http::Request::post("/v1/request-landing").header("host", host);
        if let Some(f) = force {
            b = b.header("x-has-force", f);
        }
        b.body(Full::new(Bytes::from_static(b"landing gear down")))
            .expect("valid")
    };
    assert_eq!(
        c.send(post("deathstar:80", Some("true")))
            .await
            .expect("ok")
            .status,
        200
    );
    assert_eq!(
        c.send(post("deathstar", Some("false")))
            .await
            .expect("ok")
            .status,
        403
    );
    assert_eq!(
        c.send(post("deathstar.evil", Some("true")))
            .await
            .expect("ok")
            .status,
        403
    );
    assert_eq!(
        c.send(post("deathstar", None)).await.expect("ok").status,
        403
    );
    assert_eq!(
        c.send(post("deathstar", Some("true")))
            .await
            .expect("ok")
            .status,
        200
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.method == "POST" && s.body_len == 17));
    assert_eq!(seen[0].host.as_deref(), Some("deathstar:80"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_503() {
    // A port nothing listens on: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let proxy = Proxy::with_config(
        public_policy(1),
        ProxyConfig {
            connect_override: Some(dead),
            ..ProxyConfig::default()
        },
    );
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/public").await.status, 503);
    assert_eq!(c.get("/secret").await.status, 403);
    assert_eq!(proxy.counters().snapshot().upstream_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_layer_takes_the_context_from_the_socket() {
    // Loopback stands in for both pods: 127.0.0.1 is the server endpoint and its peer.
    let upstream = Upstream::start().await;
    let mut p = public_policy(1);
    p.endpoints = vec![(
        "127.0.0.1".parse().expect("literal"),
        NumericIdentity(SERVER),
    )];
    p.ipcache = vec![(
        "127.0.0.1/32".parse().expect("literal"),
        NumericIdentity(CLIENT),
    )];
    let proxy = proxy_for(&upstream, p);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(accept_loop(
        listener,
        cnpc_ir::Direction::Ingress,
        proxy.clone(),
    ));
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/public").await.status, 200);
    assert_eq!(c.get("/private").await.status, 403);
    // As egress, 127.0.0.1 has no table: fail closed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(accept_loop(
        listener,
        cnpc_ir::Direction::Egress,
        proxy.clone(),
    ));
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/public").await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_mix_is_judged_request_by_request_in_order() {
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&upstream, public_policy(1));
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let reqs = [
        "GET /public/1 HTTP/1.1\r\nHost: d\r\nX-Seq: 1\r\n\r\n",
        "PUT /public/2 HTTP/1.1\r\nHost: d\r\nX-Seq: 2\r\nContent-Length: 5\r\n\r\nhello",
        "GET /public/3 HTTP/1.1\r\nHost: d\r\nX-Seq: 3\r\n\r\n",
        "GET /secret HTTP/1.1\r\nHost: d\r\nX-Seq: 4\r\n\r\n",
        "POST /public/5 HTTP/1.1\r\nHost: d\r\nX-Seq: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "GET /public/6 HTTP/1.1\r\nHost: d\r\nX-Seq: 6\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let (bytes, closed) = raw_exchange(addr, reqs.as_bytes(), Duration::from_secs(5)).await;
    assert!(closed, "the last request asked to close");
    let got = statuses(&bytes);
    assert_eq!(
        got,
        [
            (200, "1".to_string()),
            (403, "Access denied".to_string()),
            (200, "3".to_string()),
            (403, "Access denied".to_string()),
            (403, "Access denied".to_string()),
            (200, "6".to_string()),
        ],
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let seqs: Vec<Option<String>> = upstream.seen().into_iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [Some("1".into()), Some("3".into()), Some("6".into())]);
}

/// Asserts the exchange ended in a 4xx or a closed connection without any 2xx.
fn refused(bytes: &[u8], closed: bool) {
    let text = String::from_utf8_lossy(bytes);
    let status = statuses(bytes).first().map(|(s, _)| *s);
    assert!(
        matches!(status, Some(400..=499)) || (bytes.is_empty() && closed),
        "expected a 4xx or a close, got {text:?} (closed: {closed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_get_4xx_or_close() {
    let upstream = Upstream::start().await;
    let proxy = proxy_for(
        &upstream,
        policy(
            1,
            vec![HttpRule {
                method: None,
                path: None,
                host: None,
                headers: Vec::new(),
            }],
        ),
    );
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let w = Duration::from_secs(3);
    // (case, bytes, the status expected; None: closed without a response)
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("bad request line", b"GARBAGE\r\n\r\n".to_vec(), Some(400)),
        ("no version", b"GET /public\r\n\r\n".to_vec(), Some(400)),
        (
            "bad version",
            b"GET /public HTTP/9.9\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "space in target",
            b"GET /a b HTTP/1.1\r\nHost: d\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "bad header",
            b"GET / HTTP/1.1\r\nHost d\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "http/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00".to_vec(),
            None,
        ),
        (
            "two hosts",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "conflicting content-lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
                .to_vec(),
            Some(400),
        ),
    ];
    for (name, bytes, want) in cases {
        let (got, closed) = raw_exchange(addr, &bytes, w).await;
        let status = statuses(&got).first().map(|(s, _)| *s);
        assert_eq!(status, want, "{name}: {:?}", String::from_utf8_lossy(&got));
        assert!(closed, "{name}: the connection must close");
    }
    // Oversized head: one 100 KiB header.
    let mut big = b"GET / HTTP/1.1\r\nHost: d\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let (got, closed) = raw_exchange(addr, &big, w).await;
    assert_eq!(statuses(&got).first().map(|(s, _)| *s), Some(431));
    assert!(closed);
    // Too many header fields.
    let mut many = b"GET / HTTP/1.1\r\nHost: d\r\n".to_vec();
    for i in 0..500 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (got, closed) = raw_exchange(addr, &many, w).await;
    assert_eq!(statuses(&got).first().map(|(s, _)| *s), Some(431));
    assert!(closed);
    assert_eq!(
        upstream.seen(),
        vec![],
        "nothing malformed reaches the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_endless_heads_are_cut_off() {
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&upstream, public_policy(1));
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    // Slow sender: half a request line, then silence. The 1 s header timeout closes it.
    let start = Instant::now();
    let (got, closed) =
        raw_exchange(addr, b"GET /public HTTP/1.1\r\nHo", Duration::from_secs(5)).await;
    assert!(closed, "a stalled head must be closed");
    assert!(start.elapsed() < Duration::from_secs(4));
    refused(&got, closed);
    // Endless headers, one line every 50 ms: never completes, closed by the timeout or the
    // size limit.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    use tokio::io::AsyncWriteExt;
    let start = Instant::now();
    let writer = async {
        let _ = s.write_all(b"GET /public HTTP/1.1\r\nHost: d\r\n").await;
        for i in 0..200 {
            if s.write_all(format!("X-{i}: v\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let cut = tokio::time::timeout(Duration::from_secs(8), writer).await;
    assert!(
        matches!(cut, Ok(true)),
        "the proxy must stop an endless head (after {:?})",
        start.elapsed()
    );
    // Idle keep-alive: the same timer closes a connection that sends nothing after a request.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /public HTTP/1.1\r\nHost: d\r\n\r\n")
        .await
        .expect("write");
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed);
    assert_eq!(statuses(&got).first().map(|(s, _)| *s), Some(200));
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_body_too_large_to_drain_closes_the_connection() {
    let upstream = Upstream::start().await;
    let proxy = proxy_for(&upstream, public_policy(1));
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut req = b"POST /secret HTTP/1.1\r\nHost: d\r\nContent-Length: 200000\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 200_000));
    req.extend_from_slice(b"GET /public HTTP/1.1\r\nHost: d\r\n\r\n");
    let (got, closed) = raw_exchange(addr, &req, Duration::from_secs(5)).await;
    assert!(closed);
    let st = statuses(&got);
    assert_eq!(st.first().map(|(s, _)| *s), Some(403));
    assert!(st.len() == 1, "nothing after the 403: {st:?}");
    assert!(upstream.seen().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_never_forward(
        prefix in prop::sample::select(vec![
            "", "GET ", "GET /public HTTP/1.1\r\n", "POST /public HTTP/1.1\r\nContent-Length: 5\r\n",
            "PRI * HTTP/2.0\r\n\r\n",
        ]),
        bytes in prop::collection::vec(any::<u8>(), 0..1500),
    ) {
        let rt = rt();
        rt.block_on(async {
            let upstream = Upstream::start().await;
            // Nothing is allowed: whatever the bytes say, no request may be forwarded.
            let proxy = proxy_for(&upstream, policy(1, vec![]));
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let task = tokio::spawn({
                let proxy = proxy.clone();
                async move { proxy.serve_connection(server, ingress_ctx()).await }
            });
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut input = prefix.as_bytes().to_vec();
            input.extend_from_slice(&bytes);
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut out)).await;
            drop(client);
            let joined = tokio::time::timeout(Duration::from_secs(3), task).await;
            // The connection task ended (Ok or Err), and did not panic.
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("the connection task failed: {e}"),
                Err(_) => panic!("the connection task did not end"),
            }
            for (status, _) in statuses(&out) {
                assert!(!(200..300).contains(&status), "got {status}");
            }
            assert!(upstream.seen().is_empty());
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sockets_carry_the_mark_or_say_why_not() {
    use cnpc_ir::proxy::contract::FROM_INGRESS_PROXY;
    use cnpc_proxy::server::{connect, UpstreamError};
    let upstream = Upstream::start().await;
    let mark = FROM_INGRESS_PROXY | CLIENT;
    match connect(upstream.addr, Some(mark), Duration::from_secs(2)).await {
        // With CAP_NET_ADMIN the mark is on the socket.
        Ok(stream) => {
            let got = socket2::SockRef::from(&stream)
                .mark()
                .expect("SO_MARK readable");
            assert_eq!(got, mark);
        }
        Err(UpstreamError::Mark { mark: m, .. }) => assert_eq!(m, mark),
        Err(e) => panic!("unexpected error: {e}"),
    }
    let plain = connect(upstream.addr, None, Duration::from_secs(2)).await;
    assert!(plain.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_gets_504() {
    // Accepts and reads, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let proxy = Proxy::with_config(
        public_policy(1),
        ProxyConfig {
            connect_override: Some(silent_addr),
            upstream_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        },
    );
    let addr = spawn_proxy(&proxy, ingress_ctx()).await;
    let mut c = Client::connect(addr).await;
    let start = Instant::now();
    assert_eq!(c.get("/public").await.status, 504);
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(proxy.counters().snapshot().upstream_errors, 1);
}
