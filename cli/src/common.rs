//! What every command shares: printing with exit codes (DESIGN.md §7), and loading, checking
//! and lowering policies over a cluster snapshot.

use crate::vars::VarArgs;
use cnpc_compiler::{check, check_errors, lower, report, CheckReport, Cluster, PolicySet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Prints to stdout: exit code 0, or 2 when stdout cannot be written.
pub fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`cnpc check | head`) is not an error worth a panic.
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write output: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints an error with its diagnostic details; exit code 2.
pub fn fail(e: impl Into<miette::Report>) -> ExitCode {
    eprintln!("{:?}", e.into());
    ExitCode::from(2)
}

/// Prints a usage error; exit code 2.
pub fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// Whether human output on stdout may use colour.
pub fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Loads policies and a cluster and checks them; on errors prints them and returns the exit code.
pub fn load_checked(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    vars: &VarArgs,
) -> Result<CheckReport, ExitCode> {
    let vars = vars.vars().map_err(fail)?;
    let set = PolicySet::load_with(paths, &vars).map_err(fail)?;
    checked(set, cluster)
}

/// Checks a loaded policy set against a cluster; on errors prints them and returns exit code 1.
pub fn checked(mut set: PolicySet, cluster: &[PathBuf]) -> Result<CheckReport, ExitCode> {
    let cluster = Cluster::load(cluster, &mut set.sources).map_err(fail)?;
    refused_with_errors(check(set, Some(cluster)))
}

/// The report, or, when it has errors, exit code 1 after printing it: verdicts of policies
/// Cilium would reject would describe a cluster that cannot exist.
fn refused_with_errors(report: CheckReport) -> Result<CheckReport, ExitCode> {
    if report.errors() > 0 {
        eprint!("{}", report::human(&report, false));
        return Err(ExitCode::from(1));
    }
    Ok(report)
}

/// Loads policies and a cluster for a command that needs them valid and nothing more
/// (`compile`, `tables`): validation without the lints, which only warn (they never stop a
/// command) and cost the most on large sets. On errors, prints them beside the lints'
/// warnings, as [`checked`] does, and returns exit code 1; a valid set prints nothing either
/// way.
pub fn load_valid(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    vars: &VarArgs,
) -> Result<CheckReport, ExitCode> {
    let vars = vars.vars().map_err(fail)?;
    let mut set = PolicySet::load_with(paths, &vars).map_err(fail)?;
    let cluster = Cluster::load(cluster, &mut set.sources).map_err(fail)?;
    let report = check_errors(set, Some(cluster));
    if report.errors() > 0 {
        // The full check only now, for the same report `checked` prints (it has these errors
        // and the lints' warnings).
        return refused_with_errors(check(report.set, report.cluster));
    }
    Ok(report)
}

/// The lowered program of a checked report, taking its policies: each syntax tree is dropped
/// once lowered ([`lower::build_consuming`]), so a large set's trees and program are not held
/// whole at once. The report keeps its sources and cluster.
pub fn program_consuming(
    report: &mut CheckReport,
    identities: &Option<PathBuf>,
) -> Result<cnpc_ir::Program, ExitCode> {
    let previous = previous_allocation(identities)?;
    let cluster = needed_cluster(report.cluster.as_ref())?;
    let trees = std::mem::take(&mut report.set.policies);
    Ok(lower::build_consuming(
        trees,
        &report.set.sources,
        cluster,
        &previous,
    ))
}

/// Loads, checks and lowers: the report (for sources and the cluster) and the program.
pub fn load_program(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    identities: &Option<PathBuf>,
    vars: &VarArgs,
) -> Result<(CheckReport, cnpc_ir::Program), ExitCode> {
    let report = load_checked(paths, cluster, vars)?;
    let program = program_of(&report, identities)?;
    Ok((report, program))
}

/// The lowered program of a checked report, with a previous identity allocation if given.
pub fn program_of(
    report: &CheckReport,
    identities: &Option<PathBuf>,
) -> Result<cnpc_ir::Program, ExitCode> {
    let previous = previous_allocation(identities)?;
    let cluster = needed_cluster(report.cluster.as_ref())?;
    Ok(lower::build(
        &report.set.policies,
        &report.set.sources,
        cluster,
        &previous,
    ))
}

/// The identity numbers to keep (`--identities FILE`), or none.
fn previous_allocation(identities: &Option<PathBuf>) -> Result<lower::Allocation, ExitCode> {
    match identities {
        Some(path) => lower::read_allocation(path).map_err(fail),
        None => Ok(Default::default()),
    }
}

/// A report's cluster snapshot, which lowering needs; a usage error without one.
fn needed_cluster(cluster: Option<&Cluster>) -> Result<&Cluster, ExitCode> {
    cluster.ok_or_else(|| usage("this command needs a cluster snapshot (--cluster FILE)"))
}

/// The program of a checked report and its decision tables as `cnpc tables` prints them.
pub fn tables_of(
    report: &CheckReport,
    identities: &Option<PathBuf>,
) -> Result<(cnpc_ir::Program, String), ExitCode> {
    let program = program_of(report, identities)?;
    let universe = cnpc_compiler::tables::peer_universe(&program);
    let text = report::tables_text(
        &program,
        &universe,
        &cnpc_compiler::tables::all_tables(&program),
    );
    Ok((program, text))
}
