//! `cnpc`: the command line. It parses arguments, calls the library crates and prints; the logic
//! lives in the libraries (DESIGN.md §1).
//!
//! Exit codes (DESIGN.md §7): 0 success, 1 the command's negative result (errors found), 2 usage
//! or I/O error.

mod common;
mod diff_cmd;
mod test_cmd;
mod trace;
mod vars;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use cnpc_compiler::eval::HttpRequest;
use cnpc_compiler::{check, lower, report, Cluster, PolicySet};
use common::{
    checked, fail, load_program, load_valid, print, program_consuming, program_of, usage,
};
use diff_cmd::{DiffArgs, DiffFormat, FailOn};
use std::path::PathBuf;
use std::process::ExitCode;
use test_cmd::{TestArgs, TestFormat};
use trace::TraceArgs;
use vars::VarArgs;

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
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Explain the verdict of one flow, rule by rule.
    Trace {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Cluster snapshot (`kubectl get -o yaml` output).
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// A previous identity allocation (from `cnpc identities`), so numbers stay stable.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        /// Source: pod:NS/NAME, labels:NS:k=v,..., ip:ADDR, fqdn:NAME=ADDR or entity:NAME.
        #[arg(long = "from", value_name = "PEER")]
        from: String,
        /// Destination, in the same forms as --from.
        #[arg(long = "to", value_name = "PEER")]
        to: String,
        /// Destination port and protocol: 80, 53/UDP, 8/ICMP (an ICMP type).
        #[arg(long, value_name = "PORT[/PROTO]")]
        dport: String,
        /// An HTTP request to judge against L7 rules.
        #[arg(long, num_args = 2, value_names = ["METHOD", "PATH"])]
        http: Option<Vec<String>>,
        #[arg(long, value_name = "HOST")]
        http_host: Option<String>,
        #[arg(long, value_name = "NAME:VALUE")]
        http_header: Vec<String>,
        /// A DNS query name to judge against DNS rules.
        #[arg(long, value_name = "NAME")]
        dns_query: Option<String>,
        #[arg(long, value_enum, default_value_t = Engine::Reference)]
        engine: Engine,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TraceFormat::Text)]
        output: TraceFormat,
        /// Where `fqdn:NAME` peers without an address find the addresses a node learned:
        /// a loader's `fqdn.json` (default: /run/cnpc/fqdn.json).
        #[arg(long, value_name = "FILE")]
        fqdn_cache: Option<PathBuf>,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Check reachability expectations (from, to, port: allowed or denied) against policies.
    Test {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Cluster snapshot (`kubectl get -o yaml` output).
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// An expectations file, or a directory of them (repeatable); `cnpc schema
        /// --expectations` prints their JSON Schema.
        #[arg(long, value_name = "FILE", required = true)]
        expect: Vec<PathBuf>,
        /// A previous identity allocation (from `cnpc identities`), so numbers stay stable.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        /// reference: the reference evaluator; bpf: also the compiled programs in the kernel,
        /// which must agree with it.
        #[arg(long, value_enum, default_value_t = Engine::Reference)]
        engine: Engine,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TestFormat::Text)]
        output: TestFormat,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Show which (source, destination, port) verdicts a policy change flips.
    Diff {
        /// The policies before: a file, a directory, or git:REV:PATH.
        old: String,
        /// The policies after, in the same forms.
        new: String,
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// A previous identity allocation (from `cnpc identities`), so numbers stay stable.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        /// text and json list the flipped flows; markdown tables them per workload pair for a
        /// pull-request comment; dot and html draw the connectivity picture with the edges the
        /// change adds, removes or alters.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = DiffFormat::Text)]
        output: DiffFormat,
        /// Exit 1 when some verdict changes (dot, html: when some edge changes).
        #[arg(long)]
        exit_code: bool,
        /// Exit 1 when some flow flips this way.
        #[arg(long, value_enum, value_name = "DIRECTION")]
        fail_on: Option<FailOn>,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Draw the allowed connectivity between workloads (Graphviz DOT or one offline HTML page).
    Graph {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// A previous identity allocation (from `cnpc identities`), so numbers stay stable.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = GraphFormat::Dot)]
        output: GraphFormat,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Show the flows a node's loader decides, like `hubble observe`.
    Observe {
        /// The loader's state directory (its event socket is `events.sock` there).
        #[arg(long, value_name = "DIR", default_value = "/run/cnpc")]
        state_dir: PathBuf,
        /// Keep printing new flows as they happen.
        #[arg(short, long)]
        follow: bool,
        /// How many of the flows the loader kept to print first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
        /// Only flows from this peer: pod:NS/NAME, labels:NS:k=v,..., ip:ADDRESS or entity:NAME.
        #[arg(long = "from", value_name = "PEER")]
        from: Option<String>,
        /// Only flows to this peer, in the same forms as --from.
        #[arg(long = "to", value_name = "PEER")]
        to: Option<String>,
        /// Only flows with this verdict.
        #[arg(long, value_enum)]
        verdict: Option<ObserveVerdict>,
        /// Only flows to this port: 80 or 80/TCP.
        #[arg(long, value_name = "PORT[/PROTO]")]
        port: Option<String>,
        /// Only flows of this kind.
        #[arg(long = "type", value_enum)]
        kind: Option<ObserveType>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TraceFormat::Text)]
        output: TraceFormat,
    },
    /// Compile policies to BPF programs and map images in an output directory.
    Compile {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// The output directory (replaced atomically).
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        output: PathBuf,
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Load every program of a compiled directory through the kernel verifier.
    Verify { dir: PathBuf },
    /// Disassemble the programs of a compiled directory.
    Disasm {
        dir: PathBuf,
        /// Only this identity's programs.
        identity: Option<u32>,
    },
    /// Print the decision tables: per identity and direction, what each peer class may do.
    Tables {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        /// A previous identity allocation (from `cnpc identities`), so numbers stay stable.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        /// Only the tables of this numeric identity.
        #[arg(long, value_name = "N")]
        identity: Option<u32>,
        #[command(flatten)]
        vars: VarArgs,
    },
    /// Print the identity allocation of a cluster snapshot (JSON: labels -> number), to pass
    /// back with --identities so numbers stay stable as the cluster changes.
    Identities {
        #[arg(long, value_name = "FILE", required = true)]
        cluster: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
    },
    /// Print the JSON Schema of the policy kinds (for yaml-language-server and editors).
    Schema {
        /// The schema of `cnpc test` expectations files instead.
        #[arg(long)]
        expectations: bool,
    },
    /// List the endpoints cnpc-loader enforces on this node, from its pinned state (like
    /// `cilium-dbg endpoint list`).
    Endpoints {
        /// The loader's pin directory.
        #[arg(long, default_value = "/sys/fs/bpf/cnpc")]
        pin_dir: PathBuf,
        /// The loader's state directory.
        #[arg(long, default_value = "/run/cnpc")]
        state_dir: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: TraceFormat,
    },
    /// Print the shell completion script for cnpc, e.g. `source <(cnpc completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum Engine {
    Reference,
    Bpf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObserveVerdict {
    Allowed,
    Denied,
    Proxied,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObserveType {
    L3l4,
    Http,
    Dns,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum TraceFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Html,
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
            vars,
        } => run_check(&paths, &cluster, format, deny_warnings, &vars),
        Command::Trace {
            paths,
            cluster,
            from,
            to,
            dport,
            http,
            http_host,
            http_header,
            dns_query,
            engine,
            output,
            identities,
            fqdn_cache,
            vars,
        } => {
            let request = http.map(|v| HttpRequest {
                method: v[0].clone(),
                path: v[1].clone(),
                host: http_host,
                headers: http_header
                    .iter()
                    .filter_map(|h| h.split_once(':'))
                    .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                    .collect(),
            });
            let args = TraceArgs {
                paths,
                cluster,
                from,
                to,
                dport,
                http: request,
                dns_query,
                engine,
                output,
                identities,
                fqdn_cache,
                vars,
            };
            trace::run_trace(args)
        }
        Command::Test {
            paths,
            cluster,
            expect,
            identities,
            engine,
            output,
            vars,
        } => test_cmd::run_test(TestArgs {
            paths,
            cluster,
            identities,
            expect,
            engine,
            output,
            vars,
        }),
        Command::Diff {
            old,
            new,
            cluster,
            output,
            exit_code,
            fail_on,
            identities,
            vars,
        } => diff_cmd::run_diff(DiffArgs {
            old,
            new,
            cluster,
            output,
            exit_code,
            fail_on,
            identities,
            vars,
        }),
        Command::Tables {
            paths,
            cluster,
            identity,
            identities,
            vars,
        } => run_tables(&paths, &cluster, identity, &identities, &vars),
        Command::Graph {
            paths,
            cluster,
            identities,
            output,
            vars,
        } => run_graph(&paths, &cluster, &identities, output, &vars),
        Command::Observe {
            state_dir,
            follow,
            last,
            from,
            to,
            verdict,
            port,
            kind,
            output,
        } => run_observe(ObserveArgs {
            state_dir,
            follow,
            last,
            from,
            to,
            verdict,
            port,
            kind,
            json: matches!(output, TraceFormat::Json),
        }),
        Command::Compile {
            paths,
            cluster,
            output,
            identities,
            vars,
        } => run_compile(&paths, &cluster, &output, &identities, &vars),
        Command::Disasm { dir, identity } => run_disasm(&dir, identity),
        Command::Verify { dir } => run_verify(&dir),
        Command::Identities {
            cluster,
            identities,
        } => run_identities(&cluster, &identities),
        Command::Schema { expectations } => print(&format!(
            "{:#}\n",
            if expectations {
                cnpc_compiler::schema::expectations_schema()
            } else {
                cnpc_compiler::schema::policy_schema()
            }
        )),
        Command::Endpoints {
            pin_dir,
            state_dir,
            output,
        } => run_endpoints(pin_dir, &state_dir, output),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cnpc", &mut script);
            print(&String::from_utf8_lossy(&script))
        }
    }
}

