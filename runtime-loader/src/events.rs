//! One event stream for a node (issue 11, DESIGN.md §6b): what `cnpc observe` reads.
//!
//! The programs write a verdict event for every dropped packet and every connection a packet
//! opens (codegen `gen::event`); the proxies print a JSON line per HTTP request and DNS query.
//! The loader turns both into [`FlowRecord`]s (one JSON object per line, the fields of
//! DESIGN.md §7) and hands each to the [`Hub`], which keeps the last N for newcomers and fans
//! them out to subscribers on a unix socket in the state directory (mode 0600: flows name
//! pods and addresses).
//!
//! A subscriber never slows the loader or the datapath: each has a bounded queue, a full
//! queue drops the record and counts it, and the subscriber is told how many it lost before
//! its next record (`{"type":"lost","count":N}`), as Hubble tells a slow client. The
//! protocol: the server greets with `{"cnpc":"events","version":1}` (so a client can tell a
//! cnpc socket from anything else), the client sends one request line (`{"last":N,
//! "follow":bool}`), the server sends up to N kept records, then, when following, every new
//! one.

use crate::metrics::MatchKind;
use cnpc_codegen_bpf::gen::event;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Records kept for new subscribers by default.
pub const KEEP: usize = 4096;
/// Records a subscriber may have queued before it starts losing them.
pub const QUEUE: usize = 1024;
/// The greeting a cnpc event socket sends first.
pub const GREETING: &str = r#"{"cnpc":"events","version":1}"#;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("a verdict event of {0} bytes (expected {size})", size = cnpc_codegen_bpf::gen::EVENT_SIZE)]
    Size(usize),
}

/// One verdict event of the programs, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    pub subject: u32,
    pub peer: u32,
    /// Row of the subject's table, `u32::MAX` for its default.
    pub row: u32,
    pub port: u16,
    pub protocol: u8,
    /// 0 allowed, 1 denied, 2 proxied.
    pub verdict: u8,
    pub egress: bool,
    pub subject_address: IpAddr,
    pub peer_address: IpAddr,
}

impl VerdictEvent {
    pub fn parse(e: &[u8]) -> Result<VerdictEvent, EventError> {
        if e.len() != cnpc_codegen_bpf::gen::EVENT_SIZE {
            return Err(EventError::Size(e.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let address = |at: usize| -> IpAddr {
            let mut b = [0u8; 16];
            b.copy_from_slice(&e[at..at + 16]);
            if e[event::FAMILY] == 6 {
                IpAddr::from(b)
            } else {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            }
        };
        Ok(VerdictEvent {
            subject: u32_at(event::SUBJECT),
            peer: u32_at(event::PEER),
            row: u32_at(event::ROW),
            port: u16::from_le_bytes([e[event::PORT], e[event::PORT + 1]]),
            protocol: e[event::PROTOCOL],
            verdict: e[event::VERDICT],
            egress: e[event::DIRECTION] == 1,
            subject_address: address(event::SUBJECT_ADDRESS),
            peer_address: address(event::PEER_ADDRESS),
        })
    }
}

/// One side of a flow: a pod (namespace, name), or an address outside the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub identity: u32,
    pub ip: Option<IpAddr>,
    /// A pod's labels (`k8s:key=value`), for `--from labels:...` filters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// The policy that decided a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    pub file: String,
    pub line: u32,
}

/// One flow as `cnpc observe -o json` prints it (DESIGN.md §7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// `l3l4`, `http` or `dns`.
    #[serde(rename = "type")]
    pub kind: String,
    pub direction: String,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// `80/TCP`, `8/ICMP`.
    pub port: String,
    /// `allowed`, `denied` or `proxied`.
    pub verdict: String,
    pub policy: Option<PolicyRef>,
    pub http: Option<serde_json::Value>,
    pub dns: Option<serde_json::Value>,
}

/// RFC 3339 with milliseconds, UTC, without a date crate: civil date from days since the epoch
/// (Howard Hinnant's algorithm).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn protocol_name(p: u8) -> String {
    cnpc_ir::Protocol::from_number(p).map_or_else(|| format!("proto-{p}"), |p| p.as_str().into())
}

/// The rule that decided a flow and its kind.
type Decided = (PolicyRef, MatchKind);

/// A pod's namespace, name and labels.
type PodName = (String, String, Arc<[String]>);

