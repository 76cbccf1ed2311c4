//! Keeping the kernel in step with a generation (DESIGN.md §6, issue 5).
//!
//! Layout under the pin directory (default `/sys/fs/bpf/cnpc`, bpffs mounted there if missing):
//!
//! ```text
//! ct, events                       shared by every generation: connections survive swaps
//! fqdn                             addresses learned from DNS and their FQDN identities, shared
//!                                  by every generation (gen::FQDN_MAP): learned addresses
//!                                  survive swaps and restarts
//! proxy_config                     the proxy device's ifindex, for ingress programs' handoff
//! links/<direction>_<interface>    one TCX link per endpoint hook, pinned so enforcement
//!                                  outlives the loader
//! proxy_device                     the TCX link of the proxy device's program (crate::l7)
//! ```
//!
//! and a state file (default `/run/cnpc/state.json`) recording each hook's endpoint, identity,
//! generation and digest.
//!
//! A generation is applied in three phases. Load: the generation's own maps (large tables'
//! maps, and the ipcache maps when programs must be loaded and no live ones hold this
//! generation's ipcache) are created and filled, and every changed program is checked and
//! loaded against them, on as many threads as there are CPUs; a failure here returns an error
//! with nothing switched, so the last good generation keeps enforcing. Switch: each hook
//! changes in one step, `BPF_LINK_UPDATE` of its link to the new program (a packet runs the
//! old program or the new, never a mix; a loaded program reads only its own generation's
//! maps); hooks new to this generation get a link created and pinned. A hook whose digest (its
//! program and the contents of every map it reads) has not changed keeps its program. A hook
//! whose program is the same and only the ipcache differs keeps it too, and the ipcache maps
//! it reads are changed in place once the loaded programs are in ([`crate::ipcache`]: every
//! lookup meanwhile answers as the old or the new ipcache does). Release: links of endpoints
//! that left are unpinned and closed, which detaches them; old programs and their maps are
//! freed by the kernel once no link holds them.
//!
//! The endpoint's `egress` program runs where its packets leave it, tc ingress of the host-side
//! interface; `ingress` runs at tc egress of that interface.

use crate::generation::{EndpointInfo, Generation};
use crate::ipcache::IpcacheImage;
use crate::node::{interface_for, Route};
use crate::sys;
use cnpc_codegen_bpf::{artifacts, check, gen};
use cnpc_ir::{DecisionTable, Direction, NumericIdentity, TableVerdict};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How hooks are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// TCX links where the kernel has them (Linux 6.6), clsact filters otherwise.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
    pub attach: AttachMode,
    /// Where each generation's proxy policy is written for the L7 proxies (`None`: not
    /// written, no L7 stage).
    pub proxy_policy: Option<PathBuf>,
    /// How long to wait for the proxy to acknowledge a new proxy policy before switching the
    /// generation's programs in anyway (a proxy that is down never acknowledges; its flows
    /// are dropped whatever the policy says).
    pub proxy_ack_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            pin_dir: PathBuf::from("/sys/fs/bpf/cnpc"),
            state_file: PathBuf::from("/run/cnpc/state.json"),
            attach: AttachMode::Auto,
            proxy_policy: None,
            proxy_ack_timeout: Duration::from_millis(200),
        }
    }
}

/// How one hook is attached: a pinned TCX link, or cnpc's clsact filter on the interface.
enum Attachment {
    Link(OwnedFd),
    Clsact { ifindex: u32 },
}

/// The pin (and clsact filter) name of the proxy device's program.
const PROXY_DEVICE_HOOK: &str = "proxy_device";

fn tc_hook(direction: Direction) -> crate::tc::Hook {
    match direction {
        Direction::Egress => crate::tc::Hook::Ingress,
        Direction::Ingress => crate::tc::Hook::Egress,
    }
}

/// One enforced hook, as the state file records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRecord {
    pub interface: String,
    /// The endpoint's direction (`ingress` runs at tc egress of the interface).
    pub direction: String,
    /// `namespace/name`; empty for a deny-all hook put in place before any good generation.
    pub endpoint: String,
    pub identity: u32,
    pub labels: Vec<String>,
    pub generation: u64,
    /// sha256 of the program and of every map it reads; equal digests, equal behaviour.
    pub digest: String,
    /// The decision form (`gen::Strategy`), or `deny-all`.
    pub strategy: String,
    /// `tcx` (a pinned link) or `clsact` (a tc filter).
    #[serde(default = "tcx")]
    pub attach: String,
}

fn tcx() -> String {
    "tcx".into()
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub generation: u64,
    pub hooks: BTreeMap<String, HookRecord>,
}

