//! One generation: the policies and the cluster snapshot compiled into decision tables, the
//! ipcache, and the endpoints to enforce on. Compiling is the compiler's work; this module only
//! runs it the way `cnpc compile` does and keeps what the loader needs.

use crate::fqdn::FqdnState;
use crate::node::{interface_for, Route};
use cnpc_compiler::lower::{self, Allocation};
use cnpc_compiler::tables::{ipcache_entries, TableCompiler};
use cnpc_compiler::{check_errors, report, Cluster, PolicySet};
use cnpc_ir::proxy::ProxyPolicy;
use cnpc_ir::{DecisionTable, Direction, IpNet, NumericIdentity, Origin};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A pod endpoint of the cluster snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `namespace/name`.
    pub name: String,
    pub identity: NumericIdentity,
    pub labels: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// The interface its `cnpc.io/interface` annotation names, if any.
    pub interface: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tables: Vec<DecisionTable>,
    pub ipcache: Vec<(IpNet, NumericIdentity)>,
    pub endpoints: Vec<EndpointInfo>,
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
    // Endpoint and node addresses keep their identities: never learned from DNS.
    let excluded = program
        .endpoints
        .values()
        .flat_map(|e| e.ips.iter().copied())
        .chain(crate::node::local_addresses())
        .collect();
    let mut learned = FqdnState::new(0);
    let managed = fqdn.is_some();
    let (fqdn_identities, mut fqdn) = fqdn.unwrap_or(&mut learned).prepare(&program, excluded);
    fqdn.managed = managed;
    let compiler = TableCompiler::with_fqdn(&program, &fqdn_identities);
    let tables = match routes {
        None => compiler.all(&program),
        Some(routes) => {
            let local: BTreeSet<NumericIdentity> = program
                .endpoints
                .values()
                .filter(|e| {
                    e.is_pod && interface_for(e.interface.as_deref(), &e.ips, routes).is_some()
                })
                .map(|e| program.identities[e.identity].numeric)
                .collect();
            compiler.of(&program, &local)
        }
    };
    let row_origins = tables
        .iter()
        .filter_map(|t| {
            let subject = program
                .endpoints
                .values()
                .find(|e| e.is_pod && program.identities[e.identity].numeric == t.subject)?;
            let origins = compiler
                .row_rules(&program, subject, t)
                .into_iter()
                .map(|refs| {
                    refs.first().map(|r| {
                        let rule = &program.rules[*r];
                        (rule.origin.clone(), crate::metrics::MatchKind::of(rule))
                    })
                })
                .collect();
            Some(((t.subject, t.direction), origins))
        })
        .collect();
    let default_denies = tables
        .iter()
        .filter_map(|t| {
            let subject = program
                .endpoints
                .values()
                .find(|e| e.is_pod && program.identities[e.identity].numeric == t.subject)?;
            let denies: Vec<DefaultDeny> = compiler
                .deny_rules(&program, subject, t.direction)
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
    let mut ipcache = ipcache_entries(&program, &compiler.universe);
    // Compiled for this node: its own addresses are the host, not a remote node.
    if routes.is_some() {
        crate::node::mark_host(&mut ipcache, &crate::node::local_addresses());
    }
    let mut proxy = ProxyPolicy::build(&program, &tables, &ipcache);
    proxy.learned = fqdn
        .map
        .iter()
        .filter(|(_, v)| *v & crate::fqdn::ZOMBIE == 0)
        .map(|(ip, v)| (*ip, NumericIdentity(*v)))
        .collect();
    let endpoints = program
        .endpoints
        .values()
        .filter(|e| e.is_pod)
        .map(|e| EndpointInfo {
            name: e.name.clone(),
            identity: program.identities[e.identity].numeric,
            labels: e.labels.to_strings(),
            ips: e.ips.clone(),
            interface: e.interface.clone(),
        })
        .collect();
    let tables_time = start.elapsed() - check_time - lower_time;
    Ok(Generation {
        tables,
        ipcache,
        endpoints,
        proxy,
        fqdn,
        row_origins,
        default_denies,
        allocation: lower::allocation_of(&program),
        check_time,
        lower_time,
        tables_time,
    })
}