/// What a generation knows for naming flows: pods by address, and the rule behind each row
/// of each table.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Pods by address, shared between generations of the same snapshot (`pods_of` says which
    /// endpoint list it was made from).
    by_ip: Arc<HashMap<IpAddr, PodName>>,
    pods_of: Option<Arc<Vec<crate::generation::EndpointInfo>>>,
    rows: HashMap<(u32, bool), Vec<Option<Decided>>>,
    denies: HashMap<(u32, bool), Vec<crate::generation::DefaultDeny>>,
}

impl Names {
    /// From a generation's endpoints (`namespace/name`).
    pub fn new(endpoints: &[crate::generation::EndpointInfo]) -> Names {
        let mut by_ip = HashMap::new();
        for e in endpoints {
            let (ns, pod) = e.name.split_once('/').unwrap_or(("", e.name.as_str()));
            for ip in &e.ips {
                by_ip.insert(*ip, (ns.to_string(), pod.to_string(), e.labels.clone()));
            }
        }
        Names {
            by_ip: Arc::new(by_ip),
            pods_of: None,
            rows: HashMap::new(),
            denies: HashMap::new(),
        }
    }

    /// From a generation: its pods and its tables' row rules.
    pub fn of(g: &crate::generation::Generation) -> Names {
        Names::after(g, &Names::default())
    }

    /// [`Names::of`], taking the pods from `previous` when it was made from the same endpoint
    /// list (a policy edit leaves the snapshot's thousands of pods as they were).
    pub fn after(g: &crate::generation::Generation, previous: &Names) -> Names {
        let mut names = match &previous.pods_of {
            Some(e) if Arc::ptr_eq(e, &g.endpoints) => Names {
                by_ip: previous.by_ip.clone(),
                ..Names::default()
            },
            _ => Names::new(&g.endpoints),
        };
        names.pods_of = Some(g.endpoints.clone());
        names.rows = g
            .row_origins
            .iter()
            .map(|((subject, direction), origins)| {
                let key = (subject.0, *direction == cnpc_ir::Direction::Egress);
                (
                    key,
                    origins
                        .iter()
                        .map(|o| o.as_ref().map(|(o, k)| (policy_ref(o), *k)))
                        .collect(),
                )
            })
            .collect();
        names.denies = g
            .default_denies
            .iter()
            .map(|((subject, direction), d)| {
                (
                    (subject.0, *direction == cnpc_ir::Direction::Egress),
                    d.clone(),
                )
            })
            .collect();
        names
    }

    /// The deny rule that dropped what the default row of (`subject`, direction) dropped: one
    /// that selects the peer and covers the port; none when default deny alone did.
    fn default_policy(&self, e: &VerdictEvent) -> Option<(PolicyRef, MatchKind)> {
        let protocol = cnpc_ir::Protocol::from_number(e.protocol)?;
        self.denies
            .get(&(e.subject, e.egress))?
            .iter()
            .find(|d| {
                d.peers.contains(&cnpc_ir::NumericIdentity(e.peer))
                    && d.ports
                        .iter()
                        .any(|(p, r)| *p == protocol && r.lo <= e.port && e.port <= r.hi)
            })
            .map(|d| (policy_ref(&d.origin), d.kind))
    }

    /// The rule behind row `row` of the table of (`subject`, direction); none for the default
    /// (`u32::MAX`) or a row this generation does not have.
    fn row_policy(&self, subject: u32, egress: bool, row: u32) -> Option<(PolicyRef, MatchKind)> {
        self.rows
            .get(&(subject, egress))?
            .get(usize::try_from(row).ok()?)?
            .clone()
    }

    /// The rule that decided `e` and its kind (Cilium's policy match type); `none` when a
    /// table's default decided with no rule behind it.
    pub fn decided(&self, e: &VerdictEvent) -> (Option<PolicyRef>, MatchKind) {
        let found = if e.row == u32::MAX && e.verdict == 1 {
            self.default_policy(e)
        } else {
            self.row_policy(e.subject, e.egress, e.row)
        };
        match found {
            Some((p, k)) => (Some(p), k),
            None => (None, MatchKind::None),
        }
    }

    fn peer(&self, ip: IpAddr, identity: u32) -> FlowPeer {
        let (namespace, pod, labels) = self
            .by_ip
            .get(&ip)
            .map_or((None, None, Vec::new()), |(n, p, l)| {
                (Some(n.clone()), Some(p.clone()), l.to_vec())
            });
        FlowPeer {
            namespace,
            pod,
            identity,
            ip: Some(ip),
            labels,
        }
    }
}

