//! One proxied connection: HTTP/1.1 from the client, each request judged against the current
//! generation, denied ones answered locally, allowed ones forwarded over one upstream
//! HTTP/1.1 connection to the original destination.
//!
//! What a client sees is what Cilium's Envoy does:
//! - a denied request gets `403 Forbidden` with the body `Access denied` (`text/plain`), the
//!   response Cilium's HTTP policy docs show for a denied `PUT /v1/exhaust-port`; the upstream
//!   is never contacted for it. The connection stays open when its body could be read off.
//! - an allowed request goes upstream unchanged but for hop-by-hop headers (RFC 9110 §7.6.1:
//!   `Connection` and what it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`); the response streams back. The upstream connection is
//!   opened at the first allowed request and reused by the following ones (opened again if the
//!   upstream closed it). Failing to connect gives `503`, an upstream that fails mid-request
//!   `502` (Envoy: "upstream connect error or disconnect/reset before headers"), one that sends
//!   no response head within `upstream_timeout` `504`.
//! - protocol switches are not proxied: `Upgrade` is stripped, an allowed `CONNECT` gets `501`.
//! - hyper enforces the limits: a head larger than `max_head_bytes` or with too many fields
//!   gets `431`, a malformed one `400`, an HTTP/2 preface is refused, and a head not complete
//!   within `header_timeout` closes the connection (the same timer bounds idle keep-alive).
//! - several `Host` headers, or one that is not UTF-8, get `400`: the request would be judged
//!   on one host and routed on another.
//! - the path judged is the request-target as received (`/v1/status?x=1`); for an
//!   absolute-form target (`GET http://h/x`) the path is its path and query and the host its
//!   authority (RFC 9112 §3.2.2, as Envoy converts it).

use crate::events::{now_ms, Counters, L7Event, Verdict};
use crate::matcher::{mark_identity, CompiledPolicy, Judgement, Request as L7Request};
use crate::{ConnContext, Shared};
use bytes::Bytes;
use cnpc_ir::proxy::contract::{FROM_EGRESS_PROXY, FROM_INGRESS_PROXY};
use cnpc_ir::{Direction, NumericIdentity};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, EXPECT, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

/// The body of a response the proxy sends: the upstream's, streamed, or its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The body of a denied request.
pub const DENIED_BODY: &str = "Access denied";

