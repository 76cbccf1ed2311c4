//! The generation's [`ProxyPolicy`] as the loader hands it over: a JSON file it replaces
//! atomically (write a temporary file, rename it over the old one). The proxy reads it at start
//! and whenever it changes (its modification time, length or inode; polled, and on SIGHUP); a
//! file that does not read or parse leaves the previous generation in force.

use crate::Proxy;
use cnpc_ir::proxy::ProxyPolicy;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a proxy policy: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Reads the file a proxy starts with, and its stamp as it was before the read (pass it to
/// [`watch`], so a change made meanwhile is not missed).
pub fn read_initial(path: &Path) -> Result<(ProxyPolicy, Option<Stamp>), PolicyFileError> {
    let before = stamp(path);
    Ok((read(path)?, before))
}

/// Reads and parses a policy file.
pub fn read(path: &Path) -> Result<ProxyPolicy, PolicyFileError> {
    let text = std::fs::read(path).map_err(|source| PolicyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| PolicyFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// What tells one version of the file from the next: a rename gives a new inode even when
/// time and length happen to be equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// The file's stamp, or `None` when it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Reads the file and swaps it in, then acknowledges it ([`applied_path`]). Returns the
/// (previous, new) generations.
pub fn reload(proxy: &Proxy, path: &Path) -> Result<(u64, u64), PolicyFileError> {
    let policy = read(path)?;
    let new = policy.generation;
    let old = proxy.swap(policy);
    acknowledge(path, new);
    Ok((old, new))
}

/// Where the proxy says which generation it runs: the policy file's path with `.applied`
/// appended, holding the generation number. The loader waits for it before switching that
/// generation's programs in, so the datapath never hands a connection to a proxy that still
/// judges by older rules.
pub fn applied_path(policy: &Path) -> PathBuf {
    let mut p = policy.as_os_str().to_owned();
    p.push(".applied");
    PathBuf::from(p)
}

/// Writes the acknowledgement atomically; a failure only delays the loader (it waits with a
/// bound), so it is logged, not fatal.
pub fn acknowledge(policy: &Path, generation: u64) {
    let path = applied_path(policy);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written =
        std::fs::write(&tmp, generation.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "cannot acknowledge the generation");
    }
}

/// The generation the proxy acknowledged for `policy`, if any.
pub fn acknowledged(policy: &Path) -> Option<u64> {
    std::fs::read_to_string(applied_path(policy))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Watches `path` until the task is dropped: on every change in its directory (inotify) and
/// every `interval`, reloads when the stamp differs from `since` (the version in force); at
/// once when `hup` fires (the binary passes SIGHUP). Logs each switch and each failure.
pub async fn watch(
    proxy: Proxy,
    path: PathBuf,
    since: Option<Stamp>,
    interval: Duration,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    let mut last = since;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The directory is watched (the loader renames a new file over the old one): an event
    // wakes the loop at once, so a new generation is in force within a millisecond or two;
    // the poll stays as the fallback where inotify is unavailable.
    let (tx, mut changed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _watcher = path.parent().and_then(|dir| {
        use notify::Watcher;
        let mut w = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
            let _ = tx.send(());
        })
        .ok()?;
        w.watch(dir, notify::RecursiveMode::NonRecursive).ok()?;
        Some(w)
    });
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = changed.recv() => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = stamp(&path);
        if !forced && (now == last || now.is_none()) {
            continue;
        }
        // Taken before reading: a write racing the read changes the stamp again.
        last = now;
        match reload(&proxy, &path) {
            Ok((old, new)) => {
                tracing::info!(from = old, to = new, path = %path.display(), "switched generation")
            }
            Err(e) => tracing::warn!(
                error = %e,
                keeping = proxy.current().generation(),
                "policy file not used; the previous generation stays"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_is_swapped_in_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("policy.json");
        let write = |generation: u64| {
            let p = ProxyPolicy {
                generation,
                ..ProxyPolicy::default()
            };
            let tmp = dir.path().join("policy.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&p).expect("serialisable")).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        };
        write(1);
        let (first, since) = read_initial(&path).expect("valid");
        let proxy = Proxy::new(first);
        assert_eq!(proxy.current().generation(), 1);
        let task = tokio::spawn(watch(
            proxy.clone(),
            path.clone(),
            since,
            Duration::from_millis(10),
            None,
        ));
        let wait_for = |want: u64| {
            let proxy = proxy.clone();
            async move {
                for _ in 0..300 {
                    if proxy.current().generation() == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        write(2);
        assert!(wait_for(2).await, "generation 2 was not picked up");
        assert_eq!(acknowledged(&path), Some(2), "the switch is acknowledged");
        std::fs::write(&path, b"{ not json").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(proxy.current().generation(), 2);
        write(3);
        assert!(wait_for(3).await, "generation 3 was not picked up");
        task.abort();
        assert!(matches!(
            read(&dir.path().join("missing.json")),
            Err(PolicyFileError::Read { .. })
        ));
    }
}
