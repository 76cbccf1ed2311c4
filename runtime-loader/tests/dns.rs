//! End to end, DNS rules and toFQDNs on a node (issue 10): the seed's DNS demos
//! (policies/dns) on one machine, in namespaces the test creates: the mediabot pod, the
//! cluster's DNS server pod (kube-dns, 10.0.1.53: a server this test runs, with fixed records
//! and TTLs, counting the queries it receives) and a "world" namespace holding the external
//! addresses the names resolve to (TEST-NET-2, RFC 5737), with TCP echo servers on 80 and 443.
//! `cnpc-loader` supervises the real `cnpc-proxy`.
//!
//! Shown: an address a toFQDNs rule names is unreachable before the lookup and reachable on
//! the first SYN after it (the answer is held until the datapath knows it); an address learned
//! for a name no toFQDNs selects stays denied; DNS over TCP; a loader restart keeps learned
//! addresses; a query outside the DNS rules gets REFUSED and never reaches the server; a
//! pattern and a port restriction apply; a CNAME chain's addresses count for the question;
//! when the TTL ends, new connections are refused while an established one keeps working
//! (Cilium's zombies).

mod netns;

use cnpc_runtime_loader::sys;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata, Name, RData, Record, RecordType};
use netns::{echoes, Net};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SHORT: Duration = Duration::from_millis(400);
/// The loader's /metrics, inside the node's namespace.
const METRICS: &str = "127.0.0.1:9963";
const MEDIABOT: (&str, &str, &str) = ("mb", "mb", "10.0.1.40");
const KUBE_DNS: (&str, &str, &str) = ("dns", "dn", "10.0.1.53");
const API: &str = "198.51.100.10";
const EDGE: &str = "198.51.100.11";
const EXAMPLE: &str = "198.51.100.12";
const SHORT_LIVED: &str = "198.51.100.13";
const NEW: &str = "198.51.100.14";

/// The DNS server's records: (name, CNAME target or address, TTL).
const RECORDS: [(&str, &str, u32); 6] = [
    ("new.github.com", NEW, 60),
    ("api.github.com", API, 60),
    ("www.github.com", "edge.github.com", 60),
    ("edge.github.com", EDGE, 60),
    ("example.com", EXAMPLE, 60),
    ("short.github.com", SHORT_LIVED, 2),
];

/// With NARROW: new.github.com is matched by two selectors (this name and NARROW's pattern),
/// a set no generation has an identity for until its first answer.
const NEW_NAME: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mediabot-new, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: mediabot}}
  egress:
  - toFQDNs: [{matchName: new.github.com}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

/// The match-name demo with its DNS rule narrowed to github.com names, and the port variant
/// of the pattern demo: what REFUSED and the port restriction are shown with.
const NARROW: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mediabot-narrow, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: mediabot}}
  egress:
  - toFQDNs: [{matchPattern: "*.github.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.github.com"}]
"#;

type Asked = Arc<Mutex<BTreeMap<String, usize>>>;

/// The answer of the test's DNS server to one query message.
fn answer(query: &[u8], asked: &Asked) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let qname = question
        .name
        .to_ascii()
        .trim_end_matches('.')
        .to_lowercase();
    *asked.lock().unwrap().entry(qname.clone()).or_default() += 1;
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    let mut name = qname;
    for _ in 0..4 {
        let Some((_, target, ttl)) = RECORDS.iter().find(|(n, _, _)| *n == name) else {
            break;
        };
        let owner = Name::from_ascii(format!("{name}.")).ok()?;
        match target.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if question.query_type == RecordType::A => {
                m.add_answer(Record::from_rdata(owner, *ttl, RData::A(rdata::A(a))));
                break;
            }
            Ok(_) => break,
            Err(_) => {
                let t = Name::from_ascii(format!("{target}.")).ok()?;
                m.add_answer(Record::from_rdata(
                    owner,
                    *ttl,
                    RData::CNAME(rdata::CNAME(t)),
                ));
                name = target.to_string();
            }
        }
    }
    if m.answers.is_empty() {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    m.to_vec().ok()
}