fn run_endpoints(pin_dir: PathBuf, state_dir: &std::path::Path, output: TraceFormat) -> ExitCode {
    use cnpc_runtime_loader::loader;
    let cfg = loader::Config {
        pin_dir,
        state_file: state_dir.join("state.json"),
        ..Default::default()
    };
    let hooks = match loader::endpoints(&cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e} (is cnpc-loader running with this --state-dir?)");
            return ExitCode::from(2);
        }
    };
    if let TraceFormat::Json = output {
        return print(&format!(
            "{:#}\n",
            serde_json::json!({ "endpoints": hooks })
        ));
    }
    // One line per endpoint: both hooks of an interface together.
    let mut rows: std::collections::BTreeMap<&str, [Option<&loader::EndpointHook>; 2]> =
        Default::default();
    for h in &hooks {
        let slot = usize::from(h.record.direction == "egress");
        rows.entry(h.record.interface.as_str()).or_default()[slot] = Some(h);
    }
    let mut out = format!(
        "{:<24} {:<16} {:>9} {:<14} {:<14} {:>7} {:>7} {:>4}  {}\n",
        "ENDPOINT",
        "INTERFACE",
        "IDENTITY",
        "INGRESS",
        "EGRESS",
        "PROG-IN",
        "PROG-EG",
        "GEN",
        "LABELS"
    );
    for (interface, [ingress, egress]) in rows {
        let any = ingress.or(egress).expect("a row has a hook");
        let form = |h: Option<&loader::EndpointHook>| match h {
            None => "-".to_string(),
            Some(h) if !h.attached => "DETACHED".to_string(),
            Some(h) => h.record.strategy.clone(),
        };
        let id = |h: Option<&loader::EndpointHook>| {
            h.and_then(|h| h.program_id)
                .map_or("-".into(), |i| i.to_string())
        };
        let generation = ingress
            .into_iter()
            .chain(egress)
            .map(|h| h.record.generation)
            .max()
            .unwrap_or(0);
        let endpoint = if any.record.endpoint.is_empty() {
            "(deny-all)"
        } else {
            any.record.endpoint.as_str()
        };
        out.push_str(&format!(
            "{:<24} {:<16} {:>9} {:<14} {:<14} {:>7} {:>7} {:>4}  {}\n",
            endpoint,
            interface,
            any.record.identity,
            form(ingress),
            form(egress),
            id(ingress),
            id(egress),
            generation,
            any.record.labels.join(",")
        ));
    }
    print(&out)
}

