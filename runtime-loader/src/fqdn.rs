//! Addresses learned from DNS, the node side of toFQDNs (issue 10, DESIGN.md §6a).
//!
//! Cilium's name manager (pkg/fqdn/namemanager) keeps, per name, the addresses DNS answers gave
//! and when they expire, and gives each address an identity labelled with every toFQDNs
//! selector matching its names; the DNS proxy holds an answer until the datapath knows its
//! addresses. Here the DNS proxy (`cnpc-proxy`) asks the loader over a unix socket
//! ([`serve`]), and [`FqdnState`] is what the loader keeps:
//!
//! - **Names → addresses with expiry**: a record's TTL, raised to the configured minimum
//!   (Cilium `--tofqdns-min-ttl`). Re-learning an address extends it.
//! - **Identities**: one per key (the selectors matching any live name of the address, and
//!   the longest CIDR prefix of the policies holding it: [`cnpc_ir::FqdnIdentity`]), numbered
//!   from [`cnpc_ir::FIRST_FQDN_IDENTITY`] and never reused, so an entry of the datapath's
//!   `fqdn` map means the same identity to every generation that knows the number. Each
//!   generation is compiled with the identities its addresses need ([`FqdnState::prepare`]);
//!   an answer whose key no enforcing generation knows yet needs a new generation first, and
//!   the proxy's hold (≤ 100 ms) covers that only when compiling is quick.
//! - **Endpoint and node addresses are not learned**: their identity wins, as Cilium's
//!   ipcache lets endpoint state override the `generated` source of FQDN entries.
//! - **Expiry with zombies** (pkg/fqdn/namemanager, "zombies"): an address all of whose names
//!   expired stays in the map, marked [`ZOMBIE`], while the conntrack map still has a
//!   connection to it; the datapath lets packets of such connections through and refuses new
//!   ones. Without connections it leaves the map.
//! - **Persistence**: the state is saved in the state directory (`fqdn.json`, atomically) and
//!   read at start, and the `fqdn` map is pinned, so a restarted loader keeps what it learned.

use cnpc_compiler::tables::{cidr_prefixes, fqdn_key, fqdn_selectors};
use cnpc_ir::proxy::{LearnReply, LearnRequest};
use cnpc_ir::{DnsMatcher, FqdnIdentity, IpNet, NumericIdentity, Program, FIRST_FQDN_IDENTITY};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set in an `fqdn` map value whose address's names all expired while connections to it
/// remain: those connections keep their identity, new ones are dropped (gen::FQDN_ZOMBIE).
pub const ZOMBIE: u32 = cnpc_codegen_bpf::gen::FQDN_ZOMBIE;

/// Most addresses kept per name (Cilium's --tofqdns-endpoint-max-ip-per-hostname default).
pub const MAX_ADDRESSES_PER_NAME: usize = 1000;

/// An FQDN identity's key: the selectors (sorted) and the CIDR prefix.
pub type FqdnKey = (Vec<DnsMatcher>, Option<IpNet>);

/// Seconds since the epoch (the clock of expiry times, which survive restarts).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum FqdnError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a cnpc FQDN state file: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What the loader learned, and the identity numbers it handed out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FqdnState {
    /// name → address → expiry (seconds since the epoch).
    names: BTreeMap<String, BTreeMap<IpAddr, u64>>,
    /// Addresses whose names expired, kept for their connections, with the key they had.
    zombies: BTreeMap<IpAddr, FqdnKey>,
    allocation: BTreeMap<String, (FqdnKey, u32)>,
    next: u32,
    #[serde(skip)]
    pub min_ttl: u32,
    /// Keys of the values in the `fqdn` map as last written: the next generation keeps them
    /// in its tables, so its programs still know every entry until the map is rewritten.
    #[serde(skip)]
    pub in_map: BTreeSet<FqdnKey>,
    #[serde(skip)]
    dirty: bool,
    /// address → the names it was learned for (an index of `names`, rebuilt at load).
    #[serde(skip)]
    by_address: BTreeMap<IpAddr, BTreeSet<String>>,
    /// A name or address is new since the last save: worth saving at once, so a loader killed
    /// right after an answer still knows the address when it comes back (a later expiry only
    /// waits for the next periodic save).
    #[serde(skip)]
    new_since_save: bool,
}

