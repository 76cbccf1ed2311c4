//! End to end (issue 5, item 8): the Star Wars demo on one machine. The test creates a node
//! network namespace and a namespace per pod (two deathstars, a tiefighter, an xwing) joined by
//! veth pairs, with the addresses of `policies/cluster.yaml`; HTTP servers in the deathstar pods
//! answer `POST /v1/request-landing` with "Ship landed"; `cnpc-loader` runs standalone in the
//! node namespace on a copy of `policies/starwars-l4`. Everything it creates (namespaces,
//! interfaces, the pin directory, temporary files) carries this process's id and is removed at
//! the end, whatever the outcome.

use cnpc_runtime_loader::sys;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (pod, host-side interface suffix, address) as in policies/cluster.yaml.
const PODS: [(&str, &str, &str); 4] = [
    ("ds1", "d1", "10.0.1.10"),
    ("ds2", "d2", "10.0.1.11"),
    ("tf", "tf", "10.0.1.20"),
    ("xw", "xw", "10.0.1.30"),
];

struct Net {
    prefix: String,
    pin_dir: PathBuf,
    tmp: PathBuf,
    stop: Arc<AtomicBool>,
    loader: Option<Child>,
}

impl Net {
    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn setup() -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let prefix = format!("cnpc{id}");
        let net = Net {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/cnpc-e2e-{id}")),
            tmp: std::env::temp_dir().join(format!("cnpc-e2e-{id}")),
            prefix,
            stop: Arc::new(AtomicBool::new(false)),
            loader: None,
        };
        let node = net.ns("node");
        net.ip(&["netns", "add", &node])?;
        net.ip(&["-n", &node, "link", "set", "lo", "up"])?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("sysctl: {}", String::from_utf8_lossy(&out.stderr)));
        }
        for (pod, suffix, addr) in PODS {
            let ns = net.ns(pod);
            let host = format!("{}{suffix}", net.prefix);
            net.ip(&["netns", "add", &ns])?;
            net.ip(&[
                "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            net.ip(&["-n", &node, "link", "set", &host, "up"])?;
            net.ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", &host])?;
            net.ip(&[
                "-n",
                &node,
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                &host,
            ])?;
            net.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            net.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            net.ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ])?;
            net.ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            net.ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
        }
        std::fs::create_dir_all(net.tmp.join("policies")).map_err(|e| e.to_string())?;
        for f in [
            "deathstar.yaml",
            "tiefighter-egress.yaml",
            "xwing-egress-deny.yaml",
        ] {
            std::fs::copy(
                root().join("policies/starwars-l4").join(f),
                net.tmp.join("policies").join(f),
            )
            .map_err(|e| e.to_string())?;
        }
        for (pod, _, addr) in &PODS[..2] {
            net.serve(pod, addr)?;
        }
        Ok(net)
    }

    /// An HTTP server in the pod's namespace, on a thread that entered it.
    fn serve(&self, pod: &str, addr: &str) -> Result<(), String> {
        let path = format!("/var/run/netns/{}", self.ns(pod));
        let addr: SocketAddr = format!("{addr}:80").parse().unwrap();
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = enter(&path)
                .and_then(|_| TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}")));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 1024];
                        let mut req = Vec::new();
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend(&buf[..n]),
                            }
                        }
                        let body = if req.starts_with(b"POST /v1/request-landing ") {
                            "Ship landed\n"
                        } else {
                            "Page not found\n"
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().map_err(|e| e.to_string())?
    }

    /// Whether `pod` lands on the deathstar at `addr` within `timeout`.
    fn land(&self, pod: &str, addr: &str, timeout: Duration) -> bool {
        let path = format!("/var/run/netns/{}", self.ns(pod));
        let addr: SocketAddr = format!("{addr}:80").parse().unwrap();
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.write_all(
                b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            reply.contains("Ship landed")
        })
        .join()
        .unwrap()
    }

    fn start_loader(&mut self) -> Result<(), String> {
        let node = format!("/var/run/netns/{}", self.ns("node"));
        let netns = std::fs::File::open(&node).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.join("loader.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cnpc-loader"));
        cmd.arg("--policies")
            .arg(self.tmp.join("policies"))
            .arg("--cluster")
            .arg(root().join("policies/cluster.yaml"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.tmp.join("state"))
            .args(["--metrics", "off", "--debounce-ms", "30"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let fd = netns.as_raw_fd();
        // Entering the node's network namespace alone (not `ip netns exec`, which also makes a
        // mount namespace with a fresh /sys) keeps the pins on the host's bpffs, where they
        // outlive the loader.
        // SAFETY: setns is async-signal-safe; `netns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        self.loader = Some(cmd.spawn().map_err(|e| e.to_string())?);
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.join("loader.log")).unwrap_or_default()
    }

    fn generation(&self) -> u64 {
        std::fs::read_to_string(self.tmp.join("state/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or(0)
    }

    /// Polls `f` until it holds or `limit` passes; the time it took.
    fn until(&self, limit: Duration, f: impl Fn() -> bool) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn enter(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on a namespace file this thread keeps open for the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(format!("setns {path}: {}", std::io::Error::last_os_error()))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut c) = self.loader.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (pod, _, _) in PODS {
            let _ = self.ip(&["netns", "del", &self.ns(pod)]);
        }
        let _ = self.ip(&["netns", "del", &self.ns("node")]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn the_demo_enforces_swaps_without_a_gap_and_survives_the_loader() {
    if !Path::new("/sys/fs/bpf").exists() || !sys::is_bpffs(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail("bpffs is not mounted at /sys/fs/bpf");
    }
    let mut net = match Net::setup() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    let (tf, xw, ds1, ds2) = ("tf", "xw", PODS[0].2, PODS[1].2);
    // Without the loader nothing is enforced: the network itself works.
    assert!(
        net.land(xw, ds1, Duration::from_secs(2)),
        "the test network does not carry traffic"
    );
    // A policy set that does not compile, with no good generation before it: every endpoint
    // gets a deny-all program rather than none.
    let policies = net.tmp.join("policies");
    let rule1 = std::fs::read_to_string(policies.join("deathstar.yaml")).unwrap();
    let broken = rule1.replace("protocol: TCP", "protocol: TPC");
    assert_ne!(broken, rule1);
    std::fs::write(policies.join("deathstar.yaml"), &broken).unwrap();
    net.start_loader().unwrap();
    let log = || net.log();
    assert!(
        net.until(Duration::from_secs(20), || log()
            .contains("deny-all attached"))
            .is_some(),
        "no deny-all before the first good generation:\n{}",
        log()
    );
    assert!(
        !net.land(tf, ds1, SHORT),
        "deny-all blocks even the tiefighter"
    );
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    assert!(
        net.until(Duration::from_secs(5), || net.land(tf, ds1, SHORT))
            .is_some(),
        "the fixed policy set enforces:\n{}",
        log()
    );
    assert!(!net.land(xw, ds1, SHORT), "xwing must not land");
    assert!(
        net.land(tf, ds2, Duration::from_secs(2)),
        "on either deathstar"
    );
    assert!(!net.land(xw, ds2, SHORT), "xwing must not land on either");

    // Editing the policy changes verdicts within a second.
    let deny = std::fs::read_to_string(policies.join("xwing-egress-deny.yaml")).unwrap();
    std::fs::remove_file(policies.join("xwing-egress-deny.yaml")).unwrap();
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    assert_ne!(open, rule1, "the edit applies to the demo policy");
    std::fs::write(policies.join("deathstar.yaml"), &open).unwrap();
    let took = net.until(Duration::from_secs(5), || net.land(xw, ds1, SHORT));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "xwing lands within a second of the edit (took {took:?}):\n{}",
        log()
    );
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    std::fs::write(policies.join("xwing-egress-deny.yaml"), &deny).unwrap();
    let took = net.until(Duration::from_secs(5), || !net.land(xw, ds1, SHORT));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "and is blocked again within a second (took {took:?})"
    );

    // A broken edit leaves the last good generation enforcing.
    let failures = log().matches("compile failed").count();
    std::fs::write(policies.join("deathstar.yaml"), &broken).unwrap();
    assert!(
        net.until(Duration::from_secs(5), || log()
            .matches("compile failed")
            .count()
            > failures)
            .is_some(),
        "the broken edit is reported"
    );
    assert!(
        net.land(tf, ds1, Duration::from_secs(2)),
        "the last good generation still lets the tiefighter land"
    );
    assert!(!net.land(xw, ds1, SHORT), "and still blocks the xwing");
    std::fs::write(policies.join("deathstar.yaml"), &rule1).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // 100 swaps to equivalent generations while ships keep trying.
    let net = Arc::new(net);
    let done = Arc::new(AtomicBool::new(false));
    let (landed, refused, wrongly) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let client = {
        let (net, done, landed, refused, wrongly) = (
            net.clone(),
            done.clone(),
            landed.clone(),
            refused.clone(),
            wrongly.clone(),
        );
        std::thread::spawn(move || {
            // Bounded: at most 2,000 attempts each.
            for _ in 0..2000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                if net.land(tf, ds1, Duration::from_secs(1)) {
                    landed.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                if net.land(xw, ds2, Duration::from_millis(50)) {
                    wrongly.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let pid = net.loader.as_ref().unwrap().id() as i32;
    let before = net.generation();
    for i in 1..=100 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        assert!(
            net.until(Duration::from_secs(5), || net.generation() >= before + i)
                .is_some(),
            "swap {i} did not happen:\n{}",
            net.log()
        );
    }
    done.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (landed, refused, wrongly) = (
        landed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        wrongly.load(Ordering::Relaxed),
    );
    eprintln!("during 100 swaps: {landed} landings, {refused} refused, {wrongly} xwing landings");
    assert!(landed > 10, "the client kept trying ({landed})");
    assert_eq!(refused, 0, "a tiefighter landing failed during a swap");
    assert_eq!(wrongly, 0, "an xwing landed during a swap");

    // kill -9: the pinned state keeps enforcing; a restarted loader adopts it without a gap.
    let mut net = Arc::try_unwrap(net).ok().expect("the client is done");
    let mut child = net.loader.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !net.land(xw, ds1, SHORT),
        "xwing is still blocked with the loader dead"
    );
    assert!(
        net.land(tf, ds1, Duration::from_secs(2)),
        "and tiefighter still lands"
    );
    let lines_before = net.log().lines().count();
    net.start_loader().unwrap();
    let adopted = net.until(Duration::from_secs(20), || {
        net.log()
            .lines()
            .skip(lines_before)
            .any(|l| l.contains("applied"))
    });
    let restart_log: String = net
        .log()
        .lines()
        .skip(lines_before)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        adopted.is_some(),
        "the restarted loader did not apply:\n{restart_log}"
    );
    assert!(restart_log.contains("adopted=8"), "{restart_log}");
    assert!(
        restart_log.contains("swapped=0")
            && restart_log.contains("attached=0")
            && restart_log.contains("unchanged=8"),
        "a restart with unchanged inputs switches nothing:\n{restart_log}"
    );
    assert!(!net.land(xw, ds1, SHORT));
    assert!(net.land(tf, ds2, Duration::from_secs(2)));

    // What `cnpc endpoints` shows: every hook with the program its pinned link runs.
    let hooks = cnpc_runtime_loader::loader::endpoints(&cnpc_runtime_loader::loader::Config {
        pin_dir: net.pin_dir.clone(),
        state_file: net.tmp.join("state/state.json"),
    })
    .unwrap();
    assert_eq!(hooks.len(), 8);
    assert!(hooks.iter().all(|h| h.program_id.is_some()), "{hooks:?}");
    let tiefighter: Vec<_> = hooks
        .iter()
        .filter(|h| h.record.endpoint == "default/tiefighter")
        .collect();
    assert_eq!(tiefighter.len(), 2);
    assert!(tiefighter[0].record.interface.ends_with("tf"));
}
