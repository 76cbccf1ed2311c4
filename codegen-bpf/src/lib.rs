//! cnpc's BPF back end.
//!
//! Turns decision tables from `cnpc-ir` into specialised, verifier-friendly BPF programs (DESIGN.md
//! §6). This crate holds the typed instruction model ([`insn`]), an assembler with labels and
//! back-patched jumps ([`asm`]), a disassembler whose listing reads like llvm-objdump's
//! ([`disasm`]) and cnpc's own static checker ([`check`]). No C compiler or LLVM is involved. It
//! makes no syscalls outside its tests.

pub mod artifacts;
pub mod asm;
pub mod check;
pub mod disasm;
pub mod elf;
pub mod gen;
pub mod insn;

pub use asm::{Asm, Label, Program};
