//! Running packets through generated programs in the kernel without attaching them: programs
//! loaded beside the shared maps, packets crafted from a flow, BPF_PROG_TEST_RUN. Used by
//! `cnpc trace --engine bpf` and by the differential tests.

use crate::sys;
use cnpc_codegen_bpf::{artifacts, check, gen};
use cnpc_ir::{DecisionTable, IpNet, NumericIdentity, Protocol};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the kernel refused: {0}")]
    Kernel(String),
    #[error("cnpc's checker rejected the program: {0}")]
    Checker(String),
}

/// The shared maps in the kernel (ipcache, fqdn, ct, events, proxy_config), the maps of loaded
/// programs, and
/// programs loaded against them.
pub struct Kernel {
    maps: BTreeMap<String, OwnedFd>,
}

pub use cnpc_codegen_bpf::gen::Record;

/// What a program did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The tc return code (TC_ACT_OK, TC_ACT_SHOT, or TC_ACT_REDIRECT for an ingress program
    /// handing the packet to the proxy device).
    pub code: u32,
    /// `skb->mark` afterwards (gen::TO_PROXY_MARK when the program handed the packet to an L7
    /// proxy, or tried to; ingress programs or the peer's identity into its low 16 bits).
    pub mark: u32,
    /// The conntrack entry the packet created, if it opened a connection: who opened it
    /// (gen::CT_OPENED_BY_EGRESS or gen::CT_OPENED_BY_INGRESS).
    pub opened: Option<u32>,
}

impl Outcome {
    /// The packet passed (TC_ACT_OK).
    pub fn passed(&self) -> bool {
        self.code == gen::TC_ACT_OK as u32
    }

    /// The policy lets the packet on: it passed, or the table handed it to an L7 proxy (which
    /// decides from there). In a test run a proxied packet is dropped or redirected: no proxy
    /// takes it here (see [`Outcome::proxied`]).
    pub fn allowed(&self) -> bool {
        self.passed() || self.proxied()
    }

    /// The packet was redirected (to the proxy device).
    pub fn redirected(&self) -> bool {
        self.code == gen::TC_ACT_REDIRECT as u32
    }

    /// The packet goes on in the kernel: passed, or redirected to the proxy device.
    pub fn handed_on(&self) -> bool {
        self.passed() || self.redirected()
    }

    /// The table proxies the packet: it carries TO_PROXY_MARK (with no proxy socket or device,
    /// or for a protocol not proxied there, the program drops it with the mark).
    pub fn proxied(&self) -> bool {
        self.mark & cnpc_ir::proxy::contract::MARK_MAGIC_MASK == gen::TO_PROXY_MARK as u32
    }
}

fn kernel_err(what: &str) -> impl Fn(std::io::Error) -> RunError + '_ {
    move |e| RunError::Kernel(format!("{what}: {e}"))
}

impl Kernel {
    pub fn new(entries: &[(IpNet, NumericIdentity)]) -> Result<Kernel, RunError> {
        let mut maps = BTreeMap::new();
        for def in gen::shared_maps(entries.len()) {
            let fd = sys::create_filled(&def, &[]).map_err(|e| RunError::Kernel(e.to_string()))?;
            maps.insert(def.name, fd);
        }
        let k = Kernel { maps };
        for (net, id) in entries {
            k.insert(*net, *id)?;
        }
        Ok(k)
    }

    fn map(&self, name: &str) -> &OwnedFd {
        // Kernel::new creates every shared map, and nothing removes one.
        &self.maps[name]
    }

    /// Names the proxy device in `proxy_config` (0: none, so ingress Proxy verdicts drop).
    /// Nothing is redirected in a test run: the program only returns TC_ACT_REDIRECT.
    pub fn set_proxy_device(&self, ifindex: u32) -> Result<(), RunError> {
        let (k, v) = gen::proxy_config_record(ifindex);
        sys::map_update(self.map(gen::PROXY_CONFIG_MAP), &k, &v)
            .map_err(kernel_err("cannot fill proxy_config"))
    }

    /// Checks and loads a program that reads no map but the shared ones (the proxy device's).
    pub fn load_program(
        &mut self,
        program: &cnpc_codegen_bpf::Program,
    ) -> Result<OwnedFd, RunError> {
        self.load_generated(&gen::Generated {
            program: program.clone(),
            strategy: gen::Strategy::Constant,
            maps: Vec::new(),
            inlined: Vec::new(),
        })
    }

    /// Adds one ipcache entry (an address learned from DNS, say).
    pub fn insert(&self, net: IpNet, id: NumericIdentity) -> Result<(), RunError> {
        let key = artifacts::ipcache_key(net);
        // Where the loader puts it (artifacts::ipcache_images).
        let (map, key) = if artifacts::is_host_entry(net, id) {
            (gen::HOSTS_MAP, &key[4..])
        } else {
            (gen::IPCACHE_MAP, &key[..])
        };
        sys::map_update(self.map(map), key, &id.0.to_le_bytes())
            .map_err(kernel_err("cannot fill the ipcache"))
    }

    /// Records an address learned from DNS with its FQDN identity in the `fqdn` map
    /// (gen::FQDN_MAP), as the loader does for the DNS proxy: programs look it up after the
    /// host entries and before the prefixes.
    pub fn insert_fqdn(&self, ip: IpAddr, id: NumericIdentity) -> Result<(), RunError> {
        sys::map_update(
            self.map(gen::FQDN_MAP),
            &artifacts::fqdn_key(ip),
            &id.0.to_le_bytes(),
        )
        .map_err(kernel_err("cannot fill the fqdn map"))
    }

