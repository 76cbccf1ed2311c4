//! One DNS query through the proxy, whatever transport brought it: parse, judge against the
//! current generation, refuse or forward, learn, answer. The UDP listener ([`crate::udp`]) and
//! the DNS-over-TCP loop ([`crate::dns_tcp`]) only move bytes to and from here.
//!
//! Behaviour (Cilium's pkg/fqdn/dnsproxy/proxy.go `ServeDNS`, with the differences named):
//! - malformed input ([`crate::dns::Malformed`]) is dropped and counted; no answer, no upstream;
//! - a refused query gets `REFUSED` with its id and question; the upstream never sees it;
//! - an allowed query goes to the original destination over the same transport, from the
//!   node's own address (no transparent bind: the answer comes back by ordinary routing), with
//!   a fresh random id and, when `ProxyConfig::mark`, the socket mark
//!   `FROM_EGRESS_PROXY | source identity`, so the server's ingress program judges the pod,
//!   not the host. UDP queries each get a fresh socket, hence a fresh random source port: only
//!   an answer to that socket with that id and the same question is taken, anything else
//!   arriving there is ignored;
//! - an upstream that does not answer within `upstream_timeout` gets no answer sent for it
//!   (as Cilium: the pod's resolver retries on its own; a late `SERVFAIL` could be taken as the
//!   answer to that retry). An upstream that fails outright (refused connection, ICMP
//!   unreachable) gets `SERVFAIL` (Cilium's `sendErrorResponse`);
//! - the answer goes back byte for byte but for its id (the pod's again). Before that, if it is
//!   `NOERROR`, has addresses for the name, and the name matches a toFQDNs selector of the
//!   generation, the addresses go to the loader ([`crate::learn`]) and the answer waits for its
//!   reply, at most `learn_timeout`.

use crate::dns::{self, chain_addresses, error_answer, match_answer, Malformed, ParsedQuery};
use crate::events::{now_ms, Counters, DnsEvent, Verdict};
use crate::learn::Learner;
use crate::matcher::{mark_identity, CompiledPolicy};
use crate::{dns_policy, ConnContext, Shared};
use cnpc_ir::proxy::contract::FROM_EGRESS_PROXY;
use cnpc_ir::proxy::{LearnRequest, LearnedAddress};
use cnpc_ir::{Origin, Protocol};
use hickory_proto::op::{Query, ResponseCode};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// Knobs of the DNS proxy (part of [`crate::ProxyConfig`]).
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Time the upstream has to answer a forwarded query (Cilium: 10 s; 5 s matches glibc's
    /// per-attempt timeout, so the pod's retry meets a fresh attempt here).
    pub upstream_timeout: Duration,
    /// Longest an answer is held for the loader's learn reply (Cilium: 100 ms).
    pub learn_timeout: Duration,
    /// Idle time allowed on a DNS-over-TCP connection between queries.
    pub tcp_idle_timeout: Duration,
    /// Most UDP queries handled at once; datagrams beyond are dropped and counted (a flood
    /// must not grow memory without bound; the pods' resolvers retry).
    pub max_in_flight: usize,
    /// Send every query here instead of the original destination (tests on loopback).
    pub upstream_override: Option<SocketAddr>,
    /// Where per-query events go; a full queue drops events (counted).
    pub events: Option<mpsc::Sender<DnsEvent>>,
    /// Who learns the addresses of answers (the loader's socket); none: nothing is learned
    /// and answers are released at once.
    pub learner: Option<Arc<dyn Learner>>,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            upstream_timeout: Duration::from_secs(5),
            learn_timeout: Duration::from_millis(100),
            tcp_idle_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            upstream_override: None,
            events: None,
            learner: None,
        }
    }
}

