//! cnpc's own static checker, the first rung of the verification ladder (DESIGN.md §6): it
//! rejects what the kernel verifier would reject for structural reasons, with a message that
//! names the instruction, before any kernel is involved.
//!
//! Checked: every jump lands on an instruction inside the program; jumps only go forward (the
//! generator emits no loops, so every path is finite); no path runs off the end; every register
//! is written before it is read on every path (r1 holds the context and r10 the frame pointer
//! on entry; a helper call clobbers r1-r5 and sets r0); r10 is never written; every instruction
//! is reachable (the kernel rejects dead code); the program stays far below the kernel's
//! instruction limit.
//!
//! Packet accesses are checked by a second forward dataflow over pointer kinds, after the
//! kernel's own model (kernel/bpf/verifier.c): `skb->data` and `skb->data_end` loaded from the
//! context are packet pointers; adding a constant moves a pointer, adding a variable gives a
//! pointer with a fresh id and nothing verified; `if p > data_end goto` proves, on the path that
//! falls through, that the bytes before `p` exist for every pointer with `p`'s id. Every load
//! from a packet pointer must lie inside what is proven on every path to it, and a map value may
//! be read only after the null check.
//!
//! Sockets follow the kernel's reference tracking (kernel/bpf/verifier.c, acquire and release
//! of `bpf_sk_lookup_tcp` and friends): a lookup returns a socket or null and acquires a
//! reference; the pointer may be used (read, passed to `bpf_sk_assign` or `bpf_sk_release`) only
//! after its null check, where the null path drops the reference; `bpf_sk_release` ends it and
//! invalidates every copy; a reference still held at an exit, on any path, is a leak. Helpers
//! that take the context or a socket are checked for it.

use crate::asm::Program;
use crate::insn::*;

/// Programs are kept far below the kernel's one-million-instruction limit for privileged loads.
pub const MAX_SLOTS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slot {slot}: {message}")]
pub struct CheckError {
    pub slot: usize,
    pub message: String,
}

// Helpers (enum bpf_func_id, include/uapi/linux/bpf.h).
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const MAP_DELETE_ELEM: i32 = 3;
const KTIME_GET_NS: i32 = 5;
const REDIRECT: i32 = 23;
const SKB_CHANGE_TYPE: i32 = 32;
const SK_LOOKUP_TCP: i32 = 84;
const SK_LOOKUP_UDP: i32 = 85;
const SK_RELEASE: i32 = 86;
const SKC_LOOKUP_TCP: i32 = 99;
const SK_ASSIGN: i32 = 124;
const RINGBUF_OUTPUT: i32 = 130;

/// Arguments (r1.. ) each helper the generator uses reads.
fn helper_args(helper: i32) -> usize {
    match helper {
        MAP_LOOKUP_ELEM | MAP_DELETE_ELEM => 2,
        MAP_UPDATE_ELEM => 4,
        KTIME_GET_NS => 0,
        REDIRECT | SKB_CHANGE_TYPE => 2, // ifindex, flags; ctx, packet type
        SK_RELEASE => 1,
        SK_ASSIGN => 3,                                      // ctx, socket, flags
        SK_LOOKUP_TCP | SK_LOOKUP_UDP | SKC_LOOKUP_TCP => 5, // ctx, tuple, size, netns, flags
        RINGBUF_OUTPUT => 4,
        _ => 5,
    }
}

/// Whether `helper` looks a socket up: it returns a socket or null, holding a reference.
fn acquires_socket(helper: i32) -> bool {
    matches!(helper, SK_LOOKUP_TCP | SK_LOOKUP_UDP | SKC_LOOKUP_TCP)
}

/// The argument registers of `helper` that must hold the context.
fn ctx_args(helper: i32) -> &'static [usize] {
    match helper {
        SK_LOOKUP_TCP | SK_LOOKUP_UDP | SKC_LOOKUP_TCP | SK_ASSIGN | SKB_CHANGE_TYPE => &[1],
        _ => &[],
    }
}

/// The argument register of `helper` that must hold a (null-checked) socket.
fn socket_arg(helper: i32) -> Option<usize> {
    match helper {
        SK_ASSIGN => Some(2),
        SK_RELEASE => Some(1),
        _ => None,
    }
}