    /// Generates, checks and loads the program of `table`, tracking connections as
    /// [`gen::needs_tracking`] says for the endpoint's tables.
    pub fn load(&mut self, table: &DecisionTable, track: bool) -> Result<OwnedFd, RunError> {
        self.load_generated(&gen::generate(table, track))
    }

    /// [`Kernel::load`], deciding the peers at `hosts`' addresses by address
    /// ([`gen::generate_inlined`], with the default bound on address map records).
    pub fn load_inlined(
        &mut self,
        table: &DecisionTable,
        track: bool,
        hosts: &gen::HostAddresses,
    ) -> Result<OwnedFd, RunError> {
        self.load_generated(&gen::generate_inlined(
            table,
            track,
            &gen::Inline::new(hosts),
        ))
    }

    /// Creates and fills the maps of a generated program, checks it and loads it.
    pub fn load_generated(&mut self, g: &gen::Generated) -> Result<OwnedFd, RunError> {
        for m in &g.maps {
            if self.maps.contains_key(&m.def.name) {
                continue; // named by content: the same map
            }
            let fd = sys::create_filled(&m.def, &m.records)
                .map_err(|e| RunError::Kernel(e.to_string()))?;
            self.maps.insert(m.def.name.clone(), fd);
        }
        let program = g
            .program
            .with_map_fds(|name| self.maps.get(name).map(|fd| fd.as_raw_fd()))
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

    /// Runs one packet as the first of its flow: connections it opens are forgotten afterwards,
    /// so packets of different test flows never see each other's state.
    pub fn run(&self, prog: &OwnedFd, packet: &[u8]) -> Result<Outcome, RunError> {
        let out = self.run_opening(prog, packet)?;
        self.forget_connections()?;
        Ok(out)
    }

    /// Runs one packet and reports the connection it opened (the only one in `ct`: callers
    /// forget connections between flows).
    fn run_opening(&self, prog: &OwnedFd, packet: &[u8]) -> Result<Outcome, RunError> {
        let mut out = self.run_keep(prog, packet)?;
        out.opened = self
            .connections()?
            .first()
            .map(|(_, v)| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
        Ok(out)
    }

    /// Runs the first packet of a flow through `prog`, and, when it opens a connection, its
    /// reply (addresses and ports swapped) through `reverse`, the endpoint's program for the
    /// other direction; then forgets the connection. Replies of an opened connection must pass
    /// whatever `reverse`'s table says.
    pub fn run_with_reply(
        &self,
        prog: &OwnedFd,
        reverse: &OwnedFd,
        packet: &[u8],
        reply: &[u8],
    ) -> Result<(Outcome, Option<Outcome>), RunError> {
        let out = self.run_opening(prog, packet)?;
        let back = match out.opened {
            Some(_) => Some(self.run_keep(reverse, reply)?),
            None => None,
        };
        self.forget_connections()?;
        Ok((out, back))
    }

    /// Runs one packet, keeping the conntrack state it leaves.
    pub fn run_keep(&self, prog: &OwnedFd, packet: &[u8]) -> Result<Outcome, RunError> {
        self.run_marked(prog, packet, 0)
    }

    /// Runs one packet that arrives with `skb->mark` = `mark` (what the proxies' sockets set),
    /// keeping the conntrack state it leaves.
    pub fn run_marked(
        &self,
        prog: &OwnedFd,
        packet: &[u8],
        mark: u32,
    ) -> Result<Outcome, RunError> {
        let (code, mark, _) = sys::test_run_with_mark(prog, packet, 1, mark)
            .map_err(kernel_err("BPF_PROG_TEST_RUN"))?;
        Ok(Outcome {
            code,
            mark,
            opened: None,
        })
    }

    /// The conntrack entries: (key, value).
    pub fn connections(&self) -> Result<Vec<Record>, RunError> {
        let ct = self.map(gen::CT_MAP);
        let mut out = Vec::new();
        for k in sys::map_keys(ct, gen::CT_KEY_SIZE as usize).map_err(kernel_err("reading ct"))? {
            if let Some(v) = sys::map_lookup(ct, &k, gen::CT_VALUE_SIZE as usize)
                .map_err(kernel_err("reading ct"))?
            {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Records a connection in `ct` as a program would (key and value in gen::CT_MAP's layout).
    pub fn insert_connection(&self, key: &[u8], value: &[u8]) -> Result<(), RunError> {
        sys::map_update(self.map(gen::CT_MAP), key, value).map_err(kernel_err("writing ct"))
    }

    pub fn forget_connections(&self) -> Result<(), RunError> {
        let ct = self.map(gen::CT_MAP);
        for k in sys::map_keys(ct, gen::CT_KEY_SIZE as usize).map_err(kernel_err("reading ct"))? {
            sys::map_delete(ct, &k).map_err(kernel_err("clearing ct"))?;
        }
        Ok(())
    }

    /// The consumer side of the events ring buffer.
    pub fn events(&self) -> Result<sys::RingBuf, RunError> {
        sys::RingBuf::new(self.map(gen::EVENTS_MAP), gen::EVENTS_BYTES as usize)
            .map_err(kernel_err("cannot map the events ring buffer"))
    }
}

/// An Ethernet frame carrying one packet of the flow: IPv4 or IPv6 after the addresses, the
/// destination port (or ICMP type) set, everything else zero. The addresses must be of one family.
pub fn craft(src: IpAddr, dst: IpAddr, proto: Protocol, port: u16) -> Vec<u8> {
    craft_ports(src, dst, proto, 40000, port)
}

/// As [`craft`], with the source port given (ignored for ICMP).
pub fn craft_ports(src: IpAddr, dst: IpAddr, proto: Protocol, sport: u16, port: u16) -> Vec<u8> {
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
            p[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
            p[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
        }
    }
    p
}
