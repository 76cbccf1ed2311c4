//! The sockets the datapath hands proxied connections to, and the accept loops.
//!
//! Cilium's proxy listeners are transparent sockets the BPF program finds by port and assigns
//! packets to with `bpf_sk_assign` (bpf/lib/proxy.h); the connection keeps its original
//! addresses, so the accepted socket's local address is the original destination and its peer
//! the original source. Each listener here is:
//! - `IP_TRANSPARENT` / `IPV6_TRANSPARENT`, so it may accept connections to addresses that are
//!   not the node's (needs CAP_NET_ADMIN);
//! - `SO_REUSEADDR` but **not** `SO_REUSEPORT`: `bpf_sk_assign` refuses a socket with
//!   `sk_reuseport` set (`-ESOCKTNOSUPPORT`, net/core/filter.c);
//! - bound to the wildcard address of its family, `[::]` with `IPV6_V6ONLY` so the IPv4
//!   socket takes IPv4 connections.
//!
//! The port says the direction: [`EGRESS_PROXY_PORT`] and [`INGRESS_PROXY_PORT`].

use crate::{ConnContext, Proxy};
use cnpc_ir::proxy::contract::{self, EGRESS_PROXY_PORT, INGRESS_PROXY_PORT};
use cnpc_ir::Direction;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::net::TcpListener;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create a socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot make the socket for {addr} transparent ({source}); the proxy needs \
         CAP_NET_ADMIN (run it as root or grant the capability)"
    )]
    Transparent {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set {option} on the socket for {addr}: {source}")]
    Option {
        addr: SocketAddr,
        option: &'static str,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Ports of the two listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub egress: u16,
    pub ingress: u16,
}

impl Default for Ports {
    fn default() -> Ports {
        Ports {
            egress: EGRESS_PROXY_PORT,
            ingress: INGRESS_PROXY_PORT,
        }
    }
}

/// A socket of the family of `addr`, made transparent when asked (IP_TRANSPARENT /
/// IPV6_TRANSPARENT: it may take packets for, or send from, addresses that are not the node's),
/// with the error of each step naming `addr`.
pub(crate) fn proxy_socket(
    addr: SocketAddr,
    ty: Type,
    protocol: Protocol,
    transparent: bool,
) -> Result<Socket, ListenError> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))
        .map_err(|source| ListenError::Socket { addr, source })?;
    if transparent {
        let t = if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)
        } else {
            socket.set_ip_transparent_v6(true)
        };
        t.map_err(|source| ListenError::Transparent { addr, source })?;
    }
    Ok(socket)
}

/// The error of setting `option` on a socket for `addr`.
pub(crate) fn option_error(
    addr: SocketAddr,
    option: &'static str,
) -> impl Fn(std::io::Error) -> ListenError {
    move |source| ListenError::Option {
        addr,
        option,
        source,
    }
}

/// A transparent listening socket on `addr` (see the module doc). Must be called within a
/// tokio runtime.
pub fn transparent_listener(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let socket = proxy_socket(addr, Type::STREAM, Protocol::TCP, true)?;
    let option = |option: &'static str| option_error(addr, option);
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(option("IPV6_V6ONLY"))?;
    }
    socket
        .set_reuse_address(true)
        .map_err(option("SO_REUSEADDR"))?;
    socket.set_nonblocking(true).map_err(option("O_NONBLOCK"))?;
    socket
        .bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    socket
        .listen(1024)
        .map_err(|source| ListenError::Bind { addr, source })?;
    TcpListener::from_std(socket.into()).map_err(|source| ListenError::Bind { addr, source })
}

/// The four transparent listeners: both directions, both families.
pub fn bind_all(ports: Ports) -> Result<Vec<(Direction, TcpListener)>, ListenError> {
    let mut out = Vec::new();
    for (direction, port) in [
        (Direction::Egress, ports.egress),
        (Direction::Ingress, ports.ingress),
    ] {
        for ip in [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()] {
            out.push((direction, transparent_listener(SocketAddr::new(ip, port))?));
        }
    }
    Ok(out)
}

/// The context of an accepted connection: its peer is the original source, its local address
/// the original destination (IPv4-mapped addresses read as IPv4).
pub fn context_of(direction: Direction, peer: SocketAddr, local: SocketAddr) -> ConnContext {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    ConnContext {
        direction,
        source: canonical(peer),
        original_dst: canonical(local),
        source_identity: None,
    }
}

/// The source identity in an accepted socket's mark: with `net.ipv4.tcp_fwmark_accept` (set
/// by the loader) the socket takes its SYN's mark, which the datapath writes as
/// `TO_PROXY_MARK | identity` on the ingress path; 0 means it did not fit.
pub fn mark_identity(mark: u32) -> Option<cnpc_ir::NumericIdentity> {
    let identity = mark & contract::MARK_IDENTITY_MASK;
    (mark & contract::MARK_MAGIC_MASK == contract::TO_PROXY_MARK && identity != 0)
        .then_some(cnpc_ir::NumericIdentity(identity))
}

/// Accepts connections on `listener` forever, serving each in its own task. Accept errors
/// (out of file descriptors, say) are logged and retried after a pause.
pub async fn accept_loop(listener: TcpListener, direction: Direction, proxy: Proxy) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "accepted socket has no local address");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut ctx = context_of(direction, peer, local);
        if direction == Direction::Ingress {
            ctx.source_identity = socket2::SockRef::from(&stream)
                .mark()
                .ok()
                .and_then(mark_identity);
        }
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy.serve_tcp(stream, ctx).await {
                tracing::debug!(error = %e, source = %ctx.source, "connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingress_mark_names_the_source_identity() {
        let id = |m| mark_identity(m).map(|i| i.0);
        assert_eq!(id(contract::TO_PROXY_MARK | 12685), Some(12685));
        assert_eq!(id(contract::TO_PROXY_MARK), None);
        assert_eq!(id(contract::FROM_EGRESS_PROXY | 12685), None);
        assert_eq!(id(0), None);
    }

    #[test]
    fn mapped_addresses_read_as_ipv4() {
        let c = context_of(
            Direction::Ingress,
            "[::ffff:10.0.1.20]:4000".parse().expect("literal"),
            "[::ffff:10.0.1.10]:80".parse().expect("literal"),
        );
        assert_eq!(c.source, "10.0.1.20:4000".parse().expect("literal"));
        assert_eq!(c.original_dst, "10.0.1.10:80".parse().expect("literal"));
    }

    #[tokio::test]
    async fn transparent_needs_privilege_or_works() {
        // Unprivileged: a typed error naming the capability. Privileged: a listener.
        match transparent_listener("127.0.0.1:0".parse().expect("literal")) {
            Ok(l) => assert!(l.local_addr().is_ok()),
            Err(e @ ListenError::Transparent { .. }) => {
                assert!(e.to_string().contains("CAP_NET_ADMIN"))
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