struct ObserveArgs {
    state_dir: PathBuf,
    follow: bool,
    last: usize,
    from: Option<String>,
    to: Option<String>,
    verdict: Option<ObserveVerdict>,
    port: Option<String>,
    kind: Option<ObserveType>,
    json: bool,
}

/// `cnpc observe`: the loader's event stream, filtered (runtime-loader's `events::observe`).
fn run_observe(a: ObserveArgs) -> ExitCode {
    use cnpc_runtime_loader::events::{self, Filter, PeerFilter};
    let peer = |flag, p: Option<String>| p.map(|p| PeerFilter::parse(flag, &p)).transpose();
    let (from, to) = match (peer("from", a.from), peer("to", a.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return usage(&e.to_string()),
    };
    let filter = Filter {
        from,
        to,
        verdict: a.verdict.map(|v| {
            match v {
                ObserveVerdict::Allowed => "allowed",
                ObserveVerdict::Denied => "denied",
                ObserveVerdict::Proxied => "proxied",
            }
            .into()
        }),
        port: a.port,
        kind: a.kind.map(|k| {
            match k {
                ObserveType::L3l4 => "l3l4",
                ObserveType::Http => "http",
                ObserveType::Dns => "dns",
            }
            .into()
        }),
    };
    let socket = a.state_dir.join("events.sock");
    let stdout = std::io::stdout();
    match events::observe(
        &socket,
        a.last,
        a.follow,
        &filter,
        a.json,
        &mut stdout.lock(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage(&e.to_string()),
    }
}

fn run_graph(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    identities: &Option<PathBuf>,
    output: GraphFormat,
    vars: &VarArgs,
) -> ExitCode {
    let (_, program) = match load_program(paths, cluster, identities, vars) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let graph = cnpc_compiler::graph::connectivity(&program);
    match output {
        GraphFormat::Dot => print(&graph.to_dot()),
        GraphFormat::Html => print(&graph.to_html("cnpc graph")),
    }
}

fn run_compile(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    output: &std::path::Path,
    identities: &Option<PathBuf>,
    vars: &VarArgs,
) -> ExitCode {
    let mut report = match load_valid(paths, cluster, vars) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let inputs: Vec<(String, String)> = report
        .set
        .sources
        .files()
        .map(|(_, f)| {
            (
                f.path.display().to_string(),
                cnpc_codegen_bpf::artifacts::sha256(f.text.as_bytes()),
            )
        })
        .collect();
    let program = match program_consuming(&mut report, identities) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // From here on only the program is needed: the sources and the snapshot go before the
    // tables are built.
    drop(report);
    let compiler = cnpc_compiler::tables::TableCompiler::new(&program);
    let tables = compiler.all(&program);
    let ipcache = cnpc_compiler::tables::ipcache_entries(&program, &compiler.universe);
    let files = match cnpc_codegen_bpf::artifacts::render(&program, &tables, &ipcache, &inputs) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cnpc_codegen_bpf::artifacts::write_dir(output, &files) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let objects = files.keys().filter(|k| k.ends_with(".o")).count();
    eprintln!(
        "compiled {} tables into {objects} objects in {}",
        tables.len(),
        output.display()
    );
    ExitCode::SUCCESS
}

fn run_verify(dir: &std::path::Path) -> ExitCode {
    let results = match cnpc_runtime_loader::verify::verify_dir(dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = format!(
        "{:<10} {:<20} {:<14} {:>12} {:>10} {:>10}  result\n",
        "identity", "section", "decision", "instructions", "processed", "load"
    );
    let mut rejected = 0;
    for v in &results {
        let processed = v.processed.map_or("-".to_string(), |p| p.to_string());
        let result = match &v.rejected {
            None => "ok".to_string(),
            Some(why) => {
                rejected += 1;
                format!("REJECTED: {why}")
            }
        };
        out.push_str(&format!(
            "{:<10} {:<20} {:<14} {:>12} {:>10} {:>8.2}ms  {result}\n",
            v.identity,
            v.section,
            v.strategy,
            v.instructions,
            processed,
            v.load_time.as_secs_f64() * 1000.0
        ));
    }
    out.push_str(&format!(
        "{} programs, {rejected} rejected\n",
        results.len()
    ));
    let printed = print(&out);
    if printed != ExitCode::SUCCESS {
        return printed;
    }
    if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn run_disasm(dir: &std::path::Path, identity: Option<u32>) -> ExitCode {
    use object::{Object, ObjectSection};
    let manifest: serde_json::Value = match std::fs::read_to_string(dir.join("manifest.json"))
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            return usage(&format!(
                "{}: not a compiled directory ({e}); run `cnpc compile -o DIR` first",
                dir.display()
            ))
        }
    };
    let mut out = String::new();
    for p in manifest["programs"].as_array().into_iter().flatten() {
        let id = p["identity"].as_u64().unwrap_or(0) as u32;
        if identity.is_some_and(|want| want != id) {
            continue;
        }
        let file = p["file"].as_str().unwrap_or("");
        let bytes = match std::fs::read(dir.join(file)) {
            Ok(b) => b,
            Err(e) => return usage(&format!("{}: {e}", dir.join(file).display())),
        };
        let obj = match object::File::parse(&*bytes) {
            Ok(o) => o,
            Err(e) => return usage(&format!("{file}: not an ELF object: {e}")),
        };
        for sec in obj
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with("classifier/")))
        {
            let data = sec.data().unwrap_or(&[]);
            match cnpc_codegen_bpf::disasm::decode(data) {
                Ok(insns) => {
                    let program = cnpc_codegen_bpf::Program {
                        insns,
                        map_relocs: Vec::new(),
                    };
                    out.push_str(&format!(
                        "identity {id} {} ({file}, {} instructions):\n",
                        sec.name().unwrap_or("?"),
                        program.slot_count()
                    ));
                    out.push_str(&cnpc_codegen_bpf::disasm::listing(&program));
                    out.push('\n');
                }
                Err(e) => return usage(&format!("{file}: {e}")),
            }
        }
    }
    if out.is_empty() {
        return usage("no program matched");
    }
    print(&out)
}

