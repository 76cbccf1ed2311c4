//! The eBPF instruction set as cnpc uses it: a typed model that encodes to the kernel's 8-byte
//! `struct bpf_insn` (Documentation/bpf/standardization/instruction-set.rst).

use std::fmt;

/// A register, r0 to r10 (r10 is the read-only frame pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reg(pub u8);

pub const R0: Reg = Reg(0);
pub const R1: Reg = Reg(1);
pub const R2: Reg = Reg(2);
pub const R3: Reg = Reg(3);
pub const R4: Reg = Reg(4);
pub const R5: Reg = Reg(5);
pub const R6: Reg = Reg(6);
pub const R7: Reg = Reg(7);
pub const R8: Reg = Reg(8);
pub const R9: Reg = Reg(9);
pub const R10: Reg = Reg(10);

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Width of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Size {
    B,
    H,
    W,
    DW,
}

impl Size {
    pub fn bytes(self) -> u8 {
        match self {
            Size::B => 1,
            Size::H => 2,
            Size::W => 4,
            Size::DW => 8,
        }
    }

    fn code(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }

    fn from_code(c: u8) -> Size {
        match c & 0x18 {
            0x00 => Size::W,
            0x08 => Size::H,
            0x10 => Size::B,
            _ => Size::DW,
        }
    }

    fn c_type(self) -> &'static str {
        match self {
            Size::B => "u8",
            Size::H => "u16",
            Size::W => "u32",
            Size::DW => "u64",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluOp {
    Add,
    Sub,
    Mul,
    Div,
    Or,
    And,
    Lsh,
    Rsh,
    Mod,
    Xor,
    Mov,
    Arsh,
}

impl AluOp {
    fn code(self) -> u8 {
        match self {
            AluOp::Add => 0x00,
            AluOp::Sub => 0x10,
            AluOp::Mul => 0x20,
            AluOp::Div => 0x30,
            AluOp::Or => 0x40,
            AluOp::And => 0x50,
            AluOp::Lsh => 0x60,
            AluOp::Rsh => 0x70,
            AluOp::Mod => 0x90,
            AluOp::Xor => 0xa0,
            AluOp::Mov => 0xb0,
            AluOp::Arsh => 0xc0,
        }
    }

    fn from_code(c: u8) -> Option<AluOp> {
        Some(match c & 0xf0 {
            0x00 => AluOp::Add,
            0x10 => AluOp::Sub,
            0x20 => AluOp::Mul,
            0x30 => AluOp::Div,
            0x40 => AluOp::Or,
            0x50 => AluOp::And,
            0x60 => AluOp::Lsh,
            0x70 => AluOp::Rsh,
            0x90 => AluOp::Mod,
            0xa0 => AluOp::Xor,
            0xb0 => AluOp::Mov,
            0xc0 => AluOp::Arsh,
            _ => return None,
        })
    }

    fn symbol(self) -> &'static str {
        match self {
            AluOp::Add => "+=",
            AluOp::Sub => "-=",
            AluOp::Mul => "*=",
            AluOp::Div => "/=",
            AluOp::Or => "|=",
            AluOp::And => "&=",
            AluOp::Lsh => "<<=",
            AluOp::Rsh => ">>=",
            AluOp::Mod => "%=",
            AluOp::Xor => "^=",
            AluOp::Mov => "=",
            AluOp::Arsh => "s>>=",
        }
    }
}

/// Conditions of conditional jumps (unsigned unless named signed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    Eq,
    Gt,
    Ge,
    Set,
    Ne,
    Sgt,
    Sge,
    Lt,
    Le,
    Slt,
    Sle,
}

