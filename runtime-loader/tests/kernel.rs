//! The kernel accepts what the assembler writes and runs it as written: a hand-assembled
//! classifier goes through BPF_PROG_LOAD (the kernel verifier) and BPF_PROG_TEST_RUN.

use cnpc_runtime_loader::sys;

use cnpc_codegen_bpf::check::check;
use cnpc_codegen_bpf::insn::*;
use cnpc_codegen_bpf::Asm;

/// TC verdicts (include/uapi/linux/pkt_cls.h).
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// IPv4 TCP packets to `dport` pass, everything else is dropped. Offsets of struct __sk_buff:
/// data at 76, data_end at 80.
fn port_filter(dport: i32) -> cnpc_codegen_bpf::Program {
    let mut a = Asm::new();
    let drop = a.label();
    let pass = a.label();
    a.load(Size::W, R2, R1, 76).load(Size::W, R3, R1, 80);
    // Bounds: Ethernet (14) + IPv4 without options (20) + the two port fields (4).
    a.mov(R4, Src::Reg(R2))
        .alu(AluOp::Add, R4, Src::Imm(38))
        .jump_if(Cond::Gt, R4, Src::Reg(R3), drop);
    a.load(Size::H, R5, R2, 12)
        .jump_if(Cond::Ne, R5, Src::Imm(0x0008), drop); // ethertype 0x0800, read little-endian
    a.load(Size::B, R5, R2, 14)
        .jump_if(Cond::Ne, R5, Src::Imm(0x45), drop); // version 4, no options
    a.load(Size::B, R5, R2, 23)
        .jump_if(Cond::Ne, R5, Src::Imm(6), drop); // TCP
    a.load(Size::H, R5, R2, 36)
        .push(Insn::ToBe { dst: R5, bits: 16 });
    a.jump_if(Cond::Eq, R5, Src::Imm(dport), pass);
    a.bind(drop);
    a.ret(TC_ACT_SHOT);
    a.bind(pass);
    a.ret(TC_ACT_OK);
    a.finish().unwrap()
}

fn ipv4_tcp(dport: u16, proto: u8) -> Vec<u8> {
    let mut p = vec![0u8; 54];
    p[12..14].copy_from_slice(&[0x08, 0x00]);
    p[14] = 0x45;
    p[16..18].copy_from_slice(&40u16.to_be_bytes());
    p[22] = 64;
    p[23] = proto;
    p[26..30].copy_from_slice(&[10, 0, 0, 1]);
    p[30..34].copy_from_slice(&[10, 0, 0, 2]);
    p[34..36].copy_from_slice(&40000u16.to_be_bytes());
    p[36..38].copy_from_slice(&dport.to_be_bytes());
    p[46] = 0x50;
    p
}

#[test]
fn assembled_classifier_loads_and_decides_like_its_source() {
    let prog = port_filter(80);
    check(&prog).expect("our own checker accepts it");
    let fd = match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &prog.bytes()) {
        Ok(fd) => fd,
        Err(e) if e.contains("Operation not permitted") => {
            return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
        }
        Err(e) => panic!(
            "the kernel verifier rejected the program: {e}\n{}",
            cnpc_codegen_bpf::disasm::listing(&prog)
        ),
    };
    let run = |p: &[u8]| sys::test_run(&fd, p).expect("BPF_PROG_TEST_RUN").0;
    assert_eq!(run(&ipv4_tcp(80, 6)), TC_ACT_OK as u32);
    assert_eq!(run(&ipv4_tcp(81, 6)), TC_ACT_SHOT as u32);
    assert_eq!(run(&ipv4_tcp(80, 17)), TC_ACT_SHOT as u32, "UDP is not TCP");
    assert_eq!(
        run(&ipv4_tcp(20480, 6)),
        TC_ACT_SHOT as u32,
        "port bytes are big-endian on the wire"
    );
    let mut short = ipv4_tcp(80, 6);
    short.truncate(37);
    assert_eq!(
        run(&short),
        TC_ACT_SHOT as u32,
        "a truncated packet fails the bounds check"
    );
}

#[test]
fn the_kernel_rejects_what_the_checker_rejects() {
    // An out-of-bounds packet read without a bounds check: the kernel verifier must refuse it,
    // which shows the load path really runs the verifier.
    let mut a = Asm::new();
    a.load(Size::W, R2, R1, 76).load(Size::B, R0, R2, 0).exit();
    let prog = a.finish().unwrap();
    let ours = cnpc_codegen_bpf::check::check(&prog).unwrap_err();
    assert!(ours[0].message.contains("bounds-checked"), "{ours:?}");
    match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &prog.bytes()) {
        Ok(_) => panic!("the kernel accepted an unchecked packet read"),
        Err(e) if e.contains("Operation not permitted") => {
            sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
        }
        Err(e) => assert!(
            e.contains("invalid access to packet") || e.contains("R2"),
            "{e}"
        ),
    }
}

/// A 32-bit little-endian field of an event (gen::event) at `at`.
fn field(e: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]])
}

/// The ct key of a connection, written from the endpoint's side (gen::CT_MAP).
fn ct_key(
    local: std::net::IpAddr,
    peer: std::net::IpAddr,
    local_port: u16,
    peer_port: u16,
    proto: u8,
) -> Vec<u8> {
    let bytes = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => {
            let mut b = v.octets().to_vec();
            b.resize(16, 0);
            b
        }
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
    };
    let mut k = bytes(local);
    k.extend(bytes(peer));
    k.extend(local_port.to_be_bytes());
    k.extend(peer_port.to_be_bytes());
    k.extend([proto, if local.is_ipv4() { 4 } else { 6 }, 0, 0]);
    k
}

/// A ct value (gen::CT_VALUE_SIZE): who opened the connection, and its flags.
fn ct_value(opened_by: u32, flags: u32) -> Vec<u8> {
    let mut v = opened_by.to_le_bytes().to_vec();
    v.extend(flags.to_le_bytes());
    v
}

mod parsing {
    //! The behaviours `cnpc_codegen_bpf::gen` documents, on a one-row table: peer identity 300
    //! may reach TCP port 80; everything else is denied.
    use super::sys;
    use cnpc_codegen_bpf::gen::{self, event, TC_ACT_OK, TC_ACT_SHOT};
    use cnpc_ir::*;
    use cnpc_runtime_loader::testrun::{craft_ports, Kernel};
    use std::os::fd::OwnedFd;

    const PEER: u32 = 300;

