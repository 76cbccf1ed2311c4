//! ELF objects as BPF loaders read them: programs in `classifier/...` sections, maps in the
//! legacy `maps` section (`struct bpf_map_def`), `R_BPF_64_64` relocations at each map load, and
//! a `license` section. Written with the `object` crate; aya-obj parses every object we write
//! (tested). Output is byte-identical for identical input.

use crate::asm::Program;
use object::elf::R_BPF_64_64;
use object::write::{Object, Relocation, Symbol, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
};

/// A map definition, as the legacy `maps` section holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("program `{program}` refers to map `{map}`, which is not defined")]
    UnknownMap { program: String, map: String },
    #[error("writing the object: {0}")]
    Write(String),
}

/// One object file holding `programs` (section name, symbol name, code) and `maps`.
pub fn write_object(
    programs: &[(String, String, &Program)],
    maps: &[MapDef],
) -> Result<Vec<u8>, ElfError> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    let maps_section = obj.add_section(Vec::new(), b"maps".to_vec(), SectionKind::Data);
    let mut map_symbols = Vec::new();
    for m in maps {
        let mut def = Vec::with_capacity(20);
        for v in [m.map_type, m.key_size, m.value_size, m.max_entries, m.flags] {
            def.extend(v.to_le_bytes());
        }
        let offset = obj.append_section_data(maps_section, &def, 4);
        let sym = obj.add_symbol(Symbol {
            name: m.name.as_bytes().to_vec(),
            value: offset,
            size: def.len() as u64,
            kind: SymbolKind::Data,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Section(maps_section),
            flags: SymbolFlags::None,
        });
        map_symbols.push((m.name.clone(), sym));
    }
    for (section, name, program) in programs {
        let sec = obj.add_section(Vec::new(), section.as_bytes().to_vec(), SectionKind::Text);
        let code = program.bytes();
        obj.append_section_data(sec, &code, 8);
        obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: code.len() as u64,
            kind: SymbolKind::Text,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Section(sec),
            flags: SymbolFlags::None,
        });
        for (slot, map) in &program.map_relocs {
            let symbol = map_symbols
                .iter()
                .find(|(n, _)| n == map)
                .map(|(_, s)| *s)
                .ok_or_else(|| ElfError::UnknownMap {
                    program: name.clone(),
                    map: map.clone(),
                })?;
            obj.add_relocation(
                sec,
                Relocation {
                    offset: (*slot * 8) as u64,
                    symbol,
                    addend: 0,
                    flags: RelocationFlags::Elf {
                        r_type: R_BPF_64_64,
                    },
                },
            )
            .map_err(|e| ElfError::Write(e.to_string()))?;
        }
    }
    let lic = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(lic, b"GPL\0", 1);
    obj.write().map_err(|e| ElfError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen;
    use cnpc_ir::*;

    fn table(direction: Direction) -> DecisionTable {
        DecisionTable {
            subject: NumericIdentity(400),
            direction,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(300)],
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
                verdict: TableVerdict::Allow,
            }],
        }
    }

    fn maps() -> Vec<MapDef> {
        gen::shared_maps(10)
    }

    #[test]
    fn aya_obj_parses_what_we_write() {
        let ingress = gen::generate(&table(Direction::Ingress), true).program;
        let egress = gen::generate(&table(Direction::Egress), true).program;
        let bytes = write_object(
            &[
                ("classifier/ingress".into(), "ingress".into(), &ingress),
                ("classifier/egress".into(), "egress".into(), &egress),
            ],
            &maps(),
        )
        .unwrap();
        let obj = aya_obj::Object::parse(&bytes).expect("aya-obj parses the object");
        let mut programs: Vec<&String> = obj.programs.keys().collect();
        programs.sort();
        assert_eq!(programs, ["egress", "ingress"]);
        for def in maps() {
            let map = obj.maps.get(&def.name).expect("every map");
            assert_eq!(
                (
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                ),
                (def.map_type, def.key_size, def.value_size, def.max_entries),
                "{}",
                def.name
            );
        }
        assert_eq!(obj.license.to_str().unwrap(), "GPL");
        // The instructions aya sees are ours.
        let f = obj
            .functions
            .values()
            .find(|f| f.name == "ingress")
            .unwrap();
        assert_eq!(f.instructions.len(), ingress.slot_count());
    }

    #[test]
    fn output_is_byte_identical_across_runs() {
        let p = gen::generate(&table(Direction::Ingress), true).program;
        let a = write_object(
            &[("classifier/ingress".into(), "ingress".into(), &p)],
            &maps(),
        )
        .unwrap();
        let b = write_object(
            &[("classifier/ingress".into(), "ingress".into(), &p)],
            &maps(),
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_maps_are_an_error() {
        let p = gen::generate(&table(Direction::Ingress), true).program;
        assert!(write_object(&[("classifier/ingress".into(), "ingress".into(), &p)], &[]).is_err());
    }
}
