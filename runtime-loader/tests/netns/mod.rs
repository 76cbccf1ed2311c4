//! Network namespaces for loader tests and benchmarks: a node namespace, pod namespaces joined
//! to it by veth pairs, HTTP servers and clients on threads that entered a namespace, and
//! `cnpc-loader` started in the node namespace. Everything carries this process's id and is
//! removed on drop, whatever the outcome.
#![allow(dead_code)] // each target that includes this uses its own part

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `cnpc-proxy`, built beside the `cnpc-loader` under test (`loader`, where the loader looks
/// for it); `cargo test -p cnpc-runtime-loader` alone does not build other packages' binaries,
/// so it is built here when missing.
pub fn proxy_binary(loader: &str) -> Result<PathBuf, String> {
    let bin = Path::new(loader).with_file_name("cnpc-proxy");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "cnpc-proxy", "--bin", "cnpc-proxy"])
            .current_dir(root())
            .status()
            .map_err(|e| format!("cannot build cnpc-proxy: {e}"))?;
        if !status.success() || !bin.exists() {
            return Err(format!("cnpc-proxy is not at {}", bin.display()));
        }
    }
    Ok(bin)
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (pod, host-side interface suffix, address) as in policies/cluster.yaml.
pub const PODS: [(&str, &str, &str); 4] = [
    ("ds1", "d1", "10.0.1.10"),
    ("ds2", "d2", "10.0.1.11"),
    ("tf", "tf", "10.0.1.20"),
    ("xw", "xw", "10.0.1.30"),
];

pub struct Net {
    pub prefix: String,
    pub pin_dir: PathBuf,
    pub tmp: PathBuf,
    stop: Arc<AtomicBool>,
    pub loader: Option<Child>,
    /// The loader's inputs.
    pub policies: PathBuf,
    pub cluster: PathBuf,
    /// Extra loader arguments.
    pub loader_args: Vec<String>,
    /// Namespaces made beyond the demo's pods ([`Net::add_pod`], [`Net::add_world`]).
    extra: Vec<String>,
}

impl Net {
    pub fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
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

