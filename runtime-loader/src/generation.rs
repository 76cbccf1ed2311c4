//! One generation: the policies and the cluster snapshot compiled into decision tables, the
//! ipcache, and the endpoints to enforce on. Compiling is the compiler's work; this module only
//! runs it the way `cnpc compile` does and keeps what the loader needs.

use crate::fqdn::FqdnState;
use crate::node::{interface_for, Route};
use cnpc_compiler::incremental::{IncrementalInputs, Update};
use cnpc_compiler::lower::{self, Allocation};
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_compiler::{check_errors, report, Cluster, PolicySet};
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::{DecisionTable, Direction, IpNet, NumericIdentity, Origin};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pod endpoint of the cluster snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `namespace/name`.
    pub name: String,
    pub identity: NumericIdentity,
    /// Its identity's labels, shared by the endpoints of that identity (thousands of pods,
    /// few label sets).
    pub labels: Arc<[String]>,
    pub ips: Vec<IpAddr>,
    /// The interface its `cnpc.io/interface` annotation names, if any.
    pub interface: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tables: Vec<DecisionTable>,
    pub ipcache: Vec<(IpNet, NumericIdentity)>,
    /// Shared between generations of the same snapshot (thousands of pods).
    pub endpoints: Arc<Vec<EndpointInfo>>,
    /// What the L7 proxies need to judge requests under this generation.
    pub proxy: ProxyPolicy,
    /// The FQDN identities its tables know and the `fqdn` map it wants.
    pub fqdn: crate::fqdn::FqdnView,
    /// For each table (subject, direction), the rule behind each row: what a verdict event's
    /// row means to `cnpc observe`.
    pub row_origins: std::collections::HashMap<(NumericIdentity, Direction), RowRules>,
    /// For each table, its deny rules (origin, peers, ports): what dropped a packet that the
    /// table's default row drops, when a deny rule folded into the default.
    pub default_denies: std::collections::HashMap<(NumericIdentity, Direction), Vec<DefaultDeny>>,
    /// The identity numbers used, to pass to the next compile so numbers stay put.
    pub allocation: Allocation,
    /// Time spent reading and checking the inputs, lowering, and building tables.
    pub check_time: Duration,
    pub lower_time: Duration,
    pub tables_time: Duration,
}

/// Per row of a table, the rule behind it and its kind (Cilium's policy match type).
pub type RowRules = Vec<Option<(Origin, crate::metrics::MatchKind)>>;

/// A deny rule of a table, for naming what its default row dropped.
#[derive(Clone, Debug)]
pub struct DefaultDeny {
    pub origin: Origin,
    pub kind: crate::metrics::MatchKind,
    pub peers: std::collections::HashSet<NumericIdentity>,
    pub ports: Vec<(cnpc_ir::Protocol, cnpc_ir::PortRange)>,
}

/// Why a generation could not be built; the previous one keeps enforcing.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Load(#[from] cnpc_compiler::LoadError),
    #[error("{errors} error(s) in the policies:\n{report}")]
    Invalid {
        errors: usize,
        report: String,
        /// The first error of each file (source name) that has one.
        by_file: std::collections::BTreeMap<String, String>,
    },
    /// The inputs have errors, counted and not yet reported ([`Errors::Count`]).
    #[error("{errors} error(s) in the policies (not yet reported)")]
    Unreported { errors: usize },
}

/// Compiles `policies` over the snapshot `cluster`, keeping the numbers of `previous`. Tables
/// are built for the identities of endpoints `routes` reaches (this node's), or for every
/// identity when `routes` is `None`.
pub fn compile(
    policies: &[PathBuf],
    cluster: &Path,
    previous: &Allocation,
    routes: Option<&[Route]>,
    fqdn: Option<&mut FqdnState>,
) -> Result<Generation, CompileError> {
    let start = Instant::now();
    let mut set = PolicySet::load(policies)?;
    let snapshot = Cluster::load(&[cluster], &mut set.sources)?;
    build(set, snapshot, previous, routes, start, fqdn)
}

/// Checks, lowers and builds tables for a loaded policy set and cluster snapshot (from files,
/// or from the API server's objects in Kubernetes mode); `start` is when loading began. With
/// `fqdn` (a loader's learned addresses) the tables know the FQDN identities those addresses
/// need; without, one per toFQDNs selector.
pub fn build(
    set: PolicySet,
    snapshot: Cluster,
    previous: &Allocation,
    routes: Option<&[Route]>,
    start: Instant,
    fqdn: Option<&mut FqdnState>,
) -> Result<Generation, CompileError> {
    // Lints only warn; enforcement needs the errors alone.
    let checked = check_errors(set, Some(snapshot));
    if checked.errors() > 0 {
        let mut by_file = std::collections::BTreeMap::new();
        for d in checked
            .diagnostics
            .iter()
            .filter(|d| d.severity() == cnpc_compiler::Severity::Error)
        {
            let file = checked
                .set
                .sources
                .get(d.span.file)
                .path
                .display()
                .to_string();
            by_file.entry(file).or_insert_with(|| d.message.clone());
        }
        return Err(CompileError::Invalid {
            errors: checked.errors(),
            report: report::human(&checked, false),
            by_file,
        });
    }
    let check_time = start.elapsed();
    // `check` keeps the cluster it was given.
    let cluster = checked.cluster.as_ref().expect("checked with a cluster");
    let program = lower::build(
        &checked.set.policies,
        &checked.set.sources,
        cluster,
        previous,
    );
    // The sources, syntax trees and snapshot are done with: free them before building tables,
    // which is where the peak would otherwise be.
    drop(checked);
    let lower_time = start.elapsed() - check_time;
    let endpoints = endpoint_infos(&program);
    let allocation = lower::allocation_of(&program);
    Ok(of_program(
        &program,
        routes,
        fqdn,
        (endpoints, allocation),
        start,
        (check_time, lower_time),
    ))
}

