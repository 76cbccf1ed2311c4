//! `cnpc-loader`: keeps this node's kernel in step with policy files and a cluster snapshot.
//!
//! Standalone mode (the default): `cnpc-loader --policies DIR --cluster FILE` compiles, loads
//! and attaches, then watches both paths; a change is compiled at once and swapped in atomically
//! once the files have been quiet for the debounce time (`cnpc_runtime_loader::settle`).
//! A policy set that fails to compile or load leaves the last good generation enforcing and is
//! retried on the next change; endpoints with no good generation yet get a deny-all program.
//! SIGUSR1 swaps every hook to a freshly loaded equivalent generation (for tests and drills).
//! Logs go to stderr (tracing, `RUST_LOG` filters); `/healthz` and `/metrics` (Prometheus or
//! OpenMetrics text, `cnpc_runtime_loader::metrics`) are served on loopback.
//!
//! The pinned state (links, conntrack, events) outlives the process: `kill -9` leaves
//! enforcement in place, and a restarted loader adopts it and swaps only what changed.

use clap::Parser;
use cnpc_runtime_loader::generation::{self, Generation};
use cnpc_runtime_loader::loader::{AttachMode, Config, Loader};
use cnpc_runtime_loader::metrics::LoaderMetrics;
use cnpc_runtime_loader::settle::{Settle, Step};
use cnpc_runtime_loader::{events, fqdn, l7, metrics, node, sys};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "cnpc-loader",
    version,
    about = "Load cnpc's compiled policy into the kernel and keep it in step"
)]
struct Args {
    /// Policy files or directories (watched).
    #[arg(long, required_unless_present = "kubernetes", num_args = 1..)]
    policies: Vec<PathBuf>,
    /// The cluster snapshot (watched).
    #[arg(long, required_unless_present = "kubernetes")]
    cluster: Option<PathBuf>,
    /// Where links and shared maps are pinned (a bpffs directory).
    #[arg(long, default_value = "/sys/fs/bpf/cnpc")]
    pin_dir: PathBuf,
    /// Where the state file and the identity allocation are kept.
    #[arg(long, default_value = "/run/cnpc")]
    state_dir: PathBuf,
    /// Address of /healthz and /metrics (loopback by default); `off` disables them.
    #[arg(long, default_value = "127.0.0.1:9963")]
    metrics: String,
    /// Quiet time after a change before it is enforced (standalone mode compiles at once and
    /// applies the result when the quiet time ends; Kubernetes mode waits, then compiles).
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// How to attach: TCX links where the kernel has them, else clsact filters (auto), or one
    /// of the two.
    #[arg(long, value_enum, default_value = "auto")]
    attach: Attach,
    /// Apply once and exit (the pinned state keeps enforcing).
    #[arg(long)]
    once: bool,
    /// Kubernetes mode (the DaemonSet): watch the API server instead of files.
    #[arg(long)]
    kubernetes: bool,
    /// This node's name (Kubernetes mode; the downward API sets NODE_NAME).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Namespace of the identity ConfigMap (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    namespace: String,
    /// The L7 proxy binary to supervise (default: `cnpc-proxy` beside this binary).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// Run without the L7 stage: no proxy, no proxy routes. Proxied flows are then dropped.
    #[arg(long)]
    no_l7: bool,
    /// Least time an address learned from DNS stays, whatever its record's TTL (seconds;
    /// Cilium's --tofqdns-min-ttl).
    #[arg(long, default_value_t = 0)]
    fqdn_min_ttl: u32,
}

/// What wakes the daemon loop.
enum Wake {
    /// A watched input file changed (when the watcher saw it).
    Files(Instant),
    /// The DNS proxy asks to learn an answer's addresses.
    Learn(fqdn::Pending),
}

/// A compile's result, with the routes it was made for and when it started.
struct Compiled {
    result: Result<Generation, generation::CompileError>,
    routes: Vec<node::Route>,
    start: Instant,
    /// `Runner::learning_changes` when it was compiled.
    learning_changes: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Attach {
    Auto,
    Tcx,
    Clsact,
}

static FORCE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    FORCE.store(true, Ordering::SeqCst);
}

