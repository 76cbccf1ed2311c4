//! `cnpc diff`: which flows a policy change flips.

use crate::common::{checked, fail, print, program_of, tables_of};
use clap::ValueEnum;
use cnpc_compiler::diff::{self, Flip};
use cnpc_compiler::{report, PolicySet};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum DiffFormat {
    Text,
    Json,
    /// A table of the flipped flows per workload pair, for a pull-request comment.
    #[value(alias = "md")]
    Markdown,
    Dot,
    Html,
}

/// Which changes make `cnpc diff` exit 1.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum FailOn {
    /// A flow allowed before (with or without L7 rules) is denied after.
    AllowedToDenied,
    /// A flow denied before is allowed after.
    DeniedToAllowed,
    /// Any change, L7 rules added or removed included (as --exit-code).
    Any,
}

impl FailOn {
    fn matches(self, f: Flip) -> bool {
        match self {
            FailOn::Any => true,
            FailOn::AllowedToDenied => f == Flip::AllowedToDenied,
            FailOn::DeniedToAllowed => f == Flip::DeniedToAllowed,
        }
    }
}

pub struct DiffArgs {
    pub old: String,
    pub new: String,
    pub cluster: Vec<PathBuf>,
    pub output: DiffFormat,
    pub exit_code: bool,
    pub fail_on: Option<FailOn>,
    pub identities: Option<PathBuf>,
    pub vars: crate::vars::VarArgs,
}

pub fn run_diff(a: DiffArgs) -> ExitCode {
    let vars = match a.vars.vars() {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let load = |spec: &str| {
        PolicySet::load_spec_with(spec, &vars)
            .map_err(fail)
            .and_then(|s| checked(s, &a.cluster))
    };
    let (old, new) = match (load(&a.old), load(&a.new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let identities = &a.identities;
    let (old_program, new_program, tables) = match a.output {
        // Only the text form shows the tables that changed.
        DiffFormat::Text => match (tables_of(&old, identities), tables_of(&new, identities)) {
            (Ok((o, ot)), Ok((n, nt))) => (o, n, Some((ot, nt))),
            (Err(code), _) | (_, Err(code)) => return code,
        },
        _ => match (program_of(&old, identities), program_of(&new, identities)) {
            (Ok(o), Ok(n)) => (o, n, None),
            (Err(code), _) | (_, Err(code)) => return code,
        },
    };
    let changed;
    // The direction of every flipped flow, once the flows are known.
    let mut flips: Option<Vec<Flip>> = None;
    let printed = match a.output {
        DiffFormat::Dot | DiffFormat::Html => {
            let picture = cnpc_compiler::graph::diff(&old_program, &new_program);
            changed = picture.changed() > 0;
            match a.output {
                DiffFormat::Html => print(&picture.to_html("cnpc diff")),
                _ => print(&picture.to_dot()),
            }
        }
        _ => {
            let d = diff::diff_summary(&old_program, &new_program);
            changed = !d.changes.is_empty();
            flips = Some(d.changes.iter().map(diff::Change::flip).collect());
            match (a.output, &tables) {
                (DiffFormat::Json, _) => {
                    let mut v = report::diff_json(&d.changes);
                    v["unchanged"] = d.unchanged.into();
                    print(&format!("{v:#}\n"))
                }
                (DiffFormat::Markdown, _) => print(&diff::markdown(&d)),
                (_, Some((old_text, new_text))) => {
                    print(&report::diff_text(&d.changes, old_text, new_text))
                }
                (_, None) => print(&report::diff_text(&d.changes, "", "")),
            }
        }
    };
    if printed != ExitCode::SUCCESS {
        return printed;
    }
    let gated = a.fail_on.is_some_and(|f| {
        flips
            .unwrap_or_else(|| {
                let changes = diff::diff(&old_program, &new_program);
                changes.iter().map(diff::Change::flip).collect()
            })
            .into_iter()
            .any(|flip| f.matches(flip))
    });
    if gated || (a.exit_code && changed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