    fn table() -> DecisionTable {
        DecisionTable {
            subject: NumericIdentity(400),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(PEER)],
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
                verdict: TableVerdict::Allow,
            }],
        }
    }

    fn load() -> Option<(Kernel, OwnedFd)> {
        let peer = NumericIdentity(PEER);
        let entries = [
            ("10.0.0.1/32".parse().unwrap(), peer),
            ("fd00::1/128".parse().unwrap(), peer),
        ];
        let mut kernel = match Kernel::new(&entries) {
            Ok(k) => k,
            Err(e) => {
                sys::skip_or_fail(&format!("cannot create the maps: {e}"));
                return None;
            }
        };
        match kernel.load(&table(), true) {
            Ok(fd) => Some((kernel, fd)),
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                None
            }
            Err(e) => panic!("verifier: {e}"),
        }
    }

    fn v4(frag: u16, ihl: u8, port: u16) -> Vec<u8> {
        let opts = (usize::from(ihl) - 5) * 4;
        let mut p = vec![0u8; 14 + 20 + opts + 20];
        p[12..14].copy_from_slice(&[0x08, 0x00]);
        p[14] = 0x40 | ihl;
        p[20..22].copy_from_slice(&frag.to_be_bytes());
        p[23] = 6;
        p[26..30].copy_from_slice(&[10, 0, 0, 1]);
        p[30..34].copy_from_slice(&[10, 0, 0, 2]);
        let l4 = 34 + opts;
        p[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
        p
    }

    /// IPv6 from fd00::1 with the given extension headers (next-header values) before TCP.
    fn v6(exts: &[u8], frag_offset: u16, port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 14 + 40];
        p[12..14].copy_from_slice(&[0x86, 0xdd]);
        p[14] = 0x60;
        p[20] = *exts.first().unwrap_or(&6);
        p[22..38].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        for (i, &h) in exts.iter().enumerate() {
            let next = *exts.get(i + 1).unwrap_or(&6);
            let mut e = vec![0u8; 8];
            e[0] = next;
            if h == 44 {
                e[2..4].copy_from_slice(&(frag_offset << 3).to_be_bytes());
            }
            p.extend(e);
        }
        let mut tcp = vec![0u8; 20];
        tcp[2..4].copy_from_slice(&port.to_be_bytes());
        p.extend(tcp);
        p
    }

    #[test]
    fn parser_behaviours() {
        let Some((kernel, fd)) = load() else { return };
        let run = |p: &[u8]| kernel.run(&fd, p).unwrap().code as i32;
        assert_eq!(run(&v4(0, 5, 80)), TC_ACT_OK);
        assert_eq!(run(&v4(0, 5, 81)), TC_ACT_SHOT);
        assert_eq!(
            run(&v4(0, 8, 80)),
            TC_ACT_OK,
            "IPv4 options move the L4 header"
        );
        assert_eq!(
            run(&v4(0x2000, 5, 80)),
            TC_ACT_OK,
            "a first fragment (MF set) carries the ports"
        );
        assert_eq!(
            run(&v4(0x0010, 5, 80)),
            TC_ACT_SHOT,
            "a non-first fragment has no ports: dropped"
        );
        assert_eq!(run(&v6(&[], 0, 80)), TC_ACT_OK);
        assert_eq!(
            run(&v6(&[0, 60], 0, 80)),
            TC_ACT_OK,
            "hop-by-hop and destination options are skipped"
        );
        assert_eq!(run(&v6(&[0, 60], 0, 81)), TC_ACT_SHOT);
        assert_eq!(
            run(&v6(&[44], 0, 80)),
            TC_ACT_OK,
            "a first IPv6 fragment carries the ports"
        );
        assert_eq!(
            run(&v6(&[44], 5, 80)),
            TC_ACT_SHOT,
            "a non-first IPv6 fragment is dropped"
        );
        assert_eq!(
            run(&v6(&[0, 60, 0, 60, 0], 0, 80)),
            TC_ACT_SHOT,
            "more extension headers than we skip: dropped"
        );
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&arp), TC_ACT_OK, "non-IP frames pass");
        let mut short = v4(0, 5, 80);
        short.truncate(36);
        assert_eq!(
            run(&short),
            TC_ACT_SHOT,
            "too short for its headers: dropped"
        );
        let mut other = v4(0, 5, 80);
        other[23] = 47; // GRE
        assert_eq!(
            run(&other),
            TC_ACT_SHOT,
            "other IP protocols get the default"
        );
    }

    /// The egress program of the same endpoint (400 at 10.0.0.2): it denies everything, so
    /// only replies pass it.
    fn egress(kernel: &mut Kernel) -> OwnedFd {
        let t = DecisionTable {
            direction: Direction::Egress,
            rows: Vec::new(),
            classes: Vec::new(),
            ..table()
        };
        kernel.load(&t, true).unwrap()
    }

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn replies_of_allowed_connections_pass_and_nothing_else() {
        // Cilium: replies of an established connection skip policy (bpf/lib/conntrack.h).
        let Some((mut kernel, ingress)) = load() else {
            return;
        };
        kernel
            .insert("10.0.0.2/32".parse().unwrap(), NumericIdentity(400))
            .unwrap();
        let egress = egress(&mut kernel);
        let (peer, me) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let reply = craft_ports(me, peer, Protocol::Tcp, 80, 5555);
        assert_eq!(
            kernel.run_keep(&egress, &reply).unwrap().code as i32,
            TC_ACT_SHOT,
            "no connection yet: the table decides"
        );
        let first = craft_ports(peer, me, Protocol::Tcp, 5555, 80);
        assert_eq!(
            kernel.run_keep(&ingress, &first).unwrap().code as i32,
            TC_ACT_OK
        );
        let ct = kernel.connections().unwrap();
        assert_eq!(ct.len(), 1, "one entry for the connection");
        let (key, value) = &ct[0];
        assert_eq!(&key[0..4], &[10, 0, 0, 2], "local address first");
        assert_eq!(&key[16..20], &[10, 0, 0, 1]);
        assert_eq!(
            &key[32..36],
            &[0, 80, 0x15, 0xb3],
            "local port 80, peer port 5555"
        );
        assert_eq!((key[36], key[37]), (6, 4));
        assert_eq!(value[0], gen::CT_OPENED_BY_INGRESS as u8);
        assert_eq!(
            kernel.run_keep(&egress, &reply).unwrap().code as i32,
            TC_ACT_OK,
            "the reply passes"
        );
        assert_eq!(
            kernel.run_keep(&ingress, &first).unwrap().code as i32,
            TC_ACT_OK,
            "the next packet passes"
        );
        assert_eq!(
            kernel.connections().unwrap().len(),
            1,
            "and opens nothing new"
        );
        // Another port of the same peer is another connection, and the table denies its replies.
        let other = craft_ports(me, peer, Protocol::Tcp, 81, 5555);
        assert_eq!(
            kernel.run_keep(&egress, &other).unwrap().code as i32,
            TC_ACT_SHOT
        );
        // A packet the ingress table denies does not pass as a "reply" of the egress side.
        let denied = craft_ports(peer, me, Protocol::Tcp, 5555, 81);
        assert_eq!(
            kernel.run_keep(&ingress, &denied).unwrap().code as i32,
            TC_ACT_SHOT
        );
        // ICMP is not tracked.
        let ping = craft_ports(peer, me, Protocol::Icmp, 0, 8);
        kernel.run_keep(&ingress, &ping).unwrap();
        assert_eq!(kernel.connections().unwrap().len(), 1);
        kernel.forget_connections().unwrap();
        assert_eq!(
            kernel.run_keep(&egress, &reply).unwrap().code as i32,
            TC_ACT_SHOT,
            "forgotten"
        );
    }

    #[test]
    fn events_report_drops_and_new_connections() {
        let Some((kernel, ingress)) = load() else {
            return;
        };
        kernel
            .insert("fd00::2/128".parse().unwrap(), NumericIdentity(400))
            .unwrap();
        let mut events = kernel.events().unwrap();
        events.drain();
        let (peer, me) = (ip("fd00::1"), ip("fd00::2"));
        let open = craft_ports(peer, me, Protocol::Tcp, 5555, 80);
        kernel.run_keep(&ingress, &open).unwrap();
        kernel.run_keep(&ingress, &open).unwrap();
        kernel
            .run_keep(&ingress, &craft_ports(peer, me, Protocol::Udp, 5555, 53))
            .unwrap();
        let got = events.drain();
        assert_eq!(
            got.len(),
            2,
            "one for the new connection, one for the drop; none for the established packet"
        );
        let field =
            |e: &[u8], at: usize| u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let e = &got[0];
        assert_eq!(e.len(), gen::EVENT_SIZE);
        assert_eq!(field(e, event::SUBJECT), 400);
        assert_eq!(field(e, event::PEER), PEER);
        assert_eq!(field(e, event::ROW), 0, "row 0 allowed it");
        assert_eq!(u16::from_le_bytes([e[event::PORT], e[event::PORT + 1]]), 80);
        assert_eq!(
            (
                e[event::PROTOCOL],
                e[event::VERDICT],
                e[event::DIRECTION],
                e[event::FAMILY]
            ),
            (6, 0, 0, 6)
        );
        // Both addresses, from the endpoint's side: its own, then the peer's.
        let address = |e: &[u8], at: usize| -> [u8; 16] { e[at..at + 16].try_into().unwrap() };
        let v6 = |a: std::net::IpAddr| match a {
            std::net::IpAddr::V6(a) => a.octets(),
            std::net::IpAddr::V4(_) => unreachable!("IPv6 literals above"),
        };
        assert_eq!(address(e, event::SUBJECT_ADDRESS), v6(me));
        assert_eq!(address(e, event::PEER_ADDRESS), v6(peer));
        let d = &got[1];
        assert_eq!(address(d, event::PEER_ADDRESS), v6(peer));
        assert_eq!(field(d, event::ROW), u32::MAX, "the default denied it");
        assert_eq!(u16::from_le_bytes([d[event::PORT], d[event::PORT + 1]]), 53);
        assert_eq!((d[event::PROTOCOL], d[event::VERDICT]), (17, 1));
        kernel.forget_connections().unwrap();
    }
}

/// A table too large for code compiles to map lookups: `verify` must create those maps from
/// the manifest and fill them from their images, and the kernel must accept the program.
#[test]
fn verify_loads_the_map_images_of_large_tables() {
    use cnpc_codegen_bpf::artifacts;
    use cnpc_ir::*;
    let table = |direction, ports: bool| DecisionTable {
        subject: NumericIdentity(1000),
        direction,
        default: TableVerdict::Deny,
        classes: (0..200)
            .map(|i| IdentityClass {
                members: vec![NumericIdentity(5000 + i)],
            })
            .collect(),
        rows: (0..200)
            .map(|i| TableRow {
                class: i,
                protocol: Protocol::Tcp,
                ports: if ports {
                    PortRange::single(1000 + i as u16)
                } else {
                    PortRange {
                        lo: 1000,
                        hi: 2000 + i as u16,
                    }
                },
                verdict: TableVerdict::Allow,
            })
            .collect(),
    };
    let tables = [
        table(Direction::Ingress, true),
        table(Direction::Egress, false),
    ];
    let files = artifacts::render(
        &Program::default(),
        &tables,
        &[("10.0.0.1/32".parse().unwrap(), NumericIdentity(1000))],
        &[],
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("cnpc-verify-maps-{}", std::process::id()));
    artifacts::write_dir(&dir, &files).unwrap();
    let images = files.keys().filter(|f| f.starts_with("maps/")).count();
    assert!(
        images >= 4,
        "ipcache, hosts, and the tables' maps: {:?}",
        files.keys()
    );
    let result = cnpc_runtime_loader::verify::verify_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let verified = match result {
        Ok(v) => v,
        Err(e) => return sys::skip_or_fail(&format!("verify: {e}")),
    };
    if verified.iter().any(|v| {
        v.rejected
            .as_deref()
            .is_some_and(|r| r.contains("Operation not permitted"))
    }) {
        return sys::skip_or_fail("BPF_PROG_LOAD not permitted");
    }
    assert_eq!(verified.len(), 2);
    for v in &verified {
        assert_eq!(v.strategy, "maps", "{v:?}");
        assert!(v.rejected.is_none(), "{v:?}");
    }
}

mod proxy {
    //! Proxy verdicts in the kernel (cnpc_codegen_bpf::gen, "L7 proxies"): endpoint 400 at
    //! 10.0.0.2 / fd00::2, peer 300 at 10.0.0.1 / fd00::1, the node at 10.0.0.9 (host). Both
    //! directions proxy TCP 80 and UDP 53, allow TCP 81 and deny the rest (UDP is handed over
    //! at egress only). Nothing listens on the proxy ports in a test run, so the egress handoff
    //! finds no socket: the tests that depend on that run in a network namespace of their own.
    //! A test run cannot assign a socket (see `sk_assign_is_refused_in_a_test_run`): the
    //! handoff's success path is tested in network namespaces (`udp_handoff` below; TCP in
    //! tests/l7.rs).
    use super::{ct_key, ct_value, field, sys};
    use cnpc_codegen_bpf::gen::{
        self, event, CT_FLAG_PROXIED, CT_OPENED_BY_EGRESS, CT_OPENED_BY_INGRESS, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT, TO_PROXY_MARK,
    };
    use cnpc_ir::proxy::contract;
    use cnpc_ir::*;
    use cnpc_runtime_loader::testrun::{craft_ports, Kernel, Outcome};
    use std::net::IpAddr;
    use std::os::fd::OwnedFd;

    const SUBJECT: u32 = 400;
    const PEER: u32 = 300;
    const HOST: u32 = 1;
    /// A local-scope (CIDR) identity, wider than a mark's identity bits.
    const WIDE: u32 = 16_777_217;
    const SHOT: u32 = TC_ACT_SHOT as u32;
    const OK: u32 = TC_ACT_OK as u32;
    const REDIRECT: u32 = TC_ACT_REDIRECT as u32;
    const MARK: u32 = TO_PROXY_MARK as u32;

    fn proxy() -> TableVerdict {
        TableVerdict::Proxy(Vec::new())
    }

