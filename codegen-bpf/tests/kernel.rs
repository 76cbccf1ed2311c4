//! The kernel accepts what the assembler writes and runs it as written: a hand-assembled
//! classifier goes through BPF_PROG_LOAD (the kernel verifier) and BPF_PROG_TEST_RUN.

mod sys;

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
    let run = |p: &[u8]| sys::test_run(&fd, p).expect("BPF_PROG_TEST_RUN");
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
