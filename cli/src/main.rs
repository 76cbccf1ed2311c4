//! `cnpc`: the command line. It parses arguments, calls the library crates and prints; the logic
//! lives in the libraries (DESIGN.md §1).
//!
//! Exit codes (DESIGN.md §7): 0 success, 1 the command's negative result (errors found), 2 usage
//! or I/O error.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use cnpc_compiler::eval::{self, Flow, HttpRequest};
use cnpc_compiler::{check, lower, report, Cluster, PolicySet};
use cnpc_ir::Protocol;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
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
        /// text and json list the flipped flows; dot and html draw the connectivity picture
        /// with the edges the change adds, removes or alters.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = DiffFormat::Text)]
        output: DiffFormat,
        /// Exit 1 when some verdict changes (dot, html: when some edge changes).
        #[arg(long)]
        exit_code: bool,
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
    Schema,
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
enum Engine {
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
enum TraceFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormat {
    Text,
    Json,
    Dot,
    Html,
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
        } => run_check(&paths, &cluster, format, deny_warnings),
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
            };
            run_trace(args)
        }
        Command::Diff {
            old,
            new,
            cluster,
            output,
            exit_code,
            identities,
        } => run_diff(&old, &new, &cluster, output, exit_code, &identities),
        Command::Tables {
            paths,
            cluster,
            identity,
            identities,
        } => run_tables(&paths, &cluster, identity, &identities),
        Command::Graph {
            paths,
            cluster,
            identities,
            output,
        } => run_graph(&paths, &cluster, &identities, output),
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
        } => run_compile(&paths, &cluster, &output, &identities),
        Command::Disasm { dir, identity } => run_disasm(&dir, identity),
        Command::Verify { dir } => run_verify(&dir),
        Command::Identities {
            cluster,
            identities,
        } => run_identities(&cluster, &identities),
        Command::Schema => print(&format!("{:#}\n", cnpc_compiler::schema::policy_schema())),
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