/// State the DNS proxy keeps across queries.
#[derive(Debug)]
pub struct DnsState {
    /// Keyed at random per process: query ids are a keyed hash of a counter, so they do not
    /// repeat soon and cannot be guessed from earlier ones.
    ids: std::collections::hash_map::RandomState,
    counter: AtomicU64,
    learn_ids: AtomicU64,
    pub(crate) in_flight: Arc<Semaphore>,
}

impl DnsState {
    pub(crate) fn new(config: &DnsConfig) -> DnsState {
        DnsState {
            ids: std::collections::hash_map::RandomState::new(),
            counter: AtomicU64::new(0),
            learn_ids: AtomicU64::new(1),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
        }
    }

    fn fresh_id(&self) -> u16 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Truncation intended: any 16 bits of the hash are as good as any other.
        self.ids.hash_one(n) as u16
    }
}

/// How a query came in (and goes out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn protocol(self) -> Protocol {
        match self {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What became of one message.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes to the pod.
    Reply(Vec<u8>),
    /// Dropped unanswered: not a query the proxy handles (TCP closes the connection).
    Malformed(Malformed),
    /// Allowed, but the upstream gave no answer in time; nothing is sent.
    NoAnswer,
}

/// The upstream side of one client: TCP keeps its connection across the queries of the
/// client's connection, UDP opens a socket per query.
#[derive(Debug, Default)]
pub struct Upstream {
    tcp: Option<TcpStream>,
}

/// Why a forwarded query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot create a socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set mark {mark:#x} on the upstream socket: {source}")]
    Mark { mark: u32, source: std::io::Error },
    #[error(transparent)]
    Connect(#[from] crate::server::UpstreamError),
    #[error("exchange with {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a {0}-byte query does not fit a TCP frame")]
    TooLarge(usize),
}

/// Handles one message from `ctx.source` to `ctx.original_dst` (see the module doc).
pub async fn handle_query(
    shared: &Shared,
    ctx: &ConnContext,
    transport: Transport,
    upstream: &mut Upstream,
    bytes: &[u8],
) -> Outcome {
    let counters = &shared.counters.dns;
    let query = match dns::parse_query(bytes) {
        Ok(q) => q,
        Err(m) => {
            Counters::bump(&counters.malformed);
            tracing::debug!(source = %ctx.source, error = %m, "malformed DNS message dropped");
            return Outcome::Malformed(m);
        }
    };
    // Loaded per query: a swap applies to the next query of every open TCP connection.
    let policy = shared.current();
    let judgement = dns_policy::judge_query(
        &policy,
        ctx.source.ip(),
        ctx.original_dst,
        transport.protocol(),
        &query.name,
    );
    let mut event = Event {
        shared,
        policy: &policy,
        ctx,
        transport,
        query: &query,
    };
    if !judgement.allowed {
        Counters::bump(&counters.refused);
        tracing::debug!(source = %ctx.source, name = query.name, basis = ?judgement.basis, "DNS query refused");
        return match error_answer(&query, ResponseCode::Refused) {
            Some(answer) => {
                event.emit(Verdict::Denied, None, &[], Some(ResponseCode::Refused));
                Outcome::Reply(answer)
            }
            // Cannot happen for a question that parsed; if it does, the message was not one
            // the proxy can handle.
            None => Outcome::Malformed(Malformed::Unparseable("cannot encode a refusal".into())),
        };
    }
    Counters::bump(&counters.allowed);
    let rule = judgement.rule.as_ref();
    let cfg = &shared.config;
    let addr = cfg.dns.upstream_override.unwrap_or(ctx.original_dst);
    let mark = cfg
        .mark
        .then(|| FROM_EGRESS_PROXY | mark_identity(judgement.source));
    let id = shared.dns.fresh_id();
    let mut out = bytes.to_vec();
    dns::set_id(&mut out, id);
    let exchange = async {
        match transport {
            Transport::Udp => exchange_udp(addr, mark, &out, id, &query.question).await,
            Transport::Tcp => {
                let timeout = cfg.connect_timeout;
                exchange_tcp(
                    &mut upstream.tcp,
                    addr,
                    mark,
                    timeout,
                    &out,
                    id,
                    &query.question,
                )
                .await
            }
        }
    };
    let (mut answer, parsed) = match tokio::time::timeout(cfg.dns.upstream_timeout, exchange).await
    {
        Err(_) => {
            // A late answer on a kept TCP connection would be taken for the next query's.
            upstream.tcp = None;
            Counters::bump(&counters.upstream_timeouts);
            tracing::warn!(name = query.name, upstream = %addr, "DNS upstream did not answer in time");
            event.emit(Verdict::Allowed, rule, &[], None);
            return Outcome::NoAnswer;
        }
        Ok(Err(e)) => {
            Counters::bump(&counters.upstream_errors);
            tracing::warn!(name = query.name, error = %e, "DNS upstream failed");
            return match error_answer(&query, ResponseCode::ServFail) {
                Some(a) => {
                    event.emit(Verdict::Allowed, rule, &[], Some(ResponseCode::ServFail));
                    Outcome::Reply(a)
                }
                None => Outcome::NoAnswer,
            };
        }
        Ok(Ok(x)) => x,
    };
    let addresses = if parsed.rcode == ResponseCode::NoError {
        chain_addresses(&parsed.message, query.question.name())
    } else {
        Vec::new()
    };
    learn(shared, &policy, &query, ctx, &addresses).await;
    dns::set_id(&mut answer, query.id);
    event.emit(Verdict::Allowed, rule, &addresses, Some(parsed.rcode));
    Outcome::Reply(answer)
}

