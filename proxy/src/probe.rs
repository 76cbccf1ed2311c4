//! One request through the real proxy, in process: what `cnpc trace --engine bpf` asks of the
//! L7 stage once the compiled programs have handed a flow to the proxy.
//!
//! The request goes through the same code a node runs ([`crate::server::serve_connection`]
//! over an in-memory connection with the flow's addresses as its context), and an allowed
//! request really is forwarded: to a stand-in upstream on loopback that answers `200` and
//! records what reached it. So the probe reports both the proxy's answer and whether the
//! upstream saw the request, and a denied request that leaked upstream would show.

use crate::{ConnContext, L7Event, Proxy, ProxyConfig};
use cnpc_ir::proxy::ProxyPolicy;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// What the proxy did with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The status the client got (403 when denied).
    pub status: u16,
    /// Whether the request reached the upstream.
    pub forwarded: bool,
    /// The event the proxy emitted for it (verdict and deciding rule).
    pub event: Option<L7Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run the proxy in process: {0}")]
    Runtime(std::io::Error),
    #[error("the proxy gave no answer: {0}")]
    NoAnswer(String),
}

/// An HTTP request to send: method, request-target, Host (if any) and further headers.
#[derive(Clone, Debug, Default)]
pub struct ProbeRequest {
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl ProbeRequest {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if let Some(h) = &self.host {
            out.push_str(&format!("Host: {h}\r\n"));
        }
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// Sends `request` on a connection with context `ctx` through a proxy running `policy`.
pub fn probe(
    policy: ProxyPolicy,
    ctx: ConnContext,
    request: &ProbeRequest,
) -> Result<ProbeOutcome, ProbeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ProbeError::Runtime)?;
    rt.block_on(async {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ProbeError::Runtime)?;
        let upstream_addr = upstream.local_addr().map_err(ProbeError::Runtime)?;
        let (seen_tx, mut seen_rx) = mpsc::channel::<()>(1);
        // The stand-in upstream: answers one request with 200 and says it saw one.
        tokio::spawn(async move {
            if let Ok((mut s, _)) = upstream.accept().await {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = seen_tx.send(()).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        let (events_tx, mut events_rx) = mpsc::channel(4);
        let proxy = Proxy::with_config(
            policy,
            ProxyConfig {
                connect_override: Some(upstream_addr),
                header_timeout: Duration::from_secs(5),
                events: Some(events_tx),
                ..ProxyConfig::default()
            },
        );
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = proxy.serve_connection(server, ctx).await;
        });
        client
            .write_all(&request.bytes())
            .await
            .map_err(|e| ProbeError::NoAnswer(e.to_string()))?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .map_err(|_| ProbeError::NoAnswer("timed out".into()))?
            .map_err(|e| ProbeError::NoAnswer(e.to_string()))?;
        let status = std::str::from_utf8(&answer)
            .ok()
            .and_then(|a| a.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ProbeError::NoAnswer(String::from_utf8_lossy(&answer).into_owned()))?;
        Ok(ProbeOutcome {
            status,
            forwarded: seen_rx.try_recv().is_ok(),
            event: events_rx.try_recv().ok(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::{
        DecisionTable, Direction, EntityRef, HttpRule, IdentityClass, L7Rules, NumericIdentity,
        Origin, PortRange, Protocol, RuleRef, TableRow, TableVerdict,
    };

    fn policy() -> ProxyPolicy {
        let mut rules = std::collections::BTreeMap::new();
        rules.insert(
            RuleRef::new(0),
            cnpc_ir::proxy::ProxyRule {
                origin: Origin {
                    policy: "p".into(),
                    file: "f.yaml".into(),
                    line: 3,
                },
                l7: L7Rules::Http(vec![HttpRule {
                    method: Some("GET".into()),
                    path: Some("/ok.*".into()),
                    host: None,
                    headers: Vec::new(),
                }]),
            },
        );
        ProxyPolicy {
            generation: 1,
            endpoints: vec![("10.0.0.1".parse().unwrap(), NumericIdentity(300))],
            ipcache: vec![("10.0.0.2/32".parse().unwrap(), NumericIdentity(400))],
            tables: vec![DecisionTable {
                subject: NumericIdentity(300),
                direction: Direction::Ingress,
                default: TableVerdict::Deny,
                classes: vec![IdentityClass {
                    members: vec![NumericIdentity(400)],
                }],
                rows: vec![TableRow {
                    class: 0,
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(80),
                    verdict: TableVerdict::Proxy(vec![RuleRef::new(0)]),
                }],
            }],
            rules,
            ..ProxyPolicy::default()
        }
    }

    fn ctx() -> ConnContext {
        ConnContext {
            direction: Direction::Ingress,
            source: "10.0.0.2:40000".parse().unwrap(),
            original_dst: "10.0.0.1:80".parse().unwrap(),
            source_identity: None,
        }
    }

    #[test]
    fn allowed_requests_reach_the_upstream_and_denied_ones_do_not() {
        let req = |m: &str, t: &str| ProbeRequest {
            method: m.into(),
            target: t.into(),
            host: Some("x".into()),
            headers: Vec::new(),
        };
        let ok = probe(policy(), ctx(), &req("GET", "/ok/1")).unwrap();
        assert_eq!((ok.status, ok.forwarded), (200, true));
        assert_eq!(ok.event.and_then(|e| e.rule).map(|o| o.line), Some(3));
        let no = probe(policy(), ctx(), &req("PUT", "/ok/1")).unwrap();
        assert_eq!((no.status, no.forwarded), (403, false));
    }
}
