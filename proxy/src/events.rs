//! One event per HTTP request and per DNS query (DESIGN.md §6b): what was asked, what the proxy
//! did, the rule that allowed it and the generation that judged it; and counters for
//! `/metrics`.
//!
//! Events go to an optional bounded queue; the proxy never waits for a slow reader, it drops
//! the event and counts it.
//!
//! On the wire (the binary's stdout) each event is one JSON object of [`ProxyEvent`], whose
//! `type` field says `http` or `dns`. An HTTP line is an [`L7Event`] with that one extra field,
//! so a reader that parses lines as [`L7Event`] (runtime-loader/src/l7.rs) still reads them,
//! and a DNS line lacks the HTTP fields (`method`, `path`, `status`), so it never passes for
//! an HTTP request there.

use cnpc_ir::{Direction, Origin};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
}

/// One judged HTTP request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct L7Event {
    /// Milliseconds since the Unix epoch, when the request was judged.
    pub time: u64,
    pub direction: Direction,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    /// The status sent downstream: 403 for denied requests, the upstream's status (or
    /// 502/503 when the upstream failed) for allowed ones, 400 for requests the proxy could
    /// not judge.
    pub status: u16,
    pub verdict: Verdict,
    /// The rule whose HTTP rules allowed the request (none when the table allowed the
    /// connection without L7 rules, or on a denial).
    pub rule: Option<Origin>,
    pub generation: u64,
}

/// One judged DNS query (the egress DNS proxy; DNS is only proxied on egress).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsEvent {
    /// Milliseconds since the Unix epoch, when the query was judged.
    pub time: u64,
    /// `udp` or `tcp`.
    pub protocol: String,
    /// The pod that asked.
    pub source: SocketAddr,
    /// The server it asked (the original destination).
    pub destination: SocketAddr,
    /// The question's name, lower case, without the trailing dot.
    pub query: String,
    /// The question's type (`A`, `AAAA`, ...).
    pub qtype: String,
    pub verdict: Verdict,
    /// The rule whose DNS matchers allowed the query (none when the table allowed the flow
    /// without L7 rules, or on a refusal).
    pub rule: Option<Origin>,
    /// The A/AAAA addresses of the answer reached from the question through its CNAME chain.
    pub addresses: Vec<IpAddr>,
    /// The response code the pod got (`NOERROR`, `NXDOMAIN`, `REFUSED`, ...); none when it
    /// got no answer (the upstream did not answer in time).
    pub rcode: Option<String>,
    pub generation: u64,
}

/// What the binary prints: one line per event, tagged by `type`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProxyEvent {
    Http(L7Event),
    Dns(DnsEvent),
}

impl ProxyEvent {
    /// Reads one event line; a line without `type` is an HTTP event (the format before DNS).
    pub fn parse_line(line: &str) -> Option<ProxyEvent> {
        serde_json::from_str::<ProxyEvent>(line).ok().or_else(|| {
            serde_json::from_str::<L7Event>(line)
                .ok()
                .map(ProxyEvent::Http)
        })
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Request counters, readable at any time.
#[derive(Debug, Default)]
pub struct Counters {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Requests refused as malformed after hyper accepted them (e.g. several Host headers).
    pub bad_requests: AtomicU64,
    /// Allowed requests whose upstream could not be reached or failed (502/503).
    pub upstream_errors: AtomicU64,
    pub connections: AtomicU64,
    /// Events dropped because the queue was full or closed.
    pub events_dropped: AtomicU64,
    pub dns: DnsCounters,
}

/// DNS query counters.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Queries allowed (forwarded upstream).
    pub allowed: AtomicU64,
    /// Queries refused (answered `REFUSED`, upstream untouched).
    pub refused: AtomicU64,
    /// Messages dropped as malformed: unparseable, a response, not one question, or an opcode
    /// other than QUERY (on TCP the connection closes).
    pub malformed: AtomicU64,
    /// Allowed queries the upstream did not answer in time (no answer is sent).
    pub upstream_timeouts: AtomicU64,
    /// Allowed queries whose upstream failed otherwise (the pod gets `SERVFAIL`).
    pub upstream_errors: AtomicU64,
    /// Answers released without the loader's reply because `learn_timeout` passed.
    pub learn_timeouts: AtomicU64,
    /// Answers released after the loader failed or refused to learn their addresses.
    pub learn_failures: AtomicU64,
    /// Datagrams dropped because `max_in_flight` queries were being handled already.
    pub overloaded: AtomicU64,
}

/// A copy of the DNS counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DnsCounterSnapshot {
    pub allowed: u64,
    pub refused: u64,
    pub malformed: u64,
    pub upstream_timeouts: u64,
    pub upstream_errors: u64,
    pub learn_timeouts: u64,
    pub learn_failures: u64,
    pub overloaded: u64,
}