/// Policies and a snapshot kept compiled between generations: each compile parses, checks and
/// lowers only the files whose contents changed ([`IncrementalInputs`]).
#[derive(Default)]
pub struct Incremental {
    inputs: IncrementalInputs,
    /// What the snapshot's endpoints give every generation, under the inputs' identities
    /// version they were made for.
    endpoints: Option<(u64, Arc<Vec<EndpointInfo>>)>,
}

/// What a compile does with inputs that have errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errors {
    /// Reports them as `cnpc check` would ([`CompileError::Invalid`]).
    Report,
    /// Counts them ([`CompileError::Unreported`]): for a compile that files still being
    /// written may make stale, whose errors are likely those of a file half written. The full
    /// checker reads and checks every file again, about as long as a first compile.
    Count,
}

impl Incremental {
    /// What [`compile`] returns for the same inputs (with `Errors::Report`).
    pub fn compile(
        &mut self,
        policies: &[PathBuf],
        cluster: &Path,
        previous: &Allocation,
        routes: Option<&[Route]>,
        fqdn: Option<&mut FqdnState>,
        errors: Errors,
    ) -> Result<Generation, CompileError> {
        let start = Instant::now();
        match self.inputs.update(policies, cluster, previous)? {
            Update::Program {
                program,
                allocation,
                identities_version,
                ..
            } => {
                let check_time = start.elapsed();
                let endpoints = match &self.endpoints {
                    Some((v, e)) if *v == identities_version => e.clone(),
                    _ => {
                        let made = endpoint_infos(program);
                        self.endpoints = Some((identities_version, made.clone()));
                        made
                    }
                };
                Ok(of_program(
                    program,
                    routes,
                    fqdn,
                    (endpoints, allocation.clone()),
                    start,
                    (check_time, Duration::ZERO),
                ))
            }
            // The full path reports the errors as `cnpc check` would.
            Update::Invalid { .. } if errors == Errors::Report => {
                compile(policies, cluster, previous, routes, fqdn)
            }
            Update::Invalid { errors } => Err(CompileError::Unreported { errors }),
        }
    }
}

/// The pod endpoints of a program, as generations carry them.
fn endpoint_infos(program: &cnpc_ir::Program) -> Arc<Vec<EndpointInfo>> {
    // An endpoint's labels are its identity's (`lower::cluster_program`): written out once
    // per identity.
    let mut labels: HashMap<cnpc_ir::IdentityRef, Arc<[String]>> = HashMap::new();
    Arc::new(
        program
            .endpoints
            .values()
            .filter(|e| e.is_pod)
            .map(|e| EndpointInfo {
                name: e.name.clone(),
                identity: program.identities[e.identity].numeric,
                labels: labels
                    .entry(e.identity)
                    .or_insert_with(|| e.labels.to_strings().into())
                    .clone(),
                ips: e.ips.clone(),
                interface: e.interface.clone(),
            })
            .collect(),
    )
}