/// The DNS server in kube-dns's namespace: UDP and TCP on port 53.
fn serve_dns(net: &Net, asked: Asked) {
    let addr: SocketAddr = format!("{}:53", KUBE_DNS.2).parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let udp_asked = asked.clone();
    let tx2 = tx.clone();
    net.in_ns(KUBE_DNS.0, move || {
        let s = UdpSocket::bind(addr).expect("bind udp 53");
        let _ = tx2.send(());
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if let Some(a) = answer(&buf[..n], &udp_asked) {
                let _ = s.send_to(&a, from);
            }
        }
    });
    net.in_ns(KUBE_DNS.0, move || {
        let l = std::net::TcpListener::bind(addr).expect("bind tcp 53");
        let _ = tx.send(());
        for mut s in l.incoming().flatten() {
            let asked = asked.clone();
            std::thread::spawn(move || loop {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut q).is_err() {
                    return;
                }
                let Some(a) = answer(&q, &asked) else { return };
                let mut out = (a.len() as u16).to_be_bytes().to_vec();
                out.extend(a);
                if s.write_all(&out).is_err() {
                    return;
                }
            });
        }
    });
    rx.recv().unwrap();
    rx.recv().unwrap();
}

/// Asks kube-dns for `name`'s A records from the mediabot: (rcode, addresses), or `None` when
/// no answer came within `timeout`.
fn lookup(
    net: &Net,
    name: &str,
    tcp: bool,
    timeout: Duration,
) -> Option<(ResponseCode, Vec<IpAddr>)> {
    let mut q = Message::new(0x4242, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).unwrap(),
        RecordType::A,
    ));
    let bytes = q.to_vec().unwrap();
    let server: SocketAddr = format!("{}:53", KUBE_DNS.2).parse().unwrap();
    let reply = net
        .in_ns(MEDIABOT.0, move || -> Option<Vec<u8>> {
            if tcp {
                let mut s = TcpStream::connect_timeout(&server, timeout).ok()?;
                s.set_read_timeout(Some(timeout)).ok()?;
                let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
                out.extend(&bytes);
                s.write_all(&out).ok()?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).ok()?;
                let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut a).ok()?;
                Some(a)
            } else {
                let s = UdpSocket::bind("0.0.0.0:0").ok()?;
                s.set_read_timeout(Some(timeout)).ok()?;
                s.send_to(&bytes, server).ok()?;
                let mut buf = [0u8; 1500];
                let (n, from) = s.recv_from(&mut buf).ok()?;
                // The pod's resolver only takes answers from the server it asked.
                assert_eq!(
                    from, server,
                    "the answer must come from the server's address"
                );
                Some(buf[..n].to_vec())
            }
        })
        .join()
        .unwrap()?;
    let m = Message::from_vec(&reply).ok()?;
    assert_eq!(m.metadata.id, 0x4242, "the answer carries the query's id");
    let addrs = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    Some((m.metadata.response_code, addrs))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn logs(net: &Net) -> String {
    format!(
        "--- loader\n{}\n--- proxy\n{}",
        net.log(),
        std::fs::read_to_string(net.tmp.join("state/proxy.log")).unwrap_or_default()
    )
}

