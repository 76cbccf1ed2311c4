//! cnpc's L7 proxy: the stage Cilium runs with Envoy for HTTP and with its own DNS proxy for
//! DNS (DESIGN.md §6a). Its one job: judge every HTTP request and every DNS query of a flow
//! the datapath handed over (a table row said `Proxy`) against the L7 rules of the current
//! generation; answer the denied ones itself (`403 Access denied`, DNS `REFUSED`), forward the
//! allowed ones to the flow's original destination, and, for DNS answers of names a toFQDNs
//! selector matches, have the loader learn the addresses before the pod sees them.
//!
//! Design decisions:
//! - **Transparent in, node address out.** The datapath assigns proxied connections to
//!   transparent listening sockets ([`listener`], and [`udp`] for DNS datagrams) without NAT,
//!   so an accepted socket's local address is the original destination and its peer the
//!   original source (a datagram brings its original destination in a control message); the
//!   listener it arrived on gives the direction ([`cnpc_ir::proxy::contract`]). The upstream
//!   connection leaves from the node's own address, with no transparent bind: replies come
//!   back to the node by ordinary routing (no policy routing for the return path, no port
//!   clashes with the client's own socket). It carries `FROM_EGRESS_PROXY`/`FROM_INGRESS_PROXY`
//!   or'ed with the original source's identity in its socket mark, so the destination's ingress
//!   program judges the real source identity rather than "host" (and passes what its own
//!   ingress proxy already judged).
//! - **One egress port for HTTP and DNS.** UDP on the egress port is DNS; a TCP connection on
//!   it is DNS when its table row proxies it for DNS rules, HTTP otherwise
//!   ([`dns_policy::is_dns_connection`], [`Proxy::serve_tcp`]).
//! - **A separate process, supervised by the loader.** The proxy parses untrusted input; it
//!   runs as `cnpc-proxy`, gets each generation's [`ProxyPolicy`] as a JSON file the loader
//!   writes atomically, and never sees a policy file. A proxy that is not running fails closed:
//!   the datapath's handover finds no socket and drops.
//! - **Per-request judgement against the current generation.** The compiled policy lives in
//!   an [`ArcSwap`]; every request and query loads the current one, and nothing per connection
//!   caches a verdict, so a keep-alive connection opened under an old generation is judged by
//!   the new one from its next request on.
//!
//! Modules: [`matcher`] (the HTTP decision, which must agree with `cnpc_compiler::eval`),
//! [`server`] (HTTP/1.1 in, HTTP/1.1 out), [`listener`] (transparent TCP sockets and accept
//! loops), [`dns_policy`] (the DNS decision, agreeing with the evaluator too), [`dns`] (DNS
//! messages), [`dns_proxy`] (one query: judge, forward, learn), [`dns_tcp`] and [`udp`] (the
//! two transports), [`learn`] (the loader's learning socket), [`policy_file`] (reading and
//! watching the generation's file), [`events`], [`probe`] (one request through the proxy in
//! process, for `cnpc trace --engine bpf`).

pub mod dns;
pub mod dns_policy;
pub mod dns_proxy;
pub mod dns_tcp;
pub mod events;
pub mod learn;
pub mod listener;
pub mod matcher;
pub mod policy_file;
pub mod probe;
pub mod server;
pub mod udp;

use arc_swap::ArcSwap;
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::Direction;
pub use dns_proxy::DnsConfig;
pub use events::{Counters, DnsEvent, L7Event, ProxyEvent, Verdict};
pub use matcher::{CompiledPolicy, Judgement, Request};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What the proxy knows of a connection: the listener it came in on and its two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnContext {
    pub direction: Direction,
    /// The original source (the accepted socket's peer).
    pub source: SocketAddr,
    /// The original destination (the accepted socket's local address).
    pub original_dst: SocketAddr,
    /// The source identity the datapath put in the accepted socket's mark (ingress path,
    /// `TO_PROXY_MARK | identity`; see `cnpc_ir::proxy::contract`). It wins over the
    /// ipcache: a connection an egress proxy opened comes from the node's address, and only
    /// the mark still names the pod behind it.
    pub source_identity: Option<cnpc_ir::NumericIdentity>,
}