/// Builds the tables of a lowered program; the rest of [`build`].
fn of_program(
    program: &cnpc_ir::Program,
    routes: Option<&[Route]>,
    fqdn: Option<&mut FqdnState>,
    (endpoints, allocation): (Arc<Vec<EndpointInfo>>, Allocation),
    start: Instant,
    (check_time, lower_time): (Duration, Duration),
) -> Generation {
    // Endpoint and node addresses keep their identities: never learned from DNS.
    let excluded = program
        .endpoints
        .values()
        .flat_map(|e| e.ips.iter().copied())
        .chain(crate::node::local_addresses())
        .collect();
    let mut learned = FqdnState::new(0);
    let managed = fqdn.is_some();
    let (fqdn_identities, mut fqdn) = fqdn.unwrap_or(&mut learned).prepare(program, excluded);
    fqdn.managed = managed;
    let compiler = TableCompiler::with_fqdn(program, &fqdn_identities);
    let tables: Vec<(DecisionTable, Vec<cnpc_ir::RuleRef>)> = match routes {
        None => {
            let all = program
                .endpoints
                .values()
                .filter(|e| e.is_pod)
                .map(|e| program.identities[e.identity].numeric)
                .collect();
            compiler.of_with_rules(program, &all)
        }
        Some(routes) => {
            let local: BTreeSet<NumericIdentity> = program
                .endpoints
                .values()
                .filter(|e| {
                    e.is_pod && interface_for(e.interface.as_deref(), &e.ips, routes).is_some()
                })
                .map(|e| program.identities[e.identity].numeric)
                .collect();
            compiler.of_with_rules(program, &local)
        }
    };
    // What `cnpc observe` names: the rule behind each row, and the deny rules folded into a
    // table's default.
    let row_origins = tables
        .iter()
        .map(|(t, applicable)| {
            let origins = compiler
                .row_rules_among(program, t, applicable)
                .into_iter()
                .map(|refs| {
                    refs.first().map(|r| {
                        let rule = &program.rules[*r];
                        (rule.origin.clone(), crate::metrics::MatchKind::of(rule))
                    })
                })
                .collect();
            ((t.subject, t.direction), origins)
        })
        .collect();
    let default_denies = tables
        .iter()
        .filter_map(|(t, applicable)| {
            let denies: Vec<DefaultDeny> = compiler
                .deny_rules_among(program, applicable)
                .into_iter()
                .map(|d| DefaultDeny {
                    origin: program.rules[d.rule].origin.clone(),
                    kind: crate::metrics::MatchKind::of(&program.rules[d.rule]),
                    peers: d.peers,
                    ports: d.ports,
                })
                .collect();
            (!denies.is_empty()).then_some(((t.subject, t.direction), denies))
        })
        .collect();
    let tables: Vec<DecisionTable> = tables.into_iter().map(|(t, _)| t).collect();
    let mut ipcache = ipcache_entries(program, &compiler.universe);
    // Compiled for this node: its own addresses are the host, not a remote node.
    if routes.is_some() {
        crate::node::mark_host(&mut ipcache, &crate::node::local_addresses());
    }
    let mut proxy = ProxyPolicy::build(program, &tables, &ipcache);
    proxy.learned = fqdn
        .map
        .iter()
        .filter(|(_, v)| *v & crate::fqdn::ZOMBIE == 0)
        .map(|(ip, v)| (*ip, NumericIdentity(*v)))
        .collect();
    let tables_time = start.elapsed() - check_time - lower_time;
    Generation {
        tables,
        ipcache,
        endpoints,
        proxy,
        fqdn,
        row_origins,
        default_denies,
        allocation,
        check_time,
        lower_time,
        tables_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the loader needs of a generation, comparable (tables, ipcache, endpoints, the L7
    /// view, the rules behind rows, identity numbers).
    fn summary(g: &Generation) -> String {
        let mut rows: Vec<_> = g.row_origins.iter().collect();
        rows.sort_by_key(|(k, _)| **k);
        let mut denies: Vec<_> = g
            .default_denies
            .iter()
            .map(|(k, d)| {
                let d: Vec<_> = d
                    .iter()
                    .map(|d| {
                        let mut peers: Vec<_> = d.peers.iter().collect();
                        peers.sort();
                        (&d.origin, d.kind, peers, &d.ports)
                    })
                    .collect();
                (*k, format!("{d:?}"))
            })
            .collect();
        denies.sort();
        format!(
            "{:#?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            g.tables, g.ipcache, g.endpoints, g.proxy, rows, denies, g.allocation
        )
    }

    /// The loader's incremental compile gives what a full compile gives, before and after
    /// edits of a policy file and of the snapshot (issue 12).
    #[test]
    fn incremental_compile_equals_full_compile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = std::env::temp_dir().join(format!("cnpc-gen-inc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        for set in ["starwars-l4", "starwars-l7", "dns"] {
            for e in std::fs::read_dir(root.join("policies").join(set)).unwrap() {
                let p = e.unwrap().path();
                if !p.is_file() {
                    continue;
                }
                let name = format!("{set}-{}", p.file_name().unwrap().to_string_lossy());
                std::fs::copy(&p, dir.join("policies").join(name)).unwrap();
            }
        }
        let cluster = dir.join("cluster.yaml");
        std::fs::copy(root.join("policies/cluster.yaml"), &cluster).unwrap();
        let policies = vec![dir.join("policies")];
        let mut inc = Incremental::default();
        let mut previous = Allocation::new();
        let mut check = |previous: &Allocation| {
            let a = inc
                .compile(&policies, &cluster, previous, None, None, Errors::Report)
                .unwrap();
            let b = compile(&policies, &cluster, previous, None, None).unwrap();
            assert_eq!(summary(&a), summary(&b));
            a.allocation
        };
        previous = check(&previous);
        check(&previous);
        // A policy edit: the deathstar opens port 8080 too.
        let file = dir.join("policies/starwars-l4-deathstar.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let edited = text.replace("port: \"80\"", "port: \"8080\"");
        assert_ne!(edited, text);
        std::fs::write(&file, edited).unwrap();
        check(&previous);
        // A pod's labels change in the snapshot: a new identity.
        let text = std::fs::read_to_string(&cluster).unwrap();
        let edited = text.replacen("class: xwing", "class: xwing-mk2", 1);
        assert_ne!(edited, text);
        std::fs::write(&cluster, edited).unwrap();
        previous = check(&previous);
        check(&previous);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
