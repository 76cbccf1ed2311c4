//! A disassembler whose listing reads like `llvm-objdump -d`: slot, bytes, instruction, and the
//! absolute target of every jump.

use crate::asm::Program;
use crate::insn::{DecodeError, Insn};
use std::fmt::Write;

/// Decodes a byte image into instructions.
pub fn decode(bytes: &[u8]) -> Result<Vec<Insn>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let i = Insn::decode(&bytes[at..])?;
        at += 8 * i.slots();
        out.push(i);
    }
    Ok(out)
}

/// The listing of a program.
pub fn listing(p: &Program) -> String {
    let mut out = String::new();
    let mut bytes = Vec::new();
    for (insn, slot) in p.insns.iter().zip(p.slots()) {
        bytes.clear();
        insn.encode(&mut bytes);
        let hex: Vec<String> = bytes[..8].iter().map(|b| format!("{b:02x}")).collect();
        let target = match insn {
            Insn::Ja { off } | Insn::Jmp { off, .. } => {
                format!(" <{}>", slot as i64 + 1 + i64::from(*off))
            }
            _ => String::new(),
        };
        let reloc = p
            .map_relocs
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, n)| format!("  ; map {n}"))
            .unwrap_or_default();
        let _ = writeln!(out, "{slot:>5}:\t{}\t{insn}{target}{reloc}", hex.join(" "));
        if insn.slots() == 2 {
            let hex: Vec<String> = bytes[8..].iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(out, "{:>5}:\t{}", slot + 1, hex.join(" "));
        }
    }
    out
}