/// What one generation knows of FQDN identities: enough to give a newly learned address its
/// identity without compiling again when its key is among them.
#[derive(Clone, Debug, Default)]
pub struct FqdnView {
    pub selectors: Vec<DnsMatcher>,
    pub prefixes: BTreeSet<IpNet>,
    /// The FQDN identities the generation's tables were built with.
    pub identities: BTreeMap<FqdnKey, NumericIdentity>,
    /// Endpoint and node addresses (never learned).
    pub excluded: HashSet<IpAddr>,
    /// The `fqdn` map this generation wants: address → value (identity, maybe [`ZOMBIE`]).
    pub map: BTreeMap<IpAddr, u32>,
    /// Whether `map` is the node's learned state (the loader writes it with the generation),
    /// rather than empty for want of one (a generation compiled without learned addresses
    /// leaves the pinned map alone).
    pub managed: bool,
}

/// The outcome of a [`LearnRequest`].
#[derive(Debug, PartialEq, Eq)]
pub enum Learned {
    /// Every address has an identity the enforcing generation knows: write these entries
    /// (address → map value) and reply.
    Ready(Vec<(IpAddr, u32)>),
    /// Some address needs an identity no enforcing generation knows: compile a new one.
    NeedsGeneration,
}

fn key_text(key: &FqdnKey) -> String {
    let mut s: Vec<String> = key
        .0
        .iter()
        .map(|m| match m {
            DnsMatcher::Name(n) => format!("name:{n}"),
            DnsMatcher::Pattern(p) => format!("pattern:{p}"),
        })
        .collect();
    if let Some(c) = key.1 {
        s.push(format!("cidr:{c}"));
    }
    s.join(" ")
}

impl FqdnState {
    pub fn new(min_ttl: u32) -> FqdnState {
        FqdnState {
            min_ttl,
            next: FIRST_FQDN_IDENTITY,
            ..FqdnState::default()
        }
    }

