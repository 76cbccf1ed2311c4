//! The ipcache maps programs read (`gen::IPCACHE_MAP`, the prefixes' LPM trie, and
//! `gen::HOSTS_MAP`, the endpoints' and nodes' addresses), kept across generations and changed
//! in place.
//!
//! A generation whose programs are the same as the last one's but whose ipcache differs (a pod
//! elsewhere relabelled, started or stopped: its address takes another identity) needs no
//! program loaded: the running programs get the new entries written into the maps they already
//! read, as Cilium writes its one `cilium_ipcache` map in place while its programs run
//! (pkg/maps/ipcache, updated by pkg/ipcache as identities change). Loading and verifying a
//! program costs milliseconds each; an entry costs a system call.
//!
//! # Why a packet sees the old or the new answer, never a third
//! Entries change one system call at a time while packets are decided, so [`changes`] orders
//! them. A program finds an address's identity in the host map (exact match) and, on a miss,
//! the longest prefix of the trie holding it. Writing, in this order:
//! 1. host entries added or changed;
//! 2. prefixes added or changed, **longest first**;
//! 3. prefixes removed, **shortest first**;
//! 4. host entries removed,
//!
//! every lookup between two steps answers what the old maps answer or what the new ones do.
//! Host map: each key changes once, and an address with an old or a new host entry has one
//! from step 1 to step 4 (old value, then new), which shadows the trie throughout. Trie, for an
//! address `a` whose longest old prefix is `o` and longest new prefix `n`: in step 2, before
//! `n` is written no prefix holding `a` has changed and the answer is `o`; once it is (it is
//! the first holding `a` to be written, being the longest), the answer is the longer of `n`
//! and the old prefixes holding `a` still there, that is `o` if `o` is longer than `n` (then
//! `o` is one removed, or it would be a longer new prefix) and `n` otherwise. In step 3 the
//! removed prefixes holding `a` go shortest first, so while one longer than `n` remains, `o`
//! (the longest of them) does and answers; then `n` does.
//!
//! The old or the new answer is what the switch of programs gives too: hooks switch one at a
//! time. The loader changes maps in place only under programs whose own code and maps are the
//! same for both ipcaches (`loader`), so each of their packets is decided as one of the two
//! generations decides it.

use cnpc_codegen_bpf::artifacts;
use cnpc_codegen_bpf::gen::{self, Record};
use cnpc_ir::{IpNet, NumericIdentity};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

/// A map's records, by key.
pub type MapRecords = BTreeMap<Vec<u8>, Vec<u8>>;

/// An ipcache's contents as the two maps hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpcacheImage {
    /// LPM trie records (`gen::IPCACHE_MAP`), by key.
    pub prefixes: MapRecords,
    /// Host map records (`gen::HOSTS_MAP`), by key.
    pub hosts: MapRecords,
    /// sha256 of both, to compare generations by.
    pub digest: [u8; 32],
}

impl IpcacheImage {
    pub fn new(ipcache: &[(IpNet, NumericIdentity)]) -> IpcacheImage {
        let (prefixes, hosts) = artifacts::ipcache_images(ipcache);
        let mut digest = Sha256::new();
        for (k, v) in prefixes.iter().chain(&hosts) {
            digest.update(k);
            digest.update(v);
        }
        // Filled in order, a later record of a key wins, as it does in a map filled in order.
        IpcacheImage {
            prefixes: prefixes.into_iter().collect(),
            hosts: hosts.into_iter().collect(),
            digest: digest.finalize().into(),
        }
    }

    /// Records of each map, for filling new maps.
    pub fn records(&self) -> [(&'static str, Vec<Record>); 2] {
        let list = |m: &MapRecords| -> Vec<Record> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        [
            (gen::IPCACHE_MAP, list(&self.prefixes)),
            (gen::HOSTS_MAP, list(&self.hosts)),
        ]
    }

    /// Entries of both maps (the ipcache's entries): what `gen::shared_maps` sizes them by.
    pub fn entries(&self) -> usize {
        self.prefixes.len() + self.hosts.len()
    }
}

/// One write to an ipcache map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    Put {
        map: &'static str,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        map: &'static str,
        key: &'a [u8],
    },
}

