//! `--var` and `--vars-file`: values for Flux post-build variables (`${NAME}`) in policy files,
//! for every command that reads policies. The rules (syntax, defaults, file formats, which
//! source wins) live in `cnpc_compiler::subst`; this is the command-line face of them.

use cnpc_compiler::subst::{Vars, VarsError};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct VarArgs {
    /// A value for a Flux post-build variable (`${NAME}` in the policies), as NAME=VALUE;
    /// repeatable, and wins over --vars-file.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub var: Vec<String>,
    /// Values for Flux variables from a file: a ConfigMap, Secret or Flux Kustomization
    /// (postBuild.substitute) in YAML (.yaml, .yml, .json), or dotenv NAME=VALUE lines (any
    /// other name); repeatable, later files win.
    #[arg(long = "vars-file", value_name = "FILE")]
    pub vars_file: Vec<PathBuf>,
}

impl VarArgs {
    /// The values: every --vars-file in order, then every --var (a later source overrides an
    /// earlier one, as Flux's inline `substitute` overrides `substituteFrom`).
    pub fn vars(&self) -> Result<Vars, VarsError> {
        let mut vars = Vars::new();
        for path in &self.vars_file {
            vars.read_file(path)?;
        }
        for arg in &self.var {
            vars.set_assignment(arg)?;
        }
        Ok(vars)
    }
}
