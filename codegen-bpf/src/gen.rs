//! Program generation: one decision table becomes one tc classifier (DESIGN.md §6).
//!
//! The program parses Ethernet, IPv4 (any header length) or IPv6 (skipping hop-by-hop, routing
//! and destination-options headers, up to [`MAX_EXT_HEADERS`]), and the L4 header; finds the
//! peer's identity in the `ipcache` LPM map (a miss is the world); and decides with the table
//! compiled into branches. Behaviours fixed here, each tested:
//! - frames that are not IP pass (ARP must work; policy is about IP peers);
//! - a packet too short for the headers its type announces is dropped;
//! - a non-first fragment carries no ports, so it cannot be matched against port rules: it is
//!   dropped, and so no fragment of a denied flow gets through unchecked;
//! - an IP protocol other than TCP, UDP, SCTP, ICMP and ICMPv6 gets the table's default;
//! - Proxy sets `skb->mark` to [`PROXY_MARK`] (the L7 stage takes marked packets) and passes.

use crate::asm::{Asm, Label, Program};
use crate::insn::*;
use cnpc_ir::{DecisionTable, Direction, Protocol, TableVerdict};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
/// `skb->mark` of packets for the L7 proxy.
pub const PROXY_MARK: i32 = 0x0c70_0000;
/// IPv6 extension headers skipped before giving up (and dropping).
pub const MAX_EXT_HEADERS: usize = 4;
/// The identity of addresses the ipcache does not know (reserved:world).
pub const WORLD: i32 = 2;

/// Layout of an `ipcache` key: a 32-bit prefix length, then 20 bytes of data: the address family
/// (4 or 6, one 32-bit word) and the address (IPv4 in the first four bytes).
pub const IPCACHE_KEY_SIZE: u32 = 24;
pub const IPCACHE_VALUE_SIZE: u32 = 4;
pub const IPCACHE_MAP: &str = "ipcache";

// struct __sk_buff offsets (include/uapi/linux/bpf.h).
const SKB_MARK: i16 = 8;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

// Registers kept across helper calls.
const CTX: Reg = R6;
const DATA: Reg = R7;
const DATA_END: Reg = R8;
const PROTO: Reg = R9;
// Stack: the ipcache key at fp-24..fp-1, the port at fp-32.
const KEY: i16 = -24;
const PORT: i16 = -32;

fn ip_proto(p: Protocol) -> i32 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        Protocol::Icmp => 1,
        Protocol::Icmpv6 => 58,
    }
}

fn verdict_code(a: &mut Asm, v: &TableVerdict) {
    match v {
        TableVerdict::Allow => {
            a.ret(TC_ACT_OK);
        }
        TableVerdict::Deny => {
            a.ret(TC_ACT_SHOT);
        }
        TableVerdict::Proxy(_) => {
            a.store(Size::W, CTX, SKB_MARK, Src::Imm(PROXY_MARK))
                .ret(TC_ACT_OK);
        }
    }
}

/// Bounds check: `if DATA + off + len > DATA_END goto fail` with `off` in `base` (a packet
/// pointer register) and a constant.
fn need(a: &mut Asm, base: Reg, end_off: i32, fail: Label) {
    a.mov(R2, Src::Reg(base))
        .alu(AluOp::Add, R2, Src::Imm(end_off))
        .jump_if(Cond::Gt, R2, Src::Reg(DATA_END), fail);
}