struct Runner {
    args: Args,
    loader: Loader,
    proxy: Option<l7::ProxySupervisor>,
    allocation: cnpc_compiler::lower::Allocation,
    /// The policy files and snapshot as last compiled: an edit recompiles only what changed.
    inputs: generation::Incremental,
    metrics: Arc<LoaderMetrics>,
    /// Addresses learned from DNS (see `fqdn::Learning`).
    learning: fqdn::Learning,
    /// Counts changes to what was learned (addresses written, names expired): a compile
    /// result from before one carries an older view of the learned addresses.
    learning_changes: u64,
    /// Pod names of the enforcing generation, for the event stream.
    names: Arc<std::sync::RwLock<events::Names>>,
}

impl Runner {
    fn allocation_path(&self) -> PathBuf {
        self.args.state_dir.join("identities.json")
    }

    /// Writes the identity allocation (temp file + rename), so a restart keeps the numbers.
    fn save_allocation(&self) {
        let Ok(text) = serde_json::to_string_pretty(&self.allocation) else {
            return;
        };
        let path = self.allocation_path();
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_err()
        {
            warn!(path = %path.display(), "cannot save the identity allocation");
        }
    }

    fn cluster(&self) -> PathBuf {
        self.args.cluster.clone().unwrap_or_default()
    }

    fn fqdn_path(&self) -> PathBuf {
        self.args.state_dir.join("fqdn.json")
    }

    /// Counts what the learning side did, and saves what it learned when something is new
    /// (a loader killed right after an answer still knows the address when it comes back).
    fn learned(&mut self, r: fqdn::LearningReport) {
        if r.written > 0 || r.expired > 0 || r.needs_generation {
            self.learning_changes += 1;
        }
        let (live, zombies) = self.learning.state.counts();
        self.metrics
            .fqdn_learned(r.written, r.late, r.expired, live, zombies);
        // Saved at once when the map changed (a loader killed right after an answer still
        // knows the address when it comes back); otherwise with the next tick.
        if r.written > 0 && self.learning.state.has_new() {
            self.save_learned();
        }
    }

    fn save_learned(&mut self) {
        let path = self.fqdn_path();
        if let Err(e) = self.learning.state.save(&path) {
            warn!(error = %e, "cannot save the learned addresses");
        }
    }

    /// A learning request from the DNS proxy; true when it waits for a new generation, which
    /// the caller compiles at once (no debounce: the proxy holds the answer meanwhile).
    fn learn(&mut self, p: fqdn::Pending) -> bool {
        use std::os::fd::AsFd;
        self.metrics.fqdn_learn_request();
        let r = self
            .learning
            .handle(self.loader.fqdn_map().as_fd(), p, Instant::now());
        self.learned(r);
        if r.needs_generation {
            self.metrics.fqdn_generation();
        }
        r.needs_generation
    }

    /// Ends expired names (zombies stay while conntrack has their connections) and saves the
    /// state; true when the map needs an identity the enforcing generation lacks (compile).
    fn expire_fqdn(&mut self) -> bool {
        use std::os::fd::AsFd;
        let r = self
            .learning
            .tick(self.loader.fqdn_map().as_fd(), self.loader.ct_map().as_fd());
        let needs_generation = match r {
            Ok(r) => {
                self.learned(r);
                r.needs_generation
            }
            Err(e) => {
                warn!(error = %e, "expiring learned addresses failed; retried in a second");
                false
            }
        };
        self.save_learned();
        needs_generation
    }

    /// Serves the DNS proxy's learning socket; requests arrive on the returned channel.
    fn serve_learning(&self) -> Option<mpsc::Receiver<fqdn::Pending>> {
        self.proxy.as_ref()?;
        let (tx, rx) = mpsc::channel();
        let socket = self.args.state_dir.join("fqdn.sock");
        match fqdn::serve(&socket, tx) {
            Ok(()) => Some(rx),
            Err(e) => {
                error!(
                    path = %socket.display(),
                    error = %e,
                    "cannot serve the learning socket: addresses from DNS are not learned"
                );
                None
            }
        }
    }