/// Why the upstream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot create a socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set mark {mark:#x} on the upstream socket: {source}")]
    Mark { mark: u32, source: std::io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no connection to {addr} within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Serves one accepted connection until the client closes it, a limit closes it, or the
/// protocol fails (the error says how). `ctx` is the connection's addresses as the datapath
/// saw them; the listener layer derives it from the socket, tests give it explicitly.
pub async fn serve_connection<I>(
    io: I,
    ctx: ConnContext,
    shared: &Arc<Shared>,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Counters::bump(&shared.counters.connections);
    let cfg = &shared.config;
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        ctx,
        upstream: Mutex::new(None),
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    // hyper refuses (panics on) buffers below 8 KiB.
    let max_buf = cfg.max_head_bytes.max(8192);
    http1::Builder::new()
        .keep_alive(true)
        // Pipelined requests are read and answered in order either way; hyper's experimental
        // `pipeline_flush` only batches the flushes, and with it a malformed head's 400 is
        // lost (the connection closes without it), so it stays off.
        .pipeline_flush(false)
        .half_close(false)
        .max_buf_size(max_buf)
        .max_header_size(max_buf)
        .max_headers(cfg.max_headers.max(1))
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .await
}

/// Per-connection state: only the upstream connection. No verdict is kept here.
struct Conn {
    shared: Arc<Shared>,
    ctx: ConnContext,
    upstream: Mutex<Option<SendRequest<Incoming>>>,
}

/// What a request is judged on, owned for the event.
struct Facts {
    method: String,
    path: String,
    host: Option<String>,
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        // Loaded per request: a swap applies to the next request of every open connection.
        let policy = self.shared.current();
        let method = req.method().as_str().to_string();
        let path = target(req.uri());
        let host = match host_of(&req) {
            Ok(h) => h,
            Err(why) => {
                Counters::bump(&self.shared.counters.bad_requests);
                let facts = Facts {
                    method,
                    path,
                    host: None,
                };
                self.event(
                    &policy,
                    &facts,
                    StatusCode::BAD_REQUEST,
                    Verdict::Denied,
                    None,
                );
                return local(StatusCode::BAD_REQUEST, why, true);
            }
        };
        let judgement = policy.judge(
            &self.ctx,
            &L7Request {
                method: &method,
                path: &path,
                host: host.as_deref(),
                headers: req.headers(),
            },
        );
        let facts = Facts { method, path, host };
        if !judgement.allowed {
            return self.deny(req, &policy, &facts).await;
        }
        Counters::bump(&self.shared.counters.allowed);
        tracing::debug!(
            direction = self.ctx.direction.as_str(),
            source = %self.ctx.source,
            destination = %self.ctx.original_dst,
            method = facts.method,
            path = facts.path,
            basis = ?judgement.basis,
            "allowed"
        );
        let resp = if req.method() == Method::CONNECT {
            local(StatusCode::NOT_IMPLEMENTED, "CONNECT is not proxied", false)
        } else {
            let source = policy.parties(&self.ctx).source;
            self.forward(req, source).await
        };
        self.event(
            &policy,
            &facts,
            resp.status(),
            Verdict::Allowed,
            Some(&judgement),
        );
        resp
    }

    async fn deny(
        &self,
        req: Request<Incoming>,
        policy: &CompiledPolicy,
        facts: &Facts,
    ) -> Response<ProxyBody> {
        Counters::bump(&self.shared.counters.denied);
        tracing::debug!(
            direction = self.ctx.direction.as_str(),
            source = %self.ctx.source,
            destination = %self.ctx.original_dst,
            method = facts.method,
            path = facts.path,
            "denied"
        );
        // Read the body off so the next request can follow; one that asked to wait for
        // `100 Continue` is not invited to send it, and the connection closes instead.
        let expects = req.headers().contains_key(EXPECT);
        let cfg = &self.shared.config;
        let drained =
            !expects && drain(req.into_body(), cfg.max_denied_body, cfg.header_timeout).await;
        self.event(policy, facts, StatusCode::FORBIDDEN, Verdict::Denied, None);
        local(StatusCode::FORBIDDEN, DENIED_BODY, !drained)
    }

    fn event(
        &self,
        policy: &CompiledPolicy,
        facts: &Facts,
        status: StatusCode,
        verdict: Verdict,
        judgement: Option<&Judgement>,
    ) {
        let Some(tx) = &self.shared.config.events else {
            return;
        };
        let event = L7Event {
            time: now_ms(),
            direction: self.ctx.direction,
            source: self.ctx.source,
            destination: self.ctx.original_dst,
            method: facts.method.clone(),
            path: facts.path.clone(),
            host: facts.host.clone(),
            status: status.as_u16(),
            verdict,
            rule: judgement.and_then(|j| j.rule.clone()),
            generation: policy.generation(),
        };
        if tx.try_send(event).is_err() {
            Counters::bump(&self.shared.counters.events_dropped);
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        source: NumericIdentity,
    ) -> Response<ProxyBody> {
        strip_hop_by_hop(req.headers_mut());
        let mut upstream = self.upstream.lock().await;
        // One retry: a kept connection the upstream closed meanwhile hands the request back
        // unsent; a fresh connection gets no second chance.
        for _ in 0..2 {
            let mut sender = match upstream.take() {
                Some(s) if !s.is_closed() => s,
                _ => match self.connect(source).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream unavailable");
                        Counters::bump(&self.shared.counters.upstream_errors);
                        return local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error",
                            false,
                        );
                    }
                },
            };
            if sender.ready().await.is_err() {
                // Closed while idle: nothing was sent, connect again.
                continue;
            }
            let sent = tokio::time::timeout(
                self.shared.config.upstream_timeout,
                sender.try_send_request(req),
            )
            .await;
            let Ok(sent) = sent else {
                // The upstream connection is dropped with `sender`: a late answer goes nowhere.
                tracing::warn!(timeout = ?self.shared.config.upstream_timeout, "upstream did not answer");
                Counters::bump(&self.shared.counters.upstream_errors);
                return local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    true,
                );
            };
            match sent {
                Ok(mut resp) => {
                    *upstream = Some(sender);
                    strip_hop_by_hop(resp.headers_mut());
                    return resp.map(Either::Left);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => {
                        tracing::warn!(error = %e.error(), "upstream failed");
                        Counters::bump(&self.shared.counters.upstream_errors);
                        return local(StatusCode::BAD_GATEWAY, "upstream reset", true);
                    }
                },
            }
        }
        Counters::bump(&self.shared.counters.upstream_errors);
        local(StatusCode::BAD_GATEWAY, "upstream closed", true)
    }

    async fn connect(
        &self,
        source: NumericIdentity,
    ) -> Result<SendRequest<Incoming>, UpstreamError> {
        let cfg = &self.shared.config;
        let addr = cfg.connect_override.unwrap_or(self.ctx.original_dst);
        let mark = cfg.mark.then(|| {
            let base = match self.ctx.direction {
                Direction::Egress => FROM_EGRESS_PROXY,
                Direction::Ingress => FROM_INGRESS_PROXY,
            };
            base | mark_identity(source)
        });
        let stream = connect(addr, mark, cfg.connect_timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Connects to `addr` from the node's address, with `mark` as the socket mark if given.
pub async fn connect(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| UpstreamError::Socket { addr, source })?;
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket)
            .set_mark(mark)
            .map_err(|source| UpstreamError::Mark { mark, source })?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr, timeout })?
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    // Latency over throughput: heads and small bodies go out at once.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The path the rules see: the request-target's path and query, or the whole target when it
/// has none (`*`, authority-form).
fn target(uri: &Uri) -> String {
    match uri.path_and_query() {
        Some(pq) => pq.as_str().to_string(),
        None => uri.to_string(),
    }
}