    /// A node namespace only, with forwarding on.
    pub fn node() -> Result<Net, String> {
        // Unique per process and per network, so tests can run side by side.
        static NETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NETS.fetch_add(1, Ordering::Relaxed) % 10;
        let id = format!("{}{n}", std::process::id() % 100_000);
        let prefix = format!("cnpc{id}");
        let tmp = std::env::temp_dir().join(format!("cnpc-e2e-{id}"));
        let net = Net {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/cnpc-e2e-{id}")),
            policies: tmp.join("policies"),
            cluster: root().join("policies/cluster.yaml"),
            tmp,
            prefix,
            stop: Arc::new(AtomicBool::new(false)),
            loader: None,
            loader_args: Vec::new(),
            extra: Vec::new(),
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
        std::fs::create_dir_all(&net.policies).map_err(|e| e.to_string())?;
        Ok(net)
    }

    /// The Star Wars demo: pod namespaces for the deathstars, the tiefighter and the xwing,
    /// HTTP servers in the deathstars, and the demo policies to edit.
    pub fn demo() -> Result<Net, String> {
        let net = Net::pods()?;
        for f in [
            "deathstar.yaml",
            "tiefighter-egress.yaml",
            "xwing-egress-deny.yaml",
        ] {
            std::fs::copy(
                root().join("policies/starwars-l4").join(f),
                net.policies.join(f),
            )
            .map_err(|e| e.to_string())?;
        }
        for (pod, _, addr) in &PODS[..2] {
            net.serve(pod, addr)?;
        }
        Ok(net)
    }

    /// The node and the demo's pod namespaces, joined by veth pairs; no server, no policy.
    pub fn pods() -> Result<Net, String> {
        let mut net = Net::node()?;
        for (pod, suffix, addr) in PODS {
            net.join(pod, suffix, &[addr])?;
        }
        Ok(net)
    }

    /// One more pod namespace (beyond the demo's), joined to the node like theirs.
    pub fn add_pod(&mut self, pod: &str, suffix: &str, addr: &str) -> Result<(), String> {
        self.extra.push(self.ns(pod));
        self.join(pod, suffix, &[addr])
    }

    /// A namespace standing for the world outside the cluster: `addrs` (host addresses) are
    /// its own, routed to it from the node.
    pub fn add_world(&mut self, addrs: &[&str]) -> Result<(), String> {
        self.extra.push(self.ns("world"));
        self.join("world", "wd", addrs)
    }

    /// A namespace `pod` holding `addrs`, joined to the node by a veth pair whose host side
    /// is `<prefix><suffix>`, with routes both ways.
    fn join(&mut self, pod: &str, suffix: &str, addrs: &[&str]) -> Result<(), String> {
        let net = &*self;
        let node = net.ns("node");
        {
            let ns = net.ns(pod);
            let host = format!("{}{suffix}", net.prefix);
            net.ip(&["netns", "add", &ns])?;
            net.ip(&[
                "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            net.ip(&["-n", &node, "link", "set", &host, "up"])?;
            net.ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", &host])?;
            for addr in addrs {
                net.ip(&[
                    "-n",
                    &node,
                    "route",
                    "add",
                    &format!("{addr}/32"),
                    "dev",
                    &host,
                ])?;
            }
            net.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            net.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            for addr in addrs {
                net.ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/32"),
                    "dev",
                    "eth0",
                ])?;
            }
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
        Ok(())
    }

    /// A keep-alive HTTP/1.1 server on port 80 in the pod's namespace that records the request
    /// line of every request it receives in `seen`. `POST /v1/request-landing` gets "Ship
    /// landed", anything else "Deathstar: PATH".
    pub fn serve_http(
        &self,
        pod: &str,
        addr: &str,
        seen: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Result<(), String> {
        self.accept_in(pod, addr, move |s| {
            let seen = seen.clone();
            // Keep-alive: each connection on its own thread.
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = std::io::BufReader::new(&s);
                let mut out = &s;
                while let Some((line, body)) = read_message(&mut reader) {
                    let target = line.split(' ').nth(1).unwrap_or("").to_string();
                    seen.lock().unwrap().push(line.clone());
                    let reply = if line.starts_with("POST /v1/request-landing ") {
                        "Ship landed\n".to_string()
                    } else {
                        format!("Deathstar: {target} ({} bytes)\n", body.len())
                    };
                    if write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}",
                        reply.len()
                    )
                    .is_err()
                    {
                        break;
                    }
                }
            });
        })
    }

    /// Listens on `addr:80` in the pod's namespace (a thread that entered it) and hands each
    /// accepted connection, blocking, to `handle` on that thread until the network is dropped.
    fn accept_in(
        &self,
        pod: &str,
        addr: &str,
        handle: impl Fn(TcpStream) + Send + 'static,
    ) -> Result<(), String> {
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
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        handle(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().map_err(|e| e.to_string())?
    }

    /// A TCP connection from `pod` to `addr:80`, made on a thread that entered the pod's
    /// namespace (a socket keeps the namespace it was made in, so the caller may use it from
    /// any thread). `None` when it cannot be made within `timeout`.
    pub fn connect(&self, pod: &str, addr: &str, timeout: Duration) -> Option<TcpStream> {
        let path = format!("/var/run/netns/{}", self.ns(pod));
        let addr: SocketAddr = format!("{addr}:80").parse().unwrap();
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            let s = TcpStream::connect_timeout(&addr, timeout).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            Some(s)
        })
        .join()
        .unwrap()
    }

    /// Sends `requests` (method, path) one after another on one new keep-alive connection
    /// from `pod`; the (status, body) of each answer, as far as answers came. `None` when the
    /// connection cannot be made within `timeout`.
    pub fn requests(
        &self,
        pod: &str,
        addr: &str,
        requests: &[(&str, &str)],
        timeout: Duration,
    ) -> Option<Vec<(u16, String)>> {
        let s = self.connect(pod, addr, timeout)?;
        let mut reader = std::io::BufReader::new(&s);
        Some(
            requests
                .iter()
                .map_while(|(m, p)| request(&s, &mut reader, m, p))
                .collect(),
        )
    }

    /// An HTTP server in the pod's namespace: one request per connection, answered on the
    /// accepting thread.
    pub fn serve(&self, pod: &str, addr: &str) -> Result<(), String> {
        self.accept_in(pod, addr, |mut s| {
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
        })
    }

    /// Whether `pod` lands on the deathstar at `addr` within `timeout`.
    pub fn land(&self, pod: &str, addr: &str, timeout: Duration) -> bool {
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

    pub fn start_loader(&mut self) -> Result<(), String> {
        let node = format!("/var/run/netns/{}", self.ns("node"));
        let netns = std::fs::File::open(&node).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.join("loader.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cnpc-loader"));
        if !self.loader_args.iter().any(|a| a == "--metrics") {
            cmd.args(["--metrics", "off"]);
        }
        cmd.arg("--policies")
            .arg(&self.policies)
            .arg("--cluster")
            .arg(&self.cluster)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.tmp.join("state"));
        if !self.loader_args.iter().any(|a| a == "--debounce-ms") {
            cmd.args(["--debounce-ms", "30"]);
        }
        cmd.args(&self.loader_args)
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.join("loader.log")).unwrap_or_default()
    }

    pub fn generation(&self) -> u64 {
        std::fs::read_to_string(self.tmp.join("state/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or(0)
    }

    /// Polls `f` until it holds or `limit` passes; the time it took.
    pub fn until(&self, limit: Duration, f: impl Fn() -> bool) -> Option<Duration> {
        self.until_polling(limit, Duration::from_millis(10), f)
    }

    /// [`Self::until`], asking every `every` (a latency measured this way is late by up to
    /// `every`).
    pub fn until_polling(
        &self,
        limit: Duration,
        every: Duration,
        f: impl Fn() -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return Some(start.elapsed());
            }
            std::thread::sleep(every);
        }
        None
    }
}

