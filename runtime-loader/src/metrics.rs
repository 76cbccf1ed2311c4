//! The loader's metrics and the HTTP server of `/metrics` and `/healthz`.
//!
//! [`LoaderMetrics`] keeps every metric in a prometheus-client [`Registry`] with typed families;
//! the loader updates them through small methods ([`LoaderMetrics::applied`],
//! [`LoaderMetrics::verdict_event`], ...). [`spawn_server`] serves them with hyper on a
//! current-thread tokio runtime of its own thread, so a slow scrape never holds up the loader.
//!
//! `/metrics` answers in the Prometheus text format (0.0.4), or in OpenMetrics text when the
//! scraper's `Accept` asks for `application/openmetrics-text`. `/healthz` answers 503 while no
//! good generation enforces, 503 while the enforcing generation proxies flows and the L7 proxy
//! is not listening (those flows are dropped), 200 otherwise.
//!
//! Metrics (counters end in `_total` as exposed; prometheus-client appends it):
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `cnpc_generation` | gauge | |
//! | `cnpc_swaps_total` | counter | |
//! | `cnpc_swap_latency_seconds` | gauge (the last swap) | |
//! | `cnpc_swap_duration_seconds` | histogram (1 ms to 10 s) | |
//! | `cnpc_compile_failures_total`, `cnpc_load_failures_total` | counter | |
//! | `cnpc_hooks` | gauge | |
//! | `cnpc_proxy_up` | gauge | |
//! | `cnpc_proxy_restarts_total` | counter | |
//! | `cnpc_dns_queries_total` | counter | `verdict` |
//! | `cnpc_l7_requests_total` | counter | `direction`, `verdict` |
//! | `cnpc_fqdn_learn_requests_total`, `cnpc_fqdn_addresses_written_total`, `cnpc_fqdn_generations_total`, `cnpc_fqdn_hold_exceeded_total`, `cnpc_fqdn_addresses_expired_total` | counter | |
//! | `cnpc_fqdn_addresses` | gauge | `state` (`live`, `zombie`) |
//! | `cnpc_verdict_events_total` | counter | `verdict` |
//! | `cnpc_policy_verdicts_total` | counter | `direction`, `verdict`, `match` |
//! | `cnpc_drops_total` | counter | `reason` (`policy`, `no-proxy`) |
//!
//! The L7 and DNS request counts are the supervised proxy's [`L7Counts`], read when scraped
//! (a [`Collector`]): the proxy supervisor's reader thread already keeps them in atomics, and
//! reading them at scrape time needs no copy loop and never shows a stale value.

use crate::l7::L7Counts;
use cnpc_ir::{DecisionTable, Direction as IrDirection, TableVerdict};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Upper bounds of the swap-duration buckets, seconds: 1 ms to 10 s.
pub const SWAP_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The content type of the Prometheus text format the scrape gets by default.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The content type of the OpenMetrics text format, served when the scraper asks for it.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Implements [`EncodeLabelValue`] with the value's `as_str`.
macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

/// The direction of a verdict, from the endpoint's side, as a label value: a newtype, since the
/// orphan rule keeps `EncodeLabelValue` off `cnpc_ir::Direction` itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DirectionLabel(IrDirection);

impl DirectionLabel {
    fn as_str(self) -> &'static str {
        self.0.as_str()
    }
}
label_value!(DirectionLabel);

/// A datapath verdict as the programs report it (`cnpc_codegen_bpf::gen::event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    Denied,
    Proxied,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allowed, Verdict::Denied, Verdict::Proxied];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Proxied => "proxied",
        }
    }

    /// The verdict byte of an event: 0 allowed, 1 denied, 2 proxied.
    pub fn from_event(v: u8) -> Option<Verdict> {
        Verdict::ALL.get(usize::from(v)).copied()
    }
}
label_value!(Verdict);