impl DnsCounters {
    pub fn snapshot(&self) -> DnsCounterSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsCounterSnapshot {
            allowed: r(&self.allowed),
            refused: r(&self.refused),
            malformed: r(&self.malformed),
            upstream_timeouts: r(&self.upstream_timeouts),
            upstream_errors: r(&self.upstream_errors),
            learn_timeouts: r(&self.learn_timeouts),
            learn_failures: r(&self.learn_failures),
            overloaded: r(&self.overloaded),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    pub allowed: u64,
    pub denied: u64,
    pub bad_requests: u64,
    pub upstream_errors: u64,
    pub connections: u64,
    pub events_dropped: u64,
    pub dns: DnsCounterSnapshot,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            allowed: r(&self.allowed),
            denied: r(&self.denied),
            bad_requests: r(&self.bad_requests),
            upstream_errors: r(&self.upstream_errors),
            connections: r(&self.connections),
            events_dropped: r(&self.events_dropped),
            dns: self.dns.snapshot(),
        }
    }

    pub(crate) fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> L7Event {
        L7Event {
            time: 1,
            direction: Direction::Egress,
            source: "10.0.0.1:4000".parse().expect("literal"),
            destination: "10.0.0.2:80".parse().expect("literal"),
            method: "GET".into(),
            path: "/".into(),
            host: None,
            status: 200,
            verdict: Verdict::Allowed,
            rule: None,
            generation: 3,
        }
    }

    fn dns() -> DnsEvent {
        DnsEvent {
            time: 1,
            protocol: "udp".into(),
            source: "10.0.0.1:4000".parse().expect("literal"),
            destination: "10.0.0.53:53".parse().expect("literal"),
            query: "cilium.io".into(),
            qtype: "A".into(),
            verdict: Verdict::Denied,
            rule: None,
            addresses: Vec::new(),
            rcode: Some("REFUSED".into()),
            generation: 3,
        }
    }

    #[test]
    fn http_lines_still_read_as_l7_events_and_dns_lines_do_not() {
        let line = serde_json::to_string(&ProxyEvent::Http(http())).expect("serialisable");
        assert!(line.starts_with(r#"{"type":"http","#), "{line}");
        // What the loader does with every line (runtime-loader/src/l7.rs).
        let back: L7Event = serde_json::from_str(&line).expect("an HTTP line is an L7Event");
        assert_eq!(back, http());
        let line = serde_json::to_string(&ProxyEvent::Dns(dns())).expect("serialisable");
        assert!(line.contains(r#""type":"dns""#), "{line}");
        assert!(serde_json::from_str::<L7Event>(&line).is_err(), "{line}");
        assert_eq!(ProxyEvent::parse_line(&line), Some(ProxyEvent::Dns(dns())));
        // A line of the format before DNS (no type) reads as HTTP.
        let old = serde_json::to_string(&http()).expect("serialisable");
        assert_eq!(ProxyEvent::parse_line(&old), Some(ProxyEvent::Http(http())));
    }
}
