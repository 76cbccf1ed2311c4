//! cnpc's policy front end and, later, its semantics core.
//!
//! Today this crate reads CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes
//! NetworkPolicy files into a typed AST whose every node carries its source [`Span`], checks them
//! the way Cilium and the Kubernetes API server would ([`validate`]), lints them for mistakes that
//! both accept ([`lint`]), and reports everything as [`Diagnostic`]s with stable codes.
//!
//! Pipeline position (DESIGN.md §1): YAML → **compiler** → ir → codegen-bpf → runtime-loader.
//! It emits no BPF.

pub mod ast;
pub mod cluster;
pub mod decode;
pub mod diag;
pub mod diff;
pub mod eval;
pub mod expect;
pub mod graph;
pub mod incremental;
pub mod labels;
pub mod lint;
pub mod load;
pub mod lower;
pub mod parallel;
pub mod report;
pub mod schema;
pub mod source;
pub mod subst;
pub mod tables;
pub mod validate;
pub mod vocab;
pub mod yaml;

pub use cluster::Cluster;
pub use diag::{Code, Diagnostic, Severity};
pub use load::{load_str, LoadError, Note, PolicySet};
pub use source::{FileId, SourceMap, Span};

/// The result of `cnpc check`: every diagnostic, sorted by file and position.
#[derive(Debug)]
pub struct CheckReport {
    pub set: PolicySet,
    pub cluster: Option<Cluster>,
    pub diagnostics: Vec<Diagnostic>,
}

impl CheckReport {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity() == Severity::Error)
            .count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity() == Severity::Warning)
            .count()
    }
}

/// Validates and lints a loaded policy set.
pub fn check(set: PolicySet, cluster: Option<Cluster>) -> CheckReport {
    checked(set, cluster, true)
}

/// Validates without linting: every error `check` finds, none of its warnings. Lints only
/// ever warn (their codes are all warnings), so this is what enforcement needs, at about half
/// the cost on large sets.
pub fn check_errors(set: PolicySet, cluster: Option<Cluster>) -> CheckReport {
    checked(set, cluster, false)
}

fn checked(set: PolicySet, cluster: Option<Cluster>, lints: bool) -> CheckReport {
    let mut diagnostics = set.diagnostics.clone();
    diagnostics.extend(validate::validate(&set.policies));
    if lints {
        diagnostics.extend(lint::lint(&set.policies, cluster.as_ref()));
    }
    if let Some(c) = &cluster {
        diagnostics.extend(c.diagnostics.iter().cloned());
    }
    diagnostics.sort_by(|a, b| {
        (a.span.file, a.span.start, a.code).cmp(&(b.span.file, b.span.start, b.code))
    });
    diagnostics.dedup();
    CheckReport {
        set,
        cluster,
        diagnostics,
    }
}