impl Cond {
    fn code(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ge => 0x30,
            Cond::Set => 0x40,
            Cond::Ne => 0x50,
            Cond::Sgt => 0x60,
            Cond::Sge => 0x70,
            Cond::Lt => 0xa0,
            Cond::Le => 0xb0,
            Cond::Slt => 0xc0,
            Cond::Sle => 0xd0,
        }
    }

    fn from_code(c: u8) -> Option<Cond> {
        Some(match c & 0xf0 {
            0x10 => Cond::Eq,
            0x20 => Cond::Gt,
            0x30 => Cond::Ge,
            0x40 => Cond::Set,
            0x50 => Cond::Ne,
            0x60 => Cond::Sgt,
            0x70 => Cond::Sge,
            0xa0 => Cond::Lt,
            0xb0 => Cond::Le,
            0xc0 => Cond::Slt,
            0xd0 => Cond::Sle,
            _ => return None,
        })
    }

    fn symbol(self) -> &'static str {
        match self {
            Cond::Eq => "==",
            Cond::Gt => ">",
            Cond::Ge => ">=",
            Cond::Set => "&",
            Cond::Ne => "!=",
            Cond::Sgt => "s>",
            Cond::Sge => "s>=",
            Cond::Lt => "<",
            Cond::Le => "<=",
            Cond::Slt => "s<",
            Cond::Sle => "s<=",
        }
    }
}

/// An operand that is a register or a 32-bit immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Src {
    Reg(Reg),
    Imm(i32),
}

impl fmt::Display for Src {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Src::Reg(r) => write!(f, "{r}"),
            Src::Imm(i) => write!(f, "{i}"),
        }
    }
}

/// One instruction. Jump offsets count instructions (slots) after the next one, as the kernel
/// does; `LdImm64` takes two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Insn {
    /// 64-bit (`alu64`) or 32-bit ALU operation.
    Alu {
        op: AluOp,
        wide: bool,
        dst: Reg,
        src: Src,
    },
    /// `dst = -dst`.
    Neg {
        wide: bool,
        dst: Reg,
    },
    /// Byte swap to big endian of the low `bits` (16, 32, 64).
    ToBe {
        dst: Reg,
        bits: u8,
    },
    /// `dst = imm64`; with `map`, the immediate is a map reference resolved at load time
    /// (BPF_PSEUDO_MAP_FD).
    LdImm64 {
        dst: Reg,
        imm: i64,
        map: bool,
    },
    /// `dst = *(size *)(src + off)`.
    Load {
        size: Size,
        dst: Reg,
        src: Reg,
        off: i16,
    },
    /// `*(size *)(dst + off) = src`.
    Store {
        size: Size,
        dst: Reg,
        off: i16,
        src: Src,
    },
    Ja {
        off: i16,
    },
    Jmp {
        cond: Cond,
        wide: bool,
        dst: Reg,
        src: Src,
        off: i16,
    },
    Call {
        helper: i32,
    },
    Exit,
}

pub const BPF_PSEUDO_MAP_FD: u8 = 1;

const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const MEM: u8 = 0x60;
const IMM: u8 = 0x00;
const X: u8 = 0x08;

