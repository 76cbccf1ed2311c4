//! DNS over TCP (RFC 1035 §4.2.2, RFC 7766): the egress TCP listener hands over connections
//! whose table row proxies them for DNS rules (`dns_policy::is_dns_connection`). Queries are
//! 2-byte length-prefixed messages; several may follow on one connection, each judged
//! against the generation current when it arrives, answered in order. The upstream side is
//! one TCP connection per client connection, opened at the first allowed query.
//!
//! The connection closes when the client closes it, stays idle longer than
//! `tcp_idle_timeout`, sends a malformed message (as Cilium's miekg/dns server does for TCP),
//! or a forwarded query gets no answer in time (the client then retries on a new connection).

use crate::dns_proxy::{handle_query, read_frame, Outcome, Transport, Upstream};
use crate::events::Counters;
use crate::{ConnContext, Shared};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Serves one DNS-over-TCP connection until it closes (see the module doc).
pub async fn serve<I>(mut io: I, ctx: ConnContext, shared: &Shared) -> std::io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    Counters::bump(&shared.counters.connections);
    let mut upstream = Upstream::default();
    let idle = shared.config.dns.tcp_idle_timeout;
    loop {
        let message = match tokio::time::timeout(idle, read_frame(&mut io)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(m)) => m,
        };
        match handle_query(shared, &ctx, Transport::Tcp, &mut upstream, &message).await {
            Outcome::Reply(answer) => {
                // Replies come from the upstream's frames or the proxy's own small messages:
                // always below 64 KiB.
                let Ok(len) = u16::try_from(answer.len()) else {
                    return Ok(());
                };
                let mut frame = Vec::with_capacity(answer.len() + 2);
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend_from_slice(&answer);
                io.write_all(&frame).await?;
            }
            Outcome::Malformed(_) | Outcome::NoAnswer => {
                let _ = io.shutdown().await;
                return Ok(());
            }
        }
    }
}
