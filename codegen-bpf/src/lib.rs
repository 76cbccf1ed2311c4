//! cnpc's BPF back end.
//!
//! Turns decision tables from `cnpc-ir` into specialised, verifier-friendly BPF programs, ELF
//! objects and map images (`DESIGN.md` §6), with an instruction builder, a static checker and a
//! disassembler. It makes no syscalls outside its tests. Filled in by the BPF back-end work; until
//! then it holds only this description.
