//! An assembler: instructions appended in order, jumps to labels back-patched when the program
//! is finished, map references recorded for relocation.

use crate::insn::*;

/// A jump target, bound to a position with [`Asm::bind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    #[error("label {0} is used but never bound")]
    Unbound(u32),
    #[error("jump from slot {from} to slot {to} does not fit a 16-bit offset")]
    TooFar { from: usize, to: usize },
}

/// A finished program: instructions and, per map reference, the slot of its `LdImm64` and the
/// map's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
    pub map_relocs: Vec<(usize, String)>,
}

impl Program {
    /// The kernel's byte form.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.insns.len() * 8);
        for i in &self.insns {
            i.encode(&mut out);
        }
        out
    }

    /// Slot number of each instruction (an `LdImm64` takes two).
    pub fn slots(&self) -> Vec<usize> {
        let mut at = 0;
        self.insns
            .iter()
            .map(|i| {
                let s = at;
                at += i.slots();
                s
            })
            .collect()
    }

    /// The program with every map reference resolved to a file descriptor (what the loader
    /// does before BPF_PROG_LOAD); `fd_of` returns `None` for a map it does not know.
    pub fn with_map_fds(&self, fd_of: impl Fn(&str) -> Option<i32>) -> Option<Program> {
        let slots = self.slots();
        let mut insns = self.insns.clone();
        for (slot, name) in &self.map_relocs {
            let i = slots.iter().position(|s| s == slot)?;
            let fd = fd_of(name)?;
            insns[i] = Insn::LdImm64 {
                dst: match insns[i] {
                    Insn::LdImm64 { dst, .. } => dst,
                    _ => return None,
                },
                imm: i64::from(fd),
                map: true,
            };
        }
        Some(Program {
            insns,
            map_relocs: self.map_relocs.clone(),
        })
    }

    pub fn slot_count(&self) -> usize {
        self.insns.iter().map(Insn::slots).sum()
    }
}

#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of every jump to patch.
    fixups: Vec<(usize, Label)>,
    map_relocs: Vec<(usize, String)>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() as u32 - 1)
    }

    /// Binds `l` to the next instruction.
    pub fn bind(&mut self, l: Label) {
        self.labels[l.0 as usize] = Some(self.insns.len());
    }

    pub fn push(&mut self, i: Insn) -> &mut Asm {
        self.insns.push(i);
        self
    }

    pub fn mov(&mut self, dst: Reg, src: Src) -> &mut Asm {
        self.push(Insn::Alu {
            op: AluOp::Mov,
            wide: true,
            dst,
            src,
        })
    }

    pub fn alu(&mut self, op: AluOp, dst: Reg, src: Src) -> &mut Asm {
        self.push(Insn::Alu {
            op,
            wide: true,
            dst,
            src,
        })
    }

    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::Load {
            size,
            dst,
            src,
            off,
        })
    }

    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Src) -> &mut Asm {
        self.push(Insn::Store {
            size,
            dst,
            off,
            src,
        })
    }

    /// `if dst cond src goto target`.
    pub fn jump_if(&mut self, cond: Cond, dst: Reg, src: Src, target: Label) -> &mut Asm {
        self.fixups.push((self.insns.len(), target));
        self.push(Insn::Jmp {
            cond,
            wide: true,
            dst,
            src,
            off: 0,
        })
    }

    /// `if (u32)dst cond (u32)src goto target`: compares the low 32 bits only (BPF_JMP32, Linux
    /// 5.1), so an immediate from 2^31 up is not sign-extended against a zero-extended register.
    pub fn jump32_if(&mut self, cond: Cond, dst: Reg, src: Src, target: Label) -> &mut Asm {
        self.fixups.push((self.insns.len(), target));
        self.push(Insn::Jmp {
            cond,
            wide: false,
            dst,
            src,
            off: 0,
        })
    }

    pub fn goto(&mut self, target: Label) -> &mut Asm {
        self.fixups.push((self.insns.len(), target));
        self.push(Insn::Ja { off: 0 })
    }

    /// `dst = &map` for the map named `name`, resolved when the program is loaded.
    pub fn ld_map(&mut self, dst: Reg, name: &str) -> &mut Asm {
        self.map_relocs.push((self.insns.len(), name.to_string()));
        self.push(Insn::LdImm64 {
            dst,
            imm: 0,
            map: true,
        })
    }

    pub fn call(&mut self, helper: i32) -> &mut Asm {
        self.push(Insn::Call { helper })
    }

    pub fn exit(&mut self) -> &mut Asm {
        self.push(Insn::Exit)
    }

    /// `r0 = verdict; exit`.
    pub fn ret(&mut self, verdict: i32) -> &mut Asm {
        self.mov(R0, Src::Imm(verdict)).exit()
    }

    /// Resolves every jump and returns the program; map relocations are given in slots.
    pub fn finish(self) -> Result<Program, AsmError> {
        let mut slot_of = Vec::with_capacity(self.insns.len() + 1);
        let mut at = 0usize;
        for i in &self.insns {
            slot_of.push(at);
            at += i.slots();
        }
        slot_of.push(at);
        let mut insns = self.insns;
        for (idx, label) in self.fixups {
            let target = self.labels[label.0 as usize].ok_or(AsmError::Unbound(label.0))?;
            let (from, to) = (slot_of[idx], slot_of[target]);
            let off = i16::try_from(to as i64 - from as i64 - 1)
                .map_err(|_| AsmError::TooFar { from, to })?;
            match &mut insns[idx] {
                Insn::Ja { off: o } | Insn::Jmp { off: o, .. } => *o = off,
                _ => unreachable!("only jumps are fixed up"),
            }
        }
        let map_relocs = self
            .map_relocs
            .into_iter()
            .map(|(i, n)| (slot_of[i], n))
            .collect();
        Ok(Program { insns, map_relocs })
    }
}
