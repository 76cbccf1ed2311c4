//! `cnpc-proxy`: the L7 proxy process the loader supervises (HTTP, and DNS on the egress
//! port). Reads the generation's proxy policy from `--policy`, listens on the transparent
//! proxy ports (TCP both directions, UDP egress for DNS), asks the loader to learn DNS answers
//! over `--learn-socket` when given, prints one JSON line per HTTP request or DNS query on
//! stdout (`cnpc_proxy::ProxyEvent`, tagged by `type`), logs on stderr.

use clap::Parser;
use cnpc_proxy::learn::SocketLearner;
use cnpc_proxy::listener::{accept_loop, bind_all, Ports};
use cnpc_proxy::udp::{self, Replier, SpoofSender};
use cnpc_proxy::{policy_file, DnsConfig, DnsEvent, L7Event, Proxy, ProxyConfig, ProxyEvent};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(name = "cnpc-proxy", version, about = "cnpc's L7 proxy (HTTP and DNS)")]
struct Args {
    /// The generation's proxy policy (JSON), replaced atomically by the loader.
    #[arg(long)]
    policy: PathBuf,
    #[arg(long, default_value_t = cnpc_ir::proxy::contract::EGRESS_PROXY_PORT)]
    egress_port: u16,
    #[arg(long, default_value_t = cnpc_ir::proxy::contract::INGRESS_PROXY_PORT)]
    ingress_port: u16,
    /// Do not mark upstream connections (the datapath then sees them as the host's).
    #[arg(long)]
    no_mark: bool,
    /// Time a client has to send a request head (and may stay idle between requests).
    #[arg(long, default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// The loader's learning socket (unix stream, JSON lines): DNS answers for names a
    /// toFQDNs selector matches are held until it confirms their addresses. Without it
    /// nothing is learned.
    #[arg(long, value_name = "PATH")]
    learn_socket: Option<PathBuf>,
    /// Time a DNS upstream has to answer a forwarded query (no answer is sent after it).
    #[arg(long, default_value_t = 5_000)]
    dns_timeout_ms: u64,
    /// Longest a DNS answer waits for the loader's learn reply.
    #[arg(long, default_value_t = 100)]
    learn_timeout_ms: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let (policy, since) = match policy_file::read_initial(&args.policy) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "no policy to start with");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = mpsc::channel::<L7Event>(4096);
    let (dns_tx, dns_rx) = mpsc::channel::<DnsEvent>(4096);
    let config = ProxyConfig {
        mark: !args.no_mark,
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        events: Some(tx),
        dns: DnsConfig {
            upstream_timeout: Duration::from_millis(args.dns_timeout_ms),
            learn_timeout: Duration::from_millis(args.learn_timeout_ms),
            events: Some(dns_tx),
            learner: args
                .learn_socket
                .clone()
                .map(|p| Arc::new(SocketLearner::new(p)) as Arc<dyn cnpc_proxy::learn::Learner>),
            ..DnsConfig::default()
        },
        ..ProxyConfig::default()
    };
    tracing::info!(generation = policy.generation, "starting");
    let proxy = Proxy::with_config(policy, config);
    let listeners = match bind_all(Ports {
        egress: args.egress_port,
        ingress: args.ingress_port,
    }) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    for (direction, listener) in listeners {
        if let Ok(a) = listener.local_addr() {
            tracing::info!(direction = direction.as_str(), address = %a, "listening");
        }
        tokio::spawn(accept_loop(listener, direction, proxy.clone()));
    }
    // DNS over UDP: answers leave from the original destination through raw sockets.
    let dns_sockets =
        udp::bind_transparent(args.egress_port).and_then(|s| Ok((s, SpoofSender::new()?)));
    let (dns_sockets, spoof) = match dns_sockets {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for DNS");
            return ExitCode::FAILURE;
        }
    };
    let replier = Replier::Spoofed(Arc::new(spoof));
    for socket in dns_sockets {
        if let Ok(a) = socket.local_addr() {
            tracing::info!(address = %a, "listening for DNS (UDP)");
        }
        tokio::spawn(udp::serve(socket, replier.clone(), proxy.clone()));
    }
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    policy_file::acknowledge(&args.policy, proxy.current().generation());
    // The file's directory is watched; the poll is a fallback (and bounds how long the loader
    // waits for an acknowledgement where inotify is missing).
    tokio::spawn(policy_file::watch(
        proxy.clone(),
        args.policy.clone(),
        since,
        Duration::from_millis(50),
        hup,
    ));
    tokio::spawn(print_events(rx, dns_rx));
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let c = proxy.counters().snapshot();
    tracing::info!(
        allowed = c.allowed,
        denied = c.denied,
        upstream_errors = c.upstream_errors,
        events_dropped = c.events_dropped,
        dns_allowed = c.dns.allowed,
        dns_refused = c.dns.refused,
        dns_malformed = c.dns.malformed,
        dns_learn_timeouts = c.dns.learn_timeouts,
        "stopping"
    );
    ExitCode::SUCCESS
}

/// One JSON line per event on stdout, flushed whenever both queues run dry.
async fn print_events(mut http: mpsc::Receiver<L7Event>, mut dns: mpsc::Receiver<DnsEvent>) {
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    loop {
        let event = tokio::select! {
            Some(e) = http.recv() => ProxyEvent::Http(e),
            Some(e) = dns.recv() => ProxyEvent::Dns(e),
            else => return,
        };
        let mut line = match serde_json::to_vec(&event) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "event not printable");
                continue;
            }
        };
        line.push(b'\n');
        if out.write_all(&line).await.is_err() {
            return;
        }
        if http.is_empty() && dns.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
}