/// Sends one request on `s` and reads its answer through `reader` (a reader over `s` kept
/// across requests, so nothing buffered is lost): (status, body), or `None` when the
/// connection failed or closed.
pub fn request(
    s: &TcpStream,
    reader: &mut impl std::io::BufRead,
    method: &str,
    target: &str,
) -> Option<(u16, String)> {
    let mut out = s;
    write!(
        out,
        "{method} {target} HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let (line, body) = read_message(reader)?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Reads one HTTP/1.1 message (request or response): its first line and a body of
/// `Content-Length` bytes. `None` at the end of the stream or on a malformed message.
pub fn read_message(r: &mut impl std::io::BufRead) -> Option<(String, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let first = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((first, body))
}

impl Net {
    /// Runs `f` on a new thread inside `pod`'s namespace; returns what it returns.
    pub fn in_ns<T: Send + 'static>(
        &self,
        pod: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(pod));
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            f()
        })
    }

    /// (status line, body) of `GET path` from the loader's metrics server at `addr` (in the
    /// node's namespace), or `None` when it does not answer.
    pub fn loader_get(&self, addr: &str, path: &str) -> Option<(String, String)> {
        let (addr, path) = (addr.to_string(), path.to_string());
        self.in_ns("node", move || {
            let mut s = TcpStream::connect(addr).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            Some((head.lines().next()?.to_string(), body.to_string()))
        })
        .join()
        .ok()?
    }

    /// A TCP echo server on `addr:port` in `pod`'s namespace (one thread per connection).
    pub fn serve_echo(&self, pod: &str, addr: &str, port: u16) -> Result<(), String> {
        let addr: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.in_ns(pod, move || {
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("bind {addr}: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 512];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().map_err(|e| e.to_string())?
    }

    /// A TCP connection from `pod` to `addr:port`, or `None` within `timeout`.
    pub fn connect_to(
        &self,
        pod: &str,
        addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Option<TcpStream> {
        let addr: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        self.in_ns(pod, move || {
            let s = TcpStream::connect_timeout(&addr, timeout).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            Some(s)
        })
        .join()
        .unwrap()
    }
}

/// Whether `s` echoes a line back.
pub fn echoes(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    s.write_all(b"ping\n").is_ok() && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"ping\n")
}

pub fn enter(path: &str) -> Result<(), String> {
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
        let extra = std::mem::take(&mut self.extra);
        for ns in PODS.iter().map(|(pod, _, _)| self.ns(pod)).chain(extra) {
            if Path::new(&format!("/var/run/netns/{ns}")).exists() {
                let _ = self.ip(&["netns", "del", &ns]);
            }
        }
        let _ = self.ip(&["netns", "del", &self.ns("node")]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}