/// The prefix length an LPM key starts with.
fn prefix_len(key: &[u8]) -> u32 {
    key.get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The writes that turn maps holding `old` into maps holding `new`, in the order that lets
/// every lookup in between answer as `old` or `new` does (module doc).
pub fn changes<'a>(old: &'a IpcacheImage, new: &'a IpcacheImage) -> Vec<Change<'a>> {
    let puts = |map: &'static str, o: &'a MapRecords, n: &'a MapRecords| {
        n.iter().filter(move |(k, v)| o.get(*k) != Some(*v)).map(
            move |(k, v): (&'a Vec<u8>, &'a Vec<u8>)| Change::Put {
                map,
                key: k,
                value: v,
            },
        )
    };
    let deletes = |map: &'static str, o: &'a MapRecords, n: &'a MapRecords| {
        o.keys()
            .filter(move |k| !n.contains_key(*k))
            .map(move |k: &'a Vec<u8>| Change::Delete { map, key: k })
    };
    let length = |c: &Change| match c {
        Change::Put { key, .. } | Change::Delete { key, .. } => prefix_len(key),
    };
    let mut prefix_puts: Vec<Change> =
        puts(gen::IPCACHE_MAP, &old.prefixes, &new.prefixes).collect();
    prefix_puts.sort_by_key(|c| std::cmp::Reverse(length(c)));
    let mut prefix_deletes: Vec<Change> =
        deletes(gen::IPCACHE_MAP, &old.prefixes, &new.prefixes).collect();
    prefix_deletes.sort_by_key(length);
    puts(gen::HOSTS_MAP, &old.hosts, &new.hosts)
        .chain(prefix_puts)
        .chain(prefix_deletes)
        .chain(deletes(gen::HOSTS_MAP, &old.hosts, &new.hosts))
        .collect()
}

