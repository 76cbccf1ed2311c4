//! `cnpc test`: reachability expectations checked against the policies (compiler's `expect`).
//!
//! Exit codes: 0 every case holds, 1 some case fails (or the policies have errors, as for
//! `cnpc trace`), 2 an expectations file cannot be read or is malformed, or `--engine bpf`
//! cannot run.

use crate::common::{color, fail, load_program, print, usage};
use crate::Engine;
use clap::ValueEnum;
use cnpc_compiler::eval::{Flow, Verdict};
use cnpc_compiler::expect::{self, EngineError, Expectations, TestReport};
use cnpc_ir::Program;
use cnpc_runtime_loader::trace::{bpf_verdict, TraceError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum TestFormat {
    Text,
    Json,
    /// JUnit XML: one test suite per expectations file, one test case per checked flow.
    Junit,
}

pub struct TestArgs {
    pub paths: Vec<PathBuf>,
    pub cluster: Vec<PathBuf>,
    pub identities: Option<PathBuf>,
    pub expect: Vec<PathBuf>,
    pub engine: Engine,
    pub output: TestFormat,
    pub vars: crate::vars::VarArgs,
}

/// The generated programs in the kernel, as `cnpc trace --engine bpf` runs them.
struct Bpf;

impl expect::Engine for Bpf {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn verdict(&mut self, program: &Program, flow: &Flow) -> Result<Verdict, EngineError> {
        bpf_verdict(program, flow).map_err(|e| match e {
            // Peers without an address (labels:) or an entity with no node: no packet to craft.
            TraceError::NoAddress | TraceError::NoNode(_) => EngineError::Skip(e.to_string()),
            e => EngineError::Fatal(e.to_string()),
        })
    }
}

pub fn run_test(a: TestArgs) -> ExitCode {
    let expectations = match Expectations::load(&a.expect) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let (report, program) = match load_program(&a.paths, &a.cluster, &a.identities, &a.vars) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let Some(cluster) = report.cluster.as_ref() else {
        return usage("cnpc test needs --cluster FILE");
    };
    let (checks, expansion) = expectations.expand(&program, cluster);
    let mut diagnostics = expectations.diagnostics.clone();
    diagnostics.extend(expansion);
    if !diagnostics.is_empty() {
        diagnostics.sort_by_key(|d| (d.span.file, d.span.start));
        let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none();
        eprint!(
            "{}",
            cnpc_compiler::report::render(&diagnostics, &expectations.sources, color)
        );
        eprintln!(
            "error: {} in the expectations; no case was run",
            if diagnostics.len() == 1 {
                "1 problem".to_string()
            } else {
                format!("{} problems", diagnostics.len())
            }
        );
        return ExitCode::from(2);
    }
    // Nothing to check would pass a CI job that checks nothing (an --expect directory without
    // expectation files, say): that is a usage error, like an empty `cases:` list.
    if checks.is_empty() {
        return usage("no expectation case found in the --expect paths; nothing would be checked");
    }
    let mut bpf = Bpf;
    let engine: Option<&mut dyn expect::Engine> = match a.engine {
        Engine::Bpf => Some(&mut bpf),
        Engine::Reference => None,
    };
    let outcomes = match expect::run(&program, &expectations, &checks, engine) {
        Ok(o) => o,
        Err(e) => return usage(&e.to_string()),
    };
    let result = TestReport {
        expectations: &expectations,
        checks: &checks,
        outcomes: &outcomes,
        engine: match a.engine {
            Engine::Bpf => "bpf",
            Engine::Reference => "reference",
        },
    };
    let printed = match a.output {
        TestFormat::Text => print(&result.text(color())),
        TestFormat::Json => print(&format!("{:#}\n", result.json())),
        TestFormat::Junit => print(&result.junit()),
    };
    if printed != ExitCode::SUCCESS {
        return printed;
    }
    if result.failed() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
