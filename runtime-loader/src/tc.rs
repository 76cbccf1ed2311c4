//! The clsact fallback for kernels without TCX links (before Linux 6.6): a `clsact` qdisc on
//! the interface and a direct-action `bpf` filter at its ingress or egress hook, through
//! rtnetlink (include/uapi/linux/rtnetlink.h, pkt_sched.h, pkt_cls.h). Replacing the filter
//! (NLM_F_REPLACE, same priority and handle) swaps its program in one step, as a link update
//! does. Filters live with the interface, not with the loader, so they keep enforcing when it
//! exits; they carry no pin, so the loader finds them again by interface, hook and priority.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const ETH_P_ALL: u16 = 0x0003;
/// The priority and handle cnpc's filters use; one filter per hook.
pub const PRIORITY: u32 = 0xc70;
const HANDLE: u32 = 1;

/// A tc hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// A netlink message with a `struct tcmsg` body.
    fn tc(kind: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Message {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
                                                         // struct tcmsg: family, pad[3], ifindex, handle, parent, info.
        buf.extend([0u8; 4]);
        buf.extend((ifindex as i32).to_ne_bytes());
        buf.extend(handle.to_ne_bytes());
        buf.extend(parent.to_ne_bytes());
        buf.extend(info.to_ne_bytes());
        Message { buf }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Message {
        let len = 4 + data.len();
        self.buf.extend((len as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }

    /// Starts a nested attribute; returns where its length goes.
    fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend([0u8; 2]);
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Sends one request and waits for its acknowledgement; the kernel's error, if any.
fn request(msg: Message) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let bytes = msg.finish();
    // SAFETY: `bytes` is a live buffer of the given length; the kernel is the destination
    // (a zeroed sockaddr_nl).
    let sent = unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            0,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = vec![0u8; 8192];
    // SAFETY: `reply` is a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            reply.as_mut_ptr() as *mut libc::c_void,
            reply.len(),
            0,
        )
    };
    if n < 20 {
        return Err(io::Error::last_os_error());
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::other(format!("unexpected netlink reply {kind}")));
    }
    // struct nlmsgerr: error (negative errno, 0 for an acknowledgement), then the request.
    let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

fn parent(hook: Hook) -> u32 {
    (TC_H_CLSACT & 0xffff_0000)
        | match hook {
            Hook::Ingress => TC_H_MIN_INGRESS,
            Hook::Egress => TC_H_MIN_EGRESS,
        }
}

/// Adds the clsact qdisc to `ifindex` unless it is there.
pub fn ensure_clsact(ifindex: u32) -> io::Result<()> {
    let mut m = Message::tc(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_EXCL,
        ifindex,
        0xffff_0000,
        TC_H_CLSACT,
        0,
    );
    m.attr(TCA_KIND, b"clsact\0");
    match request(m) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Puts `prog` at `hook` of `ifindex` as cnpc's direct-action filter, replacing the program of
/// the filter already there in one step.
pub fn attach(ifindex: u32, hook: Hook, prog: &OwnedFd, name: &str) -> io::Result<()> {
    ensure_clsact(ifindex)?;
    let info = (PRIORITY << 16) | u32::from(ETH_P_ALL.to_be());
    let mut m = Message::tc(
        RTM_NEWTFILTER,
        NLM_F_CREATE | NLM_F_REPLACE,
        ifindex,
        HANDLE,
        parent(hook),
        info,
    );
    m.attr(TCA_KIND, b"bpf\0");
    let at = m.nest(TCA_OPTIONS);
    m.attr(TCA_BPF_FD, &(prog.as_raw_fd() as u32).to_ne_bytes());
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    m.attr(TCA_BPF_NAME, &n);
    m.attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    m.end(at);
    request(m)
}

/// Removes cnpc's filter from `hook` of `ifindex` (gone already is fine).
pub fn detach(ifindex: u32, hook: Hook) -> io::Result<()> {
    let info = (PRIORITY << 16) | u32::from(ETH_P_ALL.to_be());
    let mut m = Message::tc(RTM_DELTFILTER, 0, ifindex, HANDLE, parent(hook), info);
    m.attr(TCA_KIND, b"bpf\0");
    match request(m) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}