fn run_identities(cluster: &[PathBuf], identities: &Option<PathBuf>) -> ExitCode {
    let report = match checked(PolicySet::default(), cluster) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match program_of(&report, identities) {
        Ok(program) => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&lower::allocation_of(&program)).unwrap_or_default()
        )),
        Err(code) => code,
    }
}

fn run_tables(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    identity: Option<u32>,
    identities: &Option<PathBuf>,
    vars: &VarArgs,
) -> ExitCode {
    let mut report = match load_valid(paths, cluster, vars) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let program = match program_consuming(&mut report, identities) {
        Ok(p) => p,
        Err(code) => return code,
    };
    drop(report);
    let universe = cnpc_compiler::tables::peer_universe(&program);
    let mut tables = cnpc_compiler::tables::all_tables(&program);
    if let Some(n) = identity {
        tables.retain(|t| t.subject.0 == n);
        if tables.is_empty() {
            return usage(&format!(
                "no endpoint has identity {n}; `cnpc tables` without --identity lists them"
            ));
        }
    }
    // Written as it is made: at 20,000 identities the text passes 600 MB.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match report::write_tables(&mut out, &program, &universe, &tables) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`cnpc tables | head`) is not an error, as for `print`.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write output: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_check(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    format: Format,
    deny_warnings: bool,
    vars: &VarArgs,
) -> ExitCode {
    let vars = match vars.vars() {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let mut set = match PolicySet::load_with(paths, &vars) {
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
        Format::Human => report::human(&report, common::color()),
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