    fn table(direction: Direction, port_80: TableVerdict) -> DecisionTable {
        let row = |protocol, port, verdict| TableRow {
            class: 0,
            protocol,
            ports: PortRange::single(port),
            verdict,
        };
        let rows = vec![
            row(Protocol::Tcp, 80, port_80),
            row(Protocol::Tcp, 81, TableVerdict::Allow),
            row(Protocol::Udp, 53, proxy()),
        ];
        DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(PEER)],
            }],
            rows,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The shared maps with the parties in the ipcache; `None` (after skip_or_fail) when the
    /// kernel refuses us.
    fn kernel() -> Option<Kernel> {
        let entries = [
            ("10.0.0.1/32", PEER),
            ("fd00::1/128", PEER),
            ("10.0.0.2/32", SUBJECT),
            ("fd00::2/128", SUBJECT),
            ("10.0.0.9/32", HOST),
        ]
        .map(|(net, id)| (net.parse().unwrap(), NumericIdentity(id)));
        match Kernel::new(&entries) {
            Ok(k) => Some(k),
            Err(e) => {
                sys::skip_or_fail(&format!("cannot create the maps: {e}"));
                None
            }
        }
    }

    fn load(kernel: &mut Kernel, t: &DecisionTable) -> Option<OwnedFd> {
        match kernel.load(t, true) {
            Ok(fd) => Some(fd),
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                None
            }
            Err(e) => panic!(
                "rejected: {e}\n{}",
                cnpc_codegen_bpf::disasm::listing(&gen::generate(t, true).program)
            ),
        }
    }

    /// Runs `f` on a thread in a new network namespace, where no socket listens (test runs
    /// look sockets up in the namespace of the thread that runs them).
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    sys::skip_or_fail(&format!(
                        "unshare(CLONE_NEWNET): {}",
                        std::io::Error::last_os_error()
                    ));
                    return None;
                }
                Some(f())
            })
            .join()
            .expect("the test thread")
        })
    }

    /// (peer, row, verdict, direction) of each event.
    fn events(ring: &mut sys::RingBuf) -> Vec<(u32, u32, u8, u8)> {
        ring.drain()
            .iter()
            .map(|e| {
                assert_eq!(field(e, event::SUBJECT), SUBJECT, "{e:?}");
                (
                    field(e, event::PEER),
                    field(e, event::ROW),
                    e[event::VERDICT],
                    e[event::DIRECTION],
                )
            })
            .collect()
    }

    fn code_mark(o: Outcome) -> (u32, u32) {
        (o.code, o.mark)
    }

    #[test]
    fn egress_proxy_without_a_proxy_socket_drops_and_reports() {
        in_fresh_netns(|| {
            let Some(mut kernel) = kernel() else { return };
            let Some(egress) = load(&mut kernel, &table(Direction::Egress, proxy())) else {
                return;
            };
            let mut ring = kernel.events().unwrap();
            ring.drain();
            for (me, peer) in [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")] {
                let (me, peer) = (ip(me), ip(peer));
                let out = kernel
                    .run_keep(&egress, &craft_ports(me, peer, Protocol::Tcp, 40000, 80))
                    .unwrap();
                assert_eq!(code_mark(out), (SHOT, MARK), "fail closed, {me}");
                assert!(kernel.connections().unwrap().is_empty(), "no connection");
                assert_eq!(
                    events(&mut ring),
                    [(PEER, 0, 1, 1)],
                    "a drop event naming the Proxy row"
                );
                let out = kernel
                    .run_keep(&egress, &craft_ports(me, peer, Protocol::Udp, 40000, 53))
                    .unwrap();
                assert_eq!(
                    code_mark(out),
                    (SHOT, MARK),
                    "no DNS proxy socket: UDP fails closed too"
                );
                assert!(kernel.connections().unwrap().is_empty(), "no flow");
                assert_eq!(events(&mut ring), [(PEER, 2, 1, 1)]);
                let out = kernel
                    .run_keep(&egress, &craft_ports(me, peer, Protocol::Tcp, 40000, 81))
                    .unwrap();
                assert_eq!(code_mark(out), (OK, 0), "allowed rows pass as before");
                kernel.forget_connections().unwrap();
                ring.drain();
            }
        });
    }

    #[test]
    fn proxied_connections_stay_with_the_proxy() {
        in_fresh_netns(|| {
            let Some(mut kernel) = kernel() else { return };
            let (me, peer) = (ip("10.0.0.2"), ip("10.0.0.1"));
            let packet = craft_ports(me, peer, Protocol::Tcp, 40000, 80);
            let key = ct_key(me, peer, 40000, 80, 6);
            // The next generation allows, or denies, what was proxied.
            for now in [TableVerdict::Allow, TableVerdict::Deny] {
                let Some(egress) = load(&mut kernel, &table(Direction::Egress, now.clone())) else {
                    return;
                };
                let Some(ingress) = load(&mut kernel, &table(Direction::Ingress, now.clone()))
                else {
                    return;
                };
                kernel
                    .insert_connection(&key, &ct_value(CT_OPENED_BY_EGRESS, CT_FLAG_PROXIED))
                    .unwrap();
                let out = kernel.run_keep(&egress, &packet).unwrap();
                assert_eq!(
                    code_mark(out),
                    (SHOT, MARK),
                    "{now:?}: a proxied connection goes to the proxy (none here: dropped)"
                );
                let reply = craft_ports(peer, me, Protocol::Tcp, 80, 40000);
                assert_eq!(
                    code_mark(kernel.run_keep(&ingress, &reply).unwrap()),
                    (OK, 0),
                    "{now:?}: its replies pass"
                );
                kernel
                    .insert_connection(&key, &ct_value(CT_OPENED_BY_EGRESS, 0))
                    .unwrap();
                let want = if now == TableVerdict::Allow { OK } else { SHOT };
                assert_eq!(
                    code_mark(kernel.run_keep(&egress, &packet).unwrap()),
                    (want, 0),
                    "{now:?}: a connection never proxied is decided by the table"
                );
                kernel.forget_connections().unwrap();
            }
            // An ingress connection handed to the proxy stays there too.
            let Some(ingress) = load(&mut kernel, &table(Direction::Ingress, TableVerdict::Allow))
            else {
                return;
            };
            kernel.set_proxy_device(7).unwrap();
            kernel
                .insert_connection(
                    &ct_key(me, peer, 80, 5555, 6),
                    &ct_value(CT_OPENED_BY_INGRESS, CT_FLAG_PROXIED),
                )
                .unwrap();
            let first = craft_ports(peer, me, Protocol::Tcp, 5555, 80);
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &first).unwrap()),
                (REDIRECT, MARK | PEER)
            );
            kernel.forget_connections().unwrap();
        });
    }

    #[test]
    fn ingress_proxy_redirects_to_the_proxy_device() {
        let Some(mut kernel) = kernel() else { return };
        let Some(ingress) = load(&mut kernel, &table(Direction::Ingress, proxy())) else {
            return;
        };
        let Some(egress) = load(&mut kernel, &table(Direction::Egress, TableVerdict::Deny)) else {
            return;
        };
        let mut ring = kernel.events().unwrap();
        for (me, peer) in [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")] {
            let (me, peer) = (ip(me), ip(peer));
            let first = craft_ports(peer, me, Protocol::Tcp, 5555, 80);
            kernel.set_proxy_device(0).unwrap();
            ring.drain();
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &first).unwrap()),
                (SHOT, MARK | PEER),
                "no proxy device: dropped"
            );
            assert!(kernel.connections().unwrap().is_empty());
            assert_eq!(events(&mut ring), [(PEER, 0, 1, 0)]);

            kernel.set_proxy_device(7).unwrap();
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &first).unwrap()),
                (REDIRECT, MARK | PEER),
                "redirected to the proxy device"
            );
            let ct = kernel.connections().unwrap();
            assert_eq!(ct.len(), 1);
            assert_eq!(ct[0].0, ct_key(me, peer, 80, 5555, 6));
            assert_eq!(ct[0].1, ct_value(CT_OPENED_BY_INGRESS, CT_FLAG_PROXIED));
            assert_eq!(events(&mut ring), [(PEER, 0, 2, 0)], "a proxied connection");
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &first).unwrap()),
                (REDIRECT, MARK | PEER),
                "the next packet too"
            );
            assert!(events(&mut ring).is_empty(), "and no event for it");
            let reply = craft_ports(me, peer, Protocol::Tcp, 80, 5555);
            assert_eq!(
                code_mark(kernel.run_keep(&egress, &reply).unwrap()),
                (OK, 0),
                "the proxy's replies (from the endpoint's address) pass"
            );
            let udp = craft_ports(peer, me, Protocol::Udp, 5555, 80);
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &udp).unwrap()),
                (SHOT, 0),
                "the table denies UDP 80"
            );
            kernel.forget_connections().unwrap();
            ring.drain();
            let dns = craft_ports(peer, me, Protocol::Udp, 5555, 53);
            assert_eq!(
                code_mark(kernel.run_keep(&ingress, &dns).unwrap()),
                (SHOT, MARK | PEER),
                "UDP is not proxied at ingress: dropped, not redirected"
            );
            assert!(kernel.connections().unwrap().is_empty());
            assert_eq!(events(&mut ring), [(PEER, 2, 1, 0)]);
        }
        // A peer whose identity does not fit the mark's 16 identity bits (a CIDR identity, say)
        // is marked with 0 there.
        let Some(wide) = load(
            &mut kernel,
            &DecisionTable {
                classes: vec![IdentityClass {
                    members: vec![NumericIdentity(WIDE)],
                }],
                ..table(Direction::Ingress, proxy())
            },
        ) else {
            return;
        };
        kernel
            .insert("10.0.0.7/32".parse().unwrap(), NumericIdentity(WIDE))
            .unwrap();
        let first = craft_ports(ip("10.0.0.7"), ip("10.0.0.2"), Protocol::Tcp, 5555, 80);
        assert_eq!(
            code_mark(kernel.run_keep(&wide, &first).unwrap()),
            (REDIRECT, MARK)
        );
        kernel.forget_connections().unwrap();
    }

    #[test]
    fn traffic_of_the_proxies_is_recognised_by_its_mark() {
        let Some(mut kernel) = kernel() else { return };
        let Some(ingress) = load(&mut kernel, &table(Direction::Ingress, proxy())) else {
            return;
        };
        let Some(egress) = load(&mut kernel, &table(Direction::Egress, TableVerdict::Deny)) else {
            return;
        };
        kernel.set_proxy_device(7).unwrap();
        let mut ring = kernel.events().unwrap();
        ring.drain();
        let (me, node) = (ip("10.0.0.2"), ip("10.0.0.9"));
        let to = |port| craft_ports(node, me, Protocol::Tcp, 45000, port);
        let run = |port, mark| code_mark(kernel.run_marked(&ingress, &to(port), mark).unwrap());

        // The endpoint's own ingress proxy: no table, and the connection is recorded.
        for port in [82, 80] {
            assert_eq!(
                run(port, contract::FROM_INGRESS_PROXY | PEER),
                (OK, contract::FROM_INGRESS_PROXY | PEER),
                "port {port}"
            );
        }
        let ct = kernel.connections().unwrap();
        assert_eq!(ct.len(), 2);
        assert!(ct
            .iter()
            .all(|(_, v)| *v == ct_value(CT_OPENED_BY_INGRESS, 0)));
        let reply = craft_ports(me, node, Protocol::Tcp, 82, 45000);
        assert_eq!(
            kernel.run_keep(&egress, &reply).unwrap().code,
            OK,
            "the endpoint's replies to the proxy pass"
        );
        assert!(events(&mut ring).is_empty(), "the proxy reports these");
        kernel.forget_connections().unwrap();

        // An egress proxy's upstream connection: decided by the mark's identity, not the
        // ipcache's (which says host, and the table denies the host).
        assert_eq!(run(81, 0), (SHOT, 0), "the node itself is denied");
        assert_eq!(run(81, contract::FROM_EGRESS_PROXY | PEER).0, OK);
        assert_eq!(run(81, contract::FROM_EGRESS_PROXY | (PEER + 1)).0, SHOT);
        assert_eq!(
            run(80, contract::FROM_EGRESS_PROXY | PEER),
            (REDIRECT, MARK | PEER),
            "and handed to the ingress proxy where the table says so"
        );
        let got = events(&mut ring);
        assert_eq!(
            got,
            [
                (HOST, u32::MAX, 1, 0),
                (PEER, 1, 0, 0),
                (PEER + 1, u32::MAX, 1, 0),
                (PEER, 0, 2, 0)
            ]
        );
        kernel.forget_connections().unwrap();

        // Marks mean nothing to egress programs: a pod cannot send them (module doc).
        let out = kernel
            .run_marked(
                &egress,
                &craft_ports(me, node, Protocol::Tcp, 45000, 81),
                contract::FROM_INGRESS_PROXY | PEER,
            )
            .unwrap();
        assert_eq!(out.code, SHOT);
        kernel.forget_connections().unwrap();
    }

    #[test]
    fn the_proxy_device_program_takes_only_marked_tcp() {
        in_fresh_netns(|| {
            let Some(mut kernel) = kernel() else { return };
            let prog = match kernel.load_program(&gen::proxy_device_program()) {
                Ok(fd) => fd,
                Err(e) if e.to_string().contains("Operation not permitted") => {
                    return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                }
                Err(e) => panic!(
                    "rejected: {e}\n{}",
                    cnpc_codegen_bpf::disasm::listing(&gen::proxy_device_program())
                ),
            };
            for (peer, me) in [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")] {
                let (peer, me) = (ip(peer), ip(me));
                let tcp = craft_ports(peer, me, Protocol::Tcp, 5555, 80);
                let run = |p: &[u8], mark| kernel.run_marked(&prog, p, mark).unwrap().code;
                assert_eq!(run(&tcp, 0), SHOT, "unmarked: dropped");
                assert_eq!(run(&tcp, contract::FROM_INGRESS_PROXY), SHOT);
                assert_eq!(run(&tcp, MARK), SHOT, "no proxy socket: dropped");
                let udp = craft_ports(peer, me, Protocol::Udp, 5555, 53);
                assert_eq!(run(&udp, MARK), SHOT, "not TCP");
                let mut short = tcp.clone();
                short.truncate(short.len() - 18);
                assert_eq!(run(&short, MARK), SHOT, "too short for the ports");
            }
            let mut arp = vec![0u8; 42];
            arp[12..14].copy_from_slice(&[0x08, 0x06]);
            assert_eq!(kernel.run_marked(&prog, &arp, MARK).unwrap().code, SHOT);
        });
    }

    /// Whether `bpf_sk_assign` can be exercised with BPF_PROG_TEST_RUN: a listener in this
    /// namespace is found, but the assignment is refused with EOPNOTSUPP, because a test run is
    /// not at tc ingress (net/core/filter.c `bpf_sk_assign` checks `skb_at_tc_ingress`, and
    /// net/bpf/test_run.c never sets `tc_at_ingress`). So the handoff's success path is tested
    /// end to end in network namespaces, not here.
    #[test]
    fn sk_assign_is_refused_in_a_test_run() {
        use cnpc_codegen_bpf::insn::*;
        use cnpc_codegen_bpf::Asm;
        const NOT_FOUND: i32 = 1000;
        in_fresh_netns(|| {
            let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("a listener");
            let port = listener.local_addr().unwrap().port();
            let mut a = Asm::new();
            let none = a.label();
            a.mov(R6, Src::Reg(R1));
            // struct bpf_sock_tuple (IPv4): 10.0.0.1:40000 -> 10.0.0.2:port.
            a.store(
                Size::W,
                R10,
                -16,
                Src::Imm(i32::from_le_bytes([10, 0, 0, 1])),
            )
            .store(
                Size::W,
                R10,
                -12,
                Src::Imm(i32::from_le_bytes([10, 0, 0, 2])),
            )
            .store(Size::H, R10, -8, Src::Imm(i32::from(40000u16.swap_bytes())))
            .store(Size::H, R10, -6, Src::Imm(i32::from(port.swap_bytes())));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R10))
                .alu(AluOp::Add, R2, Src::Imm(-16))
                .mov(R3, Src::Imm(12))
                .mov(R4, Src::Imm(-1))
                .mov(R5, Src::Imm(0))
                .call(84); // bpf_sk_lookup_tcp
            a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
            a.mov(R7, Src::Reg(R0));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R7))
                .mov(R3, Src::Imm(0))
                .call(124); // bpf_sk_assign
            a.mov(R8, Src::Reg(R0));
            a.mov(R1, Src::Reg(R7)).call(86); // bpf_sk_release
            a.mov(R0, Src::Reg(R8)).exit();
            a.bind(none);
            a.ret(NOT_FOUND);
            let prog = a.finish().unwrap();
            cnpc_codegen_bpf::check::check(&prog).expect("cnpc's checker");
            let fd = match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &prog.bytes()) {
                Ok(fd) => fd,
                Err(e) if e.contains("Operation not permitted") => {
                    return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                }
                Err(e) => panic!("the kernel verifier rejected the probe: {e}"),
            };
            let packet = craft_ports(ip("10.0.0.1"), ip("10.0.0.2"), Protocol::Tcp, 40000, port);
            let (ret, _) = sys::test_run(&fd, &packet).expect("BPF_PROG_TEST_RUN");
            assert_ne!(ret as i32, NOT_FOUND, "the wildcard listener is found");
            assert_eq!(
                ret as i32,
                -libc::EOPNOTSUPP,
                "sk_assign is refused outside tc ingress"
            );
            drop(listener);
        });
    }

    /// The UDP lookup of the egress handoff (`bpf_sk_lookup_udp`, the packet's addresses with
    /// the proxy's port) finds an unconnected socket bound to the wildcard address on that
    /// port, whatever the packet's addresses, in both families; with no such socket it finds
    /// nothing. As for TCP, the assignment itself is refused in a test run.
    #[test]
    fn the_udp_lookup_finds_the_dns_proxy_socket() {
        use cnpc_codegen_bpf::insn::*;
        use cnpc_codegen_bpf::Asm;
        const NOT_FOUND: i32 = 1000;
        let port = contract::EGRESS_PROXY_PORT;
        // The tuple of a pod's query from `src`:40000 to `dst`, with the proxy's port.
        let probe = |src: IpAddr, dst: IpAddr| {
            let mut tuple = Vec::new();
            for a in [src, dst] {
                match a {
                    IpAddr::V4(v) => tuple.extend(v.octets()),
                    IpAddr::V6(v) => tuple.extend(v.octets()),
                }
            }
            tuple.extend(40000u16.to_be_bytes());
            tuple.extend(port.to_be_bytes());
            let mut a = Asm::new();
            let none = a.label();
            a.mov(R6, Src::Reg(R1));
            for (i, w) in tuple.chunks(4).enumerate() {
                let w = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                a.store(Size::W, R10, -40 + 4 * i as i16, Src::Imm(w));
            }
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R10))
                .alu(AluOp::Add, R2, Src::Imm(-40))
                .mov(R3, Src::Imm(tuple.len() as i32))
                .mov(R4, Src::Imm(-1))
                .mov(R5, Src::Imm(0))
                .call(85); // bpf_sk_lookup_udp
            a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
            a.mov(R7, Src::Reg(R0));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R7))
                .mov(R3, Src::Imm(0))
                .call(124); // bpf_sk_assign
            a.mov(R8, Src::Reg(R0));
            a.mov(R1, Src::Reg(R7)).call(86); // bpf_sk_release
            a.mov(R0, Src::Reg(R8)).exit();
            a.bind(none);
            a.ret(NOT_FOUND);
            let prog = a.finish().unwrap();
            cnpc_codegen_bpf::check::check(&prog).expect("cnpc's checker");
            prog
        };
        in_fresh_netns(|| {
            let cases = [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")];
            for bound in [false, true] {
                let sockets = bound.then(|| {
                    (
                        super::udp_handoff::udp_socket("0.0.0.0:15001".parse().unwrap(), &[]),
                        super::udp_handoff::udp_socket("[::]:15001".parse().unwrap(), &[]),
                    )
                });
                for (src, dst) in cases {
                    let (src, dst) = (ip(src), ip(dst));
                    let prog = probe(src, dst);
                    let fd = match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &prog.bytes()) {
                        Ok(fd) => fd,
                        Err(e) if e.contains("Operation not permitted") => {
                            return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                        }
                        Err(e) => panic!("the kernel verifier rejected the probe: {e}"),
                    };
                    let packet = craft_ports(src, dst, Protocol::Udp, 40000, 53);
                    let (ret, _) = sys::test_run(&fd, &packet).expect("BPF_PROG_TEST_RUN");
                    let want = if bound { -libc::EOPNOTSUPP } else { NOT_FOUND };
                    assert_eq!(ret as i32, want, "{src} -> {dst}, socket bound: {bound}");
                }
                drop(sockets);
            }
        });
    }

    /// A socket reference leaked, or a socket used before its null check: cnpc's checker and the
    /// kernel verifier both refuse the program.
    #[test]
    fn the_kernel_rejects_what_the_checker_rejects_about_sockets() {
        use cnpc_codegen_bpf::insn::*;
        use cnpc_codegen_bpf::Asm;
        let program = |leak: bool| {
            let mut a = Asm::new();
            let none = a.label();
            a.mov(R6, Src::Reg(R1));
            a.store(Size::DW, R10, -16, Src::Imm(0))
                .store(Size::W, R10, -8, Src::Imm(0));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R10))
                .alu(AluOp::Add, R2, Src::Imm(-16))
                .mov(R3, Src::Imm(12))
                .mov(R4, Src::Imm(-1))
                .mov(R5, Src::Imm(0))
                .call(84); // bpf_sk_lookup_tcp
            if leak {
                a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
                a.ret(0); // holding the socket
            } else {
                a.load(Size::W, R1, R0, 72); // the state, before the null check
                a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
                a.mov(R1, Src::Reg(R0)).call(86);
            }
            a.bind(none);
            a.ret(0);
            a.finish().unwrap()
        };
        for (leak, ours, theirs) in [
            (true, "not released", "Unreleased reference"),
            (false, "before its null check", "invalid mem access"),
        ] {
            let prog = program(leak);
            let e = cnpc_codegen_bpf::check::check(&prog).unwrap_err();
            assert!(e.iter().any(|e| e.message.contains(ours)), "{e:?}");
            match sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &prog.bytes()) {
                Ok(_) => panic!("the kernel accepted it (leak: {leak})"),
                Err(e) if e.contains("Operation not permitted") => {
                    return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                }
                Err(e) => assert!(e.contains(theirs), "{e}"),
            }
        }
    }
}