/// The record of a verdict event seen at `time`; the source is the peer on ingress and the
/// endpoint on egress.
pub fn record(e: &VerdictEvent, names: &Names, time: SystemTime) -> FlowRecord {
    let me = names.peer(e.subject_address, e.subject);
    let peer = names.peer(e.peer_address, e.peer);
    let (source, destination) = if e.egress { (me, peer) } else { (peer, me) };
    FlowRecord {
        time: rfc3339(time),
        kind: "l3l4".into(),
        direction: if e.egress { "egress" } else { "ingress" }.into(),
        source,
        destination,
        port: format!("{}/{}", e.port, protocol_name(e.protocol)),
        verdict: match e.verdict {
            0 => "allowed",
            2 => "proxied",
            _ => "denied",
        }
        .into(),
        policy: names.decided(e).0,
        http: None,
        dns: None,
    }
}

/// A following subscriber's queue and its count of records lost.
type Queue = (mpsc::Receiver<Arc<str>>, Arc<AtomicU64>);

/// A subscriber's side of the hub.
struct Subscriber {
    tx: mpsc::SyncSender<Arc<str>>,
    lost: Arc<AtomicU64>,
}

/// The fan-out of records: the last [`KEEP`] kept, each subscriber fed through a bounded
/// queue. Publishing never blocks.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
    keep: usize,
}

#[derive(Default)]
struct HubInner {
    last: VecDeque<Arc<str>>,
    subscribers: Vec<Subscriber>,
    published: u64,
}

impl Hub {
    pub fn new(keep: usize) -> Hub {
        Hub {
            inner: Mutex::default(),
            keep,
        }
    }

    /// Adds a record (one JSON line, no newline).
    pub fn publish(&self, line: String) {
        let line: Arc<str> = line.into();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.published += 1;
        if self.keep > 0 {
            if inner.last.len() == self.keep {
                inner.last.pop_front();
            }
            inner.last.push_back(line.clone());
        }
        inner
            .subscribers
            .retain(|s| match s.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(mpsc::TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::TrySendError::Disconnected(_)) => false,
            });
    }

    /// Records published so far.
    pub fn published(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .published
    }

    /// The last `n` records, and (when `follow`) a queue of the records to come with its loss
    /// counter.
    fn subscribe(&self, n: usize, follow: bool) -> (Vec<Arc<str>>, Option<Queue>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let skip = inner.last.len().saturating_sub(n);
        let last = inner.last.iter().skip(skip).cloned().collect();
        let queue = follow.then(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let lost = Arc::new(AtomicU64::new(0));
            inner.subscribers.push(Subscriber {
                tx,
                lost: lost.clone(),
            });
            (rx, lost)
        });
        (last, queue)
    }
}

/// A subscriber's request.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Request {
    pub last: usize,
    pub follow: bool,
}

/// Serves `hub` on the unix socket `path` (mode 0600), one thread per subscriber.
pub fn serve(path: &Path, hub: Arc<Hub>) -> std::io::Result<()> {
    let listener = crate::sys::root_only_socket(path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let _ = subscriber(stream, &hub);
            });
        }
    });
    Ok(())
}