#[test]
fn dns_rules_are_enforced_and_fqdn_addresses_learned() {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let proxy = match netns::proxy_binary(env!("CARGO_BIN_EXE_cnpc-loader")) {
        Ok(p) => p,
        Err(e) => return sys::skip_or_fail(&e),
    };
    let mut net = match Net::pods() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    for (pod, suffix, addr) in [MEDIABOT, KUBE_DNS] {
        net.add_pod(pod, suffix, addr).unwrap();
    }
    net.add_world(&[API, EDGE, EXAMPLE, SHORT_LIVED, NEW])
        .unwrap();
    for addr in [API, EDGE, EXAMPLE, SHORT_LIVED, NEW] {
        for port in [80, 443] {
            net.serve_echo("world", addr, port).unwrap();
        }
    }
    let asked: Asked = Arc::default();
    serve_dns(&net, asked.clone());
    let asked_for = |name: &str| asked.lock().unwrap().get(name).copied().unwrap_or(0);
    std::fs::copy(
        netns::root().join("policies/dns/match-name/mediabot.yaml"),
        net.policies.join("mediabot.yaml"),
    )
    .unwrap();
    net.loader_args = vec![
        "--proxy".into(),
        proxy.display().to_string(),
        "--fqdn-min-ttl".into(),
        "0".into(),
        "--metrics".into(),
        METRICS.into(),
    ];
    net.start_loader().unwrap();
    let mb = MEDIABOT.0;
    let reach = |net: &Net, addr: &str, port: u16| {
        net.connect_to(mb, addr, port, SHORT)
            .is_some_and(|s| echoes(&s))
    };

    // The DNS rule allows every name (matchPattern "*"): once the proxy runs, answers come.
    assert!(
        net.until(Duration::from_secs(20), || net.generation() >= 1
            && lookup(&net, "example.com", false, SHORT).is_some())
            .is_some(),
        "no generation or no DNS answer:\n{}",
        logs(&net)
    );
    // Learned for a name no toFQDNs selects: still the world, denied.
    assert!(
        !reach(&net, EXAMPLE, 80),
        "example.com is not selected:\n{}",
        logs(&net)
    );

    // matchName api.github.com: unreachable before the lookup, reachable on the first SYN
    // after it (no retry: the answer was held until the datapath knew the address).
    assert!(!reach(&net, API, 80), "api.github.com before any lookup");
    let (rcode, addrs) = lookup(&net, "api.github.com", false, Duration::from_secs(2))
        .expect("an answer through the DNS proxy");
    assert_eq!((rcode, addrs), (ResponseCode::NoError, vec![ip(API)]));
    let first = net.connect_to(mb, API, 80, SHORT);
    assert!(
        first.as_ref().is_some_and(echoes),
        "the first connection after the answer:\n{}",
        logs(&net)
    );
    // DNS over TCP goes through the proxy too.
    let before = asked_for("api.github.com");
    assert_eq!(
        lookup(&net, "api.github.com", true, Duration::from_secs(2)).map(|(r, _)| r),
        Some(ResponseCode::NoError),
        "DNS over TCP:\n{}",
        logs(&net)
    );
    assert_eq!(asked_for("api.github.com"), before + 1);

    // The pattern demo: any single label under github.com, any port. api.github.com, learned
    // under the match-name policy, is selected by the pattern now without a new lookup.
    std::fs::copy(
        netns::root().join("policies/dns/match-pattern/mediabot.yaml"),
        net.policies.join("mediabot.yaml"),
    )
    .unwrap();
    let (rcode, addrs) = net
        .until(Duration::from_secs(5), || {
            lookup(&net, "www.github.com", false, SHORT).is_some_and(|(_, a)| !a.is_empty())
        })
        .and_then(|_| lookup(&net, "www.github.com", false, Duration::from_secs(2)))
        .expect("www.github.com answered");
    // A CNAME of edge.github.com: the chain's address is www's.
    assert_eq!((rcode, addrs), (ResponseCode::NoError, vec![ip(EDGE)]));
    assert!(
        net.until(Duration::from_secs(5), || reach(&net, EDGE, 80)
            && reach(&net, API, 80))
            .is_some(),
        "*.github.com on any port:\n{}",
        logs(&net)
    );

    // A loader restart keeps what it learned: no lookup needed afterwards.
    let applied = |net: &Net| net.log().matches(" applied ").count();
    let before = applied(&net);
    if let Some(mut c) = net.loader.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    net.start_loader().unwrap();
    // The restarted loader adopts the pinned programs (the generation number stays).
    assert!(
        net.until(Duration::from_secs(20), || applied(&net) > before)
            .is_some(),
        "no generation after the restart:\n{}",
        logs(&net)
    );
    assert!(
        reach(&net, API, 80),
        "learned before the restart:\n{}",
        logs(&net)
    );

    // Narrowed: only github.com names may be asked, only 443 reached.
    std::fs::remove_file(net.policies.join("mediabot.yaml")).unwrap();
    std::fs::write(net.policies.join("narrow.yaml"), NARROW).unwrap();
    let before = asked_for("example.com");
    assert!(
        net.until(Duration::from_secs(10), || lookup(
            &net,
            "example.com",
            false,
            SHORT
        )
        .is_some_and(|(r, _)| r == ResponseCode::Refused))
            .is_some(),
        "example.com refused:\n{}",
        logs(&net)
    );
    assert_eq!(
        asked_for("example.com"),
        before,
        "a refused query reached the server"
    );
    // www.github.com is a CNAME of edge.github.com: the chain's address is www's.
    let (rcode, addrs) = lookup(&net, "www.github.com", false, Duration::from_secs(2)).unwrap();
    assert_eq!((rcode, addrs), (ResponseCode::NoError, vec![ip(EDGE)]));
    assert!(
        reach(&net, EDGE, 443),
        "*.github.com on 443:\n{}",
        logs(&net)
    );
    assert!(!reach(&net, EDGE, 80), "only 443 is allowed");
    assert!(!reach(&net, API, 80), "the match-name policy is gone");

    // TTL 2 s: a connection opened before expiry keeps working, new ones are refused.
    lookup(&net, "short.github.com", false, Duration::from_secs(2)).unwrap();
    let open = net
        .connect_to(mb, SHORT_LIVED, 443, SHORT)
        .expect("reachable after the lookup");
    assert!(echoes(&open));
    let expired = net.until(Duration::from_secs(8), || !reach(&net, SHORT_LIVED, 443));
    assert!(expired.is_some(), "the address expired:\n{}", logs(&net));
    assert!(
        echoes(&open),
        "an established connection outlives its address's TTL:\n{}",
        logs(&net)
    );

    // A name two selectors match: its identity is compiled when the first answer comes,
    // while the proxy holds the answer, so the first SYN after it passes on both rules' ports.
    let applied_before = net.log().matches(" applied ").count();
    std::fs::write(net.policies.join("new.yaml"), NEW_NAME).unwrap();
    assert!(
        net.until(Duration::from_secs(10), || net
            .log()
            .matches(" applied ")
            .count()
            > applied_before)
            .is_some(),
        "the new policy applies:\n{}",
        logs(&net)
    );
    assert!(!reach(&net, NEW, 80), "new.github.com before any lookup");
    let (rcode, addrs) = lookup(&net, "new.github.com", false, Duration::from_secs(2)).unwrap();
    assert_eq!((rcode, addrs), (ResponseCode::NoError, vec![ip(NEW)]));
    assert!(
        reach(&net, NEW, 80) && reach(&net, NEW, 443),
        "both rules apply to the first connections:\n{}",
        logs(&net)
    );

    // /metrics counts what happened since the restart.
    let (_, text) = net
        .loader_get(METRICS, "/metrics")
        .expect("/metrics answers");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(
        value("cnpc_dns_queries_total{verdict=\"denied\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("cnpc_dns_queries_total{verdict=\"allowed\"}") >= 2.0,
        "{text}"
    );
    assert!(value("cnpc_fqdn_learn_requests_total") >= 2.0, "{text}");
    assert!(value("cnpc_fqdn_addresses_expired_total") >= 1.0, "{text}");
    assert_eq!(value("cnpc_fqdn_hold_exceeded_total"), 0.0, "{text}");
    assert!(value("cnpc_fqdn_generations_total") >= 1.0, "{text}");

    // The event stream (issue 11): the flows above, named, as `cnpc observe` reads them.
    use cnpc_runtime_loader::events::{self, Filter, FlowRecord, PeerFilter};
    let socket = net.tmp.join("state/events.sock");
    let read = |filter: &Filter| -> Vec<FlowRecord> {
        let mut out = Vec::new();
        events::observe(&socket, 4096, false, filter, true, &mut out).expect("events");
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let from_bot = Filter {
        from: Some(PeerFilter::parse("from", "pod:default/mediabot").unwrap()),
        ..Filter::default()
    };
    let has_in = |seen: &[FlowRecord], kind: &str, verdict: &str, to: &str, port: &str| {
        seen.iter().any(|r| {
            r.kind == kind
                && r.verdict == verdict
                && r.destination.ip == Some(ip(to))
                && r.port == port
        })
    };
    // The loader reads the programs' events every 10 ms: the last flows may still be on the
    // way when this reads first.
    net.until(Duration::from_secs(2), || {
        has_in(&read(&from_bot), "l3l4", "allowed", NEW, "443/TCP")
    });
    let seen = read(&from_bot);
    let has =
        |kind: &str, verdict: &str, to: &str, port: &str| has_in(&seen, kind, verdict, to, port);
    assert!(
        has("l3l4", "allowed", NEW, "80/TCP"),
        "{seen:#?}\n{}",
        logs(&net)
    );
    assert!(has("l3l4", "denied", EDGE, "80/TCP"), "{seen:#?}");
    assert!(has("dns", "denied", KUBE_DNS.2, "53/UDP"), "{seen:#?}");
    // The record of an allowed connection names the rule that allowed it.
    let allowed = seen
        .iter()
        .find(|r| r.kind == "l3l4" && r.verdict == "allowed" && r.destination.ip == Some(ip(NEW)))
        .unwrap();
    let policy = allowed.policy.as_ref().expect("the deciding rule");
    assert!(
        policy.name.ends_with("default/mediabot-new") && policy.file.ends_with("new.yaml"),
        "{policy:?}"
    );
    assert_eq!(policy.line, 7, "the toFQDNs rule's line in NEW_NAME");
    let refused = seen
        .iter()
        .find(|r| r.kind == "dns" && r.verdict == "denied")
        .unwrap();
    assert_eq!(refused.dns.as_ref().unwrap()["query"], "example.com");
    assert_eq!(refused.source.pod.as_deref(), Some("mediabot"));
    // Following: a new flow shows up at once.
    let follow_socket = socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        struct Lines(std::sync::mpsc::Sender<(std::time::Instant, String)>);
        impl Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self
                    .0
                    .send((std::time::Instant::now(), String::from_utf8_lossy(b).into()));
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let filter = Filter {
            to: Some(PeerFilter::parse("to", &format!("ip:{EXAMPLE}")).unwrap()),
            ..Filter::default()
        };
        let _ = events::observe(&follow_socket, 0, true, &filter, true, &mut Lines(tx));
    });
    std::thread::sleep(Duration::from_millis(200));
    let sent = std::time::Instant::now();
    assert!(!reach(&net, EXAMPLE, 443));
    let (at, line) = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("the denied SYN to example.com is followed");
    assert!(line.contains("\"denied\""), "{line}");
    eprintln!("follow latency: {:?}", at.saturating_duration_since(sent));

    // /metrics counts the verdict events the stream shows: the same events, read once.
    let l3l4 = || {
        read(&Filter::default())
            .iter()
            .filter(|r| r.kind == "l3l4")
            .count() as f64
    };
    let counted = || -> f64 {
        let (_, text) = net
            .loader_get(METRICS, "/metrics")
            .expect("/metrics answers");
        text.lines()
            .filter(|l| l.starts_with("cnpc_policy_verdicts_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Cilium's `match` label: the toFQDNs rules name peers and ports (L3-L4); the drops of
    // default deny have no rule (none).
    let (_, text) = net
        .loader_get(METRICS, "/metrics")
        .expect("/metrics answers");
    let matched = |kind: &str, verdict: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("cnpc_policy_verdicts_total{")
                    && l.contains(&format!("match=\"{kind}\""))
                    && l.contains(&format!("verdict=\"{verdict}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(matched("L3-L4", "allowed") >= 1.0, "{text}");
    assert!(matched("none", "denied") >= 1.0, "{text}");
    let (before, metrics, after) = (l3l4(), counted(), l3l4());
    assert!(
        before <= metrics && metrics <= after && metrics > 0.0,
        "stream {before}..{after}, cnpc_policy_verdicts_total {metrics}"
    );
}