mod fqdn {
    //! The peer identity lookup (cnpc_codegen_bpf::gen, first paragraph): the host entries,
    //! then the addresses learned from DNS (the shared `fqdn` map), then the prefixes; a miss
    //! is the world. Read from the peer identity of the drop events of a table that denies
    //! everything it sees here.
    use super::sys;
    use cnpc_codegen_bpf::gen::{self, event};
    use cnpc_ir::*;
    use cnpc_runtime_loader::testrun::{craft_ports, Kernel};
    use std::net::IpAddr;

    const SUBJECT: u32 = 400;
    const POD: u32 = 300;
    /// A CIDR identity (local scope) of the prefixes 10.0.0.0/24 and fd00::/64.
    const CIDR: u32 = 16_777_217;
    const FQDN: u32 = FIRST_FQDN_IDENTITY;
    const OTHER_FQDN: u32 = FIRST_FQDN_IDENTITY + 1;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hosts_then_learned_addresses_then_prefixes_then_the_world() {
        let entries = [
            ("10.0.0.1/32", POD),
            ("fd00::1/128", POD),
            ("10.0.0.2/32", SUBJECT),
            ("fd00::2/128", SUBJECT),
            ("10.0.0.0/24", CIDR),
            ("fd00::/64", CIDR),
        ]
        .map(|(net, id)| (net.parse().unwrap(), NumericIdentity(id)));
        let mut kernel = match Kernel::new(&entries) {
            Ok(k) => k,
            Err(e) => return sys::skip_or_fail(&format!("cannot create the maps: {e}")),
        };
        // A name resolved to the pod: the pod keeps its identity. Other learned addresses get
        // their FQDN identity over the prefix holding them.
        for (addr, id) in [
            ("10.0.0.1", OTHER_FQDN),
            ("fd00::1", OTHER_FQDN),
            ("10.0.0.5", FQDN),
            ("fd00::5", FQDN),
            ("192.0.2.5", FQDN),
            ("2001:db8::5", FQDN),
        ] {
            kernel.insert_fqdn(ip(addr), NumericIdentity(id)).unwrap();
        }
        // Denies everything but TCP 80 from an identity no one has.
        let table = DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(7)],
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
                verdict: TableVerdict::Allow,
            }],
        };
        let mut ring = kernel.events().unwrap();
        for strategy in [gen::Strategy::Branches, gen::Strategy::Maps] {
            let prog = match kernel.load_generated(&gen::build(&table, true, strategy)) {
                Ok(fd) => fd,
                Err(e) if e.to_string().contains("Operation not permitted") => {
                    return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                }
                Err(e) => panic!("rejected: {e}"),
            };
            for (peer, me, want) in [
                ("10.0.0.1", "10.0.0.2", POD),
                ("fd00::1", "fd00::2", POD),
                ("10.0.0.5", "10.0.0.2", FQDN),
                ("fd00::5", "fd00::2", FQDN),
                ("10.0.0.6", "10.0.0.2", CIDR),
                ("fd00::6", "fd00::2", CIDR),
                ("192.0.2.5", "10.0.0.2", FQDN),
                ("2001:db8::5", "fd00::2", FQDN),
                ("192.0.2.6", "10.0.0.2", gen::WORLD as u32),
                ("2001:db8::6", "fd00::2", gen::WORLD as u32),
            ] {
                ring.drain();
                let packet = craft_ports(ip(peer), ip(me), Protocol::Tcp, 40000, 81);
                let out = kernel.run(&prog, &packet).unwrap();
                assert_eq!(out.code, gen::TC_ACT_SHOT as u32);
                let got: Vec<(u32, u32)> = ring
                    .drain()
                    .iter()
                    .map(|e| {
                        let at =
                            |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
                        (at(event::SUBJECT), at(event::PEER))
                    })
                    .collect();
                assert_eq!(got, [(SUBJECT, want)], "{peer} ({strategy:?})");
            }
        }
    }
    /// Zombies (gen::FQDN_ZOMBIE): an address whose names expired while a connection to it
    /// remains keeps its FQDN identity for that connection's packets; any other packet is
    /// decided as if the address had never been learned (its CIDR prefix here), so the
    /// toFQDNs row opens nothing new while a CIDR row still does. Cilium keeps such addresses
    /// while conntrack uses them (pkg/fqdn/namemanager, zombies).
    #[test]
    fn a_zombie_address_keeps_its_connections_and_falls_back_for_new_ones() {
        let me = ip("10.0.0.2");
        let entries = [("10.0.0.2/32", SUBJECT), ("192.0.2.0/24", CIDR)]
            .map(|(n, id)| (n.parse().unwrap(), NumericIdentity(id)));
        let mut kernel = match Kernel::new(&entries) {
            Ok(k) => k,
            Err(e) => return sys::skip_or_fail(&format!("cannot create the maps: {e}")),
        };
        // toFQDNs allows 443, the CIDR prefix 80.
        let row = |class: u32, port: u16| TableRow {
            class,
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            verdict: TableVerdict::Allow,
        };
        let table = DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction: Direction::Egress,
            default: TableVerdict::Deny,
            classes: vec![
                IdentityClass {
                    members: vec![NumericIdentity(FQDN)],
                },
                IdentityClass {
                    members: vec![NumericIdentity(CIDR)],
                },
            ],
            rows: vec![row(0, 443), row(1, 80)],
        };
        for strategy in [gen::Strategy::Branches, gen::Strategy::Maps] {
            let prog = match kernel.load_generated(&gen::build(&table, true, strategy)) {
                Ok(fd) => fd,
                Err(e) if e.to_string().contains("Operation not permitted") => {
                    return sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"))
                }
                Err(e) => panic!("rejected: {e}"),
            };
            let (live, dead) = (ip("192.0.2.5"), ip("192.0.2.6"));
            kernel.insert_fqdn(live, NumericIdentity(FQDN)).unwrap();
            kernel
                .insert_fqdn(dead, NumericIdentity(FQDN | gen::FQDN_ZOMBIE))
                .unwrap();
            let syn =
                |to: IpAddr, sport: u16, port: u16| craft_ports(me, to, Protocol::Tcp, sport, port);
            let code = |packet: Vec<u8>| kernel.run_keep(&prog, &packet).unwrap().code;
            let (ok, shot) = (gen::TC_ACT_OK as u32, gen::TC_ACT_SHOT as u32);
            assert_eq!(code(syn(live, 40001, 443)), ok, "learned ({strategy:?})");
            assert_eq!(
                code(syn(dead, 40002, 443)),
                shot,
                "zombie, new ({strategy:?})"
            );
            assert_eq!(
                code(syn(dead, 40003, 80)),
                ok,
                "its prefix still ({strategy:?})"
            );
            // The live one's names expire: its open connection goes on, a new one falls back.
            kernel
                .insert_fqdn(live, NumericIdentity(FQDN | gen::FQDN_ZOMBIE))
                .unwrap();
            assert_eq!(
                code(syn(live, 40001, 443)),
                ok,
                "established ({strategy:?})"
            );
            assert_eq!(
                code(syn(live, 40004, 443)),
                shot,
                "new after expiry ({strategy:?})"
            );
            kernel.forget_connections().unwrap();
        }
    }

    /// The loader creates the `fqdn` map at `pin_dir/fqdn` and, like `ct`, reuses the pinned
    /// map when it opens again (a restart keeps the learned addresses); the map helpers write,
    /// list and delete its entries.
    #[test]
    fn the_loader_pins_the_fqdn_map_and_reuses_it() {
        use cnpc_runtime_loader::loader::{Config, Loader};
        if let Err(e) = sys::bpffs_for_tests(std::path::Path::new("/sys/fs/bpf")) {
            return sys::skip_or_fail(&e);
        }
        let id = std::process::id();
        let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/cnpc-fqdn-test-{id}"));
        let tmp = std::env::temp_dir().join(format!("cnpc-fqdn-test-{id}"));
        let cfg = Config {
            pin_dir: pin_dir.clone(),
            state_file: tmp.join("state.json"),
            ..Config::default()
        };
        let result = std::panic::catch_unwind(|| {
            let loader = match Loader::open(cfg.clone()) {
                Ok(l) => l,
                Err(e) => return sys::skip_or_fail(&format!("cannot open the loader: {e}")),
            };
            let (a, b) = (ip("192.0.2.5"), ip("2001:db8::5"));
            for (addr, n) in [(a, FQDN), (b, OTHER_FQDN)] {
                sys::map_update(loader.fqdn_map(), &sys::fqdn_key(addr), &n.to_le_bytes()).unwrap();
            }
            drop(loader);
            assert!(pin_dir.join(gen::FQDN_MAP).exists());
            let loader = Loader::open(cfg.clone()).expect("opened again");
            let map = loader.fqdn_map();
            let mut got = sys::map_entries(map, gen::HOSTS_KEY_SIZE as usize, 4).unwrap();
            got.sort();
            let mut want = vec![
                (sys::fqdn_key(a), FQDN.to_le_bytes().to_vec()),
                (sys::fqdn_key(b), OTHER_FQDN.to_le_bytes().to_vec()),
            ];
            want.sort();
            assert_eq!(got, want, "the learned addresses survive the restart");
            assert_eq!(
                sys::fqdn_key(a),
                cnpc_codegen_bpf::artifacts::ipcache_key("192.0.2.5/32".parse().unwrap())[4..],
                "the host map's key"
            );
            assert!(sys::map_delete(map, &sys::fqdn_key(a)).unwrap());
            assert!(!sys::map_delete(map, &sys::fqdn_key(a)).unwrap());
            assert_eq!(sys::map_entries(map, 20, 4).unwrap().len(), 1);
        });
        let _ = std::fs::remove_dir_all(&pin_dir);
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}