fn subscriber(stream: std::os::unix::net::UnixStream, hub: &Hub) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(stream.try_clone()?);
    writeln!(out, "{GREETING}")?;
    out.flush()?;
    // A client that never asks is not kept waiting on forever.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            writeln!(out, "{}", serde_json::json!({"error": e.to_string()}))?;
            return out.flush();
        }
    };
    let (last, queue) = hub.subscribe(request.last, request.follow);
    for l in last {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    let Some((rx, lost)) = queue else {
        return Ok(());
    };
    for l in rx {
        let n = lost.swap(0, Ordering::Relaxed);
        if n > 0 {
            writeln!(out, "{}", serde_json::json!({"type": "lost", "count": n}))?;
        }
        writeln!(out, "{l}")?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_657_015_612);
        assert_eq!(rfc3339(t), "2026-11-26T01:36:55.612Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    fn event(egress: bool, verdict: u8) -> Vec<u8> {
        let mut e = vec![0u8; cnpc_codegen_bpf::gen::EVENT_SIZE];
        e[event::SUBJECT..event::SUBJECT + 4].copy_from_slice(&300u32.to_le_bytes());
        e[event::PEER..event::PEER + 4].copy_from_slice(&2u32.to_le_bytes());
        e[event::ROW..event::ROW + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        e[event::PORT..event::PORT + 2].copy_from_slice(&443u16.to_le_bytes());
        e[event::PROTOCOL] = 6;
        e[event::VERDICT] = verdict;
        e[event::DIRECTION] = u8::from(egress);
        e[event::FAMILY] = 4;
        e[event::SUBJECT_ADDRESS..event::SUBJECT_ADDRESS + 4].copy_from_slice(&[10, 0, 1, 40]);
        e[event::PEER_ADDRESS..event::PEER_ADDRESS + 4].copy_from_slice(&[198, 51, 100, 10]);
        e
    }

    #[test]
    fn an_event_becomes_a_named_record() {
        let names = Names::new(&[crate::generation::EndpointInfo {
            name: "default/mediabot".into(),
            identity: cnpc_ir::NumericIdentity(300),
            labels: Arc::new([]),
            ips: vec!["10.0.1.40".parse().unwrap()],
            interface: None,
        }]);
        let e = VerdictEvent::parse(&event(true, 1)).unwrap();
        let r = record(&e, &names, SystemTime::UNIX_EPOCH);
        assert_eq!(r.direction, "egress");
        assert_eq!(r.verdict, "denied");
        assert_eq!(r.port, "443/TCP");
        assert_eq!(r.source.pod.as_deref(), Some("mediabot"));
        assert_eq!(r.source.namespace.as_deref(), Some("default"));
        assert_eq!(r.destination.ip, Some("198.51.100.10".parse().unwrap()));
        assert_eq!(r.destination.pod, None);
        assert_eq!(r.destination.identity, 2);
        // Ingress: the peer is the source.
        let e = VerdictEvent::parse(&event(false, 0)).unwrap();
        let r = record(&e, &names, SystemTime::UNIX_EPOCH);
        assert_eq!(r.source.identity, 2);
        assert_eq!(r.destination.pod.as_deref(), Some("mediabot"));
        assert!(VerdictEvent::parse(&[0u8; 10]).is_err());
    }

    #[test]
    fn a_slow_subscriber_loses_records_and_is_told() {
        let hub = Hub::new(3);
        let (last, queue) = hub.subscribe(10, true);
        assert!(last.is_empty());
        let (rx, lost) = queue.unwrap();
        for i in 0..QUEUE + 5 {
            hub.publish(format!("{{\"n\":{i}}}"));
        }
        assert_eq!(
            lost.load(Ordering::Relaxed),
            5,
            "the queue holds QUEUE, the rest are lost"
        );
        assert_eq!(rx.try_iter().count(), QUEUE);
        // Newcomers get the last three.
        let (last, _) = hub.subscribe(10, false);
        assert_eq!(last.len(), 3);
        assert_eq!(&*last[2], &*format!("{{\"n\":{}}}", QUEUE + 4));
        assert_eq!(hub.published(), (QUEUE + 5) as u64);
    }

    #[test]
    fn the_socket_greets_replays_and_follows() {
        let dir = std::env::temp_dir().join(format!("cnpc-events-{}", std::process::id()));
        let path = dir.join("events.sock");
        let hub = Arc::new(Hub::new(KEEP));
        hub.publish("{\"n\":1}".into());
        hub.publish("{\"n\":2}".into());
        serve(&path, hub.clone()).unwrap();
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), GREETING);
        writeln!(&s, "{}", serde_json::json!({"last": 1, "follow": true})).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "{\"n\":2}");
        // Published after subscribing: it arrives.
        std::thread::sleep(Duration::from_millis(50));
        hub.publish("{\"n\":3}".into());
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "{\"n\":3}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The record of an HTTP request the proxy judged (addresses only: the proxy's event does not
/// name identities, and pods are named from the loader's generation).
pub fn http_record(e: &cnpc_proxy::L7Event, names: &Names) -> FlowRecord {
    let egress = e.direction == cnpc_ir::Direction::Egress;
    FlowRecord {
        time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(e.time)),
        kind: "http".into(),
        direction: if egress { "egress" } else { "ingress" }.into(),
        source: names.peer(e.source.ip(), 0),
        destination: names.peer(e.destination.ip(), 0),
        port: format!("{}/TCP", e.destination.port()),
        verdict: match e.verdict {
            cnpc_proxy::Verdict::Allowed => "allowed",
            cnpc_proxy::Verdict::Denied => "denied",
        }
        .into(),
        policy: e.rule.as_ref().map(policy_ref),
        http: Some(serde_json::json!({
            "method": e.method, "path": e.path, "host": e.host, "status": e.status,
        })),
        dns: None,
    }
}

