//! Telling the loader what a DNS answer taught (DESIGN.md §6a): the addresses of a name some
//! toFQDNs selector matches must be in the datapath before the pod sees the answer, or its
//! first packet to them finds no FQDN identity and is dropped. Cilium holds the answer until
//! its ipcache is updated or 100 ms pass (pkg/fqdn/dnsproxy/proxy.go `NotifyOnDNSMsg`,
//! daemon/cmd/fqdn.go); the proxy does the same with the loader over [`SocketLearner`].
//!
//! [`Learner`] is the seam: the proxy asks it and bounds the wait itself; tests put a fake
//! behind it.

use cnpc_ir::proxy::{LearnReply, LearnRequest};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// Why the loader's answer did not come.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("cannot connect to the learning socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the learning socket {path} failed recently; not retrying yet")]
    Backoff { path: PathBuf },
    #[error("cannot send to the learning socket: {0}")]
    Write(std::io::Error),
    #[error("the learning connection closed before the reply")]
    Closed,
    #[error("cannot encode the request: {0}")]
    Encode(serde_json::Error),
}

/// The future a [`Learner`] returns.
pub type LearnFuture<'a> =
    Pin<Box<dyn Future<Output = Result<LearnReply, LearnError>> + Send + 'a>>;

/// Who learns addresses for the proxy. The proxy gives every request a fresh id and waits at
/// most `learn_timeout` for the reply; an implementation need not bound the wait itself.
pub trait Learner: Send + Sync + std::fmt::Debug {
    fn learn(&self, request: LearnRequest) -> LearnFuture<'_>;
}

/// How long a failed connect keeps the learner from trying again: each query would otherwise
/// pay for a connect while the loader is down (its answers are released at once meanwhile).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// The loader's learning socket: a unix stream carrying one JSON object per line,
/// [`LearnRequest`]s out and [`LearnReply`]s back, matched by id, so one connection serves
/// every query at once. Connected at the first request, and again after it breaks.
#[derive(Debug)]
pub struct SocketLearner {
    path: PathBuf,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    conn: Option<Arc<Conn>>,
    /// No connect before this instant (after a failed one).
    not_before: Option<Instant>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<LearnReply>>>>;

#[derive(Debug)]
struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// Removes a request's entry when its caller stops waiting (reply, error or timeout), so
/// abandoned requests do not pile up.
struct PendingGuard {
    pending: Pending,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.id);
    }
}

/// A poisoned map is used as is: every holder only inserts or removes one entry.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SocketLearner {
    pub fn new(path: PathBuf) -> SocketLearner {
        SocketLearner {
            path,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>, LearnError> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.conn {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        state.conn = None;
        if state.not_before.is_some_and(|t| Instant::now() < t) {
            return Err(LearnError::Backoff {
                path: self.path.clone(),
            });
        }
        let stream = match UnixStream::connect(&self.path).await {
            Ok(s) => s,
            Err(source) => {
                state.not_before = Some(Instant::now() + RECONNECT_BACKOFF);
                return Err(LearnError::Connect {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        state.not_before = None;
        let (read, write) = stream.into_split();
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(write),
            pending: Pending::default(),
            alive: Arc::new(AtomicBool::new(true)),
        });
        tokio::spawn(read_replies(
            BufReader::new(read),
            conn.pending.clone(),
            conn.alive.clone(),
        ));
        tracing::info!(path = %self.path.display(), "connected to the learning socket");
        state.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn exchange(&self, request: LearnRequest) -> Result<LearnReply, LearnError> {
        let conn = self.connection().await?;
        let mut line = serde_json::to_vec(&request).map_err(LearnError::Encode)?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(request.id, tx);
        let _guard = PendingGuard {
            pending: conn.pending.clone(),
            id: request.id,
        };
        let written = {
            let mut w = conn.writer.lock().await;
            w.write_all(&line).await
        };
        if let Err(e) = written {
            conn.alive.store(false, Ordering::Release);
            return Err(LearnError::Write(e));
        }
        rx.await.map_err(|_| LearnError::Closed)
    }
}

impl Learner for SocketLearner {
    fn learn(&self, request: LearnRequest) -> LearnFuture<'_> {
        Box::pin(self.exchange(request))
    }
}

/// Hands each reply line to the request waiting for its id until the connection ends; then
/// marks it dead (the next request connects again) and drops every waiter (they see
/// [`LearnError::Closed`]). A line that is not a reply is logged and skipped.
async fn read_replies(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    alive: Arc<AtomicBool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => match serde_json::from_str::<LearnReply>(line.trim_end()) {
                Ok(reply) => {
                    if let Some(tx) = lock(&pending).remove(&reply.id) {
                        let _ = tx.send(reply);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "not a learn reply; skipped"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "learning socket read failed");
                break;
            }
        }
    }
    alive.store(false, Ordering::Release);
    lock(&pending).clear();
    tracing::info!("learning connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::proxy::LearnedAddress;
    use tokio::net::UnixListener;

    fn request(id: u64) -> LearnRequest {
        LearnRequest {
            id,
            name: "x.io".into(),
            source: "10.0.0.1".parse().expect("literal"),
            addresses: vec![LearnedAddress {
                ip: "192.0.2.1".parse().expect("literal"),
                ttl: 30,
            }],
        }
    }

    /// A loader that answers requests in reverse order of arrival, two at a time, then closes.
    async fn loader(listener: UnixListener) {
        let (s, _) = listener.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let mut got = Vec::new();
        while got.len() < 2 {
            let l = lines.next_line().await.expect("read").expect("a line");
            got.push(serde_json::from_str::<LearnRequest>(&l).expect("a request"));
        }
        for req in got.iter().rev() {
            let reply = LearnReply {
                id: req.id,
                ok: true,
                identities: vec![(req.addresses[0].ip, cnpc_ir::NumericIdentity(16_777_300))],
                error: None,
            };
            let mut l = serde_json::to_vec(&reply).expect("serialisable");
            l.push(b'\n');
            w.write_all(&l).await.expect("write");
        }
    }

    #[tokio::test]
    async fn replies_find_their_requests_and_a_broken_connection_is_redone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("fqdn.sock");
        let learner = Arc::new(SocketLearner::new(path.clone()));
        // Nobody listens yet: a connect error, then the backoff.
        assert!(matches!(
            learner.learn(request(1)).await,
            Err(LearnError::Connect { .. })
        ));
        assert!(matches!(
            learner.learn(request(2)).await,
            Err(LearnError::Backoff { .. })
        ));
        tokio::time::sleep(RECONNECT_BACKOFF).await;
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(loader(listener));
        let (a, b) = tokio::join!(learner.learn(request(10)), learner.learn(request(11)));
        assert_eq!(a.expect("reply").id, 10);
        assert_eq!(b.expect("reply").id, 11);
        server.await.expect("loader ran");
        // The loader closed: a waiting request fails, and the next one connects afresh.
        let dead = learner.learn(request(12)).await;
        assert!(dead.is_err(), "{dead:?}");
        // (Had it tried to connect to the closed socket, the backoff runs now.)
        tokio::time::sleep(RECONNECT_BACKOFF).await;
        std::fs::remove_file(&path).expect("remove");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(loader(listener));
        let (a, b) = tokio::join!(learner.learn(request(20)), learner.learn(request(21)));
        assert!(a.is_ok() && b.is_ok());
        server.await.expect("loader ran");
    }
}
