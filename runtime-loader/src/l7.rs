//! The node side of the L7 stage (DESIGN.md §6a): what the loader sets up so that a `Proxy`
//! verdict reaches a proxy, and the proxy process it supervises.
//!
//! - **Local route for marked packets.** A packet the datapath assigns to a proxy socket with
//!   `bpf_sk_assign` still goes through routing, and only a local route delivers it to that
//!   socket (kernel commit cf7fbe660f2d, "must be routed towards that socket via local route").
//!   As Cilium does (pkg/proxy/routes.go: `ip rule fwmark 0x200/0xf00 lookup 2004` and
//!   `local 0.0.0.0/0 dev lo table 2004`), the loader adds a rule sending packets marked
//!   [`contract::TO_PROXY_MARK`] to table [`contract::PROXY_ROUTE_TABLE`], whose only route is
//!   `local default dev lo`, for IPv4 and IPv6.
//! - **The proxy device.** An endpoint's ingress program runs at tc egress of its host-side
//!   interface, where `bpf_sk_assign` is refused; it redirects proxied packets to the ingress of
//!   a device the loader owns ([`PROXY_DEVICE`]), whose ingress program assigns them to the
//!   ingress proxy's socket (Cilium hairpins through `cilium_host` the same way). The device is
//!   one end of a veth pair and has no address; reverse-path filtering is off on it, since the
//!   packets it receives come from pods routed elsewhere, and local sources are accepted (an
//!   egress proxy's upstream connection leaves from the node's address).
//! - **The proxy policy.** Each generation's [`ProxyPolicy`], when it changed, is written to a
//!   JSON file (a temporary file renamed over the old one), and the loader waits (bounded) for
//!   the proxy to acknowledge it before switching the generation's programs in: the datapath
//!   never hands a connection to a proxy still judging by older rules while the proxy runs.
//! - **The proxy process.** `cnpc-proxy` runs as the loader's child, restarted with a backoff
//!   when it exits; each restart is counted. Whether both of its listeners are up is read from
//!   `/proc/net/tcp{,6}`, which costs nothing and opens no connection. While it is down, proxied
//!   flows are dropped by the datapath (no socket to assign them to): the stage fails closed.

use cnpc_ir::proxy::{contract, ProxyPolicy};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The dummy device whose ingress hands proxied packets of endpoints' ingress direction to the
/// ingress proxy.
pub const PROXY_DEVICE: &str = "cnpc_proxy";
/// The other end of the proxy device's veth pair (a veth is up only with its peer up).
pub const PROXY_DEVICE_PEER: &str = "cnpc_proxy_p";

#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
}