struct TraceArgs {
    identities: Option<PathBuf>,
    fqdn_cache: Option<PathBuf>,
    paths: Vec<PathBuf>,
    cluster: Vec<PathBuf>,
    from: String,
    to: String,
    dport: String,
    http: Option<HttpRequest>,
    dns_query: Option<String>,
    engine: Engine,
    output: TraceFormat,
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// `80`, `53/UDP`, `8/ICMP`; TCP by default.
fn parse_dport(s: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    Some((port.parse().ok()?, Protocol::parse(proto)?))
}

/// `fqdn:NAME` (no address) becomes `fqdn:NAME=ADDRESS` with the lowest address a node
/// learned for NAME and has not let expire (a loader's `fqdn.json`); other peers are kept.
fn learned_peer(spec: &str, cache: Option<&Path>) -> Result<String, String> {
    let Some(name) = spec.strip_prefix("fqdn:").filter(|n| !n.contains('=')) else {
        return Ok(spec.to_string());
    };
    let path = cache.unwrap_or(Path::new("/run/cnpc/fqdn.json"));
    if !path.exists() {
        return Err(format!(
            "--from/--to `{spec}`: no learned addresses at {} (a node's loader writes them to \
             fqdn.json in its state directory): pass --fqdn-cache FILE or write \
             fqdn:{name}=ADDRESS",
            path.display()
        ));
    }
    let state = cnpc_runtime_loader::fqdn::FqdnState::load(path, 0).map_err(|e| e.to_string())?;
    let now = cnpc_runtime_loader::fqdn::now();
    match state.addresses_of(name, now).first() {
        Some(ip) => Ok(format!("fqdn:{name}={ip}")),
        None => Err(format!(
            "--from/--to `{spec}`: {} holds no unexpired address for {name}: write \
             fqdn:{name}=ADDRESS",
            path.display()
        )),
    }
}

fn run_trace(a: TraceArgs) -> ExitCode {
    let Some((port, protocol)) = parse_dport(&a.dport) else {
        return usage(&format!(
            "--dport `{}`: write PORT or PORT/PROTO (TCP, UDP, SCTP, ICMP, ICMPv6)",
            a.dport
        ));
    };
    let (report, program) = match load_program(&a.paths, &a.cluster, &a.identities) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let cluster = report.cluster.as_ref().expect("loaded by load_checked");
    let (from, to) = match (
        learned_peer(&a.from, a.fqdn_cache.as_deref()),
        learned_peer(&a.to, a.fqdn_cache.as_deref()),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return usage(&e),
    };
    let party = |spec: &str| eval::parse_peer(&program, cluster, spec);
    let (src, dst) = match (party(&from), party(&to)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let flow = Flow {
        src,
        dst,
        protocol,
        port,
        http: a.http,
        dns_query: a.dns_query,
    };
    let mut verdict = eval::evaluate(&program, &flow);
    if a.engine == Engine::Bpf {
        verdict = match cnpc_runtime_loader::trace::bpf_verdict(&program, &flow) {
            Ok(bpf) => {
                // The kernel must agree with the reference engine; a disagreement is a bug.
                // Where the proxy judged a request, its answer must be the reference's too.
                let same = |b: &eval::Decision, r: &eval::Decision| {
                    let l7 = |d: &eval::Decision| d.l7.as_ref().and_then(|l| l.allowed);
                    (b.verdict == eval::DirVerdict::Denied)
                        == (r.verdict == eval::DirVerdict::Denied)
                        && b.l7.is_some() == r.l7.is_some()
                        && (l7(b).is_none() || l7(b) == l7(r))
                };
                if !same(&bpf.egress, &verdict.egress) || !same(&bpf.ingress, &verdict.ingress) {
                    eprintln!("error: the BPF engine and the reference engine disagree (a bug in cnpc):\nbpf:\n{}reference:\n{}", report::trace_text(&flow, &bpf), report::trace_text(&flow, &verdict));
                    return ExitCode::from(1);
                }
                // Where no request went through the proxy (none given, or not HTTP), the L7
                // part is explained by the reference evaluator's reading of the rules.
                let mut bpf = bpf;
                for (b, r) in [
                    (&mut bpf.egress, &verdict.egress),
                    (&mut bpf.ingress, &verdict.ingress),
                ] {
                    if b.l7.as_ref().is_some_and(|l| l.allowed.is_none()) {
                        b.l7 = r.l7.clone();
                    }
                }
                bpf
            }
            Err(e) => return usage(&e.to_string()),
        };
    }
    match a.output {
        TraceFormat::Text => print(&report::trace_text(&flow, &verdict)),
        TraceFormat::Json => print(&format!("{:#}\n", report::trace_json(&flow, &verdict))),
    }
}

/// Loads policies and a cluster and checks them; on errors prints them and returns the exit code.
fn load_checked(
    paths: &[PathBuf],
    cluster: &[PathBuf],
) -> Result<cnpc_compiler::CheckReport, ExitCode> {
    let set = PolicySet::load(paths).map_err(fail)?;
    checked(set, cluster)
}

/// Checks a loaded policy set against a cluster; on errors prints them and returns exit code 1.
fn checked(
    mut set: PolicySet,
    cluster: &[PathBuf],
) -> Result<cnpc_compiler::CheckReport, ExitCode> {
    let cluster = Cluster::load(cluster, &mut set.sources).map_err(fail)?;
    let report = check(set, Some(cluster));
    if report.errors() > 0 {
        // Verdicts of policies Cilium would reject would describe a cluster that cannot exist.
        eprint!("{}", report::human(&report, false));
        return Err(ExitCode::from(1));
    }
    Ok(report)
}

/// Loads, checks and lowers: the report (for sources and the cluster) and the program.
fn load_program(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    identities: &Option<PathBuf>,
) -> Result<(cnpc_compiler::CheckReport, cnpc_ir::Program), ExitCode> {
    let report = load_checked(paths, cluster)?;
    let program = program_of(&report, identities)?;
    Ok((report, program))
}

/// The lowered program of a checked report, with a previous identity allocation if given.
fn program_of(
    report: &cnpc_compiler::CheckReport,
    identities: &Option<PathBuf>,
) -> Result<cnpc_ir::Program, ExitCode> {
    let previous = match identities {
        Some(path) => lower::read_allocation(path).map_err(fail)?,
        None => Default::default(),
    };
    let cluster = report.cluster.as_ref().expect("checked with a cluster");
    Ok(lower::build(
        &report.set.policies,
        &report.set.sources,
        cluster,
        &previous,
    ))
}

fn tables_of(
    report: &cnpc_compiler::CheckReport,
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

fn run_diff(
    old: &str,
    new: &str,
    cluster: &[PathBuf],
    output: DiffFormat,
    exit_code: bool,
    identities: &Option<PathBuf>,
) -> ExitCode {
    let load = |spec: &str| {
        PolicySet::load_spec(spec)
            .map_err(fail)
            .and_then(|s| checked(s, cluster))
    };
    let (old, new) = match (load(old), load(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    if let DiffFormat::Dot | DiffFormat::Html = output {
        let (old_program, new_program) =
            match (program_of(&old, identities), program_of(&new, identities)) {
                (Ok(o), Ok(n)) => (o, n),
                (Err(code), _) | (_, Err(code)) => return code,
            };
        let picture = cnpc_compiler::graph::diff(&old_program, &new_program);
        let printed = match output {
            DiffFormat::Html => print(&picture.to_html("cnpc diff")),
            _ => print(&picture.to_dot()),
        };
        if printed != ExitCode::SUCCESS || !exit_code || picture.changed() == 0 {
            return printed;
        }
        return ExitCode::from(1);
    }
    let ((old_program, old_text), (new_program, new_text)) =
        match (tables_of(&old, identities), tables_of(&new, identities)) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(code), _) | (_, Err(code)) => return code,
        };
    let changes = cnpc_compiler::diff::diff(&old_program, &new_program);
    let printed = match output {
        DiffFormat::Json => print(&format!("{:#}\n", report::diff_json(&changes))),
        _ => print(&report::diff_text(&changes, &old_text, &new_text)),
    };
    if printed != ExitCode::SUCCESS {
        return printed;
    }
    if exit_code && !changes.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn run_graph(
    paths: &[PathBuf],
    cluster: &[PathBuf],
    identities: &Option<PathBuf>,
    output: GraphFormat,
) -> ExitCode {
    let (_, program) = match load_program(paths, cluster, identities) {
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
) -> ExitCode {
    let (report, program) = match load_program(paths, cluster, identities) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let compiler = cnpc_compiler::tables::TableCompiler::new(&program);
    let tables = compiler.all(&program);
    let ipcache = cnpc_compiler::tables::ipcache_entries(&program, &compiler.universe);
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
) -> ExitCode {
    let (_, program) = match load_program(paths, cluster, identities) {
        Ok(x) => x,
        Err(code) => return code,
    };
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
    print(&report::tables_text(&program, &universe, &tables))
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