    /// Compiles the files and applies; returns whether a good generation now enforces.
    fn reconcile(&mut self, force: bool) -> bool {
        let compiled = self.compile(false);
        self.apply_compiled(compiled, force)
    }

    /// Compiles the files as they are now, for [`Self::apply_compiled`]. An `early` compile
    /// (files may still be being written) counts errors without reporting them.
    fn compile(&mut self, early: bool) -> Compiled {
        let start = Instant::now();
        let routes = node::routes();
        let (policies, cluster) = (&self.args.policies, self.cluster());
        let fqdn = Some(&mut self.learning.state);
        let errors = if early {
            generation::Errors::Count
        } else {
            generation::Errors::Report
        };
        let result = self.inputs.compile(
            policies,
            &cluster,
            &self.allocation,
            Some(&routes),
            fqdn,
            errors,
        );
        Compiled {
            result,
            routes,
            start,
            learning_changes: self.learning_changes,
        }
    }

    /// Whether a held compile result can be applied as it is: its errors, if any, were
    /// reported (`Errors::Count` only counts them, for the full checker to report), the routes
    /// it was made for are the node's, and nothing was learned or expired since (applying it
    /// would take back what was: the `fqdn` map is rewritten to the generation's view).
    fn applicable(&self, compiled: &Compiled) -> bool {
        !matches!(
            compiled.result,
            Err(generation::CompileError::Unreported { .. })
        ) && compiled.learning_changes == self.learning_changes
            && compiled.routes == node::routes()
    }

    /// Applies what [`Self::compile`] gave; returns whether a good generation now enforces.
    fn apply_compiled(&mut self, compiled: Compiled, force: bool) -> bool {
        let Compiled {
            result,
            routes,
            start,
            ..
        } = compiled;
        let result = result.map_err(|e| e.to_string());
        let endpoints = || {
            generation::compile(&[], &self.cluster(), &self.allocation, Some(&[]), None)
                .map(|g| Arc::unwrap_or_clone(g.endpoints))
                .map_err(|e| e.to_string())
        };
        let endpoints = if result.is_err() {
            endpoints()
        } else {
            Ok(Vec::new())
        };
        let ok = self.apply(result, &routes, force, start, endpoints);
        if !ok {
            self.learning.generation_failed();
        }
        ok
    }