pub mod udp_handoff {
    //! The egress handoff of UDP (DNS) to the DNS proxy's socket, for real: a pod namespace
    //! joined to a node namespace by a veth pair, the pod's egress program at tc ingress of the
    //! host side and its ingress program at tc egress (TCX links), the proxy route of the
    //! contract (`fwmark TO_PROXY_MARK lookup PROXY_ROUTE_TABLE`, `local default dev lo`) in the
    //! node, and a UDP socket on the egress proxy port there, as the DNS proxy has. A query
    //! the table proxies reaches that socket with its original destination
    //! (IP_RECVORIGDSTADDR), the flow is recorded as proxied, and the answer the "proxy" sends
    //! from the original destination (a transparent socket) passes the pod's ingress program
    //! as a reply, although its table denies it. Without the socket, the query is dropped and
    //! reported. IPv4 and IPv6.
    use super::sys;
    use cnpc_codegen_bpf::gen::{event, CT_FLAG_PROXIED, CT_OPENED_BY_EGRESS};
    use cnpc_ir::proxy::contract;
    use cnpc_ir::*;
    use cnpc_runtime_loader::testrun::Kernel;
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::Command;
    use std::time::Duration;

    const SUBJECT: u32 = 400;
    const PEER: u32 = 300;
    /// The host side of the pod's veth pair, in the node namespace.
    const HOST_IF: &str = "hv0";
    const HOST_MAC: &str = "02:00:00:00:00:01";
    const POD_MAC: &str = "02:00:00:00:00:02";