/// What one apply did.
#[derive(Clone, Debug, Default)]
pub struct SwapReport {
    pub generation: u64,
    pub attached: usize,
    pub swapped: usize,
    pub unchanged: usize,
    pub detached: usize,
    pub programs_loaded: usize,
    /// Endpoints of the snapshot with no route to an interface here (on other nodes).
    pub not_here: usize,
    /// Hooks that could not be switched (the interface went away, say), with the reason.
    pub failed: Vec<String>,
    pub load_time: Duration,
    pub switch_time: Duration,
    /// Whether the proxy acknowledged a changed proxy policy before the switch (`None`: the
    /// L7 view did not change, nothing to acknowledge).
    pub proxy_acknowledged: Option<bool>,
    /// Time spent writing the proxy policy and waiting for its acknowledgement.
    pub proxy_wait: Duration,
    /// Hooks that kept their program while the ipcache maps it reads were changed in place.
    pub ipcache_updated: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("program for {hook} rejected: {reason}")]
    Rejected { hook: String, reason: String },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    /// Kept programs' ipcache maps could not be changed in place ([`Loader::apply`] then
    /// loads every program afresh).
    #[error("cannot change the ipcache in place: {0}")]
    IpcacheInPlace(#[source] crate::ipcache::ChangeError),
}

fn map_error(e: sys::MapError) -> LoaderError {
    LoaderError::Kernel {
        what: format!("cannot {} map {}", e.action, e.map),
        source: e.source,
    }
}

fn kernel(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoaderError {
    let what = what.into();
    move |source| LoaderError::Kernel { what, source }
}

pub struct Loader {
    cfg: Config,
    ct: OwnedFd,
    events: OwnedFd,
    proxy_config: OwnedFd,
    fqdn: OwnedFd,
    state: State,
    links: BTreeMap<String, Attachment>,
    /// The proxy policy last written (without its generation number).
    proxy_policy: Option<cnpc_ir::proxy::ProxyPolicy>,
    /// The last applied generation's ipcache: what the sets its programs read hold.
    ipcache: Option<IpcacheImage>,
    /// The ipcache maps this process made and programs it loaded still read, by set number.
    ipcache_sets: BTreeMap<u64, IpcacheSet>,
    next_ipcache_set: u64,
    /// Hooks running a program this process loaded: what the program is and which ipcache
    /// set it reads. Hooks adopted from a previous run are not here: their ipcache maps are
    /// not this process's to change, so a new ipcache loads their programs again.
    running: BTreeMap<String, RunningProgram>,
}

/// Ipcache maps (`gen::IPCACHE_MAP`, `gen::HOSTS_MAP`) and the entries they were sized for.
struct IpcacheSet {
    maps: BTreeMap<String, OwnedFd>,
    made_for: usize,
    /// The digest of the ipcache they hold (`None` while, or after failing, being written):
    /// a set is given to programs, or changed in place, only from contents known this way
    /// (a set made for a generation that then failed to load holds that generation's).
    holds: Option<[u8; 32]>,
}

struct RunningProgram {
    /// sha256 of the program and of its own maps, without the ipcache.
    content: String,
    ipcache_set: u64,
}

/// What apply does with one hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HookAction {
    /// Its program and every map it reads are the same: nothing.
    Keep,
    /// Its program is the same and reads ipcache set `.0`, which changes in place.
    UpdateIpcache(u64),
    /// A program is loaded (or it is new to this generation).
    Load,
}

/// Loads programs (digest, hook, bytes) into the kernel, on as many threads as there are CPUs:
/// the verifier runs in the loading thread, and privileged loads are not serialised
/// (kernel/bpf/verifier.c takes `bpf_verifier_lock` only for unprivileged ones), so a
/// relabelled pod whose new identity changes every table's program waits for the slowest
/// share, not the sum. Results are in the order given.
fn load_all(programs: &[(String, String, Vec<u8>)]) -> Vec<Result<OwnedFd, String>> {
    cnpc_compiler::parallel::map_in_order(programs, |(_, _, code)| {
        sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, code)
    })
}

/// Opens the map pinned at `path`, or creates and pins it.
fn pinned_map(path: &Path, def: &cnpc_codegen_bpf::elf::MapDef) -> Result<OwnedFd, LoaderError> {
    if let Ok(fd) = sys::obj_get(path) {
        return Ok(fd);
    }
    let fd = sys::create_filled(def, &[]).map_err(map_error)?;
    sys::obj_pin(&fd, path).map_err(kernel(format!("cannot pin {}", path.display())))?;
    Ok(fd)
}

/// The pin name of a hook: `<direction>_<interface>`. bpffs refuses names with a dot (EPERM),
/// which interface names may have (VLANs), so a dot is written `%`.
fn hook_name(interface: &str, direction: Direction) -> String {
    format!("{}_{}", direction.as_str(), interface.replace('.', "%"))
}