    /// Applies a compile result: a generation, or an error that leaves the last good
    /// generation enforcing (and deny-all on `endpoints` that have no program).
    fn apply(
        &mut self,
        result: Result<Generation, String>,
        routes: &[node::Route],
        force: bool,
        start: Instant,
        endpoints: Result<Vec<generation::EndpointInfo>, String>,
    ) -> bool {
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                self.metrics.compile_failed();
                error!(error = %e, "compile failed; the last good generation keeps enforcing");
                self.protect_unenforced(endpoints);
                return false;
            }
        };
        match self.loader.apply(&g, routes, force) {
            Ok(r) => {
                {
                    let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
                    *names = events::Names::after(&g, &names);
                }
                // The programs know the generation's FQDN identities now: the map may name them.
                use std::os::fd::AsFd;
                match self
                    .learning
                    .generation_applied(self.loader.fqdn_map().as_fd(), g.fqdn.clone())
                {
                    Ok(r) => self.learned(r),
                    Err(e) => error!(error = %e, "cannot write learned addresses to the fqdn map"),
                }
                let elapsed = start.elapsed();
                // Saved when it changed (thousands of identities: not on every edit).
                if self.allocation != g.allocation {
                    self.allocation = g.allocation.clone();
                    self.save_allocation();
                }
                self.metrics.applied(metrics::Applied {
                    generation: r.generation,
                    elapsed,
                    hooks: self.loader.state().hooks.len(),
                    all_switched: r.failed.is_empty(),
                    needs_proxy: g.proxy.rules.values().next().is_some(),
                    tables: &g.tables,
                });
                info!(
                    generation = r.generation,
                    attached = r.attached,
                    swapped = r.swapped,
                    unchanged = r.unchanged,
                    detached = r.detached,
                    programs = r.programs_loaded,
                    ipcache_updated = r.ipcache_updated,
                    check_ms = g.check_time.as_secs_f64() * 1e3,
                    lower_ms = g.lower_time.as_secs_f64() * 1e3,
                    tables_ms = g.tables_time.as_secs_f64() * 1e3,
                    not_here = r.not_here,
                    load_ms = r.load_time.as_secs_f64() * 1e3,
                    switch_ms = r.switch_time.as_secs_f64() * 1e3,
                    proxy_acknowledged = ?r.proxy_acknowledged,
                    proxy_wait_ms = r.proxy_wait.as_secs_f64() * 1e3,
                    total_ms = elapsed.as_secs_f64() * 1e3,
                    "applied"
                );
                for f in &r.failed {
                    warn!(hook = %f, "hook not switched");
                }
                true
            }
            Err(e) => {
                self.metrics.load_failed();
                error!(error = %e, "load failed; the last good generation keeps enforcing");
                self.protect_unenforced(Ok(g.endpoints.to_vec()));
                false
            }
        }
    }

    /// Keeps the L7 proxy running and its state in the metrics.
    fn supervise_proxy(&mut self) {
        let Some(p) = &mut self.proxy else { return };
        if let Err(e) = p.poll() {
            error!(error = %e, "cannot start the L7 proxy; proxied flows are dropped");
        }
        let up = p.up();
        self.metrics.set_proxy(up, p.restarts());
    }

    /// Endpoints of the snapshot that have no program yet get a deny-all one.
    fn protect_unenforced(&mut self, endpoints: Result<Vec<generation::EndpointInfo>, String>) {
        let endpoints = match endpoints {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "the cluster snapshot is unreadable: no endpoints to protect");
                return;
            }
        };
        let routes = node::routes();
        let interfaces: Vec<String> = endpoints
            .iter()
            .filter_map(|e| node::interface_for(e.interface.as_deref(), &e.ips, &routes))
            .collect();
        match self.loader.deny_all(&interfaces) {
            Ok(0) => {}
            Ok(n) => warn!(
                hooks = n,
                "deny-all attached where no good generation enforces yet"
            ),
            Err(e) => error!(error = %e, "cannot attach deny-all"),
        }
        self.metrics.set_hooks(self.loader.state().hooks.len());
    }
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let proxy_policy = args.state_dir.join("proxy/policy.json");
    let cfg = Config {
        pin_dir: args.pin_dir.clone(),
        state_file: args.state_dir.join("state.json"),
        proxy_policy: (!args.no_l7).then(|| proxy_policy.clone()),
        attach: match args.attach {
            Attach::Auto => AttachMode::Auto,
            Attach::Tcx => AttachMode::Tcx,
            Attach::Clsact => AttachMode::Clsact,
        },
        ..Config::default()
    };
    let mut loader = match Loader::open(cfg) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot open the pinned state");
            return ExitCode::from(2);
        }
    };
    info!(
        adopted = loader.adopted(),
        generation = loader.state().generation,
        pin_dir = %args.pin_dir.display(),
        "pinned state opened"
    );
    let metrics = Arc::new(LoaderMetrics::new());
    metrics.set_generation(loader.state().generation);
    if args.metrics != "off" {
        match args
            .metrics
            .parse::<SocketAddr>()
            .map_err(|e| e.to_string())
            .and_then(|a| metrics::spawn_server(a, metrics.clone()).map_err(|e| e.to_string()))
        {
            Ok((address, _)) => info!(%address, "serving /metrics and /healthz"),
            Err(e) => warn!(address = %args.metrics, error = %e, "metrics not served"),
        }
    }
    // The event stream (`cnpc observe`): verdict events of the programs and the proxy's
    // request and query events, as records naming the pods of the enforcing generation.
    let hub = Arc::new(events::Hub::new(events::KEEP));
    let names = Arc::new(std::sync::RwLock::new(events::Names::default()));
    let events_socket = args.state_dir.join("events.sock");
    if let Err(e) = events::serve(&events_socket, hub.clone()) {
        warn!(path = %events_socket.display(), error = %e, "events not served: cnpc observe cannot read them");
    }
    // Verdict events: counted and published as the programs report them.
    match sys::RingBuf::new(
        loader.events(),
        cnpc_codegen_bpf::gen::EVENTS_BYTES as usize,
    ) {
        Ok(mut ring) => {
            let m = metrics.clone();
            let (hub, names) = (hub.clone(), names.clone());
            std::thread::spawn(move || loop {
                for e in ring.drain() {
                    let names = names.read().unwrap_or_else(|p| p.into_inner());
                    let parsed = events::VerdictEvent::parse(&e);
                    let kind = parsed
                        .as_ref()
                        .map_or(metrics::MatchKind::None, |v| names.decided(v).1);
                    m.verdict_event(&e, kind);
                    let Ok(v) = parsed else {
                        continue;
                    };
                    let record = events::record(&v, &names, std::time::SystemTime::now());
                    if let Ok(json) = serde_json::to_string(&record) {
                        hub.publish(json);
                    }
                }
                // Polled often enough that a follower sees a flow well within 100 ms.
                std::thread::sleep(Duration::from_millis(10));
            });
        }
        Err(e) => warn!(error = %e, "verdict events not read"),
    }
    let allocation = cnpc_compiler::lower::read_allocation(&args.state_dir.join("identities.json"))
        .unwrap_or_default();
    let proxy = if args.no_l7 {
        None
    } else {
        if let Err(e) = l7::install_routes() {
            error!(error = %e, "cannot route packets to the L7 proxy; proxied flows are dropped");
        }
        let device = l7::ensure_device()
            .map_err(|e| e.to_string())
            .and_then(|_| {
                loader
                    .attach_proxy_device(l7::PROXY_DEVICE)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = device {
            error!(error = %e, "no proxy device: ingress flows for the L7 proxy are dropped");
        }
        let bin = args.proxy.clone().or_else(|| {
            std::env::current_exe()
                .ok()
                .map(|exe| l7::proxy_beside(&exe))
        });
        bin.map(|bin| {
            l7::ProxySupervisor::new(bin, proxy_policy, Some(args.state_dir.join("proxy.log")))
                .with_learn_socket(args.state_dir.join("fqdn.sock"))
                .with_events(hub.clone(), names.clone())
        })
    };
    if let Some(p) = &proxy {
        metrics.set_l7(p.counts());
    }
    let mut fqdn_state =
        fqdn::FqdnState::load(&args.state_dir.join("fqdn.json"), args.fqdn_min_ttl).unwrap_or_else(
            |e| {
                warn!(error = %e, "learned addresses not read; starting without them");
                fqdn::FqdnState::new(args.fqdn_min_ttl)
            },
        );
    // The pinned map may name identities the state file does not know (lost, older): new
    // numbers go above them.
    match sys::map_entries(
        loader.fqdn_map(),
        cnpc_codegen_bpf::gen::HOSTS_KEY_SIZE as usize,
        4,
    ) {
        Ok(entries) => {
            for (_, v) in entries {
                if let Ok(v) = <[u8; 4]>::try_from(v.as_slice()) {
                    fqdn_state.reserve_above(u32::from_le_bytes(v));
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot read the pinned fqdn map"),
    }
    let mut runner = Runner {
        args,
        loader,
        proxy,
        allocation,
        inputs: generation::Incremental::default(),
        metrics,
        learning: fqdn::Learning::new(fqdn_state),
        learning_changes: 0,
        names,
    };
    if runner.args.kubernetes {
        return kubernetes(runner);
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t);
    }
    let (tx, rx) = mpsc::channel();
    // The DNS proxy's learning requests join the same loop, so they are answered at once.
    if let Some(learn_rx) = runner.serve_learning() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for p in learn_rx {
                if tx.send(Wake::Learn(p)).is_err() {
                    return;
                }
            }
        });
    }
    let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let cluster = absolute(&runner.cluster());
    let policies: Vec<PathBuf> = runner.args.policies.iter().map(absolute).collect();
    // Only changes to the inputs count: the cluster file's directory may hold anything else
    // (logs, the state directory), and a change there must not recompile.
    let (inputs, cluster_file) = (policies.clone(), cluster.clone());
    let mut watcher = match notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        let Ok(e) = e else { return };
        let relevant = !e.kind.is_access()
            && e.paths
                .iter()
                .any(|p| *p == cluster_file || inputs.iter().any(|i| p.starts_with(i)));
        if relevant {
            let _ = tx.send(Wake::Files(Instant::now()));
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot watch files");
            return ExitCode::from(2);
        }
    };
    use notify::Watcher;
    // Editors replace files by renaming, so the cluster file's directory is watched (not
    // recursively), and each policy path recursively.
    let cluster_dir = cluster
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut watched: Vec<(PathBuf, notify::RecursiveMode)> = policies
        .iter()
        .map(|p| (p.clone(), notify::RecursiveMode::Recursive))
        .collect();
    watched.push((cluster_dir, notify::RecursiveMode::NonRecursive));
    for (path, mode) in &watched {
        if let Err(e) = watcher.watch(path, *mode) {
            error!(path = %path.display(), error = %e, "cannot watch");
            return ExitCode::from(2);
        }
    }
    let watched: Vec<&PathBuf> = watched.iter().map(|(p, _)| p).collect();
    info!(paths = ?watched, "watching");
    // After the watch is set up, so a change made while this first compile runs is seen.
    let ok = runner.reconcile(false);
    if runner.args.once {
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    // Changes are compiled at once and enforced once the files have been quiet for the
    // debounce time (`settle`): the compile overlaps the wait.
    let mut settle = Settle::new(Duration::from_millis(runner.args.debounce_ms));
    let mut held: Option<Compiled> = None;
    let mut waiting: Vec<Wake> = Vec::new();
    let mut last_expiry = Instant::now();
    loop {
        // Wake when the debounce ends, not at the next 20 ms tick: the tick alone added up to
        // 20 ms to every edit's latency.
        let wait = match settle.next(Instant::now()) {
            Step::Wait(left) => left.min(Duration::from_millis(20)),
            Step::Compile | Step::Apply => Duration::ZERO,
            Step::Idle => Duration::from_millis(20),
        };
        let wake = match waiting.pop() {
            Some(w) => Ok(w),
            None => rx.recv_timeout(wait),
        };
        match wake {
            Ok(Wake::Files(at)) => {
                settle.changed(at);
                held = None;
            }
            Ok(Wake::Learn(p)) => {
                if runner.learn(p) {
                    runner.reconcile(false);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return ExitCode::from(2),
        }
        if FORCE.swap(false, Ordering::SeqCst) {
            runner.reconcile(true);
        }
        match settle.next(Instant::now()) {
            Step::Compile => {
                let token = settle.token();
                held = Some(runner.compile(true));
                // Changes that came while compiling make the result stale; other wakes wait
                // their turn (and a Learn among them makes it stale when its turn comes).
                while let Ok(w) = rx.try_recv() {
                    match w {
                        Wake::Files(at) => settle.changed(at),
                        other => waiting.insert(0, other),
                    }
                }
                if settle.token() != token {
                    held = None;
                }
                settle.compiled(token);
            }
            Step::Apply => {
                match held.take() {
                    Some(compiled) if runner.applicable(&compiled) => {
                        runner.apply_compiled(compiled, false);
                    }
                    // Errors only counted (the full checker reports them; the last good
                    // generation keeps enforcing), or what was learned or the routes changed
                    // while it was held: compiled again, now. The files are quiet, so this
                    // compile is applied. (Settle says Apply only for a compile held here.)
                    _ => {
                        runner.reconcile(false);
                    }
                }
                settle.applied();
            }
            Step::Wait(_) | Step::Idle => {}
        }
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            last_expiry = Instant::now();
            if runner.expire_fqdn() {
                runner.reconcile(false);
            }
        }
        runner.supervise_proxy();
    }
}

/// Kubernetes mode: watchers feed a store; once every kind is listed, each (debounced) change
/// recompiles with the cluster-wide identity allocation, applies, and writes policy status.
fn kubernetes(mut runner: Runner) -> ExitCode {
    use cnpc_runtime_loader::k8s;
    let Some(node_name) = runner.args.node_name.clone() else {
        error!("--kubernetes needs the node name: --node-name or NODE_NAME");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(2);
        }
    };
    rt.block_on(async move {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "cannot reach the API server");
                return ExitCode::from(2);
            }
        };
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(k8s::watch(client.clone(), tx));
        let (learn_tx, mut learn_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(requests) = runner.serve_learning() {
            std::thread::spawn(move || {
                for p in requests {
                    if learn_tx.send(p).is_err() {
                        return;
                    }
                }
            });
        }
        let mut last_expiry = Instant::now();
        let mut store = k8s::Store::default();
        let mut written = std::collections::BTreeMap::new();
        let debounce = Duration::from_millis(runner.args.debounce_ms);
        let mut dirty: Option<Instant> = None;
        let mut force = false;
        info!(node = %node_name, "watching the API server");
        loop {
            tokio::select! {
                change = rx.recv() => match change {
                    Some(c) => {
                        store.change(c);
                        dirty = Some(Instant::now());
                    }
                    None => return ExitCode::from(2),
                },
                Some(p) = learn_rx.recv() => {
                    if runner.learn(p) {
                        // An answer waits for a new identity: compile now.
                        dirty = Some(Instant::now() - debounce);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            runner.supervise_proxy();
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                last_expiry = Instant::now();
                if runner.expire_fqdn() {
                    dirty = Some(Instant::now() - debounce);
                }
            }
            if FORCE.swap(false, Ordering::SeqCst) {
                force = true;
                dirty = Some(Instant::now() - debounce);
            }
            if !store.synced() || dirty.is_none_or(|t| t.elapsed() < debounce) {
                continue;
            }
            dirty = None;
            let start = Instant::now();
            let routes = node::routes();
            let objects = store.objects.clone();
            // FQDN identities are this node's own (local scope): not part of the agreement.
            let learned = std::sync::Mutex::new(std::mem::take(&mut runner.learning.state));
            let agreed = k8s::agree(client.clone(), &runner.args.namespace, |previous| {
                let mut learned = learned.lock().unwrap_or_else(|p| p.into_inner());
                k8s::desired(&objects, previous, Some(&routes), Some(&mut learned))
            })
            .await;
            runner.learning.state = learned.into_inner().unwrap_or_else(|p| p.into_inner());
            let for_status = match &agreed {
                Ok(g) => Ok(g.clone()),
                Err(k8s::AgreeError::Compile(e)) => Err(clone_error(e)),
                Err(e) => {
                    // The API server, not the policies: try again on the next change.
                    warn!(error = %e, "cannot agree on identities; retrying");
                    dirty = Some(Instant::now());
                    continue;
                }
            };
            let statuses = k8s::statuses(&objects, &for_status);
            let endpoints = || {
                let mut empty = objects.clone();
                for k in k8s::KINDS.iter().filter(|k| k.policy) {
                    empty.by_kind.remove(k.kind);
                }
                k8s::desired(&empty, &Default::default(), Some(&[]), None)
                    .map(|g| Arc::unwrap_or_clone(g.endpoints))
                    .map_err(|e| e.to_string())
            };
            let endpoints = if agreed.is_err() {
                endpoints()
            } else {
                Ok(Vec::new())
            };
            runner.apply(
                agreed.map_err(|e| e.to_string()),
                &routes,
                std::mem::take(&mut force),
                start,
                endpoints,
            );
            k8s::write_statuses(client.clone(), &node_name, &statuses, &mut written).await;
        }
    })
}

fn clone_error(e: &generation::CompileError) -> generation::CompileError {
    match e {
        generation::CompileError::Invalid {
            errors,
            report,
            by_file,
        } => generation::CompileError::Invalid {
            errors: *errors,
            report: report.clone(),
            by_file: by_file.clone(),
        },
        other => generation::CompileError::Invalid {
            errors: 1,
            report: other.to_string(),
            by_file: Default::default(),
        },
    }
}
