//! The output directory of `cnpc compile` (DESIGN.md §6):
//!
//! ```text
//! DIR/manifest.json        inputs' hashes, identities with labels and endpoints, programs with
//!                          file, section, instruction count and sha256, maps with their layout
//! DIR/programs/<id>.o      ELF with `classifier/ingress` and `classifier/egress`; identities
//!                          whose programs are identical share one file
//! DIR/maps/ipcache.bin     the ipcache's prefixes: records of key (24 bytes) then value (4 bytes)
//! DIR/maps/ipcache_hosts.bin  its host addresses: key (20 bytes) then value (4 bytes)
//! DIR/maps/fqdn.bin        addresses learned from DNS: empty at compile time (the loader fills
//!                          the node's shared map at run time), listed so every map the
//!                          programs read has an entry and an image
//! DIR/maps/<name>.bin      images of the maps large tables are decided with: `cls_*`
//!                          (identity → class), `prt_*` (exact ports), `rng_*` (port
//!                          prefixes), keyed by identity or by class as the program's
//!                          `map_keys` says in the manifest (`gen::MapKeys`)
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
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
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

/// The key of an address in the host map ([`gen::HOSTS_MAP`]) and in the map of addresses
/// learned from DNS ([`gen::FQDN_MAP`]): `u32 family (4 or 6), u8[16] address` (IPv4 in the
/// first four bytes), the ipcache key without its prefix length.
pub fn fqdn_key(ip: IpAddr) -> Vec<u8> {
    ipcache_key(IpNet::from(ip))[4..].to_vec()
}

fn map_type_name(t: u32) -> &'static str {
    match t {
        gen::BPF_MAP_TYPE_HASH => "hash",
        gen::BPF_MAP_TYPE_LRU_HASH => "lru_hash",
        gen::BPF_MAP_TYPE_LPM_TRIE => "lpm_trie",
        gen::BPF_MAP_TYPE_RINGBUF => "ringbuf",
        _ => "other",
    }
}

fn map_entry(
    def: &MapDef,
    key_layout: &str,
    value_layout: &str,
    image: Option<(String, usize)>,
) -> Value {
    let mut m = json!({
        "name": def.name,
        "type": map_type_name(def.map_type),
        "map_type": def.map_type,
        "key_size": def.key_size,
        "value_size": def.value_size,
        "max_entries": def.max_entries,
        "flags": def.flags,
        "key_layout": key_layout,
        "value_layout": value_layout,
    });
    if let Some((path, entries)) = image {
        m["image"] = json!(path);
        m["entries"] = json!(entries);
    }
    m
}

/// A map image: its records back to back, key then value.
fn image_bytes(records: &[gen::Record]) -> Vec<u8> {
    records
        .iter()
        .flat_map(|(k, v)| k.iter().chain(v))
        .copied()
        .collect()
}

/// Whether an ipcache entry goes to the host map ([`gen::HOSTS_MAP`]): endpoints and nodes
/// only. A CIDR rule's /32 (a local-scope identity) goes to the trie, after the learned
/// addresses.
pub fn is_host_entry(net: IpNet, id: NumericIdentity) -> bool {
    net.prefix_len() == net.max_prefix_len() && id.0 < cnpc_ir::FIRST_LOCAL_IDENTITY
}

/// The ipcache as map records: (prefix LPM records, host hash records), each sorted.
pub fn ipcache_images(
    ipcache: &[(IpNet, NumericIdentity)],
) -> (Vec<gen::Record>, Vec<gen::Record>) {
    let (mut prefixes, mut hosts) = (Vec::new(), Vec::new());
    for (n, id) in ipcache {
        let key = ipcache_key(*n);
        let value = id.0.to_le_bytes().to_vec();
        if is_host_entry(*n, *id) {
            hosts.push((key[4..].to_vec(), value));
        } else {
            prefixes.push((key.to_vec(), value));
        }
    }
    for list in [&mut prefixes, &mut hosts] {
        list.sort();
        list.dedup();
    }
    (prefixes, hosts)
}

/// What a subject's programs depend on: its tables without the subject (programs name no
/// identity of their own, see [`gen`]'s events) and whether it tracks connections.
type ProgramKey<'t> = (
    Vec<(
        Direction,
        &'t cnpc_ir::TableVerdict,
        &'t [cnpc_ir::IdentityClass],
        &'t [cnpc_ir::TableRow],
    )>,
    bool,
);

