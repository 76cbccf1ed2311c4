//! One event per HTTP request (DESIGN.md §6b): what was asked, what the proxy did, the rule
//! that allowed it and the generation that judged it; and counters for `/metrics`.
//!
//! Events go to an optional bounded queue; the proxy never waits for a slow reader, it drops
//! the event and counts it.

use cnpc_ir::{Direction, Origin};
use std::net::SocketAddr;
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
        }
    }

    pub(crate) fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}
