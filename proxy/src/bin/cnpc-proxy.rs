//! `cnpc-proxy`: the HTTP L7 proxy process the loader supervises. Reads the generation's proxy
//! policy from `--policy`, listens on the transparent proxy ports, prints one JSON line per
//! request on stdout, logs on stderr.

use clap::Parser;
use cnpc_proxy::listener::{accept_loop, bind_all, Ports};
use cnpc_proxy::{policy_file, L7Event, Proxy, ProxyConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(name = "cnpc-proxy", version, about = "cnpc's HTTP L7 proxy")]
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
    let config = ProxyConfig {
        mark: !args.no_mark,
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        events: Some(tx),
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
    tokio::spawn(print_events(rx));
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
        "stopping"
    );
    ExitCode::SUCCESS
}

/// One JSON line per event on stdout, flushed whenever the queue runs dry.
async fn print_events(mut rx: mpsc::Receiver<L7Event>) {
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    while let Some(event) = rx.recv().await {
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
        if rx.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
}