/// The host the rules see: an absolute-form target's authority, else the one `Host` header.
fn host_of(req: &Request<Incoming>) -> Result<Option<String>, &'static str> {
    if let Some(a) = req.uri().authority() {
        return Ok(Some(a.as_str().to_string()));
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Ok(None),
        (Some(h), None) => std::str::from_utf8(h.as_bytes())
            .map(|s| Some(s.to_string()))
            .map_err(|_| "Host is not UTF-8"),
        (Some(_), Some(_)) => Err("more than one Host header"),
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(n);
    }
}

/// Reads and discards a body of at most `limit` bytes within `within`; false if it was larger,
/// slower or broken.
async fn drain(body: Incoming, limit: usize, within: Duration) -> bool {
    if body.is_end_stream() {
        return true;
    }
    let read = async move {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen = seen.saturating_add(data.len());
                if seen > limit {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

/// A response the proxy makes itself.
fn local(status: StatusCode, body: &'static str, close: bool) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
            ("host", "h"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["host", "x-kept"]);
    }

    #[test]
    fn the_target_keeps_the_query() {
        let u: Uri = "/v1/status?x=1".parse().expect("literal");
        assert_eq!(target(&u), "/v1/status?x=1");
        let u: Uri = "http://deathstar/v1/x?y".parse().expect("literal");
        assert_eq!(target(&u), "/v1/x?y");
        let u: Uri = "*".parse().expect("literal");
        assert_eq!(target(&u), "*");
        let u: Uri = "example.com:443".parse().expect("literal");
        assert_eq!(target(&u), "example.com:443");
    }

    #[test]
    fn the_denied_response_is_ciliums() {
        let r = local(StatusCode::FORBIDDEN, DENIED_BODY, false);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
        assert!(r.headers().get(CONNECTION).is_none());
        match r.body() {
            Either::Right(_) => {}
            Either::Left(_) => panic!("a local response has a local body"),
        }
    }
}
