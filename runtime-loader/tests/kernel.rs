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
        let d = &got[1];
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
    //! directions proxy TCP 80, allow TCP 81 and deny the rest; egress also proxies UDP 53.
    //! Nothing listens on the proxy ports in a test run, so the egress handoff finds no socket:
    //! the tests that depend on that run in a network namespace of their own.
    use super::sys;
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
        let mut rows = vec![
            row(Protocol::Tcp, 80, port_80),
            row(Protocol::Tcp, 81, TableVerdict::Allow),
        ];
        if direction == Direction::Egress {
            rows.push(row(Protocol::Udp, 53, proxy()));
        }
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

    fn field(e: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]])
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

    /// The ct key of a connection, written from the endpoint's side (gen::CT_MAP).
    fn ct_key(local: IpAddr, peer: IpAddr, local_port: u16, peer_port: u16, proto: u8) -> Vec<u8> {
        let bytes = |a: IpAddr| match a {
            IpAddr::V4(v) => {
                let mut b = v.octets().to_vec();
                b.resize(16, 0);
                b
            }
            IpAddr::V6(v) => v.octets().to_vec(),
        };
        let mut k = bytes(local);
        k.extend(bytes(peer));
        k.extend(local_port.to_be_bytes());
        k.extend(peer_port.to_be_bytes());
        k.extend([proto, if local.is_ipv4() { 4 } else { 6 }, 0, 0]);
        k
    }

    fn ct_value(opened_by: u32, flags: u32) -> Vec<u8> {
        let mut v = opened_by.to_le_bytes().to_vec();
        v.extend(flags.to_le_bytes());
        v
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
                    "UDP is not proxied yet: dropped, no handoff tried"
                );
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