/// What matched, Cilium's `match` label of `cilium_policy_verdict` (its policy match types,
/// pkg/monitor/api: `none` for no rule, i.e. a default verdict; `L3-Only` a rule naming peers
/// and no ports; `L3-L4` peers and ports; `L4-Only` ports for every peer; `all` every peer on
/// every port; `L3-Proto` / `Proto-Only` a protocol without ports, with or without peers). The
/// loader classifies the rule behind an event's table row (`events::Names`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatchKind {
    None,
    L3Only,
    L3L4,
    L4Only,
    All,
    L3Proto,
    ProtoOnly,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::None => "none",
            MatchKind::L3Only => "L3-Only",
            MatchKind::L3L4 => "L3-L4",
            MatchKind::L4Only => "L4-Only",
            MatchKind::All => "all",
            MatchKind::L3Proto => "L3-Proto",
            MatchKind::ProtoOnly => "Proto-Only",
        }
    }

    /// The kind of `rule`: whether it names peers (anything but the wildcard) and ports.
    pub fn of(rule: &cnpc_ir::Rule) -> MatchKind {
        use cnpc_ir::{L4Term, Peer};
        let any_peer = rule.peers.iter().any(|p| matches!(p, Peer::Any));
        let ports = rule.l4.iter().any(|t| match t {
            L4Term::Ports { range, .. } => !(range.lo == 0 && range.hi == u16::MAX),
            _ => true,
        });
        match (any_peer, rule.l4.is_empty(), ports) {
            (true, true, _) => MatchKind::All,
            (false, true, _) => MatchKind::L3Only,
            (false, false, false) => MatchKind::L3Proto,
            (true, false, false) => MatchKind::ProtoOnly,
            (false, false, true) => MatchKind::L3L4,
            (true, false, true) => MatchKind::L4Only,
        }
    }
}
label_value!(MatchKind);

/// Why the datapath dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A deny rule, or no rule allowing the flow (default deny).
    Policy,
    /// The flow's row hands it to the L7 proxy, and the handoff failed (no proxy listening, no
    /// proxy device, or a protocol the proxy does not take): the datapath fails closed.
    NoProxy,
}

impl DropReason {
    pub const ALL: [DropReason; 2] = [DropReason::Policy, DropReason::NoProxy];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Policy => "policy",
            DropReason::NoProxy => "no-proxy",
        }
    }
}
label_value!(DropReason);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerdictLabels {
    verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyVerdictLabels {
    direction: DirectionLabel,
    verdict: Verdict,
    r#match: MatchKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: DropReason,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionVerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DnsLabels {
    verdict: &'static str,
}

/// A float gauge.
type GaugeF64 = Gauge<f64, AtomicU64>;

/// The table rows of the enforcing generation that hand flows to the L7 proxy:
/// (subject identity, direction as in events, row; `u32::MAX` for a Proxy default).
type ProxyRows = HashSet<(u32, u8, u32)>;

/// What [`LoaderMetrics::applied`] records of a generation applied.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'a> {
    /// Its number.
    pub generation: u64,
    /// Compile, load and switch time.
    pub elapsed: Duration,
    /// Hooks enforced now.
    pub hooks: usize,
    /// Whether every hook switched (else `/healthz` says no good generation).
    pub all_switched: bool,
    /// Whether it hands flows to the L7 proxy (then `/healthz` needs the proxy listening).
    pub needs_proxy: bool,
    /// Its tables: their Proxy rows tell a failed handoff from a deny in drop events.
    pub tables: &'a [DecisionTable],
}