/// The classifier for `table` (its direction says which address is the peer's).
pub fn generate(table: &DecisionTable) -> Program {
    if table.rows.is_empty() {
        return constant(&table.default);
    }
    let mut a = Asm::new();
    let drop = a.label();
    let pass = a.label();
    let ipv4 = a.label();
    let ipv6 = a.label();
    let l4 = a.label();
    let lookup = a.label();

    a.mov(CTX, Src::Reg(R1));
    a.load(Size::W, DATA, CTX, SKB_DATA)
        .load(Size::W, DATA_END, CTX, SKB_DATA_END);
    need(&mut a, DATA, 14, drop);
    a.load(Size::H, R3, DATA, 12);
    a.jump_if(Cond::Eq, R3, Src::Imm(0x0008), ipv4); // 0x0800 read little-endian
    a.jump_if(Cond::Eq, R3, Src::Imm(0xdd86), ipv6); // 0x86dd
    a.goto(pass);

    // IPv4: R4 = L4 header offset from DATA.
    a.bind(ipv4);
    need(&mut a, DATA, 34, drop);
    a.load(Size::B, R3, DATA, 14);
    a.mov(R4, Src::Reg(R3))
        .alu(AluOp::And, R4, Src::Imm(0xf0))
        .jump_if(Cond::Ne, R4, Src::Imm(0x40), drop);
    a.alu(AluOp::And, R3, Src::Imm(0x0f))
        .jump_if(Cond::Lt, R3, Src::Imm(5), drop);
    a.alu(AluOp::Lsh, R3, Src::Imm(2));
    a.load(Size::B, PROTO, DATA, 23);
    // Fragment offset (13 bits after the flags): non-zero means no L4 header here.
    a.load(Size::H, R4, DATA, 20)
        .push(Insn::ToBe { dst: R4, bits: 16 })
        .alu(AluOp::And, R4, Src::Imm(0x1fff))
        .jump_if(Cond::Ne, R4, Src::Imm(0), drop);
    let addr = if table.direction == Direction::Egress {
        30
    } else {
        26
    };
    a.store(Size::W, R10, KEY, Src::Imm(64)); // prefix length: family word + 32 address bits
    a.store(Size::W, R10, KEY + 4, Src::Imm(4));
    a.load(Size::W, R5, DATA, addr)
        .store(Size::W, R10, KEY + 8, Src::Reg(R5));
    a.store(Size::W, R10, KEY + 12, Src::Imm(0))
        .store(Size::W, R10, KEY + 16, Src::Imm(0))
        .store(Size::W, R10, KEY + 20, Src::Imm(0));
    a.mov(R4, Src::Reg(R3)).alu(AluOp::Add, R4, Src::Imm(14));
    a.goto(l4);

    // IPv6: fixed header, then extension headers.
    a.bind(ipv6);
    need(&mut a, DATA, 54, drop);
    a.load(Size::B, PROTO, DATA, 20);
    let addr = if table.direction == Direction::Egress {
        38
    } else {
        22
    };
    a.store(Size::W, R10, KEY, Src::Imm(160)); // family word + 128 address bits
    a.store(Size::W, R10, KEY + 4, Src::Imm(6));
    for w in 0..4 {
        a.load(Size::W, R5, DATA, addr + 4 * w)
            .store(Size::W, R10, KEY + 8 + 4 * w, Src::Reg(R5));
    }
    a.mov(R4, Src::Imm(54));
    for _ in 0..MAX_EXT_HEADERS {
        let not_ext = a.label();
        let plain = a.label();
        let next = a.label();
        // R3 = pointer to the extension header.
        a.jump_if(Cond::Eq, PROTO, Src::Imm(44), plain); // fragment header: fixed 8 bytes
        a.jump_if(Cond::Eq, PROTO, Src::Imm(0), plain);
        a.jump_if(Cond::Eq, PROTO, Src::Imm(43), plain);
        a.jump_if(Cond::Eq, PROTO, Src::Imm(60), plain);
        a.goto(not_ext);
        a.bind(plain);
        a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
        need(&mut a, R3, 8, drop);
        a.jump_if(Cond::Ne, PROTO, Src::Imm(44), next);
        // Fragment: the offset (13 bits) must be zero, as for IPv4.
        a.load(Size::H, R5, R3, 2)
            .push(Insn::ToBe { dst: R5, bits: 16 })
            .alu(AluOp::And, R5, Src::Imm(0xfff8))
            .jump_if(Cond::Ne, R5, Src::Imm(0), drop);
        a.load(Size::B, PROTO, R3, 0)
            .alu(AluOp::Add, R4, Src::Imm(8));
        a.goto(not_ext);
        a.bind(next);
        a.load(Size::B, R5, R3, 1)
            .alu(AluOp::Add, R5, Src::Imm(1))
            .alu(AluOp::Lsh, R5, Src::Imm(3));
        a.load(Size::B, PROTO, R3, 0)
            .alu(AluOp::Add, R4, Src::Reg(R5));
        a.bind(not_ext);
    }
    // Still an extension header after the last one skipped: give up.
    for ext in [0, 43, 60, 44] {
        a.jump_if(Cond::Eq, PROTO, Src::Imm(ext), drop);
    }

    // L4: R4 = header offset. Ports for TCP/UDP/SCTP, the type for ICMP; 0 otherwise.
    a.bind(l4);
    let ports = a.label();
    let icmp = a.label();
    a.store(Size::W, R10, PORT, Src::Imm(0));
    for p in [6, 17, 132] {
        a.jump_if(Cond::Eq, PROTO, Src::Imm(p), ports);
    }
    a.jump_if(Cond::Eq, PROTO, Src::Imm(1), icmp);
    a.jump_if(Cond::Eq, PROTO, Src::Imm(58), icmp);
    a.goto(lookup);
    a.bind(ports);
    a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
    need(&mut a, R3, 4, drop);
    a.load(Size::H, R5, R3, 2)
        .push(Insn::ToBe { dst: R5, bits: 16 })
        .store(Size::W, R10, PORT, Src::Reg(R5));
    a.goto(lookup);
    a.bind(icmp);
    a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
    need(&mut a, R3, 1, drop);
    a.load(Size::B, R5, R3, 0)
        .store(Size::W, R10, PORT, Src::Reg(R5));

    // Peer identity: R0 = ipcache[key] or the world.
    a.bind(lookup);
    let found = a.label();
    let decide = a.label();
    a.ld_map(R1, IPCACHE_MAP);
    a.mov(R2, Src::Reg(R10))
        .alu(AluOp::Add, R2, Src::Imm(i32::from(KEY)));
    a.call(1); // map_lookup_elem
    a.jump_if(Cond::Ne, R0, Src::Imm(0), found);
    a.mov(R1, Src::Imm(WORLD)).goto(decide);
    a.bind(found);
    a.load(Size::W, R1, R0, 0);
    a.bind(decide);
    // R1 = identity, R2 = port, PROTO = protocol.
    a.load(Size::W, R2, R10, PORT);
    decision(&mut a, table);

    a.bind(drop);
    a.ret(TC_ACT_SHOT);
    a.bind(pass);
    a.ret(TC_ACT_OK);
    // The assembler only fails on an unbound label or an over-long jump, neither of which this
    // generator produces for tables of any size a jump offset can span.
    a.finish().expect("generated code assembles")
}