/// The record of a DNS query the proxy judged.
pub fn dns_record(e: &cnpc_proxy::events::DnsEvent, names: &Names) -> FlowRecord {
    FlowRecord {
        time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(e.time)),
        kind: "dns".into(),
        direction: "egress".into(),
        source: names.peer(e.source.ip(), 0),
        destination: names.peer(e.destination.ip(), 0),
        port: format!("{}/{}", e.destination.port(), e.protocol.to_uppercase()),
        verdict: match e.verdict {
            cnpc_proxy::Verdict::Allowed => "allowed",
            cnpc_proxy::Verdict::Denied => "denied",
        }
        .into(),
        policy: e.rule.as_ref().map(policy_ref),
        http: None,
        dns: Some(serde_json::json!({
            "query": e.query, "qtype": e.qtype, "rcode": e.rcode, "addresses": e.addresses,
        })),
    }
}

fn policy_ref(o: &cnpc_ir::Origin) -> PolicyRef {
    PolicyRef {
        name: o.policy.clone(),
        file: o.file.clone(),
        line: o.line,
    }
}

/// Why `cnpc observe` could not read the stream (exit code 2 for all).
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{path}: no cnpc-loader is serving events here ({source}); is the loader running with this --state-dir?")]
    NotRunning {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a cnpc event socket (it did not greet as one)")]
    NotCnpc { path: std::path::PathBuf },
    #[error("{path}: a malformed record from the loader: {line}")]
    Malformed {
        path: std::path::PathBuf,
        line: String,
    },
    #[error("--{flag} `{value}`: {why}")]
    Filter {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// Who a `--from`/`--to` filter means: the peer forms of `cnpc trace` that an event can be
/// matched against without a cluster snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerFilter {
    /// `pod:NAMESPACE/NAME`: the pod, or the pods of a workload (`NAME-...`).
    Pod {
        namespace: String,
        name: String,
    },
    Ip(IpAddr),
    /// `labels:NAMESPACE:key=value,...`: pods of the namespace with all these labels.
    Labels {
        namespace: String,
        pairs: Vec<(String, String)>,
    },
    /// `entity:world`: addresses that are no pod.
    World,
    /// `entity:NAME` for the other reserved identities (host, remote-node, ...).
    Entity(u32),
}

impl PeerFilter {
    pub fn parse(flag: &'static str, s: &str) -> Result<PeerFilter, ObserveError> {
        let err = |why: &str| ObserveError::Filter {
            flag,
            value: s.to_string(),
            why: why.to_string(),
        };
        match s.split_once(':') {
            Some(("pod", rest)) => {
                let (namespace, name) = rest
                    .split_once('/')
                    .ok_or_else(|| err("write pod:NAMESPACE/NAME"))?;
                Ok(PeerFilter::Pod {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            Some(("ip", a)) => a
                .parse()
                .map(PeerFilter::Ip)
                .map_err(|_| err("not an IP address")),
            Some(("entity", "world")) => Ok(PeerFilter::World),
            Some(("entity", name)) => cnpc_ir::Reserved::ALL
                .into_iter()
                .find(|r| r.name() == name)
                .map(|r| PeerFilter::Entity(r.numeric().0))
                .ok_or_else(|| err("not an entity (host, world, remote-node, ...)")),
            Some(("labels", rest)) => {
                let (namespace, pairs) = rest
                    .split_once(':')
                    .ok_or_else(|| err("write labels:NAMESPACE:key=value,..."))?;
                let pairs = pairs
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        p.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .ok_or_else(|| err("write labels:NAMESPACE:key=value,..."))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(PeerFilter::Labels {
                    namespace: namespace.into(),
                    pairs,
                })
            }
            Some(("fqdn", _)) => Err(err(
                "records carry addresses, not names: use ip:ADDRESS (cnpc trace --to fqdn:NAME shows what a name resolved to)",
            )),
            _ => Err(err(
                "write pod:NAMESPACE/NAME, labels:NAMESPACE:key=value,..., ip:ADDRESS or entity:NAME",
            )),
        }
    }

    fn matches(&self, p: &FlowPeer) -> bool {
        match self {
            PeerFilter::Pod { namespace, name } => {
                p.namespace.as_deref() == Some(namespace)
                    && p.pod.as_deref().is_some_and(|pod| {
                        pod == name
                            || pod
                                .strip_prefix(name.as_str())
                                .is_some_and(|r| r.starts_with('-'))
                    })
            }
            PeerFilter::Ip(ip) => p.ip == Some(*ip),
            PeerFilter::Labels { namespace, pairs } => {
                p.namespace.as_deref() == Some(namespace)
                    && pairs.iter().all(|(k, v)| {
                        p.labels.iter().any(|l| {
                            l.split_once(':').map_or(l.as_str(), |(_, kv)| kv) == format!("{k}={v}")
                        })
                    })
            }
            PeerFilter::World => p.pod.is_none(),
            PeerFilter::Entity(id) => p.identity == *id,
        }
    }
}

/// The filters of `cnpc observe`; unset ones match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub from: Option<PeerFilter>,
    pub to: Option<PeerFilter>,
    /// `allowed`, `denied` or `proxied`.
    pub verdict: Option<String>,
    /// `80` or `80/TCP`.
    pub port: Option<String>,
    /// `l3l4`, `http` or `dns`.
    pub kind: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let port_ok = self.port.as_ref().is_none_or(|p| {
            if p.contains('/') {
                r.port.eq_ignore_ascii_case(p)
            } else {
                r.port.split('/').next() == Some(p.as_str())
            }
        });
        self.from.as_ref().is_none_or(|f| f.matches(&r.source))
            && self.to.as_ref().is_none_or(|f| f.matches(&r.destination))
            && self.verdict.as_ref().is_none_or(|v| *v == r.verdict)
            && self.kind.as_ref().is_none_or(|k| *k == r.kind)
            && port_ok
    }
}

fn peer_text(p: &FlowPeer) -> String {
    match (&p.namespace, &p.pod, p.ip) {
        (Some(ns), Some(pod), _) => format!("{ns}/{pod} (ID:{})", p.identity),
        (_, _, Some(ip)) if p.identity == 0 => ip.to_string(),
        (_, _, Some(ip)) => format!("{ip} (ID:{})", p.identity),
        _ => format!("ID:{}", p.identity),
    }
}

/// One line like `hubble observe`'s.
pub fn text_line(r: &FlowRecord) -> String {
    let mut s = format!(
        "{}  {} -> {}  {}  {}  {}",
        r.time,
        peer_text(&r.source),
        peer_text(&r.destination),
        r.port,
        r.direction,
        r.verdict.to_uppercase()
    );
    if let Some(h) = &r.http {
        s.push_str(&format!(
            "  HTTP {} {} {}",
            h["method"].as_str().unwrap_or(""),
            h["path"].as_str().unwrap_or(""),
            h["status"]
        ));
    }
    if let Some(d) = &r.dns {
        s.push_str(&format!(
            "  DNS {} {}",
            d["qtype"].as_str().unwrap_or(""),
            d["query"].as_str().unwrap_or("")
        ));
    }
    if let Some(p) = &r.policy {
        s.push_str(&format!("  by {} ({}:{})", p.name, p.file, p.line));
    }
    s
}

/// Reads the loader's event socket at `path`: the last `last` records, then every new one
/// when `follow`; prints those `filter` keeps, one per line (JSON or text). A `lost` notice
/// goes to stderr.
pub fn observe(
    path: &Path,
    last: usize,
    follow: bool,
    filter: &Filter,
    json: bool,
    out: &mut impl Write,
) -> Result<(), ObserveError> {
    use std::os::unix::net::UnixStream;
    let stream = UnixStream::connect(path).map_err(|source| ObserveError::NotRunning {
        path: path.into(),
        source,
    })?;
    let not_cnpc = || ObserveError::NotCnpc { path: path.into() };
    // A socket that says nothing within a second is not a cnpc loader's.
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|_| not_cnpc())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|_| not_cnpc())?);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(_) if line.trim() == GREETING => {}
        _ => return Err(not_cnpc()),
    }
    let request = serde_json::to_string(&Request { last, follow }).unwrap_or_default();
    writeln!(&stream, "{request}").map_err(|source| ObserveError::NotRunning {
        path: path.into(),
        source,
    })?;
    stream
        .set_read_timeout(if follow {
            None
        } else {
            Some(Duration::from_secs(5))
        })
        .map_err(|_| not_cnpc())?;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // Without --follow the loader sends what it has and closes; a stall ends it.
            Err(_) if !follow => return Ok(()),
            Err(source) => {
                return Err(ObserveError::NotRunning {
                    path: path.into(),
                    source,
                })
            }
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|_| ObserveError::Malformed {
                path: path.into(),
                line: line.trim().to_string(),
            })?;
        if value["type"] == "lost" {
            eprintln!(
                "cnpc observe: {} records lost (reading too slowly)",
                value["count"]
            );
            continue;
        }
        let record: FlowRecord =
            serde_json::from_value(value).map_err(|_| ObserveError::Malformed {
                path: path.into(),
                line: line.trim().to_string(),
            })?;
        if !filter.matches(&record) {
            continue;
        }
        let text = if json {
            serde_json::to_string(&record).unwrap_or_default()
        } else {
            text_line(&record)
        };
        writeln!(out, "{text}").map_err(ObserveError::Output)?;
        if follow {
            out.flush().map_err(ObserveError::Output)?;
        }
    }
}

