//! The UDP side of the DNS proxy: the transparent socket the datapath hands a pod's DNS
//! datagrams to, and the way answers go back.
//!
//! **In.** The egress program assigns a proxied datagram to the UDP socket on
//! `EGRESS_PROXY_PORT` with `bpf_sk_assign`, without NAT, as for TCP ([`crate::listener`]).
//! The socket is `IP_TRANSPARENT` (it receives datagrams for addresses that are not the
//! node's), `SO_REUSEADDR` but not `SO_REUSEPORT` (`bpf_sk_assign` refuses reuseport
//! sockets), bound to the wildcard address, and asks for `IP_RECVORIGDSTADDR` /
//! `IPV6_RECVORIGDSTADDR`: each datagram then carries its original destination as a control
//! message, which is how the proxy learns which server the pod asked (Cilium:
//! pkg/fqdn/dnsproxy/udp.go `transparentSetsockopt`, `parseDstFromOOB`).
//!
//! **Out.** The pod's resolver takes an answer only from the address and port it asked
//! (glibc and musl compare them), so the answer must leave *from the original destination*.
//! [`Replier::Spoofed`] does what Cilium does (udp.go `WriteResponse`): a raw UDP socket with
//! `IP_TRANSPARENT` writes the UDP header itself (source port = the original destination's)
//! and names the source address in an `IP_PKTINFO` / `IPV6_PKTINFO` control message. The other
//! way, a UDP socket bound to the original destination (transparent, `SO_REUSEADDR`) per
//! answer, is worse here: while it exists it is a socket for that address and port, so the
//! datapath's lookup of a datagram's own tuple (the first lookup `__ctx_redirect_to_proxy`
//! makes, bpf/lib/proxy.h) could find it and hand it another pod's query, which it would
//! never read; and it costs a socket, a bind and a close per answer. The raw sockets are
//! made once, bound to loopback and given a drop-all socket filter, so they never queue what
//! they would otherwise receive (a raw socket gets a copy of every UDP datagram).
//!
//! [`Replier::FromListener`] answers from the listening socket itself: right when the pod
//! sent to the listener's own address (tests on loopback, which need no privilege).

use crate::dns_proxy::{handle_query, Outcome, Transport, Upstream};
use crate::events::Counters;
use crate::listener::{option_error, proxy_socket, ListenError};
use crate::{ConnContext, Proxy};
use cnpc_ir::Direction;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use socket2::{Socket, Type};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// A DNS listening socket: transparent for the datapath, or plain (tests). Both ask for the
/// original destination of each datagram. Must be called within a tokio runtime.
pub fn dns_socket(addr: SocketAddr, transparent: bool) -> Result<UdpSocket, ListenError> {
    let socket = proxy_socket(addr, Type::DGRAM, socket2::Protocol::UDP, transparent)?;
    let option = |option: &'static str| option_error(addr, option);
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(option("IPV6_V6ONLY"))?;
        setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true)
            .map_err(|e| option("IPV6_RECVORIGDSTADDR")(e.into()))?;
    } else {
        setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true)
            .map_err(|e| option("IP_RECVORIGDSTADDR")(e.into()))?;
    }
    socket
        .set_reuse_address(true)
        .map_err(option("SO_REUSEADDR"))?;
    socket.set_nonblocking(true).map_err(option("O_NONBLOCK"))?;
    socket
        .bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    UdpSocket::from_std(socket.into()).map_err(|source| ListenError::Bind { addr, source })
}

/// The transparent DNS sockets on `port`: IPv4 always, IPv6 when the host has it (a host
/// without IPv6 refuses the socket; that is logged, not fatal).
pub fn bind_transparent(port: u16) -> Result<Vec<UdpSocket>, ListenError> {
    let mut out = vec![dns_socket(
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        true,
    )?];
    match dns_socket(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true) {
        Ok(s) => out.push(s),
        Err(ListenError::Socket { source, .. })
            if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            tracing::info!("no IPv6 on this host; DNS over UDP is proxied for IPv4 only");
        }
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// One datagram: its bytes, who sent it, and where it was going.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub source: SocketAddr,
    /// The original destination: the `*_ORIGDSTADDR` control message, or the socket's own
    /// address if the kernel sent none.
    pub original_dst: SocketAddr,
}