/// A table without rows decides by its default alone: no peer lookup, no port parsing. Frames
/// that are not IP still pass, as in every program.
fn constant(default: &TableVerdict) -> Program {
    let mut a = Asm::new();
    if *default != TableVerdict::Allow {
        let ip = a.label();
        a.load(Size::W, R2, R1, SKB_DATA)
            .load(Size::W, R3, R1, SKB_DATA_END);
        a.mov(R4, Src::Reg(R2))
            .alu(AluOp::Add, R4, Src::Imm(14))
            .jump_if(Cond::Gt, R4, Src::Reg(R3), ip);
        a.load(Size::H, R4, R2, 12);
        a.jump_if(Cond::Eq, R4, Src::Imm(0x0008), ip)
            .jump_if(Cond::Eq, R4, Src::Imm(0xdd86), ip);
        a.ret(TC_ACT_OK);
        a.bind(ip);
        a.mov(CTX, Src::Reg(R1));
        verdict_code(&mut a, default);
    } else {
        a.ret(TC_ACT_OK);
    }
    a.finish().expect("generated code assembles")
}

/// The table as branches: R1 identity, R2 port, PROTO protocol.
fn decision(a: &mut Asm, table: &DecisionTable) {
    let default = a.label();
    let classes: Vec<Label> = table.classes.iter().map(|_| a.label()).collect();
    for (c, class) in table.classes.iter().enumerate() {
        for m in &class.members {
            a.jump_if(Cond::Eq, R1, Src::Imm(m.0 as i32), classes[c]);
        }
    }
    a.goto(default);
    for (c, label) in classes.iter().enumerate() {
        a.bind(*label);
        for row in table.rows.iter().filter(|r| r.class == c as u32) {
            let next = a.label();
            a.jump_if(Cond::Ne, PROTO, Src::Imm(ip_proto(row.protocol)), next);
            if row.ports.lo > 0 {
                a.jump_if(Cond::Lt, R2, Src::Imm(i32::from(row.ports.lo)), next);
            }
            if row.ports.hi < row.protocol.max_port() {
                a.jump_if(Cond::Gt, R2, Src::Imm(i32::from(row.ports.hi)), next);
            }
            verdict_code(a, &row.verdict);
            a.bind(next);
        }
        a.goto(default);
    }
    a.bind(default);
    verdict_code(a, &table.default);
}