#[cfg(test)]
mod observe_tests {
    use super::*;

    fn rec(src_pod: Option<&str>, dst_ip: &str, verdict: &str, port: &str) -> FlowRecord {
        FlowRecord {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            kind: "l3l4".into(),
            direction: "egress".into(),
            source: FlowPeer {
                namespace: src_pod.map(|_| "default".into()),
                pod: src_pod.map(String::from),
                identity: 300,
                ip: Some("10.0.1.40".parse().unwrap()),
                labels: Vec::new(),
            },
            destination: FlowPeer {
                ip: Some(dst_ip.parse().unwrap()),
                identity: 2,
                ..FlowPeer::default()
            },
            port: port.into(),
            verdict: verdict.into(),
            policy: None,
            http: None,
            dns: None,
        }
    }

    #[test]
    fn filters_take_the_peer_forms_of_trace() {
        let from = PeerFilter::parse("from", "pod:default/xwing").unwrap();
        let to = PeerFilter::parse("to", "ip:198.51.100.10").unwrap();
        let f = Filter {
            from: Some(from),
            to: Some(to),
            verdict: Some("denied".into()),
            port: Some("443".into()),
            kind: None,
        };
        assert!(f.matches(&rec(Some("xwing"), "198.51.100.10", "denied", "443/TCP")));
        // A pod of the workload (name-hash) counts; another workload does not.
        assert!(f.matches(&rec(
            Some("xwing-5d78c"),
            "198.51.100.10",
            "denied",
            "443/TCP"
        )));
        assert!(!f.matches(&rec(Some("xwingman"), "198.51.100.10", "denied", "443/TCP")));
        assert!(!f.matches(&rec(Some("xwing"), "198.51.100.10", "allowed", "443/TCP")));
        assert!(!f.matches(&rec(Some("xwing"), "198.51.100.10", "denied", "80/TCP")));
        let world = Filter {
            to: Some(PeerFilter::parse("to", "entity:world").unwrap()),
            port: Some("443/tcp".into()),
            ..Filter::default()
        };
        assert!(world.matches(&rec(None, "198.51.100.10", "denied", "443/TCP")));
        assert!(PeerFilter::parse("from", "fqdn:api.github.com").is_err());
        assert!(PeerFilter::parse("from", "entity:nowhere").is_err());
        let mut xwing = rec(Some("xwing"), "198.51.100.10", "denied", "443/TCP");
        xwing.source.labels = vec!["k8s:org=alliance".into(), "k8s:class=xwing".into()];
        let alliance = Filter {
            from: Some(PeerFilter::parse("from", "labels:default:org=alliance").unwrap()),
            to: Some(PeerFilter::parse("to", "entity:world").unwrap()),
            ..Filter::default()
        };
        assert!(alliance.matches(&xwing));
        let empire = Filter {
            from: Some(PeerFilter::parse("from", "labels:default:org=empire").unwrap()),
            ..Filter::default()
        };
        assert!(!empire.matches(&xwing));
        let host = Filter {
            to: Some(PeerFilter::parse("to", "entity:host").unwrap()),
            ..Filter::default()
        };
        assert!(!host.matches(&xwing), "the world is not the host");
        assert!(PeerFilter::parse("from", "ip:nope").is_err());
    }