    /// `sockaddr_in` or `sockaddr_in6` for `a`.
    fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
                unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: as above, for sockaddr_in6.
                unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (st, len as libc::socklen_t)
    }

    /// The address at `p`, a `sockaddr_in` or `sockaddr_in6` (possibly unaligned).
    ///
    /// # Safety
    /// `p` points at a socket address of the family it names.
    unsafe fn socket_addr(p: *const u8) -> Option<SocketAddr> {
        let family = std::ptr::read_unaligned(p as *const libc::sa_family_t);
        match i32::from(family) {
            libc::AF_INET => {
                let sin = std::ptr::read_unaligned(p as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
            }
            libc::AF_INET6 => {
                let sin6 = std::ptr::read_unaligned(p as *const libc::sockaddr_in6);
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
            }
            _ => None,
        }
    }

    /// A UDP socket bound to `bind` in the calling thread's network namespace, IPv6 ones
    /// v6-only, with the (level, option) flags `opts` set to 1 before the bind.
    pub fn udp_socket(bind: SocketAddr, opts: &[(i32, i32)]) -> UdpSocket {
        let family = if bind.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut all = opts.to_vec();
        if bind.is_ipv6() {
            all.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
        }
        for (level, opt) in all {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads an int that lives for the call.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    opt,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(
                r,
                0,
                "setsockopt({level}, {opt}): {}",
                std::io::Error::last_os_error()
            );
        }
        let (st, len) = sockaddr(bind);
        // SAFETY: `st` holds a socket address of `len` bytes.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &st as *const _ as *const libc::sockaddr,
                len,
            )
        };
        assert_eq!(r, 0, "bind {bind}: {}", std::io::Error::last_os_error());
        UdpSocket::from(fd)
    }

    /// One datagram, its source and its original destination (IP_ORIGDSTADDR or
    /// IPV6_ORIGDSTADDR), or `None` when nothing comes within the socket's read timeout.
    fn recv_with_original_destination(
        s: &UdpSocket,
    ) -> Option<(Vec<u8>, SocketAddr, Option<SocketAddr>)> {
        let mut buf = [0u8; 512];
        // SAFETY: plain data, zero is valid.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: plain data, zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every buffer `msg` names lives for the call, with its length.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return None;
        }
        let mut original = None;
        // SAFETY: walking the control messages the kernel wrote, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
                if (level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR)
                    || (level == libc::SOL_IPV6 && kind == libc::IPV6_ORIGDSTADDR)
                {
                    original = socket_addr(libc::CMSG_DATA(c));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        // SAFETY: the kernel wrote the source address there.
        let source = unsafe { socket_addr(&from as *const _ as *const u8) }?;
        Some((buf[..n as usize].to_vec(), source, original))
    }

    /// Runs `f` on a thread that entered the network namespace `ns` (`ip netns` name).
    fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("the namespace");
                // SAFETY: setns(CLONE_NEWNET) changes only this thread's network namespace.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the namespace's thread")
        })
    }

    /// The two namespaces, removed on drop.
    struct Net {
        node: String,
        pod: String,
    }

    impl Drop for Net {
        fn drop(&mut self) {
            for ns in [&self.node, &self.pod] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    fn ip_cmd(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The pod (10.0.1.20, fd00:1::20) behind the host-side veth [`HOST_IF`] in the node, with static
    /// neighbours (no ARP or neighbour discovery through the programs), the node's routes to
    /// the pod, and the proxy route of the contract.
    fn network() -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let net = Net {
            node: format!("cnpcu{id}-node"),
            pod: format!("cnpcu{id}-pod"),
        };
        let (node, pod) = (net.node.as_str(), net.pod.as_str());
        ip_cmd(&["netns", "add", node])?;
        ip_cmd(&["netns", "add", pod])?;
        let mark = format!(
            "{:#x}/{:#x}",
            contract::TO_PROXY_MARK,
            contract::MARK_MAGIC_MASK
        );
        let table = contract::PROXY_ROUTE_TABLE.to_string();
        let steps: Vec<Vec<&str>> = vec![
            vec!["-n", node, "link", "set", "lo", "up"],
            vec!["-n", pod, "link", "set", "lo", "up"],
            vec![
                "-n", node, "link", "add", "name", HOST_IF, "address", HOST_MAC, "type", "veth",
                "peer", "name", "eth0", "address", POD_MAC, "netns", pod,
            ],
            vec!["-n", node, "addr", "add", "169.254.1.1/32", "dev", HOST_IF],
            vec![
                "-n",
                node,
                "addr",
                "add",
                "fd00:1::1/128",
                "dev",
                HOST_IF,
                "nodad",
            ],
            vec!["-n", node, "link", "set", HOST_IF, "up"],
            vec!["-n", node, "route", "add", "10.0.1.20/32", "dev", HOST_IF],
            vec![
                "-n",
                node,
                "-6",
                "route",
                "add",
                "fd00:1::20/128",
                "dev",
                HOST_IF,
            ],
            vec![
                "-n",
                node,
                "neigh",
                "replace",
                "10.0.1.20",
                "lladdr",
                POD_MAC,
                "dev",
                HOST_IF,
                "nud",
                "permanent",
            ],
            vec![
                "-n",
                node,
                "neigh",
                "replace",
                "fd00:1::20",
                "lladdr",
                POD_MAC,
                "dev",
                HOST_IF,
                "nud",
                "permanent",
            ],
            vec!["-n", pod, "addr", "add", "10.0.1.20/32", "dev", "eth0"],
            vec![
                "-n",
                pod,
                "addr",
                "add",
                "fd00:1::20/128",
                "dev",
                "eth0",
                "nodad",
            ],
            vec!["-n", pod, "link", "set", "eth0", "up"],
            vec![
                "-n",
                pod,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
            vec![
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
            vec!["-n", pod, "-6", "route", "add", "fd00:1::1", "dev", "eth0"],
            vec![
                "-n",
                pod,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:1::1",
                "dev",
                "eth0",
            ],
            vec![
                "-n",
                pod,
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                HOST_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
            vec![
                "-n",
                pod,
                "neigh",
                "replace",
                "fd00:1::1",
                "lladdr",
                HOST_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
            vec![
                "-n", node, "-4", "rule", "add", "fwmark", &mark, "lookup", &table,
            ],
            vec![
                "-n", node, "-6", "rule", "add", "fwmark", &mark, "lookup", &table,
            ],
            vec![
                "-n", node, "-4", "route", "add", "local", "default", "dev", "lo", "table", &table,
            ],
            vec![
                "-n", node, "-6", "route", "add", "local", "default", "dev", "lo", "table", &table,
            ],
        ];
        for step in steps {
            ip_cmd(&step)?;
        }
        Ok(net)
    }

    fn table(direction: Direction) -> DecisionTable {
        DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(PEER)],
            }],
            rows: match direction {
                Direction::Egress => vec![TableRow {
                    class: 0,
                    protocol: Protocol::Udp,
                    ports: PortRange::single(53),
                    verdict: TableVerdict::Proxy(Vec::new()),
                }],
                // Nothing: the answer passes only as the reply of the proxied flow.
                Direction::Ingress => Vec::new(),
            },
        }
    }

    #[test]
    fn udp_to_the_dns_proxy_socket_and_its_answer_back() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return sys::skip_or_fail("network namespaces need root");
        }
        let net = match network() {
            Ok(n) => n,
            Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
        };
        let entries = [
            ("10.0.1.20/32", SUBJECT),
            ("fd00:1::20/128", SUBJECT),
            ("10.0.0.1/32", PEER),
            ("fd00::1/128", PEER),
        ]
        .map(|(n, id)| (n.parse().unwrap(), NumericIdentity(id)));
        let mut kernel = Kernel::new(&entries).expect("the maps");
        let egress = kernel
            .load(&table(Direction::Egress), true)
            .expect("egress");
        let ingress = kernel
            .load(&table(Direction::Ingress), true)
            .expect("ingress");
        let links = in_ns(&net.node, || {
            let h = sys::ifindex(HOST_IF).expect("the host-side veth");
            (
                sys::tcx_attach(&egress, h, sys::BPF_TCX_INGRESS),
                sys::tcx_attach(&ingress, h, sys::BPF_TCX_EGRESS),
            )
        });
        let _links = match links {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                return sys::skip_or_fail(&format!(
                    "cannot attach with TCX: {:?} {:?}",
                    a.err(),
                    b.err()
                ))
            }
        };
        let mut ring = kernel.events().unwrap();
        let timeout = Some(Duration::from_secs(2));
        for (pod, server, any) in [
            ("10.0.1.20", "10.0.0.1", "0.0.0.0"),
            ("fd00:1::20", "fd00::1", "::"),
        ] {
            let (pod, server): (IpAddr, IpAddr) = (pod.parse().unwrap(), server.parse().unwrap());
            let v4 = pod.is_ipv4();
            let recv_orig = if v4 {
                (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
            } else {
                (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
            };
            let transparent = if v4 {
                (libc::SOL_IP, libc::IP_TRANSPARENT)
            } else {
                (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
            };
            let proxy_addr = SocketAddr::new(any.parse().unwrap(), contract::EGRESS_PROXY_PORT);
            let proxy = in_ns(&net.node, || udp_socket(proxy_addr, &[recv_orig]));
            proxy.set_read_timeout(timeout).unwrap();
            let client = in_ns(&net.pod, || udp_socket(SocketAddr::new(pod, 40053), &[]));
            client.set_read_timeout(timeout).unwrap();
            ring.drain();

            let dns = SocketAddr::new(server, 53);
            client.send_to(b"query", dns).unwrap();
            let (data, from, original) =
                recv_with_original_destination(&proxy).expect("the query reaches the proxy");
            assert_eq!(data, b"query");
            assert_eq!(from, SocketAddr::new(pod, 40053));
            assert_eq!(
                original,
                Some(dns),
                "IP_RECVORIGDSTADDR: the original destination"
            );
            let flows = kernel.connections().unwrap();
            assert_eq!(flows.len(), 1, "{flows:?}");
            let mut value = CT_OPENED_BY_EGRESS.to_le_bytes().to_vec();
            value.extend(CT_FLAG_PROXIED.to_le_bytes());
            assert_eq!(flows[0].1, value, "recorded as proxied, opened by the pod");
            // (The pod's own ICMPv6, neighbour and listener reports, are denied and reported
            // too: only UDP counts here.)
            let udp = |ring: &mut sys::RingBuf| -> Vec<(u32, u32, u8, u8)> {
                ring.drain()
                    .iter()
                    .filter(|e| e[event::PROTOCOL] == 17)
                    .map(|e| {
                        let at =
                            |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
                        (
                            at(event::PEER),
                            at(event::ROW),
                            e[event::VERDICT],
                            e[event::DIRECTION],
                        )
                    })
                    .collect()
            };
            assert_eq!(
                udp(&mut ring),
                [(PEER, 0, 2, 1)],
                "one event: a proxied flow"
            );

            // The proxy answers from the original destination.
            let answer = in_ns(&net.node, || udp_socket(dns, &[transparent]));
            answer.send_to(b"answer", from).unwrap();
            let mut buf = [0u8; 64];
            let (n, src) = client
                .recv_from(&mut buf)
                .expect("the answer passes the pod's ingress program as a reply");
            assert_eq!((&buf[..n], src), (&b"answer"[..], dns));

            // The next query of the flow goes to the proxy too.
            client.send_to(b"again", dns).unwrap();
            let (data, _, _) = recv_with_original_destination(&proxy).expect("the second query");
            assert_eq!(data, b"again");

            // Without the proxy's socket: dropped, and reported.
            drop(proxy);
            ring.drain();
            let other = in_ns(&net.pod, || udp_socket(SocketAddr::new(pod, 40054), &[]));
            other.send_to(b"query", dns).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                udp(&mut ring),
                [(PEER, 0, 1, 1)],
                "a drop event naming the Proxy row"
            );
            assert_eq!(kernel.connections().unwrap().len(), 1, "no new flow");
            kernel.forget_connections().unwrap();
        }
    }
}