fn attach_type(direction: Direction) -> u32 {
    match direction {
        Direction::Egress => sys::BPF_TCX_INGRESS,
        Direction::Ingress => sys::BPF_TCX_EGRESS,
    }
}

impl Loader {
    /// Opens (or creates) the pinned state: shared maps, links, the state file. Mounts bpffs
    /// at the pin directory's parent when nothing is mounted there.
    pub fn open(cfg: Config) -> Result<Loader, LoaderError> {
        let parent = cfg.pin_dir.parent().unwrap_or(Path::new("/"));
        if !sys::is_bpffs(parent) && !sys::is_bpffs(&cfg.pin_dir) {
            sys::mount_bpffs(parent).map_err(kernel(format!(
                "cannot mount bpffs at {}",
                parent.display()
            )))?;
        }
        let links_dir = cfg.pin_dir.join("links");
        std::fs::create_dir_all(&links_dir)
            .map_err(kernel(format!("cannot create {}", links_dir.display())))?;
        let shared = gen::shared_maps(0);
        let def = |name: &str| {
            shared
                .iter()
                .find(|m| m.name == name)
                .expect("gen::shared_maps defines every shared map")
                .clone()
        };
        let ct = pinned_map(&cfg.pin_dir.join(gen::CT_MAP), &def(gen::CT_MAP))?;
        let events = pinned_map(&cfg.pin_dir.join(gen::EVENTS_MAP), &def(gen::EVENTS_MAP))?;
        let proxy_config = pinned_map(
            &cfg.pin_dir.join(gen::PROXY_CONFIG_MAP),
            &def(gen::PROXY_CONFIG_MAP),
        )?;
        let fqdn = pinned_map(&cfg.pin_dir.join(gen::FQDN_MAP), &def(gen::FQDN_MAP))?;
        let state = match std::fs::read_to_string(&cfg.state_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LoaderError::State {
                path: cfg.state_file.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(LoaderError::State {
                    path: cfg.state_file.clone(),
                    message: e.to_string(),
                })
            }
        };
        let mut links = BTreeMap::new();
        let entries = std::fs::read_dir(&links_dir)
            .map_err(kernel(format!("cannot read {}", links_dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match sys::obj_get(&entry.path()).and_then(|fd| sys::link_info(&fd).map(|i| (fd, i))) {
                // A tcx link whose interface is gone reports no interface: nothing to adopt.
                Ok((fd, (_, _, ifindex))) if ifindex != 0 => {
                    links.insert(name, Attachment::Link(fd));
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // clsact filters carry no pin: the state file says where they are.
        for (hook, record) in &state.hooks {
            if record.attach == "clsact" {
                if let Some(ifindex) = sys::ifindex(&record.interface) {
                    links.insert(hook.clone(), Attachment::Clsact { ifindex });
                }
            }
        }
        Ok(Loader {
            cfg,
            ct,
            events,
            proxy_config,
            fqdn,
            state,
            links,
            proxy_policy: None,
            ipcache: None,
            ipcache_sets: BTreeMap::new(),
            next_ipcache_set: 0,
            running: BTreeMap::new(),
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The pinned events ring buffer.
    pub fn events(&self) -> &OwnedFd {
        &self.events
    }

    /// The pinned conntrack map (the loader reads which peers still have connections).
    pub fn ct_map(&self) -> &OwnedFd {
        &self.ct
    }

    /// The map of addresses learned from DNS (gen::FQDN_MAP, pinned at `pin_dir/fqdn`), shared
    /// by every generation: key `artifacts::fqdn_key(ip)` (the host map's key), value the FQDN
    /// identity as a little-endian u32 (`sys::map_update`, `sys::map_delete`,
    /// `sys::map_entries`). Programs read it after the host entries and before the prefixes.
    pub fn fqdn_map(&self) -> &OwnedFd {
        &self.fqdn
    }

    /// The ipcache maps the program on `hook` reads, when this process loaded it.
    pub fn ipcache_maps(&self, hook: &str) -> Option<&BTreeMap<String, OwnedFd>> {
        let running = self.running.get(hook)?;
        Some(&self.ipcache_sets.get(&running.ipcache_set)?.maps)
    }

    /// Hooks adopted from a previous run (pinned links found at open).
    pub fn adopted(&self) -> usize {
        self.links.len()
    }

    /// Applies `g`: load everything, then switch each hook, then release what left. With
    /// `force`, hooks switch even when their digest is unchanged (an equivalent generation).
    ///
    /// Should the ipcache maps of kept programs fail to change in place (the kernel out of
    /// memory, say), every hook is switched again to programs loaded with new ipcache maps, and
    /// the report says so in `failed`.
    pub fn apply(
        &mut self,
        g: &Generation,
        routes: &[Route],
        force: bool,
    ) -> Result<SwapReport, LoaderError> {
        match self.apply_once(g, routes, force) {
            Err(LoaderError::IpcacheInPlace(e)) => {
                let mut report = self.apply_once(g, routes, true)?;
                report.failed.push(format!(
                    "every hook loaded again: cannot change the ipcache in place: {e}"
                ));
                Ok(report)
            }
            other => other,
        }
    }

    fn apply_once(
        &mut self,
        g: &Generation,
        routes: &[Route],
        force: bool,
    ) -> Result<SwapReport, LoaderError> {
        let start = Instant::now();
        let mut report = SwapReport {
            generation: self.state.generation + 1,
            ..Default::default()
        };
        // Endpoints with an interface on this node.
        let mut local: Vec<(&EndpointInfo, String)> = Vec::new();
        for e in g.endpoints.iter() {
            match interface_for(e.interface.as_deref(), &e.ips, routes) {
                Some(i) => local.push((e, i)),
                None => report.not_here += 1,
            }
        }
        // Phase 1: this generation's maps and programs.
        let image = IpcacheImage::new(&g.ipcache);
        // Whether hooks running a program of this process can keep it, their ipcache maps
        // changed in place: the ipcache differs, and a set can hold old and new entries at once.
        let old_image = self
            .ipcache
            .as_ref()
            .filter(|old| !force && old.digest != image.digest);
        let updatable: std::collections::BTreeSet<u64> = match old_image {
            Some(old) => self
                .ipcache_sets
                .iter()
                .filter(|(_, s)| {
                    s.holds == Some(old.digest) && crate::ipcache::fits(s.made_for, old, &image)
                })
                .map(|(set, _)| *set)
                .collect(),
            None => Default::default(),
        };
        let mut by_identity: BTreeMap<NumericIdentity, Vec<&DecisionTable>> = BTreeMap::new();
        for t in &g.tables {
            by_identity.entry(t.subject).or_default().push(t);
        }
        // Programs find the peers their rows name by address (gen::generate_inlined), from this
        // generation's host entries, which their content digest covers (a held address's
        // identity is in their code or maps): a program whose held addresses change identity
        // is generated and loaded again, never kept under an ipcache changed in place.
        let hosts_by_identity = gen::HostAddresses::new(&g.ipcache);
        let inline = gen::Inline::new(&hosts_by_identity);
        // Every hook's program and digest first; the programs to load, once per digest.
        let mut pending: BTreeMap<String, (String, gen::Generated)> = BTreeMap::new();
        let mut plan: Vec<(String, Direction, HookRecord, HookAction)> = Vec::new();
        let mut contents: BTreeMap<String, String> = BTreeMap::new();
        for (e, interface) in &local {
            let tables = by_identity.get(&e.identity).cloned().unwrap_or_default();
            let track = gen::needs_tracking(tables.iter().copied());
            for direction in [Direction::Ingress, Direction::Egress] {
                let hook = hook_name(interface, direction);
                // An identity without a table in a direction is not enforced there.
                let allow_all;
                let table = match tables.iter().find(|t| t.direction == direction) {
                    Some(t) => *t,
                    None => {
                        allow_all = DecisionTable {
                            subject: e.identity,
                            direction,
                            default: TableVerdict::Allow,
                            classes: Vec::new(),
                            rows: Vec::new(),
                        };
                        &allow_all
                    }
                };
                let generated = gen::generate_inlined(table, track, &inline);
                let mut content = Sha256::new();
                content.update(generated.program.bytes());
                for (slot, name) in &generated.program.map_relocs {
                    content.update(slot.to_le_bytes());
                    content.update(name.as_bytes());
                }
                for m in &generated.maps {
                    for (k, v) in &m.records {
                        content.update(k);
                        content.update(v);
                    }
                }
                let content = artifacts::sha256(&content.finalize());
                let digest = artifacts::sha256(&Sha256::digest(
                    [content.as_bytes(), &image.digest[..]].concat(),
                ));
                let attached = !force && self.links.contains_key(&hook);
                let action = match self.running.get(&hook) {
                    _ if !attached => HookAction::Load,
                    _ if self
                        .state
                        .hooks
                        .get(&hook)
                        .is_some_and(|h| h.digest == digest) =>
                    {
                        HookAction::Keep
                    }
                    Some(r) if r.content == content && updatable.contains(&r.ipcache_set) => {
                        HookAction::UpdateIpcache(r.ipcache_set)
                    }
                    _ => HookAction::Load,
                };
                let strategy = generated.strategy.as_str().into();
                if action == HookAction::Load && !pending.contains_key(&digest) {
                    pending.insert(digest.clone(), (hook.clone(), generated));
                }
                contents.insert(hook.clone(), content);
                plan.push((
                    hook,
                    direction,
                    HookRecord {
                        interface: interface.clone(),
                        direction: direction.as_str().into(),
                        endpoint: e.name.clone(),
                        identity: e.identity.0,
                        labels: e.labels.to_vec(),
                        generation: report.generation,
                        digest,
                        strategy,
                        attach: tcx(),
                    },
                    action,
                ));
            }
        }
        // The maps those programs read: ipcache maps holding this generation's ipcache (the
        // newest set when the ipcache is the same, as after most policy edits; otherwise new
        // ones, since the sets in use hold the old one until the switch), then each table's own.
        let mut maps: BTreeMap<String, OwnedFd> = BTreeMap::new();
        let mut loaded_set = None;
        if !pending.is_empty() {
            let set = self.ipcache_set_for(&image)?;
            for (name, fd) in &self.ipcache_sets[&set].maps {
                let fd = fd
                    .try_clone()
                    .map_err(kernel(format!("cannot duplicate the {name} map")))?;
                maps.insert(name.clone(), fd);
            }
            loaded_set = Some(set);
        }
        let mut to_load: Vec<(String, String, Vec<u8>)> = Vec::with_capacity(pending.len());
        for (digest, (hook, generated)) in pending {
            for m in &generated.maps {
                if maps.contains_key(&m.def.name) {
                    continue;
                }
                let fd = sys::create_filled(&m.def, &m.records).map_err(map_error)?;
                maps.insert(m.def.name.clone(), fd);
            }
            let (ct, events) = (self.ct.as_raw_fd(), self.events.as_raw_fd());
            let proxy_config = self.proxy_config.as_raw_fd();
            let fqdn = self.fqdn.as_raw_fd();
            let program = generated
                .program
                .with_map_fds(|name| match name {
                    gen::CT_MAP => Some(ct),
                    gen::EVENTS_MAP => Some(events),
                    gen::PROXY_CONFIG_MAP => Some(proxy_config),
                    gen::FQDN_MAP => Some(fqdn),
                    _ => maps.get(name).map(|fd| fd.as_raw_fd()),
                })
                .ok_or_else(|| LoaderError::Rejected {
                    hook: hook.clone(),
                    reason: "a map reference cannot be resolved".into(),
                })?;
            check::check(&program).map_err(|errors| LoaderError::Rejected {
                hook: hook.clone(),
                reason: format!("cnpc's checker: {}", errors[0]),
            })?;
            to_load.push((digest, hook, program.bytes()));
        }
        let mut programs: BTreeMap<String, OwnedFd> = BTreeMap::new();
        for ((digest, hook, _), loaded) in to_load.iter().zip(load_all(&to_load)) {
            let fd = loaded.map_err(|reason| LoaderError::Rejected {
                hook: hook.clone(),
                reason,
            })?;
            programs.insert(digest.clone(), fd);
            report.programs_loaded += 1;
        }
        report.load_time = start.elapsed();
        // The proxies get the generation's L7 view before its programs switch in, so a
        // connection the new programs hand to a proxy is judged by the new rules.
        if let Some(path) = &self.cfg.proxy_policy {
            if self.proxy_policy.as_ref() != Some(&g.proxy) {
                let mut proxy = g.proxy.clone();
                proxy.generation = report.generation;
                crate::l7::write_policy(path, &proxy).map_err(|e| LoaderError::State {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                // Kept as the generation built it, to compare the next one with.
                proxy.generation = g.proxy.generation;
                self.proxy_policy = Some(proxy);
                let waited = Instant::now();
                report.proxy_acknowledged = crate::l7::await_acknowledgement(
                    path,
                    report.generation,
                    self.cfg.proxy_ack_timeout,
                );
                report.proxy_wait = waited.elapsed();
            }
        }

        // Learned addresses take the generation's identities before its programs switch in.
        // The old programs may then read an identity they do not know for an address whose
        // identity changed, which their tables deny by default: for the moment of the switch
        // such an address is refused, never given more than either generation gives it (the
        // other order would let the new tables read the old identities).
        if g.fqdn.managed {
            crate::fqdn::sync_map(&self.fqdn, &g.fqdn.map).map_err(|e| LoaderError::State {
                path: self.cfg.pin_dir.join(gen::FQDN_MAP),
                message: e.to_string(),
            })?;
        }

        // Phase 2: switch, hook by hook.
        let switch = Instant::now();
        let mut hooks = BTreeMap::new();
        let mut updated_sets: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (hook, direction, mut record, action) in plan {
            let prog = match (action, programs.get(&record.digest)) {
                (HookAction::Load, Some(p)) => p,
                _ => {
                    // Kept: the hook runs a program with this content already.
                    if let Some(old) = self.state.hooks.get(&hook) {
                        record.attach = old.attach.clone();
                        record.generation = old.generation;
                    }
                    match action {
                        HookAction::UpdateIpcache(set) => {
                            // It decides as this generation once its ipcache set is written.
                            record.generation = report.generation;
                            updated_sets.entry(set).or_default().push(hook.clone());
                        }
                        _ => report.unchanged += 1,
                    }
                    hooks.insert(hook, record);
                    continue;
                }
            };
            match self.links.get(&hook) {
                Some(attachment) => {
                    let updated = match attachment {
                        Attachment::Link(link) => sys::link_update(link, prog),
                        Attachment::Clsact { ifindex } => {
                            crate::tc::attach(*ifindex, tc_hook(direction), prog, &hook)
                        }
                    };
                    if let Err(e) = updated {
                        report
                            .failed
                            .push(format!("{hook}: cannot switch the program: {e}"));
                        continue;
                    }
                    record.attach = self
                        .state
                        .hooks
                        .get(&hook)
                        .map_or_else(tcx, |h| h.attach.clone());
                    report.swapped += 1;
                }
                None => match self.attach(&hook, &record.interface, direction, prog) {
                    Ok(attachment) => {
                        if let Attachment::Clsact { .. } = attachment {
                            record.attach = "clsact".into();
                        }
                        self.links.insert(hook.clone(), attachment);
                        report.attached += 1;
                    }
                    Err(e) => {
                        report.failed.push(format!("{hook}: {e}"));
                        continue;
                    }
                },
            }
            if let (Some(set), Some(content)) = (loaded_set, contents.remove(&hook)) {
                self.running.insert(
                    hook.clone(),
                    RunningProgram {
                        content,
                        ipcache_set: set,
                    },
                );
            }
            hooks.insert(hook, record);
        }
        // The ipcache maps of kept programs, now that every loaded program is in (the old
        // programs they replace read the old ipcache to the end).
        if let Some(old) = self.ipcache.take().filter(|_| !updated_sets.is_empty()) {
            report.ipcache_updated = updated_sets.values().map(Vec::len).sum();
            self.update_ipcache_sets(&old, &image, &updated_sets, &mut hooks)?;
        }
        self.ipcache = Some(image);
        // Phase 3: release hooks of endpoints that left.
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|h| !hooks.contains_key(*h))
            .cloned()
            .collect();
        for hook in gone {
            let _ = std::fs::remove_file(self.cfg.pin_dir.join("links").join(&hook));
            if let Some(Attachment::Clsact { ifindex }) = self.links.remove(&hook) {
                let direction = if hook.starts_with("egress_") {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                let _ = crate::tc::detach(ifindex, tc_hook(direction));
            }
            report.detached += 1;
        }
        // Sets no program of this process reads any more (the kernel frees them with the last
        // program that holds them).
        self.running.retain(|hook, _| hooks.contains_key(hook));
        let used: std::collections::BTreeSet<u64> =
            self.running.values().map(|r| r.ipcache_set).collect();
        self.ipcache_sets.retain(|set, _| used.contains(set));
        report.switch_time = switch.elapsed();
        if report.attached + report.swapped + report.detached + report.ipcache_updated > 0 {
            self.state.generation = report.generation;
        } else {
            report.generation = self.state.generation;
        }
        self.state.hooks = hooks;
        self.save()?;
        Ok(report)
    }

    /// An ipcache set holding `image`: the newest live one that holds it, otherwise new maps,
    /// filled.
    fn ipcache_set_for(&mut self, image: &IpcacheImage) -> Result<u64, LoaderError> {
        if let Some((&set, _)) = self
            .ipcache_sets
            .iter()
            .rev()
            .find(|(_, s)| s.holds == Some(image.digest))
        {
            return Ok(set);
        }
        let shared = gen::shared_maps(image.entries());
        let mut maps = BTreeMap::new();
        for (name, records) in image.records() {
            let d = shared
                .iter()
                .find(|m| m.name == name)
                .expect("gen::shared_maps defines every shared map");
            let fd = sys::create_filled(d, &records).map_err(map_error)?;
            maps.insert(name.to_string(), fd);
        }
        let set = self.next_ipcache_set;
        self.next_ipcache_set += 1;
        self.ipcache_sets.insert(
            set,
            IpcacheSet {
                maps,
                made_for: image.entries(),
                holds: Some(image.digest),
            },
        );
        Ok(set)
    }

    /// Changes the ipcache sets in `sets` from `old` to `new` in place, for the hooks listed
    /// with each (their new records in `hooks`). The state file first records those hooks with
    /// no digest, so that a loader stopped half-way never takes their maps for either ipcache
    /// (a restarted loader keeps a hook only when its digest matches), and the hooks already
    /// switched with their new programs' digests. A set that cannot be
    /// written is forgotten and the state saved with those hooks still without a digest;
    /// [`Self::apply`] then loads every program afresh.
    fn update_ipcache_sets(
        &mut self,
        old: &IpcacheImage,
        new: &IpcacheImage,
        sets: &BTreeMap<u64, Vec<String>>,
        hooks: &mut BTreeMap<String, HookRecord>,
    ) -> Result<(), LoaderError> {
        // Their new digests, given back once every set is written.
        let mut digests = Vec::new();
        for hook in sets.values().flatten() {
            if let Some(r) = hooks.get_mut(hook) {
                digests.push((hook.clone(), std::mem::take(&mut r.digest)));
            }
        }
        // Saved meanwhile: the hooks switched so far with their new records, these with none,
        // and the hooks still to be released as they were.
        let mut interim = std::mem::take(&mut self.state.hooks);
        interim.extend(hooks.iter().map(|(h, r)| (h.clone(), r.clone())));
        self.state.hooks = interim;
        self.save()?;
        let changes = crate::ipcache::changes(old, new);
        for (set, members) in sets {
            let written = self.ipcache_sets.get_mut(set).map(|s| {
                s.holds = None;
                let written = crate::ipcache::write(&s.maps, &changes);
                if written.is_ok() {
                    s.holds = Some(new.digest);
                }
                written
            });
            if let Some(Err(e)) = written {
                self.ipcache_sets.remove(set);
                for hook in members {
                    self.running.remove(hook);
                }
                self.state.hooks = std::mem::take(hooks);
                let _ = self.save();
                return Err(LoaderError::IpcacheInPlace(e));
            }
        }
        for (hook, digest) in digests {
            if let Some(r) = hooks.get_mut(&hook) {
                r.digest = digest;
            }
        }
        Ok(())
    }

    /// Puts a deny-all program on both hooks of every interface in `interfaces` that has no
    /// hook yet: an endpoint policy selects must never run without a program while no
    /// generation has been good (non-IP frames still pass, so the interface stays usable).
    pub fn deny_all(&mut self, interfaces: &[String]) -> Result<usize, LoaderError> {
        let mut attached = 0;
        let mut prog: Option<OwnedFd> = None;
        for interface in interfaces {
            for direction in [Direction::Ingress, Direction::Egress] {
                let hook = hook_name(interface, direction);
                if self.links.contains_key(&hook) {
                    continue;
                }
                if prog.is_none() {
                    let table = DecisionTable {
                        subject: NumericIdentity(0),
                        direction,
                        default: TableVerdict::Deny,
                        classes: Vec::new(),
                        rows: Vec::new(),
                    };
                    let g = gen::generate(&table, false);
                    prog = Some(
                        sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &g.program.bytes()).map_err(
                            |reason| LoaderError::Rejected {
                                hook: hook.clone(),
                                reason,
                            },
                        )?,
                    );
                }
                let p = prog.as_ref().expect("loaded above");
                let attachment = self
                    .attach(&hook, interface, direction, p)
                    .map_err(kernel(format!("cannot attach deny-all to {hook}")))?;
                let attach = match attachment {
                    Attachment::Link(_) => tcx(),
                    Attachment::Clsact { .. } => "clsact".into(),
                };
                self.links.insert(hook.clone(), attachment);
                self.state.hooks.insert(
                    hook,
                    HookRecord {
                        interface: interface.clone(),
                        direction: direction.as_str().into(),
                        endpoint: String::new(),
                        identity: 0,
                        labels: Vec::new(),
                        generation: 0,
                        digest: String::new(),
                        strategy: "deny-all".into(),
                        attach,
                    },
                );
                attached += 1;
            }
        }
        self.save()?;
        Ok(attached)
    }

    /// Puts the proxy device's program (`gen::proxy_device_program`) at tc ingress of
    /// `interface` and names the device in `proxy_config`, so ingress programs hand proxied
    /// packets to it. Pinned apart from the endpoint hooks, which a generation replaces; done
    /// again at every start (the program has no state, the pin is replaced).
    pub fn attach_proxy_device(&mut self, interface: &str) -> Result<(), LoaderError> {
        let program = gen::proxy_device_program();
        check::check(&program).map_err(|errors| LoaderError::Rejected {
            hook: PROXY_DEVICE_HOOK.into(),
            reason: format!("cnpc's checker: {}", errors[0]),
        })?;
        let prog = sys::load(sys::BPF_PROG_TYPE_SCHED_CLS, &program.bytes()).map_err(|reason| {
            LoaderError::Rejected {
                hook: PROXY_DEVICE_HOOK.into(),
                reason,
            }
        })?;
        let pin = self.cfg.pin_dir.join(PROXY_DEVICE_HOOK);
        let ifindex = sys::ifindex(interface).ok_or_else(|| LoaderError::Kernel {
            what: format!("no interface {interface}"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let adopted = sys::obj_get(&pin)
            .ok()
            .filter(|l| sys::link_info(l).is_ok_and(|(_, _, i)| i == ifindex));
        match adopted {
            Some(link) => sys::link_update(&link, &prog)
                .map_err(kernel(format!("cannot update {}", pin.display())))?,
            None => {
                let _ = std::fs::remove_file(&pin);
                // The device's tc ingress is where an endpoint's egress program would run.
                self.attach_at(PROXY_DEVICE_HOOK, ifindex, Direction::Egress, &prog, &pin)
                    .map_err(kernel(format!("cannot attach to {interface}")))?;
            }
        }
        let (key, value) = gen::proxy_config_record(ifindex);
        sys::map_update(&self.proxy_config, &key, &value)
            .map_err(kernel("cannot write proxy_config"))
    }

    fn attach(
        &self,
        hook: &str,
        interface: &str,
        direction: Direction,
        prog: &OwnedFd,
    ) -> std::io::Result<Attachment> {
        let ifindex = sys::ifindex(interface).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no interface {interface}"),
            )
        })?;
        let path = self.cfg.pin_dir.join("links").join(hook);
        self.attach_at(hook, ifindex, direction, prog, &path)
    }

    /// Attaches `prog` where `direction`'s program of an endpoint runs on interface `ifindex`
    /// (egress: tc ingress), as a TCX link pinned at `pin`, or a clsact filter named `hook`.
    fn attach_at(
        &self,
        hook: &str,
        ifindex: u32,
        direction: Direction,
        prog: &OwnedFd,
        pin: &Path,
    ) -> std::io::Result<Attachment> {
        let clsact = |_| {
            crate::tc::attach(ifindex, tc_hook(direction), prog, hook)
                .map(|()| Attachment::Clsact { ifindex })
        };
        let link = match self.cfg.attach {
            AttachMode::Clsact => return clsact(()),
            AttachMode::Tcx => sys::tcx_attach(prog, ifindex, attach_type(direction))?,
            // A kernel without TCX refuses the attach type.
            AttachMode::Auto => match sys::tcx_attach(prog, ifindex, attach_type(direction)) {
                Ok(link) => link,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    return clsact(())
                }
                Err(e) => return Err(e),
            },
        };
        let _ = std::fs::remove_file(pin);
        sys::obj_pin(&link, pin)?;
        Ok(Attachment::Link(link))
    }

    /// Writes the state file atomically (a temporary file renamed over it).
    fn save(&self) -> Result<(), LoaderError> {
        let err = |e: std::io::Error| LoaderError::State {
            path: self.cfg.state_file.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = self.cfg.state_file.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.cfg.state_file.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&self.state).expect("the state serialises");
        std::fs::write(&tmp, text + "\n").map_err(err)?;
        std::fs::rename(&tmp, &self.cfg.state_file).map_err(err)
    }
}

/// One row of `cnpc endpoints`: a recorded hook and what the kernel says about it now.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointHook {
    #[serde(flatten)]
    pub record: HookRecord,
    /// Whether the hook is still in place (its link pinned, or its interface there).
    pub attached: bool,
    /// The id of the program the pinned link runs (TCX), if the link is still there.
    pub program_id: Option<u32>,
    pub link_id: Option<u32>,
}

/// The hooks of the pinned state, read without changing anything.
pub fn endpoints(cfg: &Config) -> Result<Vec<EndpointHook>, LoaderError> {
    let text = std::fs::read_to_string(&cfg.state_file).map_err(|e| LoaderError::State {
        path: cfg.state_file.clone(),
        message: e.to_string(),
    })?;
    let state: State = serde_json::from_str(&text).map_err(|e| LoaderError::State {
        path: cfg.state_file.clone(),
        message: e.to_string(),
    })?;
    Ok(state
        .hooks
        .into_iter()
        .map(|(hook, record)| {
            let info = sys::obj_get(&cfg.pin_dir.join("links").join(&hook))
                .and_then(|fd| sys::link_info(&fd))
                .ok();
            let attached = match record.attach.as_str() {
                "clsact" => sys::ifindex(&record.interface).is_some(),
                _ => info.is_some(),
            };
            EndpointHook {
                record,
                attached,
                program_id: info.map(|i| i.1),
                link_id: info.map(|i| i.0),
            }
        })
        .collect())
}
