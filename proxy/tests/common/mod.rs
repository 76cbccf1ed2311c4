//! Test fixtures: an upstream HTTP server that records what reaches it, a proxy listener on
//! loopback with an explicit connection context, a keep-alive client, and a small policy.
#![allow(dead_code)]

pub mod dns;

use bytes::Bytes;
use cnpc_ir::proxy::{ProxyPolicy, ProxyRule};
use cnpc_ir::{
    DecisionTable, Direction, EntityRef, HttpRule, IdentityClass, L7Rules, NumericIdentity, Origin,
    PortRange, Protocol, RuleRef, TableRow, TableVerdict,
};
use cnpc_proxy::{ConnContext, Proxy, ProxyConfig};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub seq: Option<String>,
    pub body_len: usize,
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers 200 with the
/// request's `x-seq` as the body.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let record = record.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let record = record.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes().len());
                                let text = |n: &str| {
                                    parts
                                        .headers
                                        .get(n)
                                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                };
                                let seq = text("x-seq");
                                record.lock().expect("not poisoned").push(Seen {
                                    method: parts.method.as_str().to_string(),
                                    target: parts.uri.to_string(),
                                    host: text("host"),
                                    seq: seq.clone(),
                                    body_len: body.unwrap_or(0),
                                });
                                let mut resp = http::Response::new(Full::new(Bytes::from(
                                    seq.unwrap_or_default(),
                                )));
                                resp.headers_mut()
                                    .insert("x-upstream", http::HeaderValue::from_static("yes"));
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

/// A loopback listener whose every connection the proxy serves as `ctx`.
pub async fn spawn_proxy(proxy: &Proxy, ctx: ConnContext) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("local addr");
    let proxy = proxy.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let _ = proxy.serve_connection(stream, ctx).await;
            });
        }
    });
    addr
}

/// A response as the client got it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Got {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
    pub from_upstream: bool,
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn send(&mut self, req: http::Request<Full<Bytes>>) -> Result<Got, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let from_upstream = resp.headers().contains_key("x-upstream");
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Got {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
            from_upstream,
        })
    }

    pub async fn get(&mut self, path: &str) -> Got {
        let req = http::Request::get(path)
            .header("host", "deathstar")
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        self.send(req).await.expect("response")
    }
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

pub const SERVER: u32 = 300;
pub const CLIENT: u32 = 400;
pub const SERVER_IP: &str = "10.0.1.10";
pub const CLIENT_IP: &str = "10.0.1.20";

/// The context of a connection from CLIENT to SERVER:80, judged on SERVER's ingress.
pub fn ingress_ctx() -> ConnContext {
    ConnContext {
        direction: Direction::Ingress,
        source: format!("{CLIENT_IP}:40000").parse().expect("literal"),
        original_dst: format!("{SERVER_IP}:80").parse().expect("literal"),
        source_identity: None,
    }
}

pub fn origin(line: u32) -> Origin {
    Origin {
        policy: "CiliumNetworkPolicy default/test".into(),
        file: "test.yaml".into(),
        line,
    }
}

/// SERVER's ingress from CLIENT on any TCP port is proxied with one rule of `http`.
pub fn policy(generation: u64, http: Vec<HttpRule>) -> ProxyPolicy {
    let r = RuleRef::new(0);
    let ip = |s: &str| s.parse().expect("literal");
    ProxyPolicy {
        generation,
        endpoints: vec![(ip(SERVER_IP), NumericIdentity(SERVER))],
        ipcache: vec![
            (
                format!("{SERVER_IP}/32").parse().expect("literal"),
                NumericIdentity(SERVER),
            ),
            (
                format!("{CLIENT_IP}/32").parse().expect("literal"),
                NumericIdentity(CLIENT),
            ),
        ],
        tables: vec![DecisionTable {
            subject: NumericIdentity(SERVER),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(CLIENT)],
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::ALL,
                verdict: TableVerdict::Proxy(vec![r]),
            }],
        }],
        rules: [(
            r,
            ProxyRule {
                origin: origin(10),
                l7: L7Rules::Http(http),
            },
        )]
        .into_iter()
        .collect(),
        ..ProxyPolicy::default()
    }
}

/// GET /public... allowed, everything else denied.
pub fn public_policy(generation: u64) -> ProxyPolicy {
    policy(
        generation,
        vec![HttpRule {
            method: Some("GET".into()),
            path: Some("/public(/.*)?".into()),
            host: None,
            headers: Vec::new(),
        }],
    )
}

/// A proxy in front of `upstream` with a 1 s header timeout.
pub fn proxy_for(upstream: &Upstream, policy: ProxyPolicy) -> Proxy {
    Proxy::with_config(
        policy,
        ProxyConfig {
            connect_override: Some(upstream.addr),
            header_timeout: Duration::from_secs(1),
            ..ProxyConfig::default()
        },
    )
}

/// Writes `bytes`, then reads until the proxy closes or `within` passes. Returns what was
/// read and whether the connection was closed.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    read_until_closed(&mut s, within).await
}

pub async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status codes of the HTTP responses in `bytes`, in order (responses with a
/// Content-Length body, as both the proxy and the test upstream send).
pub fn statuses(bytes: &[u8]) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_start = end + 4;
        let body_end = (body_start + len).min(rest.len());
        out.push((
            status,
            String::from_utf8_lossy(&rest[body_start..body_end]).into_owned(),
        ));
        rest = &rest[body_end..];
    }
    out
}