mod by_address {
    //! Peers decided by address (cnpc_codegen_bpf::gen, "Peers by address"): every form (looked
    //! up, compared in code, the address map) gives the same verdicts, events and conntrack
    //! entries, including for the peers it must leave to the lookup (an identity no row names,
    //! the world, an address added after generation, a port range, a default), for replies,
    //! for proxied connections, and a program generated with addresses decides by them until
    //! it is generated again (the loader's contract).
    use super::{ct_key, ct_value, field, sys};
    use cnpc_codegen_bpf::gen::{
        self, event, CT_FLAG_PROXIED, CT_OPENED_BY_EGRESS, CT_OPENED_BY_INGRESS, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT, TO_PROXY_MARK,
    };
    use cnpc_ir::*;
    use cnpc_runtime_loader::testrun::{craft_ports, Kernel};
    use std::net::IpAddr;
    use std::os::fd::OwnedFd;

    const SUBJECT: u32 = 400;
    const PEER: u32 = 300;
    const OTHER: u32 = 301;
    /// In the ipcache, in no class of the table.
    const STRANGER: u32 = 302;
    const OK: u32 = TC_ACT_OK as u32;
    const SHOT: u32 = TC_ACT_SHOT as u32;
    const REDIRECT: u32 = TC_ACT_REDIRECT as u32;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Form {
        LookedUp,
        InCode,
        /// The address map (windows refused).
        InMap,
        /// Address windows.
        InWindow,
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entries() -> Vec<(IpNet, NumericIdentity)> {
        [
            ("10.0.0.1/32", PEER),
            ("fd00::1/128", PEER),
            ("10.0.0.3/32", OTHER),
            ("10.0.0.7/32", STRANGER),
            ("10.0.0.2/32", SUBJECT),
            ("fd00::2/128", SUBJECT),
        ]
        .map(|(net, id)| (net.parse().unwrap(), NumericIdentity(id)))
        .to_vec()
    }

    /// Ingress: PEER on TCP 80, 1000-2000 (a range) and 8080 (proxied); OTHER denied on 80
    /// and allowed on 81; the rest denied.
    fn ingress() -> DecisionTable {
        let row = |class, lo, hi, verdict| TableRow {
            class,
            protocol: Protocol::Tcp,
            ports: PortRange { lo, hi },
            verdict,
        };
        DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![
                IdentityClass {
                    members: vec![NumericIdentity(PEER)],
                },
                IdentityClass {
                    members: vec![NumericIdentity(OTHER)],
                },
            ],
            rows: vec![
                row(0, 80, 80, TableVerdict::Allow),
                row(0, 1000, 2000, TableVerdict::Allow),
                row(0, 8080, 8080, TableVerdict::Proxy(Vec::new())),
                row(1, 80, 80, TableVerdict::Deny),
                row(1, 81, 81, TableVerdict::Allow),
            ],
        }
    }

    /// Egress denies everything: replies pass only through conntrack.
    fn egress() -> DecisionTable {
        DecisionTable {
            direction: Direction::Egress,
            classes: Vec::new(),
            rows: Vec::new(),
            ..ingress()
        }
    }

    fn generate(form: Form, t: &DecisionTable, hosts: &gen::HostAddresses) -> gen::Generated {
        let inline = gen::Inline::new(hosts);
        match form {
            Form::LookedUp => gen::generate(t, true),
            Form::InCode => gen::generate_inlined(t, true, &inline),
            Form::InMap => gen::generate_inlined(
                t,
                true,
                &gen::Inline {
                    max_code_addresses: 0,
                    max_window_slots: 0,
                    ..inline
                },
            ),
            Form::InWindow => gen::generate_inlined(
                t,
                true,
                &gen::Inline {
                    max_code_addresses: 0,
                    ..inline
                },
            ),
        }
    }

    fn has_map(g: &gen::Generated, prefix: &str) -> bool {
        g.maps.iter().any(|m| m.def.name.starts_with(prefix))
    }

    fn load(kernel: &mut Kernel, g: &gen::Generated) -> Option<OwnedFd> {
        match kernel.load_generated(g) {
            Ok(fd) => Some(fd),
            Err(e) if e.to_string().contains("Operation not permitted") => {
                sys::skip_or_fail(&format!("BPF_PROG_LOAD not permitted: {e}"));
                None
            }
            Err(e) => panic!(
                "rejected: {e}\n{}",
                cnpc_codegen_bpf::disasm::listing(&g.program)
            ),
        }
    }