/// Everything `cnpc compile` writes, in memory: relative path → bytes.
pub fn render(
    program: &Program,
    tables: &[DecisionTable],
    ipcache: &[(IpNet, NumericIdentity)],
    inputs: &[(String, String)],
) -> Result<BTreeMap<String, Vec<u8>>, ArtifactError> {
    let mut files = BTreeMap::new();
    let shared = gen::shared_maps(ipcache.len());
    // Programs per identity, shared between identities whose objects are identical.
    let mut by_subject: BTreeMap<NumericIdentity, Vec<&DecisionTable>> = BTreeMap::new();
    for t in tables {
        by_subject.entry(t.subject).or_default().push(t);
    }
    // Identities whose tables are equal get equal programs: each is generated once (a table
    // shared by many identities would otherwise be generated, written and compared again for
    // every one of them).
    let mut done: HashMap<ProgramKey, (String, Vec<Value>)> = HashMap::new();
    let mut objects: HashMap<Vec<u8>, String> = HashMap::new();
    let mut own_maps: BTreeMap<String, gen::MapImage> = BTreeMap::new();
    let mut program_entries = Vec::new();
    for (subject, ts) in by_subject {
        let track = gen::needs_tracking(ts.iter().copied());
        let key: ProgramKey = (
            ts.iter()
                .map(|t| {
                    (
                        t.direction,
                        &t.default,
                        t.classes.as_slice(),
                        t.rows.as_slice(),
                    )
                })
                .collect(),
            track,
        );
        if let Some((file, sections)) = done.get(&key) {
            program_entries.push(json!({"identity": subject.0, "file": file, "conntrack": track, "programs": sections}));
            continue;
        }
        let generated: Vec<(Direction, gen::Generated)> = ts
            .iter()
            .map(|t| (t.direction, gen::generate(t, track)))
            .collect();
        let named: Vec<(String, String, &crate::Program)> = generated
            .iter()
            .map(|(d, g)| {
                (
                    format!("classifier/{}", d.as_str()),
                    d.as_str().to_string(),
                    &g.program,
                )
            })
            .collect();
        let mut maps = shared.clone();
        for (_, g) in &generated {
            maps.extend(g.maps.iter().map(|m| m.def.clone()));
        }
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
        let sections: Vec<Value> = generated
            .iter()
            .map(|(d, g)| {
                let mut s = json!({
                    "section": format!("classifier/{}", d.as_str()),
                    "direction": d.as_str(),
                    "instructions": g.program.slot_count(),
                    "strategy": g.strategy.as_str(),
                    "maps": g.maps.iter().map(|m| m.def.name.clone()).collect::<Vec<_>>(),
                    "sha256": sha256(&g.program.bytes()),
                });
                if let Some(keys) = g.map_keys() {
                    s["map_keys"] = json!(keys.as_str());
                }
                s
            })
            .collect();
        program_entries.push(
            json!({"identity": subject.0, "file": file, "conntrack": track, "programs": sections}),
        );
        for (_, g) in generated {
            for m in g.maps {
                own_maps.entry(m.def.name.clone()).or_insert(m);
            }
        }
        done.insert(key, (file, sections));
    }
    let (entries, hosts) = ipcache_images(ipcache);
    // Pod endpoints per identity, in endpoint order, gathered once.
    let mut endpoints_of: HashMap<cnpc_ir::IdentityRef, Vec<&str>> = HashMap::new();
    for e in program.endpoints.values().filter(|e| e.is_pod) {
        endpoints_of
            .entry(e.identity)
            .or_default()
            .push(e.name.as_str());
    }
    let identities: Vec<Value> = program
        .identities
        .iter()
        .map(|(r, id)| {
            let endpoints = endpoints_of.get(&r).map_or(&[][..], Vec::as_slice);
            json!({"identity": id.numeric.0, "labels": id.labels.to_strings(), "endpoints": endpoints})
        })
        .collect();
    let shared_def = |name: &str| {
        shared
            .iter()
            .find(|m| m.name == name)
            .expect("gen::shared_maps defines every shared map")
    };
    let mut map_entries = vec![
        map_entry(
            shared_def(gen::IPCACHE_MAP),
            "u32 prefix length (32 + address bits), u32 family (4 or 6), u8[16] address",
            "u32 identity",
            Some(("maps/ipcache.bin".into(), entries.len())),
        ),
        map_entry(
            shared_def(gen::HOSTS_MAP),
            "u32 family (4 or 6), u8[16] address",
            "u32 identity",
            Some(("maps/ipcache_hosts.bin".into(), hosts.len())),
        ),
        map_entry(
            shared_def(gen::FQDN_MAP),
            "u32 family (4 or 6), u8[16] address",
            "u32 FQDN identity",
            Some(("maps/fqdn.bin".into(), 0)),
        ),
        map_entry(
            shared_def(gen::CT_MAP),
            "u8[16] local address, u8[16] peer address, be16 local port, be16 peer port, u8 protocol, u8 family, u16 zero",
            "u32 opened by (1 the endpoint, 2 a peer), u32 flags (1 proxied)",
            None,
        ),
        map_entry(
            shared_def(gen::EVENTS_MAP),
            "",
            "verdict events of 24 bytes: u32 subject, u32 peer, u32 row, u16 port, u8 protocol, u8 verdict, u8 direction, u8 family, u16 zero, u32 zero",
            None,
        ),
        map_entry(
            shared_def(gen::PROXY_CONFIG_MAP),
            "u32 zero",
            "u32 proxy device ifindex (0: none), u32 zero[3]",
            None,
        ),
    ];
    files.insert("maps/ipcache.bin".into(), image_bytes(&entries));
    files.insert("maps/ipcache_hosts.bin".into(), image_bytes(&hosts));
    files.insert("maps/fqdn.bin".into(), Vec::new());
    for (name, m) in &own_maps {
        let path = format!("maps/{name}.bin");
        map_entries.push(map_entry(
            &m.def,
            m.key_layout,
            m.value_layout,
            Some((path.clone(), m.records.len())),
        ));
        files.insert(path, image_bytes(&m.records));
    }
    let manifest = json!({
        "format": 1,
        "inputs": inputs.iter().map(|(f, h)| json!({"file": f, "sha256": h})).collect::<Vec<_>>(),
        "identities": identities,
        "programs": program_entries,
        "maps": map_entries,
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::{IdentityClass, PortRange, Protocol, TableRow, TableVerdict};

    fn table(subject: u32, direction: Direction, members: u32, lo: u16, hi: u16) -> DecisionTable {
        DecisionTable {
            subject: NumericIdentity(subject),
            direction,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: (1000..1000 + members).map(NumericIdentity).collect(),
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange { lo, hi },
                verdict: TableVerdict::Allow,
            }],
        }
    }

    /// Identities with equal tables share one object and one manifest entry's sections; a
    /// table decided by maps says how they are keyed, and its images are written.
    #[test]
    fn equal_tables_share_programs_and_maps_say_their_keys() {
        let mut tables = Vec::new();
        for subject in [300, 301] {
            tables.push(table(subject, Direction::Ingress, 200, 1025, 9000));
            tables.push(table(subject, Direction::Egress, 3, 80, 80));
        }
        tables.push(table(302, Direction::Ingress, 200, 1025, 9001));
        tables.push(table(302, Direction::Egress, 3, 80, 80));
        let files = render(&Program::default(), &tables, &[], &[]).expect("rendered in memory");
        let objects: Vec<&String> = files.keys().filter(|f| f.ends_with(".o")).collect();
        assert_eq!(objects, ["programs/300.o", "programs/302.o"]);
        let manifest: Value =
            serde_json::from_slice(&files["manifest.json"]).expect("the manifest is JSON");
        let programs = manifest["programs"].as_array().expect("programs");
        assert_eq!(programs.len(), 3);
        assert_eq!(programs[1]["file"], "programs/300.o");
        assert_eq!(programs[0]["programs"], programs[1]["programs"]);
        assert_ne!(programs[0]["programs"], programs[2]["programs"]);
        let ingress = &programs[0]["programs"][0];
        assert_eq!(ingress["strategy"], "maps");
        assert_eq!(ingress["map_keys"], "class");
        assert!(programs[0]["programs"][1].get("map_keys").is_none());
        for name in ingress["maps"].as_array().expect("maps") {
            let name = name.as_str().expect("a map name");
            assert!(files.contains_key(&format!("maps/{name}.bin")), "{name}");
        }
        // 200 members once, plus the range's prefixes: not 200 × the prefixes.
        let bytes: usize = files
            .iter()
            .filter(|(f, _)| f.starts_with("maps/cls_") || f.starts_with("maps/rng_"))
            .map(|(_, b)| b.len())
            .sum();
        assert!(bytes < 200 * 8 + 2 * 20 * 20, "{bytes} bytes of images");
    }
}