/// Why maps could not be changed in place.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} an entry of the {map} map: {source}")]
pub struct ChangeError {
    pub action: &'static str,
    pub map: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Writes `changes` into `maps` (by map name), in order.
pub fn write(maps: &BTreeMap<String, OwnedFd>, changes: &[Change]) -> Result<(), ChangeError> {
    let fd = |map: &'static str, action| {
        maps.get(map).ok_or_else(|| ChangeError {
            action,
            map,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    };
    for c in changes {
        match c {
            Change::Put { map, key, value } => {
                crate::sys::map_update(fd(map, "write")?.as_fd(), key, value).map_err(|source| {
                    ChangeError {
                        action: "write",
                        map,
                        source,
                    }
                })?
            }
            Change::Delete { map, key } => {
                crate::sys::map_delete(fd(map, "delete")?.as_fd(), key).map_err(|source| {
                    ChangeError {
                        action: "delete",
                        map,
                        source,
                    }
                })?;
            }
        }
    }
    Ok(())
}

/// What ipcache maps hold now, read back from the kernel (tests and diagnostics).
pub fn read(maps: &BTreeMap<String, OwnedFd>) -> std::io::Result<IpcacheImage> {
    let mut image = IpcacheImage::default();
    for (name, key_size, into) in [
        (gen::IPCACHE_MAP, gen::IPCACHE_KEY_SIZE, &mut image.prefixes),
        (gen::HOSTS_MAP, gen::HOSTS_KEY_SIZE, &mut image.hosts),
    ] {
        let fd = maps
            .get(name)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        let entries = crate::sys::map_entries(
            fd.as_fd(),
            key_size as usize,
            gen::IPCACHE_VALUE_SIZE as usize,
        )?;
        into.extend(entries);
    }
    Ok(image)
}

/// Whether maps made for `made_for` entries hold every entry of `old` and `new` at once (the
/// peak of [`changes`], before the removals).
pub fn fits(made_for: usize, old: &IpcacheImage, new: &IpcacheImage) -> bool {
    let capacity = gen::shared_maps(made_for)
        .iter()
        .filter(|m| m.name == gen::IPCACHE_MAP || m.name == gen::HOSTS_MAP)
        .map(|m| m.max_entries as usize)
        .min()
        .unwrap_or(0);
    let union =
        |o: &MapRecords, n: &MapRecords| n.len() + o.keys().filter(|k| !n.contains_key(*k)).count();
    union(&old.prefixes, &new.prefixes) <= capacity && union(&old.hosts, &new.hosts) <= capacity
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a program finds for `addr` (IPv4) in maps holding these records: the host entry,
    /// else the longest prefix, else nothing (the world).
    fn lookup(
        prefixes: &MapRecords,
        hosts: &MapRecords,
        addr: std::net::Ipv4Addr,
    ) -> Option<Vec<u8>> {
        let host = artifacts::ipcache_key(IpNet::new(addr.into(), 32).unwrap());
        if let Some(v) = hosts.get(&host[4..]) {
            return Some(v.clone());
        }
        (0..=32u8).rev().find_map(|len| {
            let net = IpNet::new(addr.into(), len).unwrap().trunc();
            prefixes.get(&artifacts::ipcache_key(net)[..]).cloned()
        })
    }

    fn apply(maps: &mut (MapRecords, MapRecords), change: &Change) {
        let (map, key) = match change {
            Change::Put { map, key, .. } | Change::Delete { map, key } => (*map, *key),
        };
        let target = if map == gen::IPCACHE_MAP {
            &mut maps.0
        } else {
            &mut maps.1
        };
        match change {
            Change::Put { value, .. } => target.insert(key.to_vec(), value.to_vec()),
            Change::Delete { .. } => target.remove(key),
        };
    }

    /// Entries over 10.0.0.0/26: prefixes /24 to /32 and hosts, a few identities, so old and
    /// new overlap, nest and shadow each other.
    fn ipcache() -> impl Strategy<Value = Vec<(IpNet, NumericIdentity)>> {
        let entry = (0u8..64, 24u8..=32, 0u32..4, any::<bool>()).prop_map(|(a, len, id, host)| {
            let addr = std::net::Ipv4Addr::new(10, 0, 0, a);
            let (len, id) = if host {
                (32, 100 + id)
            } else {
                (len, cnpc_ir::FIRST_LOCAL_IDENTITY + id)
            };
            let net = IpNet::new(addr.into(), len).unwrap().trunc();
            (net, NumericIdentity(id))
        });
        proptest::collection::vec(entry, 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// After every write of [`changes`], every address of the range finds what the old
        /// maps or the new maps give it, and at the end what the new maps give.
        #[test]
        fn every_lookup_between_writes_answers_old_or_new(old in ipcache(), new in ipcache()) {
            let (old, new) = (IpcacheImage::new(&old), IpcacheImage::new(&new));
            let mut maps = (old.prefixes.clone(), old.hosts.clone());
            let answers = |maps: &(MapRecords, MapRecords)| -> Vec<Option<Vec<u8>>> {
                (0u8..64)
                    .map(|a| lookup(&maps.0, &maps.1, std::net::Ipv4Addr::new(10, 0, 0, a)))
                    .collect()
            };
            let (before, after) = (
                answers(&(old.prefixes.clone(), old.hosts.clone())),
                answers(&(new.prefixes.clone(), new.hosts.clone())),
            );
            for c in changes(&old, &new) {
                apply(&mut maps, &c);
                for (a, got) in answers(&maps).into_iter().enumerate() {
                    prop_assert!(
                        got == before[a] || got == after[a],
                        "10.0.0.{a} found {got:?} after {c:?}: old {:?}, new {:?}",
                        before[a], after[a]
                    );
                }
            }
            prop_assert_eq!(&maps.0, &new.prefixes);
            prop_assert_eq!(&maps.1, &new.hosts);
        }
    }

    /// The order matters: removing the longest prefix first exposes a prefix that neither
    /// ipcache gives the address (the test above fails on that order).
    #[test]
    fn removals_go_shortest_first() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let id = |n| NumericIdentity(cnpc_ir::FIRST_LOCAL_IDENTITY + n);
        let old = IpcacheImage::new(&[
            (net("10.0.0.0/8"), id(1)),
            (net("10.0.0.0/16"), id(2)),
            (net("10.0.0.0/24"), id(3)),
        ]);
        let new = IpcacheImage::new(&[(net("10.0.0.0/8"), id(1))]);
        let lens: Vec<u32> = changes(&old, &new)
            .iter()
            .map(|c| match c {
                Change::Delete { key, .. } => prefix_len(key) - 32,
                Change::Put { .. } => panic!("nothing to add"),
            })
            .collect();
        assert_eq!(lens, vec![16, 24]);
    }
}