/// What the loader exposes: the registry and its typed families, plus the state `/healthz`
/// answers from.
#[derive(Debug)]
pub struct LoaderMetrics {
    registry: Registry,
    generation: Gauge,
    swaps: Counter,
    swap_latency: GaugeF64,
    swap_duration: Histogram,
    compile_failures: Counter,
    load_failures: Counter,
    hooks: Gauge,
    proxy_up: Gauge,
    proxy_restarts: Counter,
    fqdn_requests: Counter,
    fqdn_written: Counter,
    fqdn_generations: Counter,
    fqdn_late: Counter,
    fqdn_expired: Counter,
    fqdn_addresses: Family<StateLabels, Gauge>,
    verdict_events: Family<VerdictLabels, Counter>,
    policy_verdicts: Family<PolicyVerdictLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    /// The supervised proxy's request counts, once it runs (read at scrape time).
    l7: Arc<OnceLock<Arc<L7Counts>>>,
    /// Whether a good generation enforces.
    healthy: AtomicBool,
    /// Whether the enforcing generation has rows that hand flows to the L7 proxy.
    needs_proxy: AtomicBool,
    /// Whether the proxy runs with both listeners up (mirrors `cnpc_proxy_up`).
    proxy_listening: AtomicBool,
    /// Rows of the enforcing generation that proxy, to tell a failed handoff from a deny.
    proxy_rows: RwLock<ProxyRows>,
}