/// Reads the next datagram from a socket made by [`dns_socket`].
pub async fn recv_datagram(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Datagram> {
    let (n, source, original_dst) = socket
        .async_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
            let msg = recvmsg::<SockaddrStorage>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )?;
            let source = msg.address.as_ref().and_then(storage_addr);
            let mut dst = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                            dst = Some(SocketAddr::from(SocketAddrV4::from(SockaddrIn::from(a))))
                        }
                        ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                            dst = Some(SocketAddr::from(SocketAddrV6::from(SockaddrIn6::from(a))))
                        }
                        _ => {}
                    }
                }
            }
            Ok((msg.bytes, source, dst))
        })
        .await?;
    let source = source.ok_or_else(|| std::io::Error::other("a datagram without a source"))?;
    let original_dst = match original_dst {
        Some(d) => d,
        None => socket.local_addr()?,
    };
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    Ok(Datagram {
        bytes: buf[..n].to_vec(),
        source: canonical(source),
        original_dst: canonical(original_dst),
    })
}

fn storage_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddrV4::from(*a).into());
    }
    s.as_sockaddr_in6().map(|a| SocketAddrV6::from(*a).into())
}

/// How answers reach the pods (see the module doc).
#[derive(Clone, Debug)]
pub enum Replier {
    /// From the original destination, through raw sockets (the datapath's handover).
    Spoofed(Arc<SpoofSender>),
    /// From the listening socket (the pod sent to the listener's own address).
    FromListener,
}

/// Raw UDP sockets that send datagrams from any address and port (needs CAP_NET_RAW and
/// CAP_NET_ADMIN).
#[derive(Debug)]
pub struct SpoofSender {
    v4: AsyncFd<Socket>,
    v6: Option<AsyncFd<Socket>>,
}

/// `ret #0`: a classic BPF program accepting nothing, so the raw sockets queue no copies of
/// the node's UDP traffic.
const DROP_ALL: u16 = 0x06; // BPF_RET | BPF_K

impl SpoofSender {
    /// Both families; IPv6 only when the host has it. Must be called within a tokio runtime.
    pub fn new() -> Result<SpoofSender, ListenError> {
        let v4 = raw_socket(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))?;
        let v6 = match raw_socket(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0)) {
            Ok(s) => Some(s),
            Err(ListenError::Socket { source, .. } | ListenError::Bind { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        Ok(SpoofSender { v4, v6 })
    }

    /// Sends `payload` in a UDP datagram from `from` to `to` (same family).
    pub async fn send(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let datagram = udp_datagram(from, to, payload)?;
        match (from.ip(), to) {
            (IpAddr::V4(src), SocketAddr::V4(dst)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(src).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                // Raw sockets take no port; the UDP header carries it.
                let dest = SockaddrIn::from(SocketAddrV4::new(*dst.ip(), 0));
                self.v4
                    .async_io(Interest::WRITABLE, |s| {
                        sendmsg(
                            s.as_raw_fd(),
                            &[IoSlice::new(&datagram)],
                            &[ControlMessage::Ipv4PacketInfo(&info)],
                            MsgFlags::empty(),
                            Some(&dest),
                        )
                        .map_err(std::io::Error::from)
                    })
                    .await?;
            }
            (IpAddr::V6(src), SocketAddr::V6(dst)) => {
                let Some(v6) = &self.v6 else {
                    return Err(std::io::Error::other("no IPv6 raw socket"));
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                let dest = SockaddrIn6::from(SocketAddrV6::new(*dst.ip(), 0, 0, dst.scope_id()));
                v6.async_io(Interest::WRITABLE, |s| {
                    sendmsg(
                        s.as_raw_fd(),
                        &[IoSlice::new(&datagram)],
                        &[ControlMessage::Ipv6PacketInfo(&info)],
                        MsgFlags::empty(),
                        Some(&dest),
                    )
                    .map_err(std::io::Error::from)
                })
                .await?;
            }
            _ => {
                return Err(std::io::Error::other(
                    "source and destination families differ",
                ))
            }
        }
        Ok(())
    }
}

fn raw_socket(bind: SocketAddr) -> Result<AsyncFd<Socket>, ListenError> {
    let addr = bind;
    let socket = proxy_socket(addr, Type::RAW, socket2::Protocol::UDP, true)?;
    let option = |option: &'static str| option_error(addr, option);
    if addr.is_ipv6() {
        // The kernel fills in the UDP checksum (offset 6 of the UDP header), over the pseudo
        // header with the source address actually used; IPv6 forbids a zero checksum.
        let offset: libc::c_int = 6;
        // SAFETY: a valid socket, an int option of the size given.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                (&offset as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(option("IPV6_CHECKSUM")(std::io::Error::last_os_error()));
        }
    }
    socket
        .attach_filter(&[socket2::SockFilter::new(DROP_ALL, 0, 0, 0)])
        .map_err(option("SO_ATTACH_FILTER"))?;
    socket.set_nonblocking(true).map_err(option("O_NONBLOCK"))?;
    socket
        .bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    // SAFETY: the socket owns its descriptor, which stays open and the same until the
    // AsyncFd (its owner from here on) drops it.
    unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }.map_err(|e| {
        ListenError::Bind {
            addr,
            source: e.into(),
        }
    })
}

