//! Running packets through generated programs in the kernel without attaching them: programs
//! loaded beside an ipcache map, packets crafted from a flow, BPF_PROG_TEST_RUN. Used by
//! `cnpc trace --engine bpf` and by the differential tests.

use crate::sys;
use cnpc_codegen_bpf::{artifacts, check, gen};
use cnpc_ir::{DecisionTable, IpNet, NumericIdentity, Protocol};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the kernel refused: {0}")]
    Kernel(String),
    #[error("cnpc's checker rejected the program: {0}")]
    Checker(String),
}

/// An ipcache map in the kernel, and programs loaded against it.
pub struct Kernel {
    ipcache: OwnedFd,
}

/// What a program did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The tc return code (TC_ACT_OK or TC_ACT_SHOT).
    pub code: u32,
    /// `skb->mark` afterwards (gen::PROXY_MARK for the L7 proxy).
    pub mark: u32,
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        self.code == gen::TC_ACT_OK as u32
    }

    pub fn proxied(&self) -> bool {
        self.allowed() && self.mark == gen::PROXY_MARK as u32
    }
}

impl Kernel {
    pub fn new(entries: &[(IpNet, NumericIdentity)]) -> Result<Kernel, RunError> {
        let max = (entries.len() as u32 * 2).max(1024);
        let ipcache = sys::lpm_map(gen::IPCACHE_KEY_SIZE, gen::IPCACHE_VALUE_SIZE, max)
            .map_err(|e| RunError::Kernel(format!("cannot create the ipcache map: {e}")))?;
        for (net, id) in entries {
            sys::map_update(&ipcache, &artifacts::ipcache_key(*net), &id.0.to_le_bytes())
                .map_err(|e| RunError::Kernel(format!("cannot fill the ipcache map: {e}")))?;
        }
        Ok(Kernel { ipcache })
    }

    /// Adds one entry (an address learned from DNS, say).
    pub fn insert(&self, net: IpNet, id: NumericIdentity) -> Result<(), RunError> {
        sys::map_update(
            &self.ipcache,
            &artifacts::ipcache_key(net),
            &id.0.to_le_bytes(),
        )
        .map_err(|e| RunError::Kernel(e.to_string()))
    }

    /// Generates, checks and loads the program of `table`.
    pub fn load(&self, table: &DecisionTable) -> Result<OwnedFd, RunError> {
        let fd = self.ipcache.as_raw_fd();
        let program = gen::generate(table)
            .with_map_fds(|name| (name == gen::IPCACHE_MAP).then_some(fd))
            .ok_or_else(|| RunError::Checker("a map reference cannot be resolved".into()))?;
        check::check(&program).map_err(|e| {
            RunError::Checker(
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &program.bytes()).map_err(RunError::Kernel)
    }

    pub fn run(&self, prog: &OwnedFd, packet: &[u8]) -> Result<Outcome, RunError> {
        let (code, mark) = sys::test_run(prog, packet)
            .map_err(|e| RunError::Kernel(format!("BPF_PROG_TEST_RUN: {e}")))?;
        Ok(Outcome { code, mark })
    }
}

/// An Ethernet frame carrying one packet of the flow: IPv4 or IPv6 after the addresses, the
/// destination port (or ICMP type) set, everything else zero. The addresses must be of one family.
pub fn craft(src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> Vec<u8> {
    let (num, l4len) = match proto {
        Protocol::Tcp => (6u8, 20usize),
        Protocol::Udp => (17, 8),
        Protocol::Sctp => (132, 12),
        Protocol::Icmp => (1, 8),
        Protocol::Icmpv6 => (58, 8),
    };
    let mut p = vec![0u8; 14];
    let l4 = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p[12..14].copy_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4len) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = num;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            p.extend(ip);
            34
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(x) => x,
                IpAddr::V4(x) => x.to_ipv6_mapped(),
            };
            p[12..14].copy_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4len as u16).to_be_bytes());
            ip[6] = num;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&v6(s).octets());
            ip[24..40].copy_from_slice(&v6(d).octets());
            p.extend(ip);
            54
        }
    };
    p.resize(l4 + l4len, 0);
    match proto {
        Protocol::Icmp | Protocol::Icmpv6 => p[l4] = port as u8,
        _ => {
            p[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
            p[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
        }
    }
    p
}