    /// (peer address, port, code, mark, opens a connection, its event: (peer, row, verdict)).
    type Case = (&'static str, u16, u32, u32, bool, Option<(u32, u32, u8)>);

    #[test]
    fn every_form_decides_alike() {
        for form in [Form::LookedUp, Form::InCode, Form::InMap, Form::InWindow] {
            let mut entries = entries();
            let Ok(mut kernel) = Kernel::new(&entries) else {
                return sys::skip_or_fail("cannot create the maps");
            };
            kernel.set_proxy_device(7).unwrap();
            let hosts = gen::HostAddresses::new(&entries);
            let g = generate(form, &ingress(), &hosts);
            let mut held: Vec<(IpAddr, u32)> = g.inlined.iter().map(|(a, i)| (*a, i.0)).collect();
            held.sort();
            let want: Vec<(IpAddr, u32)> = match form {
                Form::LookedUp => Vec::new(),
                _ => vec![
                    (ip("10.0.0.1"), PEER),
                    (ip("10.0.0.3"), OTHER),
                    (ip("fd00::1"), PEER),
                ],
            };
            assert_eq!(held, want, "{form:?}: the peers the table tells apart");
            assert_eq!(has_map(&g, gen::ADDRESS_MAP_PREFIX), form == Form::InMap);
            assert_eq!(
                has_map(&g, gen::ADDRESS_WINDOW_MAP_PREFIX),
                form == Form::InWindow
            );
            let Some(ing) = load(&mut kernel, &g) else {
                return;
            };
            let Some(eg) = load(&mut kernel, &generate(form, &egress(), &hosts)) else {
                return;
            };
            let mut ring = kernel.events().unwrap();
            ring.drain();
            let me4 = ip("10.0.0.2");
            let cases: Vec<Case> = vec![
                ("10.0.0.1", 80, OK, 0, true, Some((PEER, 0, 0))),
                ("fd00::1", 80, OK, 0, true, Some((PEER, 0, 0))),
                ("10.0.0.1", 81, SHOT, 0, false, Some((PEER, u32::MAX, 1))),
                ("10.0.0.1", 1500, OK, 0, true, Some((PEER, 1, 0))),
                ("10.0.0.1", 2001, SHOT, 0, false, Some((PEER, u32::MAX, 1))),
                (
                    "10.0.0.1",
                    8080,
                    REDIRECT,
                    TO_PROXY_MARK as u32 | PEER,
                    true,
                    Some((PEER, 2, 2)),
                ),
                ("10.0.0.3", 80, SHOT, 0, false, Some((OTHER, 3, 1))),
                ("10.0.0.3", 81, OK, 0, true, Some((OTHER, 4, 0))),
                (
                    "10.0.0.7",
                    80,
                    SHOT,
                    0,
                    false,
                    Some((STRANGER, u32::MAX, 1)),
                ),
                (
                    "10.9.9.9",
                    80,
                    SHOT,
                    0,
                    false,
                    Some((gen::WORLD as u32, u32::MAX, 1)),
                ),
            ];
            for (peer, port, code, mark, opens, event) in cases {
                let peer = ip(peer);
                let me = if peer.is_ipv4() { me4 } else { ip("fd00::2") };
                let what = format!("{form:?}: {peer} -> {port}");
                let packet = craft_ports(peer, me, Protocol::Tcp, 5555, port);
                let out = kernel.run_keep(&ing, &packet).unwrap();
                assert_eq!((out.code, out.mark), (code, mark), "{what}");
                let conns = kernel.connections().unwrap();
                assert_eq!(conns.len(), usize::from(opens), "{what}: conntrack");
                if let Some((k, v)) = conns.first() {
                    assert_eq!(k, &ct_key(me, peer, port, 5555, 6), "{what}");
                    assert_eq!(field(v, 0), CT_OPENED_BY_INGRESS, "{what}");
                }
                let got: Vec<(u32, u32, u8)> = ring
                    .drain()
                    .iter()
                    .map(|e| {
                        assert_eq!(field(e, event::SUBJECT), SUBJECT, "{what}");
                        (
                            field(e, event::PEER),
                            field(e, event::ROW),
                            e[event::VERDICT],
                        )
                    })
                    .collect();
                assert_eq!(got, Vec::from_iter(event), "{what}: events");
                if opens && code == OK {
                    // The reply passes through the egress program, which denies everything.
                    let reply = craft_ports(me, peer, Protocol::Tcp, port, 5555);
                    assert_eq!(kernel.run_keep(&eg, &reply).unwrap().code, OK, "{what}");
                    // The connection's next packet: established, no event, no new entry.
                    assert_eq!(kernel.run_keep(&ing, &packet).unwrap().code, code);
                    assert!(ring.drain().is_empty(), "{what}: established");
                    assert_eq!(kernel.connections().unwrap().len(), 1, "{what}");
                }
                kernel.forget_connections().unwrap();
            }

            let peer = ip("10.0.0.1");
            let packet = |port| craft_ports(peer, me4, Protocol::Tcp, 5555, port);
            // A connection handed to the proxy stays there though the table allows its port
            // now; without the flag the table decides.
            let key = ct_key(me4, peer, 80, 5555, 6);
            kernel
                .insert_connection(&key, &ct_value(CT_OPENED_BY_INGRESS, CT_FLAG_PROXIED))
                .unwrap();
            let out = kernel.run_keep(&ing, &packet(80)).unwrap();
            assert_eq!(
                (out.code, out.mark),
                (REDIRECT, TO_PROXY_MARK as u32 | PEER),
                "{form:?}: proxied"
            );
            // A reply (the endpoint opened the connection) passes where the table denies.
            let key81 = ct_key(me4, peer, 81, 5555, 6);
            assert_eq!(kernel.run_keep(&ing, &packet(81)).unwrap().code, SHOT);
            kernel
                .insert_connection(&key81, &ct_value(CT_OPENED_BY_EGRESS, 0))
                .unwrap();
            assert_eq!(
                kernel.run_keep(&ing, &packet(81)).unwrap().code,
                OK,
                "{form:?}: a reply"
            );
            kernel.forget_connections().unwrap();
            ring.drain();

            // An address of PEER the ipcache learns after generation: looked up, allowed.
            let late = ip("10.0.0.5");
            kernel
                .insert(IpNet::from(late), NumericIdentity(PEER))
                .unwrap();
            let out = kernel
                .run(&ing, &craft_ports(late, me4, Protocol::Tcp, 5555, 80))
                .unwrap();
            assert_eq!(out.code, OK, "{form:?}: a late address");

            // 10.0.0.1 becomes STRANGER's. A program holding its address decides it as PEER
            // until it is generated again (the loader regenerates the programs whose
            // `inlined` holds a changed address); the looked-up one follows the map at once.
            kernel
                .insert(IpNet::from(peer), NumericIdentity(STRANGER))
                .unwrap();
            let stale = kernel.run(&ing, &packet(80)).unwrap().code;
            assert_eq!(stale, if form == Form::LookedUp { SHOT } else { OK });
            entries.retain(|(n, _)| n.addr() != peer);
            entries.push((IpNet::from(peer), NumericIdentity(STRANGER)));
            let hosts = gen::HostAddresses::new(&entries);
            let again = generate(form, &ingress(), &hosts);
            assert!(again.inlined.iter().all(|(a, _)| *a != peer));
            let Some(fresh) = load(&mut kernel, &again) else {
                return;
            };
            assert_eq!(
                kernel.run(&fresh, &packet(80)).unwrap().code,
                SHOT,
                "{form:?}: regenerated"
            );
        }
    }

    /// Identities of the windows test: WIN + j is the j-th peer, each its own class.
    const WIN: u32 = 500;
    /// In the ipcache at the addresses just outside the windows, in no class of the table.
    const OUTSIDE: u32 = 599;

    /// The held peers of [`windows_index_exactly`]: (address, port its row allows). Two IPv4
    /// windows 2,284 addresses apart (more than the windows' slot budget spans, so they are
    /// cut apart) and two IPv6 windows whose last 32 bits are the same, under different upper
    /// words.
    fn window_peers() -> Vec<(IpAddr, u16)> {
        let mut out = Vec::new();
        // 10.1.0.10-20 without 15: an empty slot inside the window.
        for j in 0..10u16 {
            out.push((
                ip(&format!("10.1.0.{}", 10 + j + u16::from(j >= 5))),
                1000 + j,
            ));
        }
        for j in 0..5u16 {
            out.push((ip(&format!("10.1.9.{j}")), 2000 + j));
        }
        for j in 0..5u16 {
            out.push((ip(&format!("fd00::a:{j}")), 4000 + j));
            out.push((ip(&format!("fd00:0:0:1::a:{j}")), 5000 + j));
        }
        out
    }

    /// Each peer allowed on its own port; peer 1's port is proxied; peer 5 also has more
    /// segments than a class record holds (gen::WINDOW_CLASS_ENTRIES): denied 6000-6002,
    /// allowed 6010-6020, 6030, UDP 53 and SCTP 9, so some of its ports are decided past its
    /// record.
    fn window_table() -> DecisionTable {
        let peers = window_peers();
        let mut rows: Vec<TableRow> = peers
            .iter()
            .enumerate()
            .map(|(j, (_, port))| TableRow {
                class: j as u32,
                protocol: Protocol::Tcp,
                ports: PortRange::single(*port),
                verdict: if j == 1 {
                    TableVerdict::Proxy(Vec::new())
                } else {
                    TableVerdict::Allow
                },
            })
            .collect();
        for (protocol, lo, hi, verdict) in [
            (Protocol::Tcp, 6000, 6002, TableVerdict::Deny),
            (Protocol::Tcp, 6010, 6020, TableVerdict::Allow),
            (Protocol::Udp, 53, 53, TableVerdict::Allow),
            (Protocol::Tcp, 6030, 6030, TableVerdict::Allow),
            (Protocol::Sctp, 9, 9, TableVerdict::Allow),
        ] {
            rows.push(TableRow {
                class: 5,
                protocol,
                ports: PortRange { lo, hi },
                verdict,
            });
        }
        DecisionTable {
            subject: NumericIdentity(SUBJECT),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: (0..peers.len() as u32)
                .map(|j| IdentityClass {
                    members: vec![NumericIdentity(WIN + j)],
                })
                .collect(),
            rows,
        }
    }

    /// An address's slot and a window's edges decide exactly: every held address (the first
    /// and last of each window included) on every port of the table gets its own identity's
    /// verdict, row and event; the addresses just outside each window and in a window's empty
    /// slot (in the ipcache with another identity, so looked up), IPv6 addresses with a window's last 32 bits under other upper
    /// words (each of the three changed), and the IPv4-looking IPv6 address get theirs. An index one off, a window one
    /// longer, or an upper word not compared would give a neighbour's identity, and so a
    /// neighbour's port, row or event. Forms compared: looked up, in code, the address map,
    /// and windows with the decision in code and in maps.
    #[test]
    fn windows_index_exactly() {
        let me4 = ip("10.0.0.2");
        let me6 = ip("fd00::2");
        let peers = window_peers();
        let outside: Vec<IpAddr> = [
            "10.1.0.9",
            "10.1.0.15",
            "10.1.0.21",
            "10.1.8.255",
            "10.1.9.5",
            "fd00::9:ffff",
            "fd00::a:5",
            "fd00:0:0:2::a:0",
            "fd00:0:0:1::a:5",
            // A window's last 32 bits under the first and the third upper word changed.
            "fd01::a:0",
            "fd00::1:0:a:0",
        ]
        .map(ip)
        .to_vec();
        let mut entries: Vec<(IpNet, NumericIdentity)> = peers
            .iter()
            .enumerate()
            .map(|(j, (a, _))| (IpNet::from(*a), NumericIdentity(WIN + j as u32)))
            .chain(
                outside
                    .iter()
                    .map(|a| (IpNet::from(*a), NumericIdentity(OUTSIDE))),
            )
            .collect();
        entries.push((IpNet::from(me4), NumericIdentity(SUBJECT)));
        entries.push((IpNet::from(me6), NumericIdentity(SUBJECT)));
        let Ok(mut kernel) = Kernel::new(&entries) else {
            return sys::skip_or_fail("cannot create the maps");
        };
        kernel.set_proxy_device(7).unwrap();
        let hosts = gen::HostAddresses::new(&entries);
        let table = window_table();
        let windows = gen::Inline {
            max_code_addresses: 0,
            ..gen::Inline::new(&hosts)
        };
        let forms = [
            ("looked up", generate(Form::LookedUp, &table, &hosts)),
            ("in code", generate(Form::InCode, &table, &hosts)),
            ("address map", generate(Form::InMap, &table, &hosts)),
            ("windows", generate(Form::InWindow, &table, &hosts)),
            (
                "windows, maps",
                gen::build_inlined(&table, true, gen::Strategy::Maps, &windows),
            ),
        ];
        let win = &forms[3].1;
        assert!(has_map(win, gen::ADDRESS_WINDOW_MAP_PREFIX));
        assert_eq!(win.inlined.len(), peers.len(), "every peer is held");
        // Two windows per family, 11 + 5 + 5 + 5 slots: the IPv4 ones were cut apart.
        let slots = win
            .maps
            .iter()
            .find(|m| m.def.name.starts_with(gen::ADDRESS_WINDOW_MAP_PREFIX))
            .unwrap();
        assert_eq!(slots.def.map_type, gen::BPF_MAP_TYPE_ARRAY);
        assert_eq!(slots.def.max_entries, 26);
        let mut ports: Vec<(Protocol, u16)> = peers
            .iter()
            .map(|(_, p)| (Protocol::Tcp, *p))
            .chain([6000, 6002, 6003, 6009, 6010, 6020, 6021, 7].map(|p| (Protocol::Tcp, p)))
            .collect();
        ports.extend([
            (Protocol::Tcp, 6030),
            (Protocol::Sctp, 9),
            (Protocol::Udp, 53),
            (Protocol::Udp, 1005),
            (Protocol::Icmp, 8),
        ]);
        let ipv4_looking = ip("::a01:a"); // 10.1.0.10's bits in an IPv6 address's last word
        let addresses: Vec<(IpAddr, u32)> = peers
            .iter()
            .enumerate()
            .map(|(j, (a, _))| (*a, WIN + j as u32))
            .chain(outside.iter().map(|a| (*a, OUTSIDE)))
            .chain([(ipv4_looking, gen::WORLD as u32)])
            .collect();
        let mut runs = 0;
        for (name, g) in &forms {
            let Some(prog) = load(&mut kernel, g) else {
                return;
            };
            let mut ring = kernel.events().unwrap();
            ring.drain();
            for (peer, id) in &addresses {
                for (protocol, port) in &ports {
                    let me = if peer.is_ipv4() { me4 } else { me6 };
                    let proto = if *protocol == Protocol::Icmp && peer.is_ipv6() {
                        Protocol::Icmpv6
                    } else {
                        *protocol
                    };
                    let what = format!("{name}: {peer} -> {port}/{}", proto.as_str());
                    let row = table.rows.iter().position(|r| {
                        table.classes[r.class as usize]
                            .members
                            .contains(&NumericIdentity(*id))
                            && r.protocol == proto
                            && r.ports.contains(*port)
                    });
                    let verdict = row.map_or(&table.default, |r| &table.rows[r].verdict);
                    let (code, mark, v) = match verdict {
                        TableVerdict::Allow => (OK, 0, 0u8),
                        TableVerdict::Deny => (SHOT, 0, 1),
                        // Ingress TCP goes to the proxy device; anything else fails closed.
                        TableVerdict::Proxy(_) if proto == Protocol::Tcp => {
                            (REDIRECT, TO_PROXY_MARK as u32 | id, 2)
                        }
                        TableVerdict::Proxy(_) => (SHOT, TO_PROXY_MARK as u32 | id, 1),
                    };
                    let packet = craft_ports(*peer, me, proto, 5555, *port);
                    let out = kernel.run(&prog, &packet).unwrap();
                    assert_eq!((out.code, out.mark), (code, mark), "{what}");
                    let events: Vec<(u32, u32, u8)> = ring
                        .drain()
                        .iter()
                        .map(|e| {
                            (
                                field(e, event::PEER),
                                field(e, event::ROW),
                                e[event::VERDICT],
                            )
                        })
                        .collect();
                    let row = row.map_or(u32::MAX, |r| r as u32);
                    // Untracked ICMP allowed: no connection opens, no event.
                    let want = if v == 0 && matches!(proto, Protocol::Icmp | Protocol::Icmpv6) {
                        vec![]
                    } else {
                        vec![(*id, row, v)]
                    };
                    assert_eq!(events, want, "{what}: events");
                    runs += 1;
                }
            }
        }
        assert_eq!(runs, forms.len() * addresses.len() * ports.len());
    }
}