/// The UDP header and payload of a datagram from `from` to `to`. The IPv4 checksum is
/// computed here (the source is known: the kernel sends from it as told); for IPv6 it is left
/// zero for the kernel (`IPV6_CHECKSUM`).
fn udp_datagram(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(payload.len() + 8)
        .map_err(|_| std::io::Error::other("a DNS answer larger than a UDP datagram"))?;
    let mut d = Vec::with_capacity(usize::from(len));
    d.extend_from_slice(&from.port().to_be_bytes());
    d.extend_from_slice(&to.port().to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    if let (IpAddr::V4(s), IpAddr::V4(t)) = (from.ip(), to.ip()) {
        let mut sum = ones_sum(&s.octets(), 0);
        sum = ones_sum(&t.octets(), sum);
        sum = ones_sum(&[0, libc::IPPROTO_UDP as u8], sum);
        sum = ones_sum(&len.to_be_bytes(), sum);
        sum = ones_sum(&d, sum);
        let mut c = !fold(sum);
        // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
        if c == 0 {
            c = 0xffff;
        }
        d[6..8].copy_from_slice(&c.to_be_bytes());
    }
    Ok(d)
}

/// The one's complement sum of `bytes` as 16-bit words (an odd last byte padded with zero),
/// added to `sum`, unfolded.
fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    sum as u16
}

/// Reads datagrams from `socket` forever, handling each in its own task (at most
/// `max_in_flight` at once; more are dropped and counted), and answers through `replier`.
pub async fn serve(socket: UdpSocket, replier: Replier, proxy: Proxy) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65_535];
    let shared = proxy.shared().clone();
    loop {
        let d = match recv_datagram(&socket, &mut buf).await {
            Ok(d) => d,
            Err(e) => {
                // ICMP errors surface here on some kernels; nothing is lost by carrying on.
                tracing::debug!(error = %e, "DNS socket read failed");
                continue;
            }
        };
        let Ok(permit) = shared.dns.in_flight.clone().try_acquire_owned() else {
            Counters::bump(&shared.counters.dns.overloaded);
            continue;
        };
        let shared = shared.clone();
        let socket = socket.clone();
        let replier = replier.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ctx = ConnContext {
                direction: Direction::Egress,
                source: d.source,
                original_dst: d.original_dst,
                source_identity: None,
            };
            let mut upstream = Upstream::default();
            let outcome =
                handle_query(&shared, &ctx, Transport::Udp, &mut upstream, &d.bytes).await;
            let Outcome::Reply(answer) = outcome else {
                return;
            };
            let sent = match &replier {
                Replier::Spoofed(s) => s.send(d.original_dst, d.source, &answer).await,
                Replier::FromListener => socket.send_to(&answer, d.source).await.map(drop),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, to = %d.source, "cannot send the DNS answer");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_checksum_is_rfc_768s() {
        // A datagram whose checksum, summed with the pseudo header, folds to all ones.
        let from: SocketAddr = "10.96.0.10:53".parse().expect("literal");
        let to: SocketAddr = "10.0.1.20:40123".parse().expect("literal");
        let d = udp_datagram(from, to, b"\x12\x34hello").expect("fits");
        assert_eq!(&d[..6], &[0, 53, 0x9c, 0xbb, 0, 15]);
        let mut sum = ones_sum(&[10, 96, 0, 10, 10, 0, 1, 20, 0, 17, 0, 15], 0);
        sum = ones_sum(&d, sum);
        assert_eq!(fold(sum), 0xffff);
        assert!(udp_datagram(from, to, &vec![0; 70_000]).is_err());
    }

    #[tokio::test]
    async fn a_plain_socket_reports_its_own_address_as_the_original_destination() {
        let s = dns_socket("127.0.0.1:0".parse().expect("literal"), false).expect("bind");
        let addr = s.local_addr().expect("bound");
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        c.send_to(b"hi", addr).await.expect("send");
        let mut buf = [0u8; 64];
        let d = recv_datagram(&s, &mut buf).await.expect("a datagram");
        assert_eq!(d.bytes, b"hi");
        assert_eq!(d.source, c.local_addr().expect("bound"));
        assert_eq!(d.original_dst, addr);
    }
}