/// Asks the loader to learn `addresses`; when a toFQDNs selector of the generation matches the
/// name, waits for its reply at most `learn_timeout` (the answer is held meanwhile). A reply's identities go into the
/// current generation's address index at once (the loader puts them in the next one).
async fn learn(
    shared: &Shared,
    policy: &CompiledPolicy,
    query: &ParsedQuery,
    ctx: &ConnContext,
    addresses: &[LearnedAddress],
) {
    let dns_cfg = &shared.config.dns;
    let Some(learner) = &dns_cfg.learner else {
        return;
    };
    let selected = policy
        .policy()
        .fqdn_selectors
        .iter()
        .any(|m| m.matches(&query.name));
    if addresses.is_empty() {
        return;
    }
    let counters = &shared.counters.dns;
    let request = LearnRequest {
        id: shared.dns.learn_ids.fetch_add(1, Ordering::Relaxed),
        name: query.name.clone(),
        source: ctx.source.ip().to_canonical(),
        addresses: addresses.to_vec(),
    };
    if !selected {
        // No selector wants the name now, but one a later generation adds should match what
        // pods already resolved, as Cilium's DNS cache serves new toFQDNs selectors
        // (pkg/fqdn/namemanager): the loader records it, and the answer is not held for it.
        let learner = learner.clone();
        let timeout = dns_cfg.learn_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, learner.learn(request)).await;
        });
        return;
    }
    match tokio::time::timeout(dns_cfg.learn_timeout, learner.learn(request)).await {
        Err(_) => {
            Counters::bump(&counters.learn_timeouts);
            tracing::warn!(name = query.name, timeout = ?dns_cfg.learn_timeout, "no learn reply in time; answer released");
        }
        Ok(Err(e)) => {
            Counters::bump(&counters.learn_failures);
            tracing::warn!(name = query.name, error = %e, "learning failed; answer released");
        }
        Ok(Ok(reply)) if !reply.ok => {
            Counters::bump(&counters.learn_failures);
            tracing::warn!(name = query.name, error = ?reply.error, "the loader did not learn; answer released");
        }
        Ok(Ok(reply)) => {
            let current = shared.current();
            for (ip, identity) in reply.identities {
                current.learn(ip, identity);
            }
        }
    }
}