/// Knobs of the proxy. The defaults are the binary's, except `mark` (off, so unprivileged
/// tests can run the proxy on loopback).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Set `FROM_*_PROXY | source identity` as the upstream socket's mark (needs
    /// CAP_NET_ADMIN).
    pub mark: bool,
    /// Time a client has to send a request head, and the idle time allowed between requests
    /// of a keep-alive connection (hyper runs the timer while it waits for a head).
    pub header_timeout: Duration,
    /// Largest request head hyper buffers (at least 8 KiB); a larger one gets 431.
    pub max_head_bytes: usize,
    /// Most header fields in one request; more get 431.
    pub max_headers: usize,
    /// Time allowed to connect upstream; failing that the request gets 503.
    pub connect_timeout: Duration,
    /// Time the upstream has to answer a forwarded request with a response head; failing
    /// that the request gets 504 and the connection closes (Envoy's default route timeout is
    /// 15 s).
    pub upstream_timeout: Duration,
    /// Connect every upstream here instead of the original destination (tests on loopback).
    pub connect_override: Option<SocketAddr>,
    /// A denied request's body is read and discarded up to this size so the connection can
    /// carry on; a larger (or slower) body closes the connection after the 403.
    pub max_denied_body: usize,
    /// Where per-request events go; a full queue drops events (counted).
    pub events: Option<mpsc::Sender<L7Event>>,
    /// The DNS proxy's knobs (its events, its learner).
    pub dns: DnsConfig,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            mark: false,
            header_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(15),
            connect_override: None,
            max_denied_body: 64 * 1024,
            events: None,
            dns: DnsConfig::default(),
        }
    }
}

/// State shared by every connection of one proxy.
#[derive(Debug)]
pub struct Shared {
    policy: ArcSwap<CompiledPolicy>,
    pub config: ProxyConfig,
    pub counters: Counters,
    pub(crate) dns: dns_proxy::DnsState,
}

impl Shared {
    /// The generation in force now.
    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.policy.load_full()
    }
}

/// A running proxy's handle: cheap to clone, shared by listeners, connections and the loader.
#[derive(Clone, Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy with the default configuration.
    pub fn new(policy: ProxyPolicy) -> Proxy {
        Proxy::with_config(policy, ProxyConfig::default())
    }

    pub fn with_config(policy: ProxyPolicy, config: ProxyConfig) -> Proxy {
        Proxy {
            shared: Arc::new(Shared {
                policy: ArcSwap::from_pointee(CompiledPolicy::new(policy)),
                dns: dns_proxy::DnsState::new(&config.dns),
                config,
                counters: Counters::default(),
            }),
        }
    }

    /// Compiles `policy` and makes it the current generation: every request from now on, on
    /// new and open connections alike, is judged by it. Returns the previous generation.
    pub fn swap(&self, policy: ProxyPolicy) -> u64 {
        let old = self
            .shared
            .policy
            .swap(Arc::new(CompiledPolicy::new(policy)));
        old.generation()
    }

    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.shared.current()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves one accepted connection until it closes. See [`server::serve_connection`].
    pub async fn serve_connection<I>(&self, io: I, ctx: ConnContext) -> Result<(), hyper::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        server::serve_connection(io, ctx, &self.shared).await
    }

    /// Serves one connection a TCP listener accepted: DNS over TCP when its table row proxies
    /// it for DNS rules (egress only), HTTP otherwise. Decided by the generation current now;
    /// every request or query on it is judged by the generation current when it arrives.
    pub async fn serve_tcp<I>(&self, io: I, ctx: ConnContext) -> Result<(), ServeError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if dns_policy::is_dns_connection(&self.current(), &ctx) {
            dns_tcp::serve(io, ctx, &self.shared)
                .await
                .map_err(ServeError::Dns)
        } else {
            self.serve_connection(io, ctx)
                .await
                .map_err(ServeError::Http)
        }
    }
}

/// How a proxied TCP connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP connection failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("DNS connection failed: {0}")]
    Dns(#[from] std::io::Error),
}
