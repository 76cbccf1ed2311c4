//! `cnpc`: the command line. It parses arguments, calls the library crates and prints; the logic
//! lives in the libraries (DESIGN.md §1).
//!
//! Exit codes (DESIGN.md §7): 0 success, 1 the command's negative result (errors found), 2 usage
//! or I/O error.

use clap::{Parser, Subcommand, ValueEnum};
use cnpc_compiler::{check, report, Cluster, PolicySet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cnpc",
    version,
    about = "A compiler for Kubernetes and Cilium network policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and lint policy files; report every problem with its place and a fix.
    Check {
        /// Policy files or directories (walked recursively: .yaml, .yml, .json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Cluster snapshot (`kubectl get -o yaml` output); enables checks against workloads.
        #[arg(long, value_name = "FILE")]
        cluster: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        /// Treat warnings as errors for the exit code.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the JSON Schema of the policy kinds (for yaml-language-server and editors).
    Schema,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Human,
    Json,
    Sarif,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            paths,
            cluster,
            format,
            deny_warnings,
        } => run_check(&paths, &cluster, format, deny_warnings),
        Command::Schema => print(&format!("{:#}\n", cnpc_compiler::schema::policy_schema())),
    }
}

fn print(text: &str) -> ExitCode {
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

fn fail(e: impl Into<miette::Report>) -> ExitCode {
    eprintln!("{:?}", e.into());
    ExitCode::from(2)
}

fn run_check(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    format: Format,
    deny_warnings: bool,
) -> ExitCode {
    let mut set = match PolicySet::load(paths) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let cluster = if cluster.is_empty() {
        None
    } else {
        match Cluster::load(cluster, &mut set.sources) {
            Ok(c) => Some(c),
            Err(e) => return fail(e),
        }
    };
    let report = check(set, cluster);
    let text = match format {
        Format::Human => {
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            report::human(&report, color)
        }
        Format::Json => format!("{:#}\n", report::json(&report)),
        Format::Sarif => format!("{:#}\n", report::sarif(&report)),
    };
    let code = print(&text);
    if code != ExitCode::SUCCESS {
        return code;
    }
    if report.errors() > 0 || (deny_warnings && report.warnings() > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