    #[test]
    fn bad_sockets_are_clear_errors_not_hangs() {
        let dir = std::env::temp_dir().join(format!("cnpc-observe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = Vec::new();
        // No loader.
        let missing = dir.join("missing.sock");
        let e = observe(&missing, 10, false, &Filter::default(), true, &mut out).unwrap_err();
        assert!(matches!(e, ObserveError::NotRunning { .. }), "{e}");
        // A socket that is not cnpc's: it never greets.
        let quiet = dir.join("quiet.sock");
        let listener = std::os::unix::net::UnixListener::bind(&quiet).unwrap();
        std::thread::spawn(move || {
            let _kept: Vec<_> = listener.incoming().take(1).collect();
            std::thread::sleep(Duration::from_secs(3));
        });
        let started = std::time::Instant::now();
        let e = observe(&quiet, 10, true, &Filter::default(), true, &mut out).unwrap_err();
        assert!(matches!(e, ObserveError::NotCnpc { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3), "no hang");
        // A loader that sends garbage.
        let bad = dir.join("bad.sock");
        let listener = std::os::unix::net::UnixListener::bind(&bad).unwrap();
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = listener.incoming().next() {
                let _ = writeln!(s, "{GREETING}");
                let mut request = String::new();
                let _ = BufReader::new(&s).read_line(&mut request);
                let _ = writeln!(s, "not json");
            }
        });
        let e = observe(&bad, 10, false, &Filter::default(), true, &mut out).unwrap_err();
        assert!(matches!(e, ObserveError::Malformed { .. }), "{e}");
        assert!(out.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_print_as_json_and_text() {
        let dir = std::env::temp_dir().join(format!("cnpc-observe-ok-{}", std::process::id()));
        let path = dir.join("events.sock");
        let hub = Arc::new(Hub::new(KEEP));
        let r = rec(Some("xwing"), "198.51.100.10", "denied", "443/TCP");
        hub.publish(serde_json::to_string(&r).unwrap());
        serve(&path, hub).unwrap();
        let mut out = Vec::new();
        observe(&path, 50, false, &Filter::default(), true, &mut out).unwrap();
        let back: FlowRecord = serde_json::from_slice(out.trim_ascii_end()).unwrap();
        assert_eq!(back, r);
        let mut out = Vec::new();
        observe(&path, 50, false, &Filter::default(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "default/xwing (ID:300) -> 198.51.100.10 (ID:2)  443/TCP  egress  DENIED"
            ),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod match_tests {
    use crate::metrics::MatchKind;
    use cnpc_ir::*;

    fn rule(peers: Vec<Peer>, l4: Vec<L4Term>) -> Rule {
        Rule {
            origin: Origin {
                policy: "p".into(),
                file: "f".into(),
                line: 1,
            },
            subject: Subject::Endpoints(Selector::default()),
            direction: Direction::Egress,
            action: Action::Allow,
            peers,
            l4,
            l7: None,
        }
    }

    #[test]
    fn rules_are_classified_as_cilium_names_its_policy_matches() {
        let sel = || Peer::Selector(Selector::default());
        let port = |lo: u16, hi: u16| L4Term::Ports {
            protocols: vec![Protocol::Tcp],
            range: PortRange { lo, hi },
        };
        assert_eq!(MatchKind::of(&rule(vec![sel()], vec![])), MatchKind::L3Only);
        assert_eq!(
            MatchKind::of(&rule(vec![sel()], vec![port(80, 80)])),
            MatchKind::L3L4
        );
        assert_eq!(
            MatchKind::of(&rule(vec![Peer::Any], vec![port(80, 80)])),
            MatchKind::L4Only
        );
        assert_eq!(
            MatchKind::of(&rule(vec![Peer::Any], vec![])),
            MatchKind::All
        );
        assert_eq!(
            MatchKind::of(&rule(vec![sel()], vec![port(0, 65535)])),
            MatchKind::L3Proto
        );
        assert_eq!(
            MatchKind::of(&rule(vec![Peer::Any], vec![port(0, 65535)])),
            MatchKind::ProtoOnly
        );
        assert_eq!(MatchKind::L3L4.as_str(), "L3-L4");
    }
}
