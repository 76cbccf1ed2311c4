//! `cnpc verify DIR`: every program of a compiled directory through cnpc's static checker and
//! the kernel verifier (BPF_PROG_LOAD), with the maps of the manifest created (and filled from
//! their images) so map references resolve as they will when loaded for real.

use crate::sys;
use cnpc_codegen_bpf::{check, disasm, Program};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("cannot create map `{map}`: {source}")]
    Map { map: String, source: std::io::Error },
}

/// One program's outcome.
#[derive(Debug)]
pub struct Verified {
    pub identity: u32,
    pub section: String,
    pub instructions: usize,
    /// How the program decides (`gen::Strategy`), as the manifest records it.
    pub strategy: String,
    /// The verifier's "processed N insns", when it reports it.
    pub processed: Option<u64>,
    pub load_time: Duration,
    /// The reason for a rejection (cnpc's checker or the kernel's), if rejected.
    pub rejected: Option<String>,
}

fn artifact(path: &Path, message: impl Into<String>) -> VerifyError {
    VerifyError::Artifact {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub fn verify_dir(dir: &Path) -> Result<Vec<Verified>, VerifyError> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| artifact(&manifest_path, format!("not a compiled directory: {e}")))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| artifact(&manifest_path, e.to_string()))?;
    // The maps, filled from their images.
    let mut maps = Vec::new();
    for m in manifest["maps"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or("").to_string();
        let num = |k: &str| m[k].as_u64().unwrap_or(0) as u32;
        let (key_size, value_size) = (num("key_size"), num("value_size"));
        let fd = sys::create_map(
            num("map_type"),
            key_size,
            value_size,
            num("max_entries"),
            num("flags"),
        )
        .map_err(|source| VerifyError::Map {
            map: name.clone(),
            source,
        })?;
        let Some(image) = m["image"].as_str() else {
            maps.push((name, fd));
            continue;
        };
        let image_path = dir.join(image);
        let image = std::fs::read(&image_path).map_err(|e| artifact(&image_path, e.to_string()))?;
        let record = (key_size + value_size) as usize;
        if record == 0 || image.len() % record != 0 {
            return Err(artifact(
                &image_path,
                format!(
                    "image size {} is not a multiple of the record size {record}",
                    image.len()
                ),
            ));
        }
        for r in image.chunks(record) {
            sys::map_update(&fd, &r[..key_size as usize], &r[key_size as usize..]).map_err(
                |source| VerifyError::Map {
                    map: name.clone(),
                    source,
                },
            )?;
        }
        maps.push((name, fd));
    }
    let mut out = Vec::new();
    for p in manifest["programs"].as_array().into_iter().flatten() {
        let identity = p["identity"].as_u64().unwrap_or(0) as u32;
        let path = dir.join(p["file"].as_str().unwrap_or(""));
        let bytes = std::fs::read(&path).map_err(|e| artifact(&path, e.to_string()))?;
        let obj = object::File::parse(&*bytes)
            .map_err(|e| artifact(&path, format!("not an ELF object: {e}")))?;
        for sec in obj
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with("classifier/")))
        {
            let section = sec.name().unwrap_or("?").to_string();
            let mut code = sec
                .data()
                .map_err(|e| artifact(&path, e.to_string()))?
                .to_vec();
            // Resolve map references: the relocation names the map's symbol.
            for (offset, reloc) in sec.relocations() {
                let RelocationTarget::Symbol(sym) = reloc.target() else {
                    continue;
                };
                let name = obj
                    .symbol_by_index(sym)
                    .and_then(|s| s.name().map(str::to_string))
                    .map_err(|e| artifact(&path, e.to_string()))?;
                let fd = maps
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, fd)| fd.as_raw_fd())
                    .ok_or_else(|| {
                        artifact(&path, format!("{section} refers to unknown map `{name}`"))
                    })?;
                let at = offset as usize + 4;
                code.get_mut(at..at + 4)
                    .ok_or_else(|| artifact(&path, "relocation outside the section"))?
                    .copy_from_slice(&fd.to_le_bytes());
            }
            let insns =
                disasm::decode(&code).map_err(|e| artifact(&path, format!("{section}: {e}")))?;
            let program = Program {
                insns,
                map_relocs: Vec::new(),
            };
            let instructions = program.slot_count();
            let strategy = p["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["section"] == section.as_str())
                .and_then(|e| e["strategy"].as_str())
                .unwrap_or("?")
                .to_string();
            let mut v = Verified {
                identity,
                section: section.clone(),
                instructions,
                strategy,
                processed: None,
                load_time: Duration::ZERO,
                rejected: None,
            };
            if let Err(errors) = check::check(&program) {
                v.rejected = Some(format!(
                    "cnpc's checker: {}",
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
                out.push(v);
                continue;
            }
            let start = Instant::now();
            match sys::load_logged(sys::BPF_PROG_TYPE_SCHED_CLS, &code, sys::LOG_LEVEL_STATS) {
                Ok((_fd, log)) => {
                    v.load_time = start.elapsed();
                    v.processed = log
                        .split("processed ")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|n| n.parse().ok());
                }
                Err(e) => {
                    v.load_time = start.elapsed();
                    // The statistics level says little about a rejection: get the trace.
                    let trace =
                        sys::load_logged(sys::BPF_PROG_TYPE_SCHED_CLS, &code, sys::LOG_LEVEL_TRACE)
                            .err()
                            .unwrap_or(e);
                    v.rejected = Some(format!("kernel verifier: {trace}"));
                }
            }
            out.push(v);
        }
    }
    Ok(out)
}