fn raw(code: u8, dst: Reg, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst.0 & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

impl Insn {
    /// Slots taken (8 bytes each).
    pub fn slots(&self) -> usize {
        if matches!(self, Insn::LdImm64 { .. }) {
            2
        } else {
            1
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let split = |s: Src| match s {
            Src::Reg(r) => (X, r.0, 0),
            Src::Imm(i) => (0, 0, i),
        };
        match *self {
            Insn::Alu { op, wide, dst, src } => {
                let (x, s, i) = split(src);
                out.extend(raw(
                    if wide { ALU64 } else { ALU } | op.code() | x,
                    dst,
                    s,
                    0,
                    i,
                ));
            }
            Insn::Neg { wide, dst } => {
                out.extend(raw(if wide { ALU64 } else { ALU } | 0x80, dst, 0, 0, 0))
            }
            Insn::ToBe { dst, bits } => out.extend(raw(ALU | 0xd0 | X, dst, 0, 0, i32::from(bits))),
            Insn::LdImm64 { dst, imm, map } => {
                let src = if map { BPF_PSEUDO_MAP_FD } else { 0 };
                out.extend(raw(LD | IMM | Size::DW.code(), dst, src, 0, imm as i32));
                out.extend(raw(0, Reg(0), 0, 0, (imm >> 32) as i32));
            }
            Insn::Load {
                size,
                dst,
                src,
                off,
            } => out.extend(raw(LDX | MEM | size.code(), dst, src.0, off, 0)),
            Insn::Store {
                size,
                dst,
                off,
                src: Src::Reg(s),
            } => out.extend(raw(STX | MEM | size.code(), dst, s.0, off, 0)),
            Insn::Store {
                size,
                dst,
                off,
                src: Src::Imm(i),
            } => out.extend(raw(ST | MEM | size.code(), dst, 0, off, i)),
            Insn::Ja { off } => out.extend(raw(JMP, Reg(0), 0, off, 0)),
            Insn::Jmp {
                cond,
                wide,
                dst,
                src,
                off,
            } => {
                let (x, s, i) = split(src);
                out.extend(raw(
                    if wide { JMP } else { JMP32 } | cond.code() | x,
                    dst,
                    s,
                    off,
                    i,
                ));
            }
            Insn::Call { helper } => out.extend(raw(JMP | 0x80, Reg(0), 0, 0, helper)),
            Insn::Exit => out.extend(raw(JMP | 0x90, Reg(0), 0, 0, 0)),
        }
    }

    /// Decodes the instruction at the start of `b` (8 or 16 bytes).
    pub fn decode(b: &[u8]) -> Result<Insn, DecodeError> {
        if b.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        let code = b[0];
        let dst = Reg(b[1] & 0x0f);
        let src = b[1] >> 4;
        let off = i16::from_le_bytes([b[2], b[3]]);
        let imm = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let operand = if code & X != 0 {
            Src::Reg(Reg(src))
        } else {
            Src::Imm(imm)
        };
        let bad = || DecodeError::Unknown(code);
        Ok(match code & 0x07 {
            LD if code == LD | IMM | Size::DW.code() => {
                if b.len() < 16 {
                    return Err(DecodeError::Truncated);
                }
                let hi = i32::from_le_bytes([b[12], b[13], b[14], b[15]]);
                Insn::LdImm64 {
                    dst,
                    imm: (i64::from(hi) << 32) | i64::from(imm as u32),
                    map: src == BPF_PSEUDO_MAP_FD,
                }
            }
            LDX if code & 0xe0 == MEM => Insn::Load {
                size: Size::from_code(code),
                dst,
                src: Reg(src),
                off,
            },
            STX if code & 0xe0 == MEM => Insn::Store {
                size: Size::from_code(code),
                dst,
                off,
                src: Src::Reg(Reg(src)),
            },
            ST if code & 0xe0 == MEM => Insn::Store {
                size: Size::from_code(code),
                dst,
                off,
                src: Src::Imm(imm),
            },
            ALU | ALU64 => {
                let wide = code & 0x07 == ALU64;
                match code & 0xf0 {
                    0x80 => Insn::Neg { wide, dst },
                    0xd0 if !wide && code & X != 0 => Insn::ToBe {
                        dst,
                        bits: imm as u8,
                    },
                    _ => Insn::Alu {
                        op: AluOp::from_code(code).ok_or_else(bad)?,
                        wide,
                        dst,
                        src: operand,
                    },
                }
            }
            JMP | JMP32 => {
                let wide = code & 0x07 == JMP;
                match code & 0xf0 {
                    0x00 if wide => Insn::Ja { off },
                    0x80 if wide => Insn::Call { helper: imm },
                    0x90 if wide => Insn::Exit,
                    _ => Insn::Jmp {
                        cond: Cond::from_code(code).ok_or_else(bad)?,
                        wide,
                        dst,
                        src: operand,
                        off,
                    },
                }
            }
            _ => return Err(bad()),
        })
    }

    /// Registers the instruction reads.
    pub fn reads(&self) -> Vec<Reg> {
        let src = |s: &Src| match s {
            Src::Reg(r) => vec![*r],
            Src::Imm(_) => vec![],
        };
        match self {
            Insn::Alu {
                op: AluOp::Mov,
                src: s,
                ..
            } => src(s),
            Insn::Alu { dst, src: s, .. } => [vec![*dst], src(s)].concat(),
            Insn::Neg { dst, .. } | Insn::ToBe { dst, .. } => vec![*dst],
            Insn::LdImm64 { .. } | Insn::Ja { .. } => vec![],
            Insn::Load { src, .. } => vec![*src],
            Insn::Store { dst, src: s, .. } => [vec![*dst], src(s)].concat(),
            Insn::Jmp { dst, src: s, .. } => [vec![*dst], src(s)].concat(),
            // Helpers read r1..r5 as their arguments; which ones depends on the helper, so the
            // checker treats calls separately.
            Insn::Call { .. } => vec![],
            Insn::Exit => vec![R0],
        }
    }

    /// The register the instruction writes, if any.
    pub fn writes(&self) -> Option<Reg> {
        match self {
            Insn::Alu { dst, .. }
            | Insn::Neg { dst, .. }
            | Insn::ToBe { dst, .. }
            | Insn::LdImm64 { dst, .. }
            | Insn::Load { dst, .. } => Some(*dst),
            Insn::Call { .. } => Some(R0),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated instruction")]
    Truncated,
    #[error("unknown opcode {0:#04x}")]
    Unknown(u8),
}

impl fmt::Display for Insn {
    /// llvm-objdump's syntax.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = |wide: bool, r: Reg| {
            if wide {
                format!("{r}")
            } else {
                format!("w{}", r.0)
            }
        };
        let ws = |wide: bool, s: Src| match s {
            Src::Reg(r) => w(wide, r),
            Src::Imm(i) => i.to_string(),
        };
        match *self {
            Insn::Alu { op, wide, dst, src } => {
                write!(f, "{} {} {}", w(wide, dst), op.symbol(), ws(wide, src))
            }
            Insn::Neg { wide, dst } => write!(f, "{} = -{}", w(wide, dst), w(wide, dst)),
            Insn::ToBe { dst, bits } => write!(f, "{dst} = be{bits} {dst}"),
            Insn::LdImm64 {
                dst,
                imm,
                map: false,
            } => write!(f, "{dst} = {imm} ll"),
            Insn::LdImm64 {
                dst,
                imm,
                map: true,
            } => write!(f, "{dst} = map[{imm}] ll"),
            Insn::Load {
                size,
                dst,
                src,
                off,
            } => write!(
                f,
                "{dst} = *({} *)({src} {} {})",
                size.c_type(),
                if off < 0 { "-" } else { "+" },
                off.unsigned_abs()
            ),
            Insn::Store {
                size,
                dst,
                off,
                src,
            } => write!(
                f,
                "*({} *)({dst} {} {}) = {src}",
                size.c_type(),
                if off < 0 { "-" } else { "+" },
                off.unsigned_abs()
            ),
            Insn::Ja { off } => write!(f, "goto {off:+}"),
            Insn::Jmp {
                cond,
                wide,
                dst,
                src,
                off,
            } => write!(
                f,
                "if {} {} {} goto {off:+}",
                w(wide, dst),
                cond.symbol(),
                ws(wide, src)
            ),
            Insn::Call { helper } => write!(f, "call {helper}"),
            Insn::Exit => write!(f, "exit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(i: Insn) -> Vec<u8> {
        let mut v = Vec::new();
        i.encode(&mut v);
        v
    }

    #[test]
    fn encodings_match_the_instruction_set_document() {
        // mov64 r0, 0 / exit / ldxw r2, [r1+76] / ld_imm64 map / be16 r5 / jeq r5, 80
        assert_eq!(
            bytes(Insn::Alu {
                op: AluOp::Mov,
                wide: true,
                dst: R0,
                src: Src::Imm(0)
            }),
            [0xb7, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(bytes(Insn::Exit), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            bytes(Insn::Load {
                size: Size::W,
                dst: R2,
                src: R1,
                off: 76
            }),
            [0x61, 0x12, 76, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            bytes(Insn::LdImm64 {
                dst: R1,
                imm: 7,
                map: true
            }),
            [0x18, 0x11, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            bytes(Insn::ToBe { dst: R5, bits: 16 }),
            [0xdc, 0x05, 0, 0, 16, 0, 0, 0]
        );
        assert_eq!(
            bytes(Insn::Jmp {
                cond: Cond::Eq,
                wide: true,
                dst: R5,
                src: Src::Imm(80),
                off: 3
            }),
            [0x15, 0x05, 3, 0, 80, 0, 0, 0]
        );
        assert_eq!(
            bytes(Insn::Jmp {
                cond: Cond::Gt,
                wide: true,
                dst: R4,
                src: Src::Reg(R3),
                off: -1
            }),
            [0x2d, 0x34, 0xff, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(
            bytes(Insn::Store {
                size: Size::DW,
                dst: R10,
                off: -8,
                src: Src::Imm(1)
            }),
            [0x7a, 0x0a, 0xf8, 0xff, 1, 0, 0, 0]
        );
        assert_eq!(bytes(Insn::Call { helper: 1 }), [0x85, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn every_instruction_round_trips() {
        let regs = [R0, R3, R9, R10];
        let mut all = vec![
            Insn::Exit,
            Insn::Ja { off: 5 },
            Insn::Call { helper: 130 },
            Insn::LdImm64 {
                dst: R2,
                imm: -5_000_000_000,
                map: false,
            },
            Insn::LdImm64 {
                dst: R1,
                imm: 3,
                map: true,
            },
        ];
        for &r in &regs {
            for op in [
                AluOp::Add,
                AluOp::Sub,
                AluOp::Mul,
                AluOp::Div,
                AluOp::Or,
                AluOp::And,
                AluOp::Lsh,
                AluOp::Rsh,
                AluOp::Mod,
                AluOp::Xor,
                AluOp::Mov,
                AluOp::Arsh,
            ] {
                for wide in [true, false] {
                    all.push(Insn::Alu {
                        op,
                        wide,
                        dst: r,
                        src: Src::Imm(-7),
                    });
                    all.push(Insn::Alu {
                        op,
                        wide,
                        dst: r,
                        src: Src::Reg(R4),
                    });
                }
            }
            for cond in [
                Cond::Eq,
                Cond::Gt,
                Cond::Ge,
                Cond::Set,
                Cond::Ne,
                Cond::Sgt,
                Cond::Sge,
                Cond::Lt,
                Cond::Le,
                Cond::Slt,
                Cond::Sle,
            ] {
                all.push(Insn::Jmp {
                    cond,
                    wide: true,
                    dst: r,
                    src: Src::Imm(1),
                    off: 2,
                });
                all.push(Insn::Jmp {
                    cond,
                    wide: false,
                    dst: r,
                    src: Src::Reg(R1),
                    off: 9,
                });
            }
            for size in [Size::B, Size::H, Size::W, Size::DW] {
                all.push(Insn::Load {
                    size,
                    dst: r,
                    src: R6,
                    off: -4,
                });
                all.push(Insn::Store {
                    size,
                    dst: r,
                    off: 12,
                    src: Src::Reg(R2),
                });
                all.push(Insn::Store {
                    size,
                    dst: r,
                    off: 12,
                    src: Src::Imm(99),
                });
            }
            all.push(Insn::Neg { wide: true, dst: r });
            all.push(Insn::ToBe { dst: r, bits: 32 });
        }
        for i in all {
            let b = bytes(i);
            assert_eq!(Insn::decode(&b), Ok(i), "{i}");
        }
    }

    #[test]
    fn text_reads_like_llvm_objdump() {
        assert_eq!(
            Insn::Load {
                size: Size::W,
                dst: R2,
                src: R1,
                off: 76
            }
            .to_string(),
            "r2 = *(u32 *)(r1 + 76)"
        );
        assert_eq!(
            Insn::Jmp {
                cond: Cond::Gt,
                wide: true,
                dst: R4,
                src: Src::Reg(R3),
                off: 7
            }
            .to_string(),
            "if r4 > r3 goto +7"
        );
        assert_eq!(
            Insn::Alu {
                op: AluOp::Add,
                wide: false,
                dst: R1,
                src: Src::Imm(2)
            }
            .to_string(),
            "w1 += 2"
        );
        assert_eq!(Insn::ToBe { dst: R5, bits: 16 }.to_string(), "r5 = be16 r5");
    }
}
