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

/// Arguments (r1.. ) each helper the generator uses reads.
fn helper_args(helper: i32) -> usize {
    match helper {
        1 | 3 => 2, // map_lookup_elem, map_delete_elem
        2 => 4,     // map_update_elem
        5 => 0,     // ktime_get_ns
        130 => 4,   // ringbuf_output
        _ => 5,
    }
}

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
const MAP_LOOKUP_ELEM: i32 = 1;

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
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MemState {
    regs: [Kind; 11],
    /// Per packet-pointer id, the bytes from its base proven to exist.
    proven: std::collections::BTreeMap<usize, i64>,
}

impl MemState {
    fn meet(&mut self, other: &MemState) {
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
    }
}

/// The packet-bounds and null-check rung: one error per offending instruction.
fn check_memory(p: &Program, succs: &[Vec<usize>]) -> Vec<CheckError> {
    let slots = p.slots();
    let mut errors = Vec::new();
    let mut states: Vec<Option<MemState>> = vec![None; p.insns.len()];
    let mut entry = MemState {
        regs: [Kind::Scalar; 11],
        proven: Default::default(),
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
                for r in 1..=5 {
                    st.regs[r] = Kind::Scalar;
                }
                st.regs[0] = if helper == MAP_LOOKUP_ELEM {
                    Kind::MapValueOrNull
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
                    _ => {}
                }
                taken = Some(t);
            }
            Insn::Ja { .. } | Insn::Exit => {}
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

    #[test]
    fn unbound_labels_are_an_error() {
        let mut a = Asm::new();
        let nowhere = a.label();
        a.goto(nowhere);
        assert!(a.finish().is_err());
    }
}