impl Default for LoaderMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LoaderMetrics {
    pub fn new() -> LoaderMetrics {
        let mut r = Registry::default();
        let generation = Gauge::default();
        r.register(
            "cnpc_generation",
            "The generation enforcing now",
            generation.clone(),
        );
        let swaps = Counter::default();
        r.register("cnpc_swaps", "Generations applied", swaps.clone());
        let swap_latency = GaugeF64::default();
        r.register_with_unit(
            "cnpc_swap_latency",
            "Compile, load and switch time of the last generation",
            Unit::Seconds,
            swap_latency.clone(),
        );
        let swap_duration = Histogram::new(SWAP_BUCKETS);
        r.register_with_unit(
            "cnpc_swap_duration",
            "Compile, load and switch time of each generation applied",
            Unit::Seconds,
            swap_duration.clone(),
        );
        let compile_failures = Counter::default();
        r.register(
            "cnpc_compile_failures",
            "Policy sets that failed to compile",
            compile_failures.clone(),
        );
        let load_failures = Counter::default();
        r.register(
            "cnpc_load_failures",
            "Generations the kernel refused",
            load_failures.clone(),
        );
        let hooks = Gauge::default();
        r.register(
            "cnpc_hooks",
            "Enforced hooks (two per endpoint)",
            hooks.clone(),
        );
        let proxy_up = Gauge::default();
        r.register(
            "cnpc_proxy_up",
            "Whether the L7 proxy runs with both listeners up",
            proxy_up.clone(),
        );
        let proxy_restarts = Counter::default();
        r.register(
            "cnpc_proxy_restarts",
            "Times the L7 proxy exited and was restarted",
            proxy_restarts.clone(),
        );
        let fqdn_requests = Counter::default();
        r.register(
            "cnpc_fqdn_learn_requests",
            "DNS answers the DNS proxy asked the loader to learn",
            fqdn_requests.clone(),
        );
        let fqdn_written = Counter::default();
        r.register(
            "cnpc_fqdn_addresses_written",
            "fqdn map entries written (addresses learned or changed)",
            fqdn_written.clone(),
        );
        let fqdn_generations = Counter::default();
        r.register(
            "cnpc_fqdn_generations",
            "Generations compiled because an answer needed a new FQDN identity",
            fqdn_generations.clone(),
        );
        let fqdn_late = Counter::default();
        r.register(
            "cnpc_fqdn_hold_exceeded",
            "Answers the loader enforced after the DNS proxy's hold (100 ms) had passed",
            fqdn_late.clone(),
        );
        let fqdn_expired = Counter::default();
        r.register(
            "cnpc_fqdn_addresses_expired",
            "Learned addresses whose TTL ended",
            fqdn_expired.clone(),
        );
        let fqdn_addresses = Family::<StateLabels, Gauge>::default();
        r.register(
            "cnpc_fqdn_addresses",
            "Addresses learned from DNS, live and zombie (expired, kept for connections)",
            fqdn_addresses.clone(),
        );
        let verdict_events = Family::<VerdictLabels, Counter>::default();
        r.register(
            "cnpc_verdict_events",
            "Verdict events from the programs: new connections (allowed, proxied) and drops",
            verdict_events.clone(),
        );
        let policy_verdicts = Family::<PolicyVerdictLabels, Counter>::default();
        r.register(
            "cnpc_policy_verdicts",
            "Policy verdicts of the datapath by direction, verdict and what matched \
             (as cilium_policy_verdict): new connections and drops",
            policy_verdicts.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        r.register(
            "cnpc_drops",
            "Packets the datapath dropped, by reason: policy (a deny or no allowing rule), \
             no-proxy (a flow for the L7 proxy that it could not take)",
            drops.clone(),
        );
        let l7 = Arc::new(OnceLock::new());
        r.register_collector(Box::new(L7Collector(l7.clone())));
        // Every series that has a fixed label set shows from the start, zeros included, so
        // rates work from the first scrape.
        for state in ["live", "zombie"] {
            let _ = fqdn_addresses.get_or_create(&StateLabels { state });
        }
        for verdict in Verdict::ALL {
            let _ = verdict_events.get_or_create(&VerdictLabels { verdict });
            for direction in [IrDirection::Ingress, IrDirection::Egress] {
                let _ = policy_verdicts.get_or_create(&PolicyVerdictLabels {
                    direction: DirectionLabel(direction),
                    verdict,
                    r#match: MatchKind::All,
                });
            }
        }
        for reason in DropReason::ALL {
            let _ = drops.get_or_create(&DropLabels { reason });
        }
        LoaderMetrics {
            registry: r,
            generation,
            swaps,
            swap_latency,
            swap_duration,
            compile_failures,
            load_failures,
            hooks,
            proxy_up,
            proxy_restarts,
            fqdn_requests,
            fqdn_written,
            fqdn_generations,
            fqdn_late,
            fqdn_expired,
            fqdn_addresses,
            verdict_events,
            policy_verdicts,
            drops,
            l7,
            healthy: AtomicBool::new(false),
            needs_proxy: AtomicBool::new(false),
            proxy_listening: AtomicBool::new(false),
            proxy_rows: RwLock::new(HashSet::new()),
        }
    }

    /// The registry, to encode or to add to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The generation enforcing (also set at start from the adopted state).
    pub fn set_generation(&self, generation: u64) {
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// A generation was applied.
    pub fn applied(&self, a: Applied<'_>) {
        self.set_generation(a.generation);
        self.swaps.inc();
        self.swap_latency.set(a.elapsed.as_secs_f64());
        self.swap_duration.observe(a.elapsed.as_secs_f64());
        self.set_hooks(a.hooks);
        self.healthy.store(a.all_switched, Ordering::Relaxed);
        self.needs_proxy.store(a.needs_proxy, Ordering::Relaxed);
        *self.proxy_rows.write().unwrap_or_else(|p| p.into_inner()) = proxy_rows(a.tables);
    }

    /// Hooks enforced now (two per endpoint).
    pub fn set_hooks(&self, hooks: usize) {
        self.hooks.set(i64::try_from(hooks).unwrap_or(i64::MAX));
    }

    pub fn compile_failed(&self) {
        self.compile_failures.inc();
    }

    pub fn load_failed(&self) {
        self.load_failures.inc();
    }

    /// The L7 proxy's state: whether it listens, and how often it was restarted in all.
    pub fn set_proxy(&self, up: bool, restarts: u64) {
        self.proxy_up.set(i64::from(up));
        self.proxy_listening.store(up, Ordering::Relaxed);
        let seen = self.proxy_restarts.get();
        if restarts > seen {
            self.proxy_restarts.inc_by(restarts - seen);
        }
    }

    /// The supervised proxy's request counts, read at each scrape from now on.
    pub fn set_l7(&self, counts: Arc<L7Counts>) {
        let _ = self.l7.set(counts);
    }

    /// A learning request from the DNS proxy.
    pub fn fqdn_learn_request(&self) {
        self.fqdn_requests.inc();
    }

    /// A learning request that needed a new generation.
    pub fn fqdn_generation(&self) {
        self.fqdn_generations.inc();
    }

    /// What the learning side did: map entries written, answers enforced after the proxy's
    /// hold, addresses expired; and the addresses held now, live and zombie.
    pub fn fqdn_learned(
        &self,
        written: usize,
        late: usize,
        expired: usize,
        live: usize,
        zombies: usize,
    ) {
        self.fqdn_written.inc_by(written as u64);
        self.fqdn_late.inc_by(late as u64);
        self.fqdn_expired.inc_by(expired as u64);
        for (state, n) in [("live", live), ("zombie", zombies)] {
            self.fqdn_addresses
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A policy verdict of the datapath (Cilium's `cilium_policy_verdict`).
    pub fn policy_verdict(&self, direction: IrDirection, verdict: Verdict, match_kind: MatchKind) {
        self.policy_verdicts
            .get_or_create(&PolicyVerdictLabels {
                direction: DirectionLabel(direction),
                verdict,
                r#match: match_kind,
            })
            .inc();
    }

    /// A packet the datapath dropped.
    pub fn dropped(&self, reason: DropReason) {
        self.drops.get_or_create(&DropLabels { reason }).inc();
    }

    /// One verdict event of the programs' ring buffer (layout: `cnpc_codegen_bpf::gen::event`):
    /// counts it in `cnpc_verdict_events_total`, `cnpc_policy_verdicts_total` and, for a drop,
    /// `cnpc_drops_total` (`no-proxy` when its row is one of the enforcing generation's Proxy
    /// rows, since a Proxy row drops only when the handoff fails; else `policy`). Returns the
    /// verdict, or `None` for a malformed event (counted nowhere).
    pub fn verdict_event(&self, event: &[u8], match_kind: MatchKind) -> Option<Verdict> {
        use cnpc_codegen_bpf::gen::event;
        let u32_at = |at: usize| {
            event
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
        };
        let verdict = Verdict::from_event(*event.get(event::VERDICT)?)?;
        let direction_byte = *event.get(event::DIRECTION)?;
        let direction = match direction_byte {
            0 => IrDirection::Ingress,
            1 => IrDirection::Egress,
            _ => return None,
        };
        self.verdict_events
            .get_or_create(&VerdictLabels { verdict })
            .inc();
        self.policy_verdict(direction, verdict, match_kind);
        if verdict == Verdict::Denied {
            let proxied_row = match (u32_at(event::SUBJECT), u32_at(event::ROW)) {
                (Some(subject), Some(row)) => self
                    .proxy_rows
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&(subject, direction_byte, row)),
                _ => false,
            };
            self.dropped(if proxied_row {
                DropReason::NoProxy
            } else {
                DropReason::Policy
            });
        }
        Some(verdict)
    }

    /// Whether a good generation enforces.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// `/healthz`: the status and its body.
    pub fn health(&self) -> (StatusCode, &'static str) {
        if !self.healthy.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, "no good generation\n")
        } else if self.needs_proxy.load(Ordering::Relaxed)
            && !self.proxy_listening.load(Ordering::Relaxed)
        {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "L7 proxy not listening: proxied flows are dropped\n",
            )
        } else {
            (StatusCode::OK, "ok\n")
        }
    }

    /// The Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String fails only if an encoder does, which ours do not.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry);
        s
    }