    /// Reads the state saved at `path`; a missing file is an empty state.
    pub fn load(path: &Path, min_ttl: u32) -> Result<FqdnState, FqdnError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FqdnState::new(min_ttl))
            }
            Err(source) => {
                return Err(FqdnError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut s: FqdnState = serde_json::from_str(&text).map_err(|source| FqdnError::Format {
            path: path.into(),
            source,
        })?;
        s.min_ttl = min_ttl;
        // Never below a number handed out already, whatever `next` says.
        let top = s.allocation.values().map(|(_, n)| n + 1).max().unwrap_or(0);
        s.next = s.next.max(FIRST_FQDN_IDENTITY).max(top);
        for (name, addrs) in &s.names {
            for ip in addrs.keys() {
                s.by_address.entry(*ip).or_default().insert(name.clone());
            }
        }
        Ok(s)
    }

    /// Hands out numbers above `identity` only: the pinned `fqdn` map may hold numbers a lost
    /// or older state file does not know, and a number must never change its meaning.
    pub fn reserve_above(&mut self, identity: u32) {
        let identity = identity & !ZOMBIE;
        if identity >= self.next {
            self.next = identity + 1;
            self.dirty = true;
        }
    }

    /// Writes the state to `path` (temp file and rename) if it changed since the last save.
    pub fn save(&mut self, path: &Path) -> Result<(), FqdnError> {
        if !self.dirty {
            return Ok(());
        }
        let io = |source| FqdnError::Io {
            path: path.into(),
            source,
        };
        let text = serde_json::to_vec(self).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        self.dirty = false;
        self.new_since_save = false;
        Ok(())
    }

    /// Whether something new was learned since the last save (see `new_since_save`).
    pub fn has_new(&self) -> bool {
        self.new_since_save
    }

    /// The names an address was learned for. Expired ones count until [`FqdnState::expire`]
    /// ends them, which is where an address becomes a zombie: a compile in between must not
    /// drop an address its connections still use.
    fn names_of(&self, ip: IpAddr) -> Vec<&str> {
        self.by_address
            .get(&ip)
            .map_or_else(Vec::new, |n| n.iter().map(String::as_str).collect())
    }

    fn number(&mut self, key: &FqdnKey) -> NumericIdentity {
        let text = key_text(key);
        if let Some((_, n)) = self.allocation.get(&text) {
            return NumericIdentity(*n);
        }
        let n = self.next;
        // Numbers run below the zombie bit: 2^31 - 2^24 - 2^23 of them, never reused.
        self.next = (n + 1).min(ZOMBIE - 1);
        self.allocation.insert(text, (key.clone(), n));
        self.dirty = true;
        NumericIdentity(n)
    }

    /// The FQDN identities a generation of `program` needs (one per selector alone, so a
    /// first answer for a name one selector matches needs no compile, and the key of every
    /// learned address), and what its `fqdn` map holds.
    pub fn prepare(
        &mut self,
        program: &Program,
        excluded: HashSet<IpAddr>,
    ) -> (Vec<FqdnIdentity>, FqdnView) {
        let selectors = fqdn_selectors(&[program]);
        let prefixes = cidr_prefixes(&[program]);
        let mut keys: BTreeSet<FqdnKey> = selectors
            .iter()
            .map(|m| (vec![m.clone()], None))
            .chain(self.in_map.iter().cloned())
            .collect();
        let mut map_keys: Vec<(IpAddr, FqdnKey, bool)> = Vec::new();
        let addresses: Vec<IpAddr> = self.by_address.keys().copied().collect();
        for ip in addresses {
            if excluded.contains(&ip) {
                continue;
            }
            let names = self.names_of(ip);
            if let Some(key) = fqdn_key(&selectors, &prefixes, names.iter().copied(), ip) {
                keys.insert(key.clone());
                map_keys.push((ip, key, false));
            }
        }
        for (ip, key) in &self.zombies {
            if !excluded.contains(ip) && !map_keys.iter().any(|(a, _, _)| a == ip) {
                keys.insert(key.clone());
                map_keys.push((*ip, key.clone(), true));
            }
        }
        let identities: BTreeMap<FqdnKey, NumericIdentity> = keys
            .into_iter()
            .map(|k| (k.clone(), self.number(&k)))
            .collect();
        let map = map_keys
            .into_iter()
            .map(|(ip, key, zombie)| {
                let id = identities[&key].0;
                (ip, if zombie { id | ZOMBIE } else { id })
            })
            .collect();
        let list = identities
            .iter()
            .map(|((selectors, cidr), n)| FqdnIdentity {
                numeric: *n,
                selectors: selectors.clone(),
                cidr: *cidr,
            })
            .collect();
        let view = FqdnView {
            selectors,
            prefixes,
            identities,
            excluded,
            map,
            managed: true,
        };
        (list, view)
    }

    /// Records what `req` says and tells whether `view` (the enforcing generation) can give
    /// every address its identity now.
    pub fn learn(&mut self, req: &LearnRequest, view: &FqdnView, now: u64) -> Learned {
        let name = req.name.trim_end_matches('.').to_ascii_lowercase();
        let mut ready = Vec::new();
        let mut needs_generation = false;
        for a in &req.addresses {
            if view.excluded.contains(&a.ip) {
                continue;
            }
            let expiry = now + u64::from(a.ttl.max(self.min_ttl));
            let entry = self.names.entry(name.clone()).or_default();
            let old = entry.insert(a.ip, expiry);
            if old.is_none_or(|o| o < expiry) {
                self.dirty = true;
            }
            self.new_since_save |= old.is_none();
            if let Some(o) = old.filter(|&o| o > expiry) {
                // A shorter TTL than an earlier answer's never cuts the address off early.
                entry.insert(a.ip, o);
            }
            if entry.len() > MAX_ADDRESSES_PER_NAME {
                // The one that would expire first goes (Cilium caps addresses per name too,
                // --tofqdns-endpoint-max-ip-per-hostname), so a wildcard record cannot fill
                // the map through one name.
                if let Some((&drop, _)) = entry.iter().min_by_key(|(_, &e)| e) {
                    entry.remove(&drop);
                    if let Some(n) = self.by_address.get_mut(&drop) {
                        n.remove(&name);
                        if n.is_empty() {
                            self.by_address.remove(&drop);
                        }
                    }
                }
            }
            self.by_address
                .entry(a.ip)
                .or_default()
                .insert(name.clone());
            self.zombies.remove(&a.ip);
            let names = self.names_of(a.ip);
            let Some(key) = fqdn_key(&view.selectors, &view.prefixes, names, a.ip) else {
                continue;
            };
            match view.identities.get(&key) {
                Some(id) => ready.push((a.ip, id.0)),
                None => {
                    self.number(&key);
                    needs_generation = true;
                }
            }
        }
        if needs_generation {
            Learned::NeedsGeneration
        } else {
            Learned::Ready(ready)
        }
    }

    /// Ends the names whose time is up. An address left with no live name becomes a zombie
    /// when `connected` says a connection still uses it, and is forgotten otherwise; a zombie
    /// without connections is forgotten. Returns whether the `fqdn` map must change (the
    /// caller recomputes it with [`FqdnState::prepare`], which may need a new generation).
    pub fn expire(&mut self, view: &FqdnView, now: u64, connected: &HashSet<IpAddr>) -> bool {
        let mut changed = false;
        let mut ended: BTreeSet<IpAddr> = BTreeSet::new();
        for (name, addrs) in self.names.iter_mut() {
            addrs.retain(|ip, exp| {
                let keep = *exp > now;
                if !keep {
                    ended.insert(*ip);
                    if let Some(n) = self.by_address.get_mut(ip) {
                        n.remove(name);
                        if n.is_empty() {
                            self.by_address.remove(ip);
                        }
                    }
                }
                keep
            });
        }
        self.names.retain(|_, a| !a.is_empty());
        for ip in ended {
            changed = true;
            self.dirty = true;
            if self.names_of(ip).is_empty() {
                // Its last name ended: keep it for its connections, with the key it had.
                if connected.contains(&ip) {
                    let names: Vec<&str> = Vec::new();
                    let key = view
                        .map
                        .get(&ip)
                        .and_then(|v| {
                            view.identities
                                .iter()
                                .find(|(_, id)| id.0 == v & !ZOMBIE)
                                .map(|(k, _)| k.clone())
                        })
                        .or_else(|| fqdn_key(&view.selectors, &view.prefixes, names, ip));
                    if let Some(key) = key {
                        self.zombies.insert(ip, key);
                    }
                }
            }
        }
        let before = self.zombies.len();
        self.zombies.retain(|ip, _| connected.contains(ip));
        if self.zombies.len() != before {
            changed = true;
            self.dirty = true;
        }
        changed
    }

    /// The `fqdn` map `view`'s generation should hold now, or `None` when some address needs
    /// an identity it does not know (compile a new generation, [`FqdnState::prepare`]).
    pub fn map_for(&self, view: &FqdnView) -> Option<BTreeMap<IpAddr, u32>> {
        let mut map = BTreeMap::new();
        for ip in self
            .by_address
            .keys()
            .copied()
            .filter(|ip| !view.excluded.contains(ip))
        {
            let names = self.names_of(ip);
            if let Some(key) = fqdn_key(&view.selectors, &view.prefixes, names, ip) {
                map.insert(ip, view.identities.get(&key)?.0);
            }
        }
        for (ip, key) in &self.zombies {
            if !map.contains_key(ip) && !view.excluded.contains(ip) {
                map.insert(*ip, view.identities.get(key)?.0 | ZOMBIE);
            }
        }
        Some(map)
    }

    /// Whether some name's time is up at `now`.
    pub fn names_expired(&self, now: u64) -> bool {
        self.names.values().any(|a| a.values().any(|&e| e <= now))
    }

    /// Whether any zombie or name will need [`FqdnState::expire`] at `now`.
    pub fn has_expired(&self, now: u64) -> bool {
        !self.zombies.is_empty() || self.names.values().any(|a| a.values().any(|&e| e <= now))
    }

    /// Every (name, address, expiry) learned, for `cnpc trace --fqdn-cache` and tests.
    pub fn entries(&self) -> Vec<(String, IpAddr, u64)> {
        self.names
            .iter()
            .flat_map(|(n, a)| a.iter().map(move |(ip, e)| (n.clone(), *ip, *e)))
            .collect()
    }

    /// The addresses learned for `name` that have not expired at `now`, lowest first.
    pub fn addresses_of(&self, name: &str, now: u64) -> Vec<IpAddr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.get(&name).map_or_else(Vec::new, |a| {
            a.iter()
                .filter(|(_, &e)| e > now)
                .map(|(ip, _)| *ip)
                .collect()
        })
    }

    /// Addresses learned and zombies, for the metrics.
    pub fn counts(&self) -> (usize, usize) {
        (self.by_address.len(), self.zombies.len())
    }
}