fn ip(args: &[&str]) -> Result<String, L7Error> {
    let err = |message: String| L7Error::Ip {
        args: args.join(" "),
        message,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Preferences of the two fwmark rules (before `main` at 32766).
const LOCAL_PREF: &str = "8";
const PROXY_PREF: &str = "9";

/// Adds the fwmark rule and the local route of the proxy table, both families (what is already
/// there is left as it is), makes accepted sockets take their SYN's mark, and turns off TCP
/// early demux (see below).
pub fn install_routes() -> Result<(), L7Error> {
    for (sysctl, value) in [
        // An accepted socket takes its SYN's mark, which carries the source identity on the
        // ingress path (ir::proxy::contract).
        ("/proc/sys/net/ipv4/tcp_fwmark_accept", "1"),
        // The ingress proxy's accepted socket has the client pod's 4-tuple. With early demux,
        // the client's next packets (arriving on its veth, to be forwarded to the server's
        // veth where the ingress program hands them over) would be matched to that socket at
        // ip_rcv, and ip_forward drops any packet that carries a socket: the connection would
        // hang after its SYN. Without it, they are routed as usual. (Covers IPv6 as well:
        // ip6_rcv_finish reads the same sysctls.) The cost is one route lookup more for the
        // packets of this namespace's own TCP connections.
        ("/proc/sys/net/ipv4/tcp_early_demux", "0"),
    ] {
        std::fs::write(sysctl, value).map_err(|source| L7Error::Write {
            path: sysctl.into(),
            source,
        })?;
    }
    let mark = format!(
        "{:#x}/{:#x}",
        contract::TO_PROXY_MARK,
        contract::MARK_MAGIC_MASK
    );
    let table = contract::PROXY_ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        let rules = ip(&[family, "rule", "show"])?;
        let has = |pref: &str| rules.lines().any(|l| l.starts_with(&format!("{pref}:")));
        // Packets the proxies' own accepted sockets send carry the mark too (an accepted
        // socket takes its SYN's mark), and must be routed normally: locally generated packets
        // match `iif lo`, so they take the main table first.
        if !has(LOCAL_PREF) {
            ip(&[
                family, "rule", "add", "pref", LOCAL_PREF, "fwmark", &mark, "iif", "lo", "lookup",
                "main",
            ])?;
        }
        if !has(PROXY_PREF) {
            ip(&[
                family, "rule", "add", "pref", PROXY_PREF, "fwmark", &mark, "lookup", &table,
            ])?;
        }
        ip(&[
            family, "route", "replace", "local", "default", "dev", "lo", "table", &table,
        ])?;
    }
    Ok(())
}

/// Creates the proxy device if it is missing, brings it up with reverse-path filtering off, and
/// returns its ifindex.
pub fn ensure_device() -> Result<u32, L7Error> {
    // A veth pair rather than a dummy device: veth is in every kernel that has network
    // namespaces, while the dummy driver is a module some kernels lack. Only this end is used.
    if crate::sys::ifindex(PROXY_DEVICE).is_none() {
        ip(&[
            "link",
            "add",
            PROXY_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            PROXY_DEVICE_PEER,
        ])?;
    }
    ip(&["link", "set", PROXY_DEVICE_PEER, "up"])?;
    ip(&["link", "set", PROXY_DEVICE, "up"])?;
    // No reverse-path check (the sources are routed through other interfaces), and local
    // sources accepted: an egress proxy's upstream connection to a local endpoint leaves from
    // this node's address and comes back in here when that endpoint's ingress is proxied too.
    for (name, value) in [("rp_filter", "0"), ("accept_local", "1")] {
        let path = format!("/proc/sys/net/ipv4/conf/{PROXY_DEVICE}/{name}");
        std::fs::write(&path, value).map_err(|source| L7Error::Write {
            path: path.into(),
            source,
        })?;
    }
    crate::sys::ifindex(PROXY_DEVICE).ok_or_else(|| L7Error::Ip {
        args: format!("link show {PROXY_DEVICE}"),
        message: "the device vanished after it was created".into(),
    })
}

/// Writes `policy` to `path` atomically: a temporary file beside it, renamed over it.
pub fn write_policy(path: &Path, policy: &ProxyPolicy) -> Result<(), L7Error> {
    let err = |source| L7Error::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("json.tmp");
    // Serialising plain data (numbers, strings, maps with integer keys) cannot fail.
    let text = serde_json::to_vec(policy).expect("a proxy policy serialises");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Waits (at most `timeout`) until the proxy acknowledges `generation` of the policy at
/// `path` (`cnpc_proxy::policy_file::acknowledged`). `Some(true)` once it has; `Some(false)`
/// at once when no proxy runs, or when the time ran out (a slow proxy: the switch goes ahead,
/// and the proxy judges by the new rules once it reads the file).
pub fn await_acknowledgement(path: &Path, generation: u64, timeout: Duration) -> Option<bool> {
    let start = Instant::now();
    loop {
        match cnpc_proxy::policy_file::acknowledged(path) {
            Some(g) if g >= generation => return Some(true),
            // No proxy runs (the supervisor removes the acknowledgement when it exits):
            // nothing to wait for, its flows are dropped.
            None => return Some(false),
            Some(_) => {}
        }
        if start.elapsed() >= timeout {
            tracing::warn!(
                generation,
                "the L7 proxy did not acknowledge the new policy in time"
            );
            return Some(false);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether a TCP socket is listening on `port` (any address), from `/proc/net/tcp` and
/// `/proc/net/tcp6` of this network namespace.
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                // Column 4 is the state; 0A is LISTEN.
                let state = cols.nth(1).unwrap_or("");
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

/// The supervised `cnpc-proxy` process.
pub struct ProxySupervisor {
    bin: PathBuf,
    policy: PathBuf,
    log: Option<PathBuf>,
    /// The loader's learning socket, passed to the proxy (`--learn-socket`).
    learn_socket: Option<PathBuf>,
    /// Where the proxy's request and query events go (`cnpc observe`), named with the pods of
    /// the enforcing generation.
    events: Option<(
        Arc<crate::events::Hub>,
        Arc<std::sync::RwLock<crate::events::Names>>,
    )>,
    child: Option<Child>,
    /// When the next start may happen (backoff after an exit).
    next_start: Instant,
    backoff: Duration,
    restarts: u64,
    counts: Arc<L7Counts>,
    /// The last reading of the proxy's listeners, and when it was taken.
    listeners_up: Option<(bool, Instant)>,
}

/// How often the supervisor reads whether the proxy's listeners are up.
const LISTENER_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often it reads them while they are down.
const LISTENER_RECHECK_WHILE_DOWN: Duration = Duration::from_millis(50);

/// HTTP requests the proxy judged, by direction and verdict (from its event lines).
#[derive(Debug, Default)]
pub struct L7Counts {
    /// `[direction][verdict]`: ingress, egress × allowed, denied.
    counts: [[AtomicU64; 2]; 2],
    /// DNS queries the proxy judged: allowed, refused.
    dns: [AtomicU64; 2],
}

impl L7Counts {
    fn count(&self, e: &cnpc_proxy::L7Event) {
        let d = usize::from(e.direction == cnpc_ir::Direction::Egress);
        let v = usize::from(e.verdict == cnpc_proxy::Verdict::Denied);
        self.counts[d][v].fetch_add(1, Ordering::Relaxed);
    }

    fn count_dns(&self, e: &cnpc_proxy::events::DnsEvent) {
        let v = usize::from(e.verdict == cnpc_proxy::Verdict::Denied);
        self.dns[v].fetch_add(1, Ordering::Relaxed);
    }

    /// DNS queries allowed and refused.
    pub fn dns(&self) -> [(&'static str, u64); 2] {
        [
            ("allowed", self.dns[0].load(Ordering::Relaxed)),
            ("denied", self.dns[1].load(Ordering::Relaxed)),
        ]
    }

    /// (direction, verdict, count) for every combination.
    pub fn all(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (d, direction) in ["ingress", "egress"].into_iter().enumerate() {
            for (v, verdict) in ["allowed", "denied"].into_iter().enumerate() {
                out.push((
                    direction,
                    verdict,
                    self.counts[d][v].load(Ordering::Relaxed),
                ));
            }
        }
        out
    }
}

impl ProxySupervisor {
    /// A supervisor for `bin` reading `policy`; its stderr goes to `log` when given, else to
    /// the loader's. Nothing starts until [`ProxySupervisor::poll`].
    pub fn new(bin: PathBuf, policy: PathBuf, log: Option<PathBuf>) -> ProxySupervisor {
        ProxySupervisor {
            bin,
            policy,
            log,
            learn_socket: None,
            events: None,
            child: None,
            next_start: Instant::now(),
            backoff: Duration::from_millis(100),
            restarts: 0,
            counts: Arc::default(),
            listeners_up: None,
        }
    }

    /// Publishes the proxy's events on `hub` (records naming pods from `names`).
    pub fn with_events(
        mut self,
        hub: Arc<crate::events::Hub>,
        names: Arc<std::sync::RwLock<crate::events::Names>>,
    ) -> ProxySupervisor {
        self.events = Some((hub, names));
        self
    }

    /// Tells the proxy where the loader learns DNS answers' addresses.
    pub fn with_learn_socket(mut self, path: PathBuf) -> ProxySupervisor {
        self.learn_socket = Some(path);
        self
    }

    /// Starts the proxy if it is not running and its backoff has passed; reaps it if it exited.
    /// Returns an error only for a start that failed (the next poll tries again).
    pub fn poll(&mut self) -> Result<(), L7Error> {
        if let Some(c) = &mut self.child {
            match c.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => {
                    tracing::warn!(%status, "cnpc-proxy exited; restarting");
                    self.child = None;
                    self.forget_acknowledgement();
                    self.restarts += 1;
                    self.next_start = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wait for cnpc-proxy");
                    return Ok(());
                }
            }
        }
        if Instant::now() < self.next_start || !self.policy.exists() {
            return Ok(());
        }
        let log = || {
            self.log.as_ref().and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            })
        };
        let stderr = log().map_or_else(Stdio::inherit, Stdio::from);
        self.forget_acknowledgement();
        let mut cmd = Command::new(&self.bin);
        // The proxy goes when the loader goes (even on kill -9), so a restarted loader never
        // finds an orphan holding the proxy ports; proxied flows are dropped in between.
        // SAFETY: prctl is async-signal-safe and touches only the child being started.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        if let Some(socket) = &self.learn_socket {
            cmd.arg("--learn-socket").arg(socket);
        }
        let child = cmd
            .arg("--policy")
            .arg(&self.policy)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| {
                self.next_start = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                L7Error::Spawn {
                    bin: self.bin.clone(),
                    source,
                }
            })?;
        tracing::info!(pid = child.id(), bin = %self.bin.display(), "cnpc-proxy started");
        let mut child = child;
        if let Some(out) = child.stdout.take() {
            // Request events arrive as JSON lines on stdout: counted here, and kept in the
            // log beside the proxy's own lines until the event stream carries them.
            let counts = self.counts.clone();
            let events = self.events.clone();
            let mut log = log();
            std::thread::spawn(move || {
                use crate::events::{dns_record, http_record};
                use std::io::{BufRead, Write};
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let record = match cnpc_proxy::events::ProxyEvent::parse_line(&line) {
                        Some(cnpc_proxy::events::ProxyEvent::Http(e)) => {
                            counts.count(&e);
                            events.as_ref().map(|(_, names)| {
                                http_record(&e, &names.read().unwrap_or_else(|p| p.into_inner()))
                            })
                        }
                        Some(cnpc_proxy::events::ProxyEvent::Dns(e)) => {
                            counts.count_dns(&e);
                            events.as_ref().map(|(_, names)| {
                                dns_record(&e, &names.read().unwrap_or_else(|p| p.into_inner()))
                            })
                        }
                        None => None,
                    };
                    if let (Some(r), Some((hub, _))) = (record, &events) {
                        if let Ok(json) = serde_json::to_string(&r) {
                            hub.publish(json);
                        }
                    }
                    if let Some(f) = &mut log {
                        let _ = writeln!(f, "{line}");
                    }
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// Removes the proxy's acknowledgement: no proxy runs to stand by it.
    fn forget_acknowledgement(&self) {
        let _ = std::fs::remove_file(cnpc_proxy::policy_file::applied_path(&self.policy));
    }

    /// The requests judged so far, across restarts.
    pub fn counts(&self) -> Arc<L7Counts> {
        self.counts.clone()
    }

    /// Times the proxy was restarted after exiting.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Whether the proxy runs and both of its listeners are up. Reading `/proc/net/tcp` walks
    /// every TCP socket of the machine (7–8 ms with a few thousand), so the listeners are read
    /// at most once a second; a proxy that exits shows at once.
    pub fn up(&mut self) -> bool {
        if self.child.is_none() {
            self.listeners_up = None;
            return false;
        }
        // While down, read again soon: a proxy that just started is up within milliseconds,
        // and /healthz and `cnpc_proxy_up` should say so.
        let interval = |up: bool| {
            if up {
                LISTENER_CHECK_INTERVAL
            } else {
                LISTENER_RECHECK_WHILE_DOWN
            }
        };
        match self.listeners_up {
            Some((up, at)) if at.elapsed() < interval(up) => up,
            _ => {
                let up = listening(contract::EGRESS_PROXY_PORT)
                    && listening(contract::INGRESS_PROXY_PORT);
                self.listeners_up = Some((up, Instant::now()));
                up
            }
        }
    }

    /// The process id, for tests and drills.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for ProxySupervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `cnpc-proxy` binary installed beside `loader` (how the container image and `cargo`
/// lay them out).
pub fn proxy_beside(loader: &Path) -> PathBuf {
    loader.with_file_name("cnpc-proxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_shows_in_proc_net_tcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(port));
        // The client end of a connection holds its port without listening on it (checking a
        // released port instead would race with other processes taking it).
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(!listening(client.local_addr().unwrap().port()));
    }

    #[test]
    fn policy_is_written_whole() {
        let dir = std::env::temp_dir().join(format!("cnpc-l7-{}", std::process::id()));
        let path = dir.join("policy.json");
        let policy = ProxyPolicy {
            generation: 7,
            ..ProxyPolicy::default()
        };
        write_policy(&path, &policy).unwrap();
        let back: ProxyPolicy = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, policy);
        assert!(!path.with_extension("json.tmp").exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_crashed_proxy_is_restarted_and_counted() {
        let dir = std::env::temp_dir().join(format!("cnpc-l7-sup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let policy = dir.join("policy.json");
        std::fs::write(&policy, "{}").unwrap();
        // `false` stands in for a proxy that exits at once.
        let mut s = ProxySupervisor::new("/bin/false".into(), policy, None);
        s.poll().unwrap();
        assert!(s.pid().is_some());
        let start = Instant::now();
        while s.restarts() < 2 && start.elapsed() < Duration::from_secs(5) {
            s.poll().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(s.restarts() >= 2, "restarts: {}", s.restarts());
        assert!(!s.up());
        let _ = std::fs::remove_dir_all(dir);
    }
}
