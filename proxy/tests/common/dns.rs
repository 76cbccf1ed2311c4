//! DNS fixtures: an upstream server with fixed records (UDP and TCP on one port, counting
//! every query it sees), query builders, and a loopback policy. Shared with benches/dns.rs.
#![allow(dead_code)]

use cnpc_ir::proxy::{ProxyPolicy, ProxyRule};
use cnpc_ir::{
    DecisionTable, Direction, DnsMatcher, EntityRef, IdentityClass, L7Rules, NumericIdentity,
    Origin, PortRange, Protocol, RuleRef, TableRow, TableVerdict,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

pub fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("valid name")
}

/// The fixed zone: (owner, TTL, data).
fn zone() -> Vec<(&'static str, u32, RData)> {
    let a = |s: &str| RData::A(A(s.parse().expect("literal")));
    let aaaa = |s: &str| RData::AAAA(AAAA(s.parse().expect("literal")));
    let cname = |s: &str| RData::CNAME(CNAME(name(s)));
    vec![
        ("www.example.com.", 300, a("192.0.2.10")),
        ("alias.example.com.", 120, cname("www.example.com.")),
        ("deep.example.com.", 60, cname("hop1.cdn.net.")),
        ("hop1.cdn.net.", 60, cname("hop2.cdn.net.")),
        ("hop2.cdn.net.", 30, a("198.51.100.2")),
        ("hop2.cdn.net.", 40, aaaa("2001:db8::2")),
        ("api.cilium.io.", 600, a("192.0.2.20")),
        ("api.cilium.io.", 600, aaaa("2001:db8::20")),
        ("other.example.org.", 60, a("203.0.113.1")),
    ]
}

/// Answers `query` from the zone: the records of the name and its CNAME chain (all types for
/// the chain, the asked type at its end); names under `slow.` are never answered (`None`);
/// unknown names get NXDOMAIN.
pub fn answer(query: &Message) -> Option<Message> {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
    let Some(q) = query.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return Some(resp);
    };
    let asked = q.name().to_lowercase();
    if asked.to_ascii().starts_with("slow.") {
        return None;
    }
    let zone = zone();
    let mut current = asked;
    let mut found = false;
    for _ in 0..8 {
        let mut next = None;
        for (owner, ttl, data) in &zone {
            if name(owner) != current {
                continue;
            }
            found = true;
            match data {
                RData::CNAME(c) => {
                    resp.add_answer(Record::from_rdata(current.clone(), *ttl, data.clone()));
                    next = Some(c.0.clone());
                }
                d if d.record_type() == q.query_type() => {
                    resp.add_answer(Record::from_rdata(current.clone(), *ttl, d.clone()));
                }
                _ => {}
            }
        }
        match next {
            Some(n) => current = n,
            None => break,
        }
    }
    if !found {
        resp.metadata.response_code = ResponseCode::NXDomain;
    }
    Some(resp)
}

/// A DNS server on 127.0.0.1 serving [`zone`] over UDP and TCP on the same port.
pub struct DnsUpstream {
    pub addr: SocketAddr,
    /// Queries seen (both transports).
    pub queries: Arc<AtomicUsize>,
    /// Question names seen, in order.
    pub names: Arc<Mutex<Vec<String>>>,
}

impl DnsUpstream {
    pub async fn start() -> DnsUpstream {
        // The TCP listener takes the UDP socket's port; retried if another test has it.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
            let addr = udp.local_addr().expect("bound");
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("bound");
        let queries = Arc::new(AtomicUsize::new(0));
        let names: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = {
            let (queries, names) = (queries.clone(), names.clone());
            move |m: &Message| {
                queries.fetch_add(1, Ordering::SeqCst);
                let n = m
                    .queries
                    .first()
                    .map(|q| q.name().to_ascii())
                    .unwrap_or_default();
                names.lock().expect("not poisoned").push(n);
            }
        };
        let udp = Arc::new(udp);
        let on_udp = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                on_udp(&q);
                if let Some(bytes) = answer(&q).and_then(|a| a.to_vec().ok()) {
                    let _ = udp.send_to(&bytes, from).await;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    while let Ok(bytes) = read_frame(&mut s).await {
                        let Ok(q) = Message::from_vec(&bytes) else {
                            return;
                        };
                        seen(&q);
                        let Some(a) = answer(&q).and_then(|a| a.to_vec().ok()) else {
                            continue;
                        };
                        if s.write_all(&frame(&a)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DnsUpstream {
            addr,
            queries,
            names,
        }
    }

    pub fn count(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

pub fn query_message(id: u16, n: &str, t: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(n), t));
    m
}

pub fn query(id: u16, n: &str, t: RecordType) -> Vec<u8> {
    query_message(id, n, t).to_vec().expect("encodable")
}

pub fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

pub async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut b = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut b).await?;
    Ok(b)
}

/// Sends `bytes` from `socket` to `to` and waits `within` for one answer.
pub async fn exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    bytes: &[u8],
    within: Duration,
) -> Option<(Message, SocketAddr)> {
    socket.send_to(bytes, to).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(within, socket.recv_from(&mut buf))
        .await
        .ok()?
        .expect("recv");
    Some((Message::from_vec(&buf[..n]).expect("a DNS message"), from))
}

/// The A/AAAA addresses of an answer, as strings.
pub fn addresses(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// The pod (an endpoint this node enforces on) asks from here.
pub const POD_IP: &str = "127.0.0.2";
/// No endpoint here: its queries are refused.
pub const STRANGER_IP: &str = "127.0.0.9";
/// The proxy's DNS listener, standing for the cluster's DNS server.
pub const SERVER_IP: &str = "127.0.0.53";
pub const POD: u32 = 300;
pub const SERVER: u32 = 500;

pub fn dns_origin() -> Origin {
    Origin {
        policy: "CiliumNetworkPolicy default/dns".into(),
        file: "dns.yaml".into(),
        line: 12,
    }
}

/// POD's egress to SERVER, UDP and TCP on any port, proxied with one DNS rule allowing
/// `www.example.com`, `*.example.com`, `api.cilium.io` and `*.cdn.net`; `selectors` are the
/// generation's toFQDNs selectors.
pub fn dns_policy(generation: u64, selectors: Vec<DnsMatcher>) -> ProxyPolicy {
    let r = RuleRef::new(0);
    let row = |protocol| TableRow {
        class: 0,
        protocol,
        ports: PortRange::ALL,
        verdict: TableVerdict::Proxy(vec![r]),
    };
    ProxyPolicy {
        generation,
        endpoints: vec![(POD_IP.parse().expect("literal"), NumericIdentity(POD))],
        ipcache: vec![
            (
                format!("{POD_IP}/32").parse().expect("literal"),
                NumericIdentity(POD),
            ),
            (
                format!("{SERVER_IP}/32").parse().expect("literal"),
                NumericIdentity(SERVER),
            ),
        ],
        tables: vec![DecisionTable {
            subject: NumericIdentity(POD),
            direction: Direction::Egress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(SERVER)],
            }],
            rows: vec![row(Protocol::Udp), row(Protocol::Tcp)],
        }],
        rules: [(
            r,
            ProxyRule {
                origin: dns_origin(),
                l7: L7Rules::Dns(vec![
                    DnsMatcher::name("www.example.com"),
                    DnsMatcher::pattern("*.example.com"),
                    DnsMatcher::name("api.cilium.io"),
                    DnsMatcher::pattern("*.cdn.net"),
                    DnsMatcher::pattern("slow.*"),
                ]),
            },
        )]
        .into_iter()
        .collect(),
        fqdn_selectors: selectors,
        learned: Vec::new(),
    }
}