/// A learning request from the DNS proxy, with where its reply goes.
pub struct Pending {
    pub request: LearnRequest,
    pub reply: mpsc::Sender<LearnReply>,
}

/// Serves the learning socket at `path` (mode 0600: only root's proxy may teach the datapath):
/// each line is a [`LearnRequest`], handed to `to_loader`; each reply is written back as a
/// line. A malformed line gets an error reply (id 0) and the connection stays open.
pub fn serve(path: &Path, to_loader: mpsc::Sender<Pending>) -> std::io::Result<()> {
    let listener = crate::sys::root_only_socket(path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let to_loader = to_loader.clone();
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                let (tx, rx) = mpsc::channel::<LearnReply>();
                // Replies may come in any order (a request waiting for a compile does not hold
                // up later ones): a writer thread sends them as they come.
                std::thread::spawn(move || {
                    for reply in rx {
                        let Ok(mut line) = serde_json::to_vec(&reply) else {
                            continue;
                        };
                        line.push(b'\n');
                        if writer.write_all(&line).is_err() {
                            return;
                        }
                    }
                });
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    match serde_json::from_str::<LearnRequest>(&line) {
                        Ok(request) => {
                            let pending = Pending {
                                request,
                                reply: tx.clone(),
                            };
                            if to_loader.send(pending).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(LearnReply {
                                id: 0,
                                ok: false,
                                identities: Vec::new(),
                                error: Some(format!("malformed request: {e}")),
                            });
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// The loader's side of learning: what it learned, what the enforcing generation knows of
/// FQDN identities, and the requests waiting for a generation that knows theirs. The daemon
/// loop hands it each request, each applied generation and a tick; it writes the `fqdn` map and
/// answers the proxy.
pub struct Learning {
    pub state: FqdnState,
    pub view: FqdnView,
    pending: Vec<(Pending, Instant)>,
    /// Whether a generation's view is in force: until then the pinned map (what the last
    /// loader wrote) is left as it is.
    applied: bool,
    /// When conntrack was last read for the zombies alone.
    zombies_checked: Option<Instant>,
}

/// How often conntrack is read while zombies are all that may end (reading it walks every
/// connection of the node).
pub const ZOMBIE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What handling a request or a tick did, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearningReport {
    /// Requests answered.
    pub answered: usize,
    /// Of those, answered after the proxy's hold ([`HOLD`]) had passed.
    pub late: usize,
    /// Requests refused (the map or a compile failed).
    pub refused: usize,
    /// `fqdn` map entries written.
    pub written: usize,
    /// Addresses whose last name expired.
    pub expired: usize,
    /// A new generation is needed (an identity the enforcing one lacks).
    pub needs_generation: bool,
}

impl std::ops::AddAssign for LearningReport {
    fn add_assign(&mut self, o: LearningReport) {
        self.answered += o.answered;
        self.late += o.late;
        self.refused += o.refused;
        self.written += o.written;
        self.expired += o.expired;
        self.needs_generation |= o.needs_generation;
    }
}

fn refuse(p: &Pending, why: &str) {
    let _ = p.reply.send(LearnReply {
        id: p.request.id,
        ok: false,
        identities: Vec::new(),
        error: Some(why.into()),
    });
}

impl Learning {
    pub fn new(state: FqdnState) -> Learning {
        Learning {
            state,
            view: FqdnView::default(),
            pending: Vec::new(),
            applied: false,
            zombies_checked: None,
        }
    }

    /// Makes `map` hold `desired` and remembers it.
    fn write(
        &mut self,
        map: BorrowedFd<'_>,
        desired: BTreeMap<IpAddr, u32>,
    ) -> std::io::Result<usize> {
        let (written, _) = sync_map(map, &desired)?;
        self.state.in_map = self.view.keys_of(&desired);
        self.view.map = desired;
        Ok(written)
    }

    /// One request: answered at once when the enforcing generation knows the identities its
    /// addresses need, else kept until [`Learning::generation_applied`] (the report says a
    /// generation is needed). Before any generation of this loader is in force the request is
    /// recorded (the first generation maps it) and refused.
    pub fn handle(&mut self, map: BorrowedFd<'_>, p: Pending, since: Instant) -> LearningReport {
        let mut report = LearningReport::default();
        if !self.applied {
            self.state.learn(&p.request, &self.view, now());
            refuse(&p, "no generation enforcing yet");
            report.refused = 1;
            return report;
        }
        match self.state.learn(&p.request, &self.view, now()) {
            Learned::Ready(entries) => {
                // Only what changed is written: the map holds the rest already.
                let mut result = Ok(());
                for (ip, value) in &entries {
                    if self.view.map.get(ip) == Some(value) {
                        continue;
                    }
                    let key = cnpc_codegen_bpf::artifacts::fqdn_key(*ip);
                    result = crate::sys::map_update(map, &key, &value.to_le_bytes());
                    if result.is_err() {
                        break;
                    }
                    self.view.map.insert(*ip, *value);
                    if let Some((k, _)) = self.view.identities.iter().find(|(_, id)| id.0 == *value)
                    {
                        self.state.in_map.insert(k.clone());
                    }
                    report.written += 1;
                }
                match result {
                    Ok(()) => {
                        report.answered = 1;
                        report.late = usize::from(since.elapsed() > HOLD);
                        let _ = p.reply.send(LearnReply {
                            id: p.request.id,
                            ok: true,
                            identities: entries
                                .into_iter()
                                .map(|(ip, v)| (ip, NumericIdentity(v)))
                                .collect(),
                            error: None,
                        });
                    }
                    Err(e) => {
                        report.refused = 1;
                        refuse(&p, &format!("the fqdn map refused an entry: {e}"));
                    }
                }
            }
            Learned::NeedsGeneration => {
                self.pending.push((p, since));
                report.needs_generation = true;
            }
        }
        report
    }

    /// A generation is enforcing (its programs switched in): its view becomes the one
    /// requests are served with, the map is rewritten to what it wants, and waiting requests
    /// are answered.
    pub fn generation_applied(
        &mut self,
        map: BorrowedFd<'_>,
        view: FqdnView,
    ) -> std::io::Result<LearningReport> {
        let desired = view.map.clone();
        self.view = view;
        self.applied = true;
        let written = self.write(map, desired)?;
        let mut report = LearningReport {
            written,
            ..LearningReport::default()
        };
        for (p, since) in std::mem::take(&mut self.pending) {
            report += self.handle(map, p, since);
        }
        // Still unknown (a name learned meanwhile): refused; the proxy has released the answer
        // by now, and the next generation knows the identity.
        for (p, _) in std::mem::take(&mut self.pending) {
            refuse(&p, "identity not yet enforced");
            report.refused += 1;
        }
        Ok(report)
    }

    /// Compiling a generation failed: the waiting requests are refused.
    pub fn generation_failed(&mut self) -> usize {
        let n = self.pending.len();
        for (p, _) in std::mem::take(&mut self.pending) {
            refuse(&p, "no generation could be compiled for these addresses");
        }
        n
    }

    /// Whether requests wait for a generation.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends expired names; `ct` is the conntrack map, read only when something expired (a
    /// zombie stays while a connection to it is there).
    pub fn tick(
        &mut self,
        map: BorrowedFd<'_>,
        ct: BorrowedFd<'_>,
    ) -> std::io::Result<LearningReport> {
        let now = now();
        let mut report = LearningReport::default();
        if !self.applied || !self.state.has_expired(now) {
            return Ok(report);
        }
        let names_ended = self.state.names_expired(now);
        let zombies_due = self
            .zombies_checked
            .is_none_or(|t| t.elapsed() >= ZOMBIE_CHECK_INTERVAL);
        if !names_ended && !zombies_due {
            return Ok(report);
        }
        self.zombies_checked = Some(Instant::now());
        let keys = crate::sys::map_keys(ct, cnpc_codegen_bpf::gen::CT_KEY_SIZE as usize)?;
        let connected = connected_peers(keys);
        let (live, _) = self.state.counts();
        if self.state.expire(&self.view, now, &connected) {
            report.expired = live.saturating_sub(self.state.counts().0);
            match self.state.map_for(&self.view) {
                Some(desired) => report.written = self.write(map, desired)?,
                None => report.needs_generation = true,
            }
        }
        Ok(report)
    }
}

/// The peer addresses of the conntrack map's entries (key layout: `gen::CT_MAP` docs; the
/// peer address is bytes 16..32, the family byte 37).
pub fn connected_peers(ct_keys: impl IntoIterator<Item = Vec<u8>>) -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    for k in ct_keys {
        if k.len() < 40 {
            continue;
        }
        let family = k[37];
        let peer: [u8; 16] = k[16..32].try_into().unwrap_or([0; 16]);
        out.insert(if family == 4 {
            IpAddr::from([peer[0], peer[1], peer[2], peer[3]])
        } else {
            IpAddr::from(peer)
        });
    }
    out
}

impl FqdnView {
    /// The keys of the identities `map` holds (for [`FqdnState::in_map`]).
    pub fn keys_of(&self, map: &BTreeMap<IpAddr, u32>) -> BTreeSet<FqdnKey> {
        let values: HashSet<u32> = map.values().map(|v| v & !ZOMBIE).collect();
        self.identities
            .iter()
            .filter(|(_, id)| values.contains(&id.0))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Makes the pinned `fqdn` map hold exactly `desired` (address → value): entries written,
/// changed and deleted one by one, so a packet never sees a half-written entry. Returns how
/// many entries were written and deleted.
pub fn sync_map(
    map: impl std::os::fd::AsFd,
    desired: &BTreeMap<IpAddr, u32>,
) -> std::io::Result<(usize, usize)> {
    use cnpc_codegen_bpf::artifacts::fqdn_key;
    let map = map.as_fd();
    let key_size = fqdn_key(IpAddr::from([0u8; 4])).len();
    let current: BTreeMap<Vec<u8>, Vec<u8>> = crate::sys::map_entries(map, key_size, 4)?
        .into_iter()
        .collect();
    let want: BTreeMap<Vec<u8>, Vec<u8>> = desired
        .iter()
        .map(|(ip, v)| (fqdn_key(*ip), v.to_le_bytes().to_vec()))
        .collect();
    let (mut written, mut deleted) = (0, 0);
    // Deletions first, so a full map still makes room; an entry the kernel refuses does not
    // stop the others (the first error is returned once all were tried).
    let mut first_error = None;
    for k in current.keys().filter(|k| !want.contains_key(*k)) {
        match crate::sys::map_delete(map, k) {
            Ok(_) => deleted += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for (k, v) in &want {
        if current.get(k) != Some(v) {
            match crate::sys::map_update(map, k, v) {
                Ok(()) => written += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok((written, deleted))
}

/// How long the proxy waits for a reply (Cilium's bound on holding an answer); the loader uses
/// it to tell when a compile made an answer late.
pub const HOLD: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::proxy::LearnedAddress;

    fn view(selectors: &[DnsMatcher], identities: &[(FqdnKey, u32)]) -> FqdnView {
        FqdnView {
            selectors: selectors.to_vec(),
            identities: identities
                .iter()
                .map(|(k, n)| (k.clone(), NumericIdentity(*n)))
                .collect(),
            ..FqdnView::default()
        }
    }

    fn req(name: &str, ips: &[(&str, u32)]) -> LearnRequest {
        LearnRequest {
            id: 1,
            name: name.into(),
            source: "10.0.0.1".parse().unwrap(),
            addresses: ips
                .iter()
                .map(|(ip, ttl)| LearnedAddress {
                    ip: ip.parse().unwrap(),
                    ttl: *ttl,
                })
                .collect(),
        }
    }

    #[test]
    fn a_known_key_is_ready_and_a_new_one_needs_a_generation() {
        let api = DnsMatcher::name("api.github.com");
        let any = DnsMatcher::pattern("*.github.com");
        let mut s = FqdnState::new(0);
        let v = view(
            &[api.clone(), any.clone()],
            &[((vec![any.clone()], None), FIRST_FQDN_IDENTITY)],
        );
        assert_eq!(
            s.learn(&req("WWW.github.com.", &[("192.0.2.1", 60)]), &v, 1000),
            Learned::Ready(vec![("192.0.2.1".parse().unwrap(), FIRST_FQDN_IDENTITY)])
        );
        // Both selectors match api.github.com: a key the generation does not have.
        assert_eq!(
            s.learn(&req("api.github.com", &[("192.0.2.2", 60)]), &v, 1000),
            Learned::NeedsGeneration
        );
        assert_eq!(s.entries().len(), 2);
    }

    #[test]
    fn expiry_keeps_connected_addresses_as_zombies_and_forgets_the_rest() {
        let any = DnsMatcher::pattern("*.github.com");
        let mut s = FqdnState::new(0);
        let mut v = view(
            std::slice::from_ref(&any),
            &[((vec![any.clone()], None), 7)],
        );
        s.learn(
            &req("a.github.com", &[("192.0.2.1", 10), ("192.0.2.2", 10)]),
            &v,
            1000,
        );
        v.map.insert("192.0.2.1".parse().unwrap(), 7);
        v.map.insert("192.0.2.2".parse().unwrap(), 7);
        let connected: HashSet<IpAddr> = ["192.0.2.1".parse().unwrap()].into();
        assert!(!s.expire(&v, 1005, &connected), "nothing expired yet");
        assert!(s.expire(&v, 1011, &connected));
        assert_eq!(s.counts(), (0, 1));
        let (_, v2) = s.prepare(&Program::default(), HashSet::new());
        assert_eq!(
            v2.map
                .get(&"192.0.2.1".parse().unwrap())
                .map(|v| v & ZOMBIE),
            Some(ZOMBIE)
        );
        assert!(!v2.map.contains_key(&"192.0.2.2".parse().unwrap()));
        // The connection closed: the zombie goes.
        assert!(s.expire(&v, 1012, &HashSet::new()));
        assert_eq!(s.counts(), (0, 0));
    }

    #[test]
    fn min_ttl_applies_and_numbers_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("cnpc-fqdn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fqdn.json");
        let any = DnsMatcher::pattern("*");
        let mut s = FqdnState::new(300);
        let v = view(std::slice::from_ref(&any), &[]);
        assert_eq!(
            s.learn(&req("x.example", &[("192.0.2.9", 5)]), &v, 1000),
            Learned::NeedsGeneration
        );
        assert_eq!(s.entries()[0].2, 1300, "the minimum TTL wins over 5 s");
        s.save(&path).unwrap();
        let mut back = FqdnState::load(&path, 300).unwrap();
        assert_eq!(back.entries(), s.entries());
        assert_eq!(
            back.number(&(vec![any], None)),
            NumericIdentity(FIRST_FQDN_IDENTITY),
            "the number handed out before the restart"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoint_addresses_are_never_learned() {
        let any = DnsMatcher::pattern("*");
        let mut s = FqdnState::new(0);
        let mut v = view(
            std::slice::from_ref(&any),
            &[((vec![any.clone()], None), 9)],
        );
        v.excluded.insert("10.0.0.5".parse().unwrap());
        assert_eq!(
            s.learn(&req("pod.example", &[("10.0.0.5", 60)]), &v, 1000),
            Learned::Ready(Vec::new())
        );
        assert!(s.entries().is_empty());
    }

    #[test]
    fn ct_keys_name_their_peers() {
        let mut k = vec![0u8; 40];
        k[16..20].copy_from_slice(&[192, 0, 2, 1]);
        k[37] = 4;
        let peers = connected_peers([k]);
        assert!(peers.contains(&"192.0.2.1".parse::<IpAddr>().unwrap()));
    }
}