/// Size of `struct bpf_sock` (include/uapi/linux/bpf.h): reads through a socket stay inside.
const BPF_SOCK_SIZE: i64 = 80;

pub fn check(p: &Program) -> Result<(), Vec<CheckError>> {
    let mut errors = Vec::new();
    let slots = p.slots();
    let total = p.slot_count();
    let err = |slot: usize, message: String| CheckError { slot, message };
    if total > MAX_SLOTS {
        errors.push(err(
            0,
            format!("{total} instructions, over cnpc's limit of {MAX_SLOTS}"),
        ));
    }
    if p.insns.is_empty() {
        return Err(vec![err(0, "empty program".into())]);
    }
    // Instruction index of each slot that starts an instruction.
    let index_of = |slot: usize| slots.binary_search(&slot).ok();
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); p.insns.len()];
    for (i, insn) in p.insns.iter().enumerate() {
        let slot = slots[i];
        let next = i + 1;
        let jump = |off: i16| -> Result<usize, CheckError> {
            let target = slot as i64 + 1 + i64::from(off);
            if off < 0 {
                return Err(err(
                    slot,
                    format!("backward jump to slot {target}: loops are not generated"),
                ));
            }
            usize::try_from(target)
                .ok()
                .and_then(index_of)
                .ok_or_else(|| {
                    err(
                        slot,
                        format!("jump to slot {target}, which is not the start of an instruction"),
                    )
                })
        };
        match insn {
            Insn::Exit => {}
            Insn::Ja { off } => match jump(*off) {
                Ok(t) => succs[i].push(t),
                Err(e) => errors.push(e),
            },
            Insn::Jmp { off, .. } => {
                match jump(*off) {
                    Ok(t) => succs[i].push(t),
                    Err(e) => errors.push(e),
                }
                succs[i].push(next);
            }
            _ => succs[i].push(next),
        }
        if succs[i].contains(&p.insns.len()) {
            errors.push(err(
                slot,
                "execution can run past the last instruction".into(),
            ));
            succs[i].retain(|&s| s < p.insns.len());
        }
        if insn.writes() == Some(R10) {
            errors.push(err(slot, "r10 (the frame pointer) is read-only".into()));
        }
    }
    // Initialised registers: a forward dataflow over the loop-free control flow, meeting by
    // intersection. `None` means "not reached yet".
    let mut init: Vec<Option<u16>> = vec![None; p.insns.len()];
    init[0] = Some(1 << 1 | 1 << 10);
    for i in 0..p.insns.len() {
        let Some(mut regs) = init[i] else { continue };
        let insn = &p.insns[i];
        let mut reads = insn.reads();
        if let Insn::Call { helper } = insn {
            reads.extend((1..=helper_args(*helper) as u8).map(Reg));
        }
        for r in reads {
            if regs & (1 << r.0) == 0 {
                errors.push(err(
                    slots[i],
                    format!("{r} is read before it is written on some path ({insn})"),
                ));
            }
        }
        if let Insn::Call { .. } = insn {
            regs &= !0b11_1110;
        }
        if let Some(w) = insn.writes() {
            regs |= 1 << w.0;
        }
        for &s in &succs[i] {
            init[s] = Some(init[s].map_or(regs, |r| r & regs));
        }
    }
    errors.extend(check_memory(p, &succs));
    // The kernel rejects dead code (kernel/bpf/verifier.c, check_cfg: "unreachable insn").
    if let Some(i) = init.iter().position(Option::is_none) {
        errors.push(err(
            slots[i],
            format!("unreachable instruction ({})", p.insns[i]),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

// struct __sk_buff offsets (include/uapi/linux/bpf.h).
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

/// What a register holds, as far as memory safety goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Not a pointer (or not known to be one): never dereferenced.
    Scalar,
    Ctx,
    Stack,
    PacketEnd,
    /// `id` names the variable part of the offset (0: none), `off` the constant part.
    Packet {
        id: usize,
        off: i64,
    },
    MapValueOrNull,
    MapValue,
    Map,
    /// A socket from a lookup, before its null check; `id` names the reference (the slot of
    /// the call that acquired it).
    SocketOrNull {
        id: usize,
    },
    Socket {
        id: usize,
    },
}

impl Kind {
    fn socket_id(self) -> Option<usize> {
        match self {
            Kind::Socket { id } | Kind::SocketOrNull { id } => Some(id),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MemState {
    regs: [Kind; 11],
    /// Per packet-pointer id, the bytes from its base proven to exist.
    proven: std::collections::BTreeMap<usize, i64>,
    /// Socket references held: id to the slot of the lookup that acquired it.
    refs: std::collections::BTreeSet<usize>,
}

impl MemState {
    /// Renames the socket reference `from` to `to`.
    fn rename(&mut self, from: usize, to: usize) {
        for r in self.regs.iter_mut() {
            match r {
                Kind::Socket { id } | Kind::SocketOrNull { id } if *id == from => *id = to,
                _ => {}
            }
        }
        if self.refs.remove(&from) {
            self.refs.insert(to);
        }
    }

    /// Ends the reference `id`: every copy of the pointer becomes a scalar.
    fn release(&mut self, id: usize) {
        self.refs.remove(&id);
        for r in self.regs.iter_mut() {
            if r.socket_id() == Some(id) {
                *r = Kind::Scalar;
            }
        }
    }

    fn meet(&mut self, other: &MemState) {
        // Sockets from different lookups that reach a join in the same register (the
        // established socket or the listener, say) are one reference from here on.
        let mut other = other.clone();
        for i in 0..self.regs.len() {
            match (self.regs[i], other.regs[i]) {
                (Kind::Socket { id: a }, Kind::Socket { id: b })
                | (Kind::SocketOrNull { id: a }, Kind::SocketOrNull { id: b })
                    if a != b =>
                {
                    other.rename(b, a)
                }
                _ => {}
            }
        }
        for (a, b) in self.regs.iter_mut().zip(other.regs.iter()) {
            if a != b {
                *a = Kind::Scalar;
            }
        }
        self.proven.retain(|id, n| match other.proven.get(id) {
            Some(m) => {
                *n = (*n).min(*m);
                true
            }
            None => false,
        });
        // A reference held on any path in is held: released on one path only is a leak.
        self.refs.extend(other.refs.iter().copied());
    }
}

/// After a null check: every copy of the socket `id` is non-null.
fn checked_socket(st: &mut MemState, id: usize) {
    for r in st.regs.iter_mut() {
        if *r == (Kind::SocketOrNull { id }) {
            *r = Kind::Socket { id };
        }
    }
}

/// The packet-bounds, null-check and reference rung: one error per offending instruction.
fn check_memory(p: &Program, succs: &[Vec<usize>]) -> Vec<CheckError> {
    let slots = p.slots();
    let mut errors = Vec::new();
    let mut states: Vec<Option<MemState>> = vec![None; p.insns.len()];
    let mut entry = MemState {
        regs: [Kind::Scalar; 11],
        proven: Default::default(),
        refs: Default::default(),
    };
    entry.regs[1] = Kind::Ctx;
    entry.regs[10] = Kind::Stack;
    if !states.is_empty() {
        states[0] = Some(entry);
    }
    for i in 0..p.insns.len() {
        let Some(mut st) = states[i].take() else {
            continue;
        };
        let insn = &p.insns[i];
        let slot = slots[i];
        let kind = |st: &MemState, r: Reg| st.regs[r.0 as usize];
        let mut access = |st: &MemState, base: Reg, off: i16, size: Size, what: &str| -> Kind {
            match kind(st, base) {
                Kind::Packet { id, off: at } => {
                    let (lo, hi) = (
                        at + i64::from(off),
                        at + i64::from(off) + i64::from(size.bytes()),
                    );
                    let proven = st.proven.get(&id).copied().unwrap_or(0);
                    if lo < 0 || hi > proven {
                        errors.push(CheckError {
                            slot,
                            message: format!(
                                "packet {what} of bytes {lo}..{hi} past its pointer, but only {proven} are bounds-checked on some path ({insn})"
                            ),
                        });
                    }
                    Kind::Scalar
                }
                Kind::Ctx if what == "read" && off == SKB_DATA && size == Size::W => {
                    Kind::Packet { id: 0, off: 0 }
                }
                Kind::Ctx if what == "read" && off == SKB_DATA_END && size == Size::W => {
                    Kind::PacketEnd
                }
                Kind::Ctx | Kind::Stack | Kind::MapValue => Kind::Scalar,
                Kind::Socket { .. } => {
                    let (lo, hi) = (i64::from(off), i64::from(off) + i64::from(size.bytes()));
                    if what != "read" || lo < 0 || hi > BPF_SOCK_SIZE {
                        errors.push(CheckError {
                            slot,
                            message: format!(
                                "socket {what} of bytes {lo}..{hi}: only reads inside struct bpf_sock are allowed ({insn})"
                            ),
                        });
                    }
                    Kind::Scalar
                }
                Kind::SocketOrNull { .. } => {
                    errors.push(CheckError {
                        slot,
                        message: format!("socket {what} before its null check ({insn})"),
                    });
                    Kind::Scalar
                }
                Kind::MapValueOrNull => {
                    errors.push(CheckError {
                        slot,
                        message: format!("map value {what} before its null check ({insn})"),
                    });
                    Kind::Scalar
                }
                k => {
                    errors.push(CheckError { slot, message: format!("{what} through {base}, which is not a pointer to memory ({k:?}) ({insn})") });
                    Kind::Scalar
                }
            }
        };
        // The state on the taken edge of a conditional jump, when it differs.
        let mut taken: Option<MemState> = None;
        match *insn {
            Insn::Alu { op, dst, src, .. } => {
                let d = dst.0 as usize;
                st.regs[d] = match (op, st.regs[d], src) {
                    (AluOp::Mov, _, Src::Reg(r)) => kind(&st, r),
                    (AluOp::Add, Kind::Packet { id, off }, Src::Imm(k)) => Kind::Packet {
                        id,
                        off: off + i64::from(k),
                    },
                    (AluOp::Sub, Kind::Packet { id, off }, Src::Imm(k)) => Kind::Packet {
                        id,
                        off: off - i64::from(k),
                    },
                    // A variable offset: nothing about the new pointer is proven yet.
                    (AluOp::Add, Kind::Packet { .. }, Src::Reg(r))
                        if kind(&st, r) == Kind::Scalar =>
                    {
                        Kind::Packet { id: i + 1, off: 0 }
                    }
                    (AluOp::Add | AluOp::Sub, Kind::Stack, Src::Imm(_)) => Kind::Stack,
                    _ => Kind::Scalar,
                };
                if let Kind::Packet { id, .. } = st.regs[d] {
                    if id == i + 1 {
                        st.proven.remove(&id);
                    }
                }
            }
            Insn::Neg { dst, .. } | Insn::ToBe { dst, .. } => {
                st.regs[dst.0 as usize] = Kind::Scalar
            }
            Insn::LdImm64 { dst, map, .. } => {
                st.regs[dst.0 as usize] = if map { Kind::Map } else { Kind::Scalar }
            }
            Insn::Load {
                size,
                dst,
                src,
                off,
            } => {
                let k = access(&st, src, off, size, "read");
                st.regs[dst.0 as usize] = k;
            }
            Insn::Store { size, dst, off, .. } => {
                access(&st, dst, off, size, "write");
            }
            Insn::Call { helper } => {
                for &r in ctx_args(helper) {
                    if st.regs[r] != Kind::Ctx {
                        errors.push(CheckError {
                            slot,
                            message: format!(
                                "helper {helper} takes the context in r{r}, not {:?} ({insn})",
                                st.regs[r]
                            ),
                        });
                    }
                }
                if let Some(r) = socket_arg(helper) {
                    match st.regs[r] {
                        Kind::Socket { id } => {
                            if helper == SK_RELEASE {
                                st.release(id);
                            }
                        }
                        Kind::SocketOrNull { .. } => errors.push(CheckError {
                            slot,
                            message: format!(
                                "socket passed to helper {helper} before its null check ({insn})"
                            ),
                        }),
                        k => errors.push(CheckError {
                            slot,
                            message: format!(
                                "helper {helper} takes a socket in r{r}, not {k:?} ({insn})"
                            ),
                        }),
                    }
                }
                // A socket left in r1-r5 is lost with them; its reference is still held, and
                // reported as a leak at the exit.
                for r in 1..=5 {
                    st.regs[r] = Kind::Scalar;
                }
                st.regs[0] = if helper == MAP_LOOKUP_ELEM {
                    Kind::MapValueOrNull
                } else if acquires_socket(helper) {
                    st.refs.insert(slot);
                    Kind::SocketOrNull { id: slot }
                } else {
                    Kind::Scalar
                };
            }
            Insn::Jmp { cond, dst, src, .. } => {
                let mut t = st.clone();
                match (cond, kind(&st, dst), src) {
                    // `if p > data_end goto`: falling through proves p's bytes.
                    (Cond::Gt, Kind::Packet { id, off }, Src::Reg(r))
                        if kind(&st, r) == Kind::PacketEnd =>
                    {
                        let e = st.proven.entry(id).or_insert(0);
                        *e = (*e).max(off);
                    }
                    (Cond::Ne, Kind::MapValueOrNull, Src::Imm(0)) => {
                        t.regs[dst.0 as usize] = Kind::MapValue
                    }
                    (Cond::Eq, Kind::MapValueOrNull, Src::Imm(0)) => {
                        st.regs[dst.0 as usize] = Kind::MapValue
                    }
                    // The null path holds no socket (the kernel drops its reference there);
                    // the other path holds it in every copy of the pointer.
                    (Cond::Ne, Kind::SocketOrNull { id }, Src::Imm(0)) => {
                        st.release(id);
                        checked_socket(&mut t, id);
                    }
                    (Cond::Eq, Kind::SocketOrNull { id }, Src::Imm(0)) => {
                        t.release(id);
                        checked_socket(&mut st, id);
                    }
                    _ => {}
                }
                taken = Some(t);
            }
            Insn::Exit => {
                for id in &st.refs {
                    errors.push(CheckError {
                        slot,
                        message: format!(
                            "the socket looked up at slot {id} is not released on some path to this exit"
                        ),
                    });
                }
            }
            Insn::Ja { .. } => {}
        }
        // Successors: a conditional jump's target first (the taken edge), then the next one.
        for (n, &s) in succs[i].iter().enumerate() {
            let out = match (&taken, n, insn) {
                (Some(t), 0, Insn::Jmp { .. }) => t,
                _ => &st,
            };
            match &mut states[s] {
                Some(existing) => existing.meet(out),
                slot @ None => *slot = Some(out.clone()),
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::Asm;

    fn errors(a: Asm) -> Vec<String> {
        match check(&a.finish().unwrap()) {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn accepts_a_well_formed_program() {
        let mut a = Asm::new();
        let drop = a.label();
        a.load(Size::W, R2, R1, 76)
            .load(Size::W, R3, R1, 80)
            .mov(R4, Src::Reg(R2))
            .alu(AluOp::Add, R4, Src::Imm(14));
        a.jump_if(Cond::Gt, R4, Src::Reg(R3), drop).ret(0);
        a.bind(drop);
        a.ret(2);
        assert_eq!(errors(a), Vec::<String>::new());
    }

    #[test]
    fn rejects_backward_jumps_fall_through_and_uninitialised_reads() {
        let mut a = Asm::new();
        let top = a.label();
        a.bind(top);
        a.mov(R0, Src::Imm(0)).goto(top);
        assert!(errors(a)[0].contains("backward jump"));

        let mut a = Asm::new();
        a.mov(R0, Src::Imm(0));
        assert!(errors(a)[0].contains("past the last instruction"));

        let mut a = Asm::new();
        a.mov(R0, Src::Reg(R7)).exit();
        assert!(errors(a)[0].contains("r7 is read before it is written"));

        // Written on one path only.
        let mut a = Asm::new();
        let skip = a.label();
        a.jump_if(Cond::Eq, R1, Src::Imm(0), skip)
            .mov(R6, Src::Imm(1));
        a.bind(skip);
        a.mov(R0, Src::Reg(R6)).exit();
        assert!(errors(a)[0].contains("r6 is read"));

        // A helper call clobbers r1-r5.
        let mut a = Asm::new();
        a.mov(R2, Src::Imm(1))
            .mov(R3, Src::Imm(0))
            .call(5)
            .mov(R0, Src::Reg(R2))
            .exit();
        assert!(errors(a).iter().any(|e| e.contains("r2 is read")));

        let mut a = Asm::new();
        a.mov(R10, Src::Imm(0)).ret(0);
        assert!(errors(a)[0].contains("read-only"));

        let mut a = Asm::new();
        a.ret(0).ret(2);
        assert!(errors(a)[0].contains("unreachable"));
    }

    #[test]
    fn packet_reads_must_be_bounds_checked_on_every_path() {
        // No check at all.
        let mut a = Asm::new();
        a.load(Size::W, R2, R1, 76).load(Size::H, R3, R2, 12).ret(0);
        assert!(errors(a)[0].contains("packet read of bytes 12..14"));

        // Checked for 14 bytes, then reading bytes 14..16.
        let well_formed = |extra: i16, skip_check_on_one_path: bool| {
            let mut a = Asm::new();
            let drop = a.label();
            let join = a.label();
            a.load(Size::W, R2, R1, 76).load(Size::W, R3, R1, 80);
            if skip_check_on_one_path {
                a.jump_if(Cond::Eq, R4, Src::Imm(0), join);
            }
            a.mov(R4, Src::Reg(R2))
                .alu(AluOp::Add, R4, Src::Imm(14))
                .jump_if(Cond::Gt, R4, Src::Reg(R3), drop);
            a.bind(join);
            a.load(Size::H, R5, R2, 12 + extra).ret(0);
            a.bind(drop);
            a.ret(2);
            a
        };
        assert_eq!(errors(well_formed(0, false)), Vec::<String>::new());
        assert!(errors(well_formed(2, false))[0].contains("bytes 14..16"));
        // r4 is uninitialised there too, which the first rung reports; the bounds rung adds its own.
        assert!(errors(well_formed(0, true))
            .iter()
            .any(|e| e.contains("only 0 are bounds-checked")));

        // A variable offset starts a new pointer with nothing proven.
        let mut a = Asm::new();
        let drop = a.label();
        a.load(Size::W, R2, R1, 76)
            .load(Size::W, R3, R1, 80)
            .mov(R4, Src::Imm(20));
        a.mov(R5, Src::Reg(R2)).alu(AluOp::Add, R5, Src::Imm(40));
        a.jump_if(Cond::Gt, R5, Src::Reg(R3), drop);
        a.alu(AluOp::Add, R2, Src::Reg(R4));
        a.load(Size::B, R0, R2, 0).ret(0);
        a.bind(drop);
        a.ret(2);
        assert!(errors(a)[0].contains("only 0 are bounds-checked"));
    }

    #[test]
    fn map_values_are_read_after_the_null_check() {
        let mut a = Asm::new();
        let miss = a.label();
        a.ld_map(R1, "m")
            .mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(-8));
        a.store(Size::DW, R10, -8, Src::Imm(0)).call(1);
        a.load(Size::W, R3, R0, 0);
        a.jump_if(Cond::Eq, R0, Src::Imm(0), miss);
        a.load(Size::W, R3, R0, 0);
        a.bind(miss);
        a.ret(0);
        let e = errors(a);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("before its null check"));
    }

    /// `r0 = bpf_sk_lookup_tcp(ctx, &tuple, 12, current netns, 0)` with the context in r6.
    fn sk_lookup(a: &mut Asm) {
        a.mov(R6, Src::Reg(R1));
        a.store(Size::DW, R10, -16, Src::Imm(0))
            .store(Size::W, R10, -8, Src::Imm(0));
        a.mov(R1, Src::Reg(R6))
            .mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(-16))
            .mov(R3, Src::Imm(12))
            .mov(R4, Src::Imm(-1))
            .mov(R5, Src::Imm(0))
            .call(SK_LOOKUP_TCP);
    }

    #[test]
    fn sockets_are_null_checked_used_and_released() {
        let well_formed = |leak: bool, unchecked: bool| {
            let mut a = Asm::new();
            let none = a.label();
            sk_lookup(&mut a);
            if !unchecked {
                a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
            }
            a.mov(R7, Src::Reg(R0));
            a.load(Size::W, R2, R7, 72); // the socket's state
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R7))
                .mov(R3, Src::Imm(0))
                .call(SK_ASSIGN);
            if !leak {
                a.mov(R1, Src::Reg(R7)).call(SK_RELEASE);
            }
            if !unchecked {
                a.bind(none);
            }
            a.ret(0);
            a
        };
        assert_eq!(errors(well_formed(false, false)), Vec::<String>::new());
        let e = errors(well_formed(true, false));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("not released on some path"), "{e:?}");
        let e = errors(well_formed(false, true));
        assert!(
            e.iter()
                .any(|e| e.contains("socket read before its null check")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("socket passed to helper 124 before its null check")),
            "{e:?}"
        );

        // Released on one path only.
        let mut a = Asm::new();
        let none = a.label();
        let skip = a.label();
        sk_lookup(&mut a);
        a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
        a.mov(R7, Src::Reg(R0));
        a.load(Size::W, R1, R7, 72)
            .jump_if(Cond::Eq, R1, Src::Imm(10), skip);
        a.mov(R1, Src::Reg(R7)).call(SK_RELEASE);
        a.bind(skip);
        a.bind(none);
        a.ret(0);
        let e = errors(a);
        assert!(e[0].contains("not released on some path"), "{e:?}");

        // A copy is dead after the release; the pointer is not a context.
        let mut a = Asm::new();
        let none = a.label();
        sk_lookup(&mut a);
        a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
        a.mov(R7, Src::Reg(R0)).mov(R8, Src::Reg(R0));
        a.mov(R1, Src::Reg(R7)).call(SK_RELEASE);
        a.load(Size::W, R1, R8, 72);
        a.mov(R1, Src::Reg(R8))
            .mov(R2, Src::Reg(R8))
            .mov(R3, Src::Imm(0))
            .call(SK_ASSIGN);
        a.bind(none);
        a.ret(0);
        let e = errors(a);
        assert!(e.iter().any(|e| e.contains("not a pointer")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("takes the context")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("takes a socket")), "{e:?}");
    }

    /// The egress handoff's shape (gen.rs, `sock_assign`): one set of arguments, then
    /// `bpf_sk_lookup_udp` or `bpf_sk_lookup_tcp` by protocol, joined before the null check.
    /// The two lookups' references are one from the join on: released once, on every path.
    #[test]
    fn either_lookup_joins_into_one_reference() {
        let program = |release: bool| {
            let mut a = Asm::new();
            let tcp = a.label();
            let found = a.label();
            let none = a.label();
            a.mov(R6, Src::Reg(R1)).mov(R9, Src::Imm(17));
            a.store(Size::DW, R10, -16, Src::Imm(0))
                .store(Size::W, R10, -8, Src::Imm(0));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R10))
                .alu(AluOp::Add, R2, Src::Imm(-16))
                .mov(R3, Src::Imm(12))
                .mov(R4, Src::Imm(-1))
                .mov(R5, Src::Imm(0));
            a.jump_if(Cond::Ne, R9, Src::Imm(17), tcp);
            a.call(SK_LOOKUP_UDP).goto(found);
            a.bind(tcp);
            a.call(SK_LOOKUP_TCP);
            a.bind(found);
            a.jump_if(Cond::Eq, R0, Src::Imm(0), none);
            a.mov(R7, Src::Reg(R0));
            a.mov(R1, Src::Reg(R6))
                .mov(R2, Src::Reg(R7))
                .mov(R3, Src::Imm(0))
                .call(SK_ASSIGN);
            if release {
                a.mov(R1, Src::Reg(R7)).call(SK_RELEASE);
            }
            a.bind(none);
            a.ret(0);
            a
        };
        assert_eq!(errors(program(true)), Vec::<String>::new());
        let e = errors(program(false));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("not released on some path"), "{e:?}");
    }

    #[test]
    fn unbound_labels_are_an_error() {
        let mut a = Asm::new();
        let nowhere = a.label();
        a.goto(nowhere);
        assert!(a.finish().is_err());
    }
}