/// What an event needs that every outcome shares.
struct Event<'a> {
    shared: &'a Shared,
    policy: &'a CompiledPolicy,
    ctx: &'a ConnContext,
    transport: Transport,
    query: &'a ParsedQuery,
}

impl Event<'_> {
    fn emit(
        &mut self,
        verdict: Verdict,
        rule: Option<&Origin>,
        addresses: &[LearnedAddress],
        rcode: Option<ResponseCode>,
    ) {
        let Some(tx) = &self.shared.config.dns.events else {
            return;
        };
        let event = DnsEvent {
            time: now_ms(),
            protocol: self.transport.name().to_string(),
            source: self.ctx.source,
            destination: self.ctx.original_dst,
            query: self.query.name.clone(),
            qtype: self.query.qtype(),
            verdict,
            rule: rule.cloned(),
            addresses: addresses.iter().map(|a| a.ip).collect(),
            rcode: rcode.map(dns::rcode_name),
            generation: self.policy.generation(),
        };
        if tx.try_send(event).is_err() {
            Counters::bump(&self.shared.counters.events_dropped);
        }
    }
}

/// A UDP socket connected to `addr` from the node's address (an ephemeral port the kernel
/// picks at random), marked when `mark` is given.
fn upstream_udp(
    addr: SocketAddr,
    mark: Option<u32>,
) -> Result<tokio::net::UdpSocket, ForwardError> {
    use socket2::{Domain, Socket, Type};
    let socket_err = |source| ForwardError::Socket { addr, source };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(socket_err)?;
    if let Some(mark) = mark {
        socket
            .set_mark(mark)
            .map_err(|source| ForwardError::Mark { mark, source })?;
    }
    socket.set_nonblocking(true).map_err(socket_err)?;
    socket
        .connect(&addr.into())
        .map_err(|source| ForwardError::Io { addr, source })?;
    tokio::net::UdpSocket::from_std(socket.into()).map_err(socket_err)
}

/// The largest DNS message (a UDP payload or a TCP frame).
const MAX_MESSAGE: usize = 65_535;

async fn exchange_udp(
    addr: SocketAddr,
    mark: Option<u32>,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<(Vec<u8>, dns::UpstreamAnswer), ForwardError> {
    let io = |source| ForwardError::Io { addr, source };
    let socket = upstream_udp(addr, mark)?;
    socket.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        if let Some(answer) = match_answer(&buf[..n], id, question) {
            buf.truncate(n);
            return Ok((buf, answer));
        }
    }
}

async fn exchange_tcp(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    mark: Option<u32>,
    connect_timeout: Duration,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<(Vec<u8>, dns::UpstreamAnswer), ForwardError> {
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::TooLarge(query.len()))?;
    let mut frame = Vec::with_capacity(query.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(query);
    // One retry: a kept connection the upstream closed while idle fails at once; a fresh
    // connection gets no second chance.
    loop {
        let fresh = conn.is_none();
        let stream = match conn {
            Some(s) => s,
            None => conn.insert(crate::server::connect(addr, mark, connect_timeout).await?),
        };
        match tcp_round_trip(stream, &frame, id, question).await {
            Ok(x) => return Ok(x),
            Err(source) => {
                *conn = None;
                if fresh {
                    return Err(ForwardError::Io { addr, source });
                }
            }
        }
    }
}

/// Writes one framed query and reads frames until the answer to it arrives.
async fn tcp_round_trip(
    stream: &mut TcpStream,
    frame: &[u8],
    id: u16,
    question: &Query,
) -> std::io::Result<(Vec<u8>, dns::UpstreamAnswer)> {
    stream.write_all(frame).await?;
    loop {
        let bytes = read_frame(stream).await?;
        if let Some(answer) = match_answer(&bytes, id, question) {
            return Ok((bytes, answer));
        }
    }
}

/// Reads one length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let mut bytes = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut bytes).await?;
    Ok(bytes)
}