    /// The OpenMetrics text format (ends with `# EOF`).
    pub fn render_openmetrics(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// The rows of `tables` that hand flows to the L7 proxy, keyed as verdict events name them.
fn proxy_rows(tables: &[DecisionTable]) -> ProxyRows {
    let mut rows = HashSet::new();
    for t in tables {
        let direction = u8::from(t.direction == IrDirection::Egress);
        for (i, r) in t.rows.iter().enumerate() {
            if matches!(r.verdict, TableVerdict::Proxy(_)) {
                rows.insert((t.subject.0, direction, i as u32));
            }
        }
        if matches!(t.default, TableVerdict::Proxy(_)) {
            rows.insert((t.subject.0, direction, u32::MAX));
        }
    }
    rows
}

/// Reads the proxy's request counts when scraped.
#[derive(Debug)]
struct L7Collector(Arc<OnceLock<Arc<L7Counts>>>);

impl Collector for L7Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counts) = self.0.get() else {
            return Ok(());
        };
        {
            let mut metric = encoder.encode_descriptor(
                "cnpc_dns_queries",
                "DNS queries the DNS proxy judged, by verdict (denied ones got REFUSED).",
                None,
                MetricType::Counter,
            )?;
            for (verdict, n) in counts.dns() {
                ConstCounter::new(n).encode(metric.encode_family(&DnsLabels { verdict })?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "cnpc_l7_requests",
            "HTTP requests the L7 proxy judged, by direction and verdict.",
            None,
            MetricType::Counter,
        )?;
        for (direction, verdict, n) in counts.all() {
            ConstCounter::new(n)
                .encode(metric.encode_family(&DirectionVerdictLabels { direction, verdict })?)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` on `addr` from a thread of its own (hyper on a
/// current-thread tokio runtime). Binding happens before this returns, so a bad or busy
/// address is an error here; the address bound (a port 0 chosen) is returned with the thread.
pub fn spawn_server(
    addr: SocketAddr,
    metrics: Arc<LoaderMetrics>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("cnpc-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics not served");
                        return;
                    }
                };
                serve(listener, metrics).await;
            })
        })?;
    Ok((local, thread))
}

/// Accepts connections for ever, one task each; one request per connection.
async fn serve(listener: tokio::net::TcpListener, metrics: Arc<LoaderMetrics>) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The answer to one request.
fn respond(metrics: &LoaderMetrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            if openmetrics {
                text(
                    StatusCode::OK,
                    OPENMETRICS_TEXT,
                    metrics.render_openmetrics(),
                )
            } else {
                text(StatusCode::OK, PROMETHEUS_TEXT, metrics.render())
            }
        }
        "/healthz" => {
            let (status, body) = metrics.health();
            text(status, PLAIN, body.into())
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_codegen_bpf::gen::{event, EVENT_SIZE};
    use cnpc_ir::{IdentityClass, NumericIdentity, PortRange, Protocol, RuleRef, TableRow};
    use std::io::{Read, Write};

    /// A sample's value by its name and labels as printed.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    fn event(subject: u32, row: u32, verdict: u8, direction: u8) -> Vec<u8> {
        let mut e = vec![0u8; EVENT_SIZE];
        e[event::SUBJECT..event::SUBJECT + 4].copy_from_slice(&subject.to_le_bytes());
        e[event::ROW..event::ROW + 4].copy_from_slice(&row.to_le_bytes());
        e[event::VERDICT] = verdict;
        e[event::DIRECTION] = direction;
        e[event::FAMILY] = 4;
        e
    }

    /// Identity 500's egress: row 0 proxies TCP/80, row 1 denies TCP/22, default deny.
    fn tables() -> Vec<DecisionTable> {
        let row = |port: u16, verdict: TableVerdict| TableRow {
            class: 0,
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            verdict,
        };
        vec![DecisionTable {
            subject: NumericIdentity(500),
            direction: IrDirection::Egress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(600)],
            }],
            rows: vec![
                row(80, TableVerdict::Proxy(Vec::<RuleRef>::new())),
                row(22, TableVerdict::Deny),
            ],
        }]
    }

    #[test]
    fn families_and_labels() {
        let m = LoaderMetrics::new();
        let text = m.render();
        // Fixed label sets show before anything happened.
        assert_eq!(
            value(&text, r#"cnpc_verdict_events_total{verdict="denied"}"#),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"cnpc_drops_total{reason="no-proxy"}"#),
            Some(0.0)
        );
        assert!(!text.contains("cnpc_l7_requests"), "no proxy yet:\n{text}");

        m.applied(Applied {
            generation: 7,
            elapsed: Duration::from_millis(30),
            hooks: 4,
            all_switched: true,
            needs_proxy: true,
            tables: &tables(),
        });
        m.applied(Applied {
            generation: 8,
            elapsed: Duration::from_millis(3),
            hooks: 4,
            all_switched: true,
            needs_proxy: true,
            tables: &tables(),
        });
        m.compile_failed();
        m.load_failed();
        m.load_failed();
        m.set_proxy(true, 2);
        m.set_proxy(true, 3);
        m.fqdn_learn_request();
        m.fqdn_generation();
        m.fqdn_learned(3, 0, 1, 2, 1);
        let counts = Arc::new(L7Counts::default());
        m.set_l7(counts);
        // Allowed egress, proxied egress, a deny row, the proxy row dropping (no proxy), a
        // default deny at ingress, and two malformed events.
        for e in [
            event(500, 5, 0, 1),
            event(500, 0, 2, 1),
            event(500, 1, 1, 1),
            event(500, 0, 1, 1),
            event(500, u32::MAX, 1, 0),
            event(500, 0, 7, 1),
            vec![0; 4],
        ] {
            m.verdict_event(&e, MatchKind::All);
        }
        let text = m.render();
        for (series, want) in [
            ("cnpc_generation", 8.0),
            ("cnpc_swaps_total", 2.0),
            ("cnpc_swap_latency_seconds", 0.003),
            ("cnpc_swap_duration_seconds_count", 2.0),
            ("cnpc_swap_duration_seconds_sum", 0.033),
            (r#"cnpc_swap_duration_seconds_bucket{le="0.005"}"#, 1.0),
            (r#"cnpc_swap_duration_seconds_bucket{le="0.05"}"#, 2.0),
            (r#"cnpc_swap_duration_seconds_bucket{le="+Inf"}"#, 2.0),
            ("cnpc_compile_failures_total", 1.0),
            ("cnpc_load_failures_total", 2.0),
            ("cnpc_hooks", 4.0),
            ("cnpc_proxy_up", 1.0),
            ("cnpc_proxy_restarts_total", 3.0),
            ("cnpc_fqdn_learn_requests_total", 1.0),
            ("cnpc_fqdn_addresses_written_total", 3.0),
            ("cnpc_fqdn_generations_total", 1.0),
            ("cnpc_fqdn_hold_exceeded_total", 0.0),
            ("cnpc_fqdn_addresses_expired_total", 1.0),
            (r#"cnpc_fqdn_addresses{state="live"}"#, 2.0),
            (r#"cnpc_fqdn_addresses{state="zombie"}"#, 1.0),
            (r#"cnpc_dns_queries_total{verdict="allowed"}"#, 0.0),
            (r#"cnpc_dns_queries_total{verdict="denied"}"#, 0.0),
            (
                r#"cnpc_l7_requests_total{direction="ingress",verdict="denied"}"#,
                0.0,
            ),
            (
                r#"cnpc_l7_requests_total{direction="egress",verdict="allowed"}"#,
                0.0,
            ),
            (r#"cnpc_verdict_events_total{verdict="allowed"}"#, 1.0),
            (r#"cnpc_verdict_events_total{verdict="denied"}"#, 3.0),
            (r#"cnpc_verdict_events_total{verdict="proxied"}"#, 1.0),
            (
                r#"cnpc_policy_verdicts_total{direction="egress",verdict="allowed",match="all"}"#,
                1.0,
            ),
            (
                r#"cnpc_policy_verdicts_total{direction="egress",verdict="proxied",match="all"}"#,
                1.0,
            ),
            (
                r#"cnpc_policy_verdicts_total{direction="egress",verdict="denied",match="all"}"#,
                2.0,
            ),
            (
                r#"cnpc_policy_verdicts_total{direction="ingress",verdict="denied",match="all"}"#,
                1.0,
            ),
            (
                r#"cnpc_policy_verdicts_total{direction="ingress",verdict="allowed",match="all"}"#,
                0.0,
            ),
            (r#"cnpc_drops_total{reason="policy"}"#, 2.0),
            (r#"cnpc_drops_total{reason="no-proxy"}"#, 1.0),
        ] {
            let got = value(&text, series);
            assert!(
                got.is_some_and(|v| (v - want).abs() < 1e-9),
                "{series}: {got:?}, want {want}\n{text}"
            );
        }
        for (name, kind) in [
            ("cnpc_swaps_total", "counter"),
            ("cnpc_swap_latency_seconds", "gauge"),
            ("cnpc_swap_duration_seconds", "histogram"),
            ("cnpc_policy_verdicts_total", "counter"),
            ("cnpc_drops_total", "counter"),
            ("cnpc_l7_requests_total", "counter"),
            ("cnpc_dns_queries_total", "counter"),
            ("cnpc_fqdn_addresses", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind}:\n{text}"
            );
        }
        // OpenMetrics: the family names, the unit and the end marker.
        let om = m.render_openmetrics();
        assert!(om.contains("# TYPE cnpc_policy_verdicts counter\n"), "{om}");
        assert!(
            om.contains("# UNIT cnpc_swap_duration_seconds seconds\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(
            value(&om, r#"cnpc_drops_total{reason="no-proxy"}"#),
            Some(1.0)
        );
    }

    /// `GET path` over HTTP/1.1 without `Connection: close`, read to the end (as the
    /// end-to-end tests scrape): (status line, headers, body).
    fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (String, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap();
        (status.into(), headers.to_ascii_lowercase(), body.into())
    }

    #[test]
    fn http_round_trip() {
        let m = Arc::new(LoaderMetrics::new());
        let (addr, _thread) = spawn_server("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();

        let (status, headers, body) = get(addr, "/healthz", None);
        assert!(status.contains("503"), "{status}");
        assert_eq!(body, "no good generation\n");
        assert!(headers.contains("connection: close"), "{headers}");

        // A generation that proxies, with no proxy listening.
        m.applied(Applied {
            generation: 1,
            elapsed: Duration::from_millis(10),
            hooks: 2,
            all_switched: true,
            needs_proxy: true,
            tables: &tables(),
        });
        let (status, _, body) = get(addr, "/healthz", None);
        assert!(status.contains("503"), "{status}");
        assert_eq!(body, "L7 proxy not listening: proxied flows are dropped\n");

        m.set_proxy(true, 0);
        let (status, _, body) = get(addr, "/healthz", None);
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, "ok\n");

        // A generation whose hooks did not all switch is not healthy.
        m.applied(Applied {
            generation: 2,
            elapsed: Duration::from_millis(10),
            hooks: 2,
            all_switched: false,
            needs_proxy: false,
            tables: &[],
        });
        assert!(get(addr, "/healthz", None).0.contains("503"));
        m.set_healthy(true);
        assert!(get(addr, "/healthz", None).0.contains("200"));

        m.verdict_event(&event(500, 1, 1, 1), MatchKind::None);
        let (status, headers, body) = get(addr, "/metrics", None);
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        assert!(headers.contains("content-length:"), "{headers}");
        assert_eq!(value(&body, "cnpc_generation"), Some(2.0), "{body}");
        assert_eq!(
            value(&body, r#"cnpc_drops_total{reason="policy"}"#),
            Some(1.0),
            "{body}"
        );

        let (status, headers, body) = get(
            addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains("content-type: application/openmetrics-text"),
            "{headers}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        let (status, _, body) = get(addr, "/nope", None);
        assert!(status.contains("404"), "{status}");
        assert_eq!(body, "not found\n");

        // A client that connects and says nothing does not hold up the others.
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        assert!(get(addr, "/healthz", None).0.contains("200"));
    }

    #[test]
    fn busy_address_is_an_error() {
        let m = Arc::new(LoaderMetrics::new());
        let (addr, _thread) = spawn_server("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();
        assert!(spawn_server(addr, m).is_err());
    }
}
