//! The output directory of `cnpc compile` (DESIGN.md §6):
//!
//! ```text
//! DIR/manifest.json        inputs' hashes, identities with labels and endpoints, programs with
//!                          file, section, instruction count and sha256, maps with their layout
//! DIR/programs/<id>.o      ELF with `classifier/ingress` and `classifier/egress`; identities
//!                          whose programs are identical share one file
//! DIR/maps/ipcache.bin     the ipcache image: records of key (24 bytes) then value (4 bytes)
//! ```
//!
//! Byte-identical for identical inputs; written to a temporary directory beside DIR and renamed
//! into place, so a reader never sees a half-written directory (replacing an existing DIR takes
//! two renames, between which DIR is briefly absent).

use crate::elf::{self, MapDef};
use crate::gen;
use cnpc_ir::{DecisionTable, Direction, IpNet, NumericIdentity, Program};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The ipcache map as programs read it.
pub fn ipcache_def(max_entries: u32) -> MapDef {
    MapDef {
        name: gen::IPCACHE_MAP.into(),
        map_type: 11,
        key_size: gen::IPCACHE_KEY_SIZE,
        value_size: gen::IPCACHE_VALUE_SIZE,
        max_entries,
        flags: 1,
    }
}

/// An ipcache key for a prefix: prefix length (family word + address bits), family, address.
pub fn ipcache_key(net: IpNet) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[0..4].copy_from_slice(&(32 + u32::from(net.prefix_len())).to_le_bytes());
    match net {
        IpNet::V4(n) => {
            k[4..8].copy_from_slice(&4u32.to_le_bytes());
            k[8..12].copy_from_slice(&n.network().octets());
        }
        IpNet::V6(n) => {
            k[4..8].copy_from_slice(&6u32.to_le_bytes());
            k[8..24].copy_from_slice(&n.network().octets());
        }
    }
    k
}

/// Everything `cnpc compile` writes, in memory: relative path → bytes.
pub fn render(
    program: &Program,
    tables: &[DecisionTable],
    ipcache: &[(IpNet, NumericIdentity)],
    inputs: &[(String, String)],
) -> Result<BTreeMap<String, Vec<u8>>, ArtifactError> {
    let mut files = BTreeMap::new();
    let max_entries = (ipcache.len() as u32 * 2).max(65_536);
    let maps = [ipcache_def(max_entries)];
    // Programs per identity, shared between identities whose code is identical.
    let mut by_subject: BTreeMap<NumericIdentity, Vec<&DecisionTable>> = BTreeMap::new();
    for t in tables {
        by_subject.entry(t.subject).or_default().push(t);
    }
    let mut objects: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut program_entries = Vec::new();
    for (subject, ts) in by_subject {
        let mut sections = Vec::new();
        let generated: Vec<(Direction, crate::Program)> =
            ts.iter().map(|t| (t.direction, gen::generate(t))).collect();
        let named: Vec<(String, String, &crate::Program)> = generated
            .iter()
            .map(|(d, p)| {
                (
                    format!("classifier/{}", d.as_str()),
                    d.as_str().to_string(),
                    p,
                )
            })
            .collect();
        let bytes = elf::write_object(&named, &maps)?;
        let file = match objects.get(&bytes) {
            Some(f) => f.clone(),
            None => {
                let f = format!("programs/{}.o", subject.0);
                objects.insert(bytes.clone(), f.clone());
                files.insert(f.clone(), bytes);
                f
            }
        };
        for (d, p) in &generated {
            sections.push(json!({"section": format!("classifier/{}", d.as_str()), "direction": d.as_str(), "instructions": p.slot_count(), "sha256": sha256(&p.bytes())}));
        }
        program_entries.push(json!({"identity": subject.0, "file": file, "programs": sections}));
    }
    let mut image = Vec::with_capacity(ipcache.len() * 28);
    let mut entries: Vec<([u8; 24], u32)> = ipcache
        .iter()
        .map(|(n, id)| (ipcache_key(*n), id.0))
        .collect();
    entries.sort();
    entries.dedup();
    for (k, v) in &entries {
        image.extend(k);
        image.extend(v.to_le_bytes());
    }
    let identities: Vec<Value> = program
        .identities
        .iter()
        .map(|(r, id)| {
            let endpoints: Vec<&str> = program.endpoints.values().filter(|e| e.identity == r && e.is_pod).map(|e| e.name.as_str()).collect();
            json!({"identity": id.numeric.0, "labels": id.labels.to_strings(), "endpoints": endpoints})
        })
        .collect();
    let manifest = json!({
        "format": 1,
        "inputs": inputs.iter().map(|(f, h)| json!({"file": f, "sha256": h})).collect::<Vec<_>>(),
        "identities": identities,
        "programs": program_entries,
        "maps": [{
            "name": gen::IPCACHE_MAP,
            "type": "lpm_trie",
            "key_size": gen::IPCACHE_KEY_SIZE,
            "value_size": gen::IPCACHE_VALUE_SIZE,
            "max_entries": max_entries,
            "key_layout": "u32 prefix length (32 + address bits), u32 family (4 or 6), u8[16] address",
            "value_layout": "u32 identity",
            "image": "maps/ipcache.bin",
            "entries": entries.len(),
        }],
    });
    files.insert("maps/ipcache.bin".into(), image);
    files.insert(
        "manifest.json".into(),
        format!("{manifest:#}\n").into_bytes(),
    );
    Ok(files)
}

/// Writes `files` as directory `dir`, atomically: a temporary directory beside it, renamed into
/// place (an existing `dir` is replaced whole).
pub fn write_dir(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<(), ArtifactError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArtifactError::Io { path, source }
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in files {
        let path = tmp.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io(p))?;
        }
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(io(dir)(e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}
