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
//! Not yet checked here (the kernel verifier still checks it in CI): that every packet access
//! is behind a bounds check.

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
    fn unbound_labels_are_an_error() {
        let mut a = Asm::new();
        let nowhere = a.label();
        a.goto(nowhere);
        assert!(a.finish().is_err());
    }
}
