//! Compile benchmark (issue 3): figures from one run, printed beside their targets; targets are
//! checked by reading them, not by timing assertions (the machines are shared).
//!
//! Rows, each measured in a child process of its own (so its peak memory is its own):
//! - `1x`: a synthetic cluster of 5,000 workloads with 2,000 identities and 10,000 policies
//!   mixing L3, L4, CIDR, FQDN and deny rules (`synthetic/mod.rs`);
//! - `10x`: the same generator at 50,000 workloads, 20,000 identities, 100,000 policies;
//! - `egress`: the independent set (`synthetic/egress.rs`): 10,000 policies over 5,000 pods,
//!   egress rules with port ranges towards large label groups;
//! - `cli`: the release `cnpc` binary on the independent set written as files: `cnpc tables`
//!   and `cnpc compile` of every identity (wall time and peak RSS from wait4). The binary is
//!   built first (`cargo build --release -p cnpc`) unless `CNPC_BIN` names one.
//!
//! Each library row times parse, validation (`check_errors`, what `cnpc compile`, `cnpc tables`
//! and the loader run), lower and tables (the full compile), then codegen (programs, ELF objects
//! and map images in memory, as `cnpc compile` renders them), then the incremental recompile
//! after one workload's labels change, then `cnpc check`'s validation and lints (`check`, on a
//! second parse), which only `cnpc check` runs. A counting allocator gives the heap each phase
//! leaves behind and its peak within the phase. The whole run takes one to three minutes on a
//! 2-core machine (by its load), most of it the 10× row's lints.
//!
//!     cargo bench -p cnpc-compiler --bench compile [-- ROW...] [--scale S]
//!     cargo bench -p cnpc-compiler --bench compile -- --write-egress DIR
//!     cargo bench -p cnpc-compiler --bench compile -- --write-synthetic DIR [--scale S]

use cnpc_codegen_bpf::artifacts;
use cnpc_compiler::{check, check_errors, load_str, lower, tables, Cluster};
use cnpc_ir::EntityRef;
use serde_json::{json, Map, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "synthetic/egress.rs"]
mod egress;
mod synthetic;
use synthetic::{cluster_yaml, policies_yaml, Shape};

/// The global allocator, counting the bytes allocated now and their peak since the last
/// [`heap_mark`]: the heap each phase leaves behind and the most it held, which VmHWM (one
/// peak for the whole process) cannot tell apart. Two relaxed atomic operations per call.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The heap now and its peak since the last mark, in KiB; starts the next phase's peak.
fn heap_mark() -> (u64, u64) {
    let live = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.swap(live, Ordering::Relaxed);
    ((live / 1024) as u64, (peak.max(live) / 1024) as u64)
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How many power-of-two-aligned port prefixes cover [lo, hi] (Cilium's policy map keys port
/// ranges as prefixes).
fn prefixes(mut lo: u32, hi: u32) -> u64 {
    let mut n = 0;
    while lo <= hi {
        let mut size = 1u32;
        while lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi && size < 65536 {
            size *= 2;
        }
        lo += size;
        n += 1;
    }
    n
}

/// Entries a per-(identity, peer identity, port prefix) policy map needs for one table.
fn map_entries(t: &cnpc_ir::DecisionTable) -> u64 {
    t.rows
        .iter()
        .map(|r| {
            t.classes[r.class as usize].members.len() as u64
                * prefixes(u32::from(r.ports.lo), u32::from(r.ports.hi))
        })
        .sum()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Files as (name, text).
type Files = Vec<(String, String)>;

/// Policies in files of 1,000 and the cluster in snapshots of 10,000 objects, as a user would
/// keep them: the front end refuses a file of more than a million YAML nodes (its guard against
/// alias bombs counts every node), which the 10× row's single files would pass.
fn split(cy: &str, py: &str) -> (Files, Files) {
    let docs: Vec<&str> = py.split("---\n").filter(|d| !d.is_empty()).collect();
    let policies = docs
        .chunks(1000)
        .enumerate()
        .map(|(i, c)| {
            let text: String = c.iter().map(|d| format!("---\n{d}")).collect();
            (format!("policies-{i:03}.yaml"), text)
        })
        .collect();
    let mut lines = cy.lines();
    let header: Vec<&str> = lines.by_ref().take(3).collect();
    let items: Vec<&str> = lines.collect();
    let clusters = items
        .chunks(10_000)
        .enumerate()
        .map(|(i, c)| {
            let mut text = header.join("\n");
            text.push('\n');
            for l in c {
                text.push_str(l);
                text.push('\n');
            }
            (format!("cluster-{i:02}.yaml"), text)
        })
        .collect();
    (clusters, policies)
}

/// The policy files read as `cnpc` and the loader read them: on every core, merged in file
/// order.
fn read_policies(files: &Files) -> cnpc_compiler::PolicySet {
    let mut set = cnpc_compiler::PolicySet::default();
    set.add_files(
        files
            .iter()
            .map(|(name, text)| (PathBuf::from(name), text.clone().into_bytes()))
            .collect(),
    );
    set.finish_notes();
    set
}

/// The cluster snapshots, read likewise (their sources join the policies').
fn read_cluster(sources: &mut cnpc_compiler::SourceMap, files: &Files) -> Cluster {
    let mut cluster = Cluster::default();
    cluster.add_strs(
        sources,
        files
            .iter()
            .map(|(name, text)| (PathBuf::from(name), text.to_string()))
            .collect(),
    );
    cluster
}

/// Figures of one library row: parse, check, lower, tables, codegen, incremental.
fn measure(cy: &str, py: &str, workloads: usize) -> Result<Map<String, Value>, String> {
    let mut f = Map::new();
    let (cluster_files, policy_files) = split(cy, py);
    let mut heap = Map::new();
    let mut mark = |phase: &str| {
        let (live, peak) = heap_mark();
        heap.insert(phase.to_string(), json!([live, peak]));
    };
    mark("inputs");
    let t = Instant::now();
    let mut set = read_policies(&policy_files);
    mark("parse_policies");
    let cluster = read_cluster(&mut set.sources, &cluster_files);
    let parse = t.elapsed();
    mark("parse");
    // What `cnpc compile` and the loader run: validation, not the lints (which only warn).
    let report = check_errors(set, Some(cluster));
    let checked = t.elapsed();
    mark("check");
    if report.errors() > 0 {
        let first: String = cnpc_compiler::report::human(&report, false)
            .chars()
            .take(2000)
            .collect();
        return Err(format!(
            "the synthetic policies have {} errors:\n{first}",
            report.errors()
        ));
    }
    let policies = report.set.policies.len();
    // As `cnpc compile` does: each syntax tree goes once lowered, and the rest of the checked
    // set once the program stands (the inputs' hashes come from the files' bytes).
    let mut report = report;
    let trees = std::mem::take(&mut report.set.policies);
    let cluster = report.cluster.as_ref().ok_or("checked without a cluster")?;
    let program = lower::build_consuming(trees, &report.set.sources, cluster, &Default::default());
    drop(report);
    let lowered = t.elapsed();
    f.insert("hwm_lowered".into(), json!(peak_rss_kib()));
    mark("lower");
    let compiler = tables::TableCompiler::new(&program);
    let all = compiler.all(&program);
    let total = t.elapsed();
    mark("tables");
    f.insert("parse".into(), json!(secs(parse)));
    f.insert("check".into(), json!(secs(checked - parse)));
    f.insert("lower".into(), json!(secs(lowered - checked)));
    f.insert("tables".into(), json!(secs(total - lowered)));
    f.insert("compile".into(), json!(secs(total)));
    f.insert("hwm_tables".into(), json!(peak_rss_kib()));
    f.insert("policies".into(), json!(policies));
    f.insert("workloads".into(), json!(workloads));
    f.insert(
        "files".into(),
        json!(policy_files.len() + cluster_files.len()),
    );
    let pods: std::collections::BTreeSet<_> = program
        .endpoints
        .values()
        .filter(|e| e.is_pod)
        .map(|e| e.identity)
        .collect();
    f.insert("identities".into(), json!(pods.len()));
    f.insert("table_count".into(), json!(all.len()));
    let rows: usize = all.iter().map(|t| t.rows.len()).sum();
    f.insert("rows".into(), json!(rows));
    f.insert(
        "classes".into(),
        json!(all.iter().map(|t| t.classes.len()).sum::<usize>()),
    );
    f.insert(
        "members".into(),
        json!(all
            .iter()
            .flat_map(|t| &t.classes)
            .map(|c| c.members.len())
            .sum::<usize>()),
    );
    let mut entries = 0u64;
    let mut worst = (0u64, 0usize);
    for t in &all {
        let e = map_entries(t);
        entries += e;
        if e > worst.0 {
            worst = (e, t.rows.len());
        }
    }
    f.insert("cilium_entries".into(), json!(entries));
    f.insert("worst_entries".into(), json!(worst.0));
    f.insert("worst_rows".into(), json!(worst.1));

    // Codegen: everything `cnpc compile` writes, rendered in memory.
    let t = Instant::now();
    let ipcache = tables::ipcache_entries(&program, &compiler.universe);
    let inputs: Vec<(String, String)> = policy_files
        .iter()
        .chain(&cluster_files)
        .map(|(name, text)| (name.clone(), artifacts::sha256(text.as_bytes())))
        .collect();
    let files = artifacts::render(&program, &all, &ipcache, &inputs).map_err(|e| e.to_string())?;
    f.insert("codegen".into(), json!(secs(t.elapsed())));
    f.insert("hwm_codegen".into(), json!(peak_rss_kib()));
    mark("codegen");
    let (mut objects, mut object_bytes, mut images, mut image_bytes, mut largest) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for (name, bytes) in &files {
        if name.ends_with(".o") {
            objects += 1;
            object_bytes += bytes.len();
        } else if name.starts_with("maps/")
            && ![
                "maps/ipcache.bin",
                "maps/ipcache_hosts.bin",
                "maps/fqdn.bin",
            ]
            .contains(&name.as_str())
        {
            images += 1;
            image_bytes += bytes.len();
            largest = largest.max(bytes.len());
        }
    }
    let written: usize = files.values().map(Vec::len).sum();
    drop(files);
    f.insert("objects".into(), json!(objects));
    f.insert("object_bytes".into(), json!(object_bytes));
    f.insert("images".into(), json!(images));
    f.insert("image_bytes".into(), json!(image_bytes));
    f.insert("largest_image".into(), json!(largest));
    f.insert("written".into(), json!(written));

    // Incremental: one workload's labels change; the tables follow without a full recompile.
    drop(compiler);
    let mut set = tables::TableSet::build(program);
    if set.tables != all {
        return Err("the incremental set does not start from the same tables".into());
    }
    drop(all);
    let mut times = Vec::new();
    for k in 0..9usize {
        let ep = cnpc_ir::EndpointRef::new((k * 557) % workloads);
        let mut labels = set.program.endpoints[ep].labels.clone();
        labels.insert("k8s", "app", &format!("moved{k}"));
        let ports = set.program.endpoints[ep].named_ports.clone();
        let t = Instant::now();
        set.update_endpoint(ep, labels, ports);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    f.insert("incr_median".into(), json!(times[4]));
    f.insert("incr_min".into(), json!(times[0]));
    f.insert("incr_max".into(), json!(times[8]));
    drop(set);
    mark("incremental");

    // What `cnpc check` adds, the lints: the same files again through `check`, with the
    // cluster (the selects-nothing lint reads it). Not part of the compile.
    let mut set = read_policies(&policy_files);
    let cluster = read_cluster(&mut set.sources, &cluster_files);
    mark("reparse");
    let t = Instant::now();
    let report = check(set, Some(cluster));
    f.insert("lint_check".into(), json!(secs(t.elapsed())));
    mark("lint_check");
    if report.errors() > 0 {
        return Err("check found errors check_errors did not".into());
    }
    f.insert("heap".into(), Value::Object(heap));
    Ok(f)
}

/// A common wide rule: every cluster peer may reach the high ports. A per-peer map needs an
/// entry per peer identity and port prefix; the table needs one class and two rows.
fn wide_rule(cy: &str, f: &mut Map<String, Value>) {
    let wide = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: wide, namespace: ns1}\nspec:\n  endpointSelector: {matchLabels: {app: a1}}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: \"1024\", endPort: 65535, protocol: TCP}, {port: \"1024\", endPort: 65535, protocol: UDP}]}]\n";
    let mut set = load_str("wide.yaml", wide);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), cy);
    let report = check(set, Some(cluster));
    let Some(cluster) = report.cluster.as_ref() else {
        return;
    };
    let program = lower::build(
        &report.set.policies,
        &report.set.sources,
        cluster,
        &Default::default(),
    );
    if let Some(t) = tables::all_tables(&program)
        .iter()
        .find(|t| !t.rows.is_empty())
    {
        f.insert("wide_entries".into(), json!(map_entries(t)));
        f.insert("wide_rows".into(), json!(t.rows.len()));
        f.insert("wide_classes".into(), json!(t.classes.len()));
    }
}

fn shape(scale: f64) -> Shape {
    Shape {
        workloads: (5000.0 * scale) as usize,
        identities: (2000.0 * scale) as usize,
        policies: (10000.0 * scale) as usize,
        namespaces: 50,
    }
}

/// The child side: one row, its figures as one JSON line on stdout.
fn child(row: &str, scale: f64) -> Result<(), String> {
    let mut f = match row {
        "egress" => {
            let s = egress::EgressShape::standard();
            measure(
                &egress::cluster_yaml(&s),
                &egress::policies_yaml(&s),
                s.pods,
            )?
        }
        _ => {
            let scale = if row == "10x" { 10.0 * scale } else { scale };
            let s = shape(scale);
            let cy = cluster_yaml(&s);
            let mut f = measure(&cy, &policies_yaml(&s), s.workloads)?;
            if row == "1x" {
                wide_rule(&cy, &mut f);
            }
            f
        }
    };
    f.insert("hwm_end".into(), json!(peak_rss_kib()));
    println!("FIGURES {}", Value::Object(f));
    Ok(())
}

/// A finished child: wall time, peak RSS (KiB, from wait4's rusage), exit code, stdout.
struct Run {
    wall: Duration,
    maxrss_kib: u64,
    code: i32,
    stdout: String,
}

/// Runs `cmd` to its end and measures it. Its stdout is captured unless the caller redirected
/// it.
fn run_measured(cmd: &mut Command, capture: bool) -> std::io::Result<Run> {
    if capture {
        cmd.stdout(Stdio::piped());
    }
    let t = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    let mut status = 0;
    // SAFETY: rusage is plain old data, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes into `status` and `usage`, both alive for the call; the child is
    // ours and not waited for anywhere else (std's `Child` does not wait when dropped).
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(Run {
        wall: t.elapsed(),
        // Linux reports ru_maxrss in KiB.
        maxrss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        code,
        stdout,
    })
}

/// Runs one library row in a child process; its figures, with the child's peak RSS and wall
/// time.
fn library_row(row: &str, scale: f64) -> Result<Map<String, Value>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let run = run_measured(
        Command::new(exe).args(["--child", row, "--scale", &scale.to_string()]),
        true,
    )
    .map_err(|e| e.to_string())?;
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("FIGURES "))
        .ok_or_else(|| format!("row {row} failed (exit {})", run.code))?;
    let Value::Object(mut f) = serde_json::from_str(line).map_err(|e| e.to_string())? else {
        return Err(format!("row {row}: figures are not an object"));
    };
    f.insert("maxrss".into(), json!(run.maxrss_kib));
    f.insert("wall".into(), json!(secs(run.wall)));
    Ok(f)
}

fn num(f: &Map<String, Value>, k: &str) -> f64 {
    f.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn mib(kib: f64) -> String {
    format!("{:.0} MiB", kib / 1024.0)
}

fn bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The side-by-side table of the library rows.
fn print_library(rows: &[(&str, Map<String, Value>)]) {
    let header: Vec<&str> = rows.iter().map(|(n, _)| *n).collect();
    println!("\n| measure | {} | target |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(rows.len()));
    type Cell = fn(&Map<String, Value>) -> String;
    let lines: Vec<(&str, Cell, &str)> = vec![
        (
            "workloads / identities / policies",
            |f| {
                format!(
                    "{} / {} / {}",
                    thousands(num(f, "workloads")),
                    thousands(num(f, "identities")),
                    thousands(num(f, "policies"))
                )
            },
            "",
        ),
        (
            "full compile, YAML to decision tables",
            |f| {
                format!(
                    "{:.2} s (parse {:.2}, validate {:.2}, lower {:.2}, tables {:.2})",
                    num(f, "compile"),
                    num(f, "parse"),
                    num(f, "check"),
                    num(f, "lower"),
                    num(f, "tables")
                )
            },
            "≤ 2 s at 1×, ≤ 5 s at 10×",
        ),
        (
            "`cnpc check` (validation and lints; not in the compile)",
            |f| format!("{:.2} s", num(f, "lint_check")),
            "",
        ),
        (
            "codegen: programs, objects, map images",
            |f| format!("{:.2} s", num(f, "codegen")),
            "",
        ),
        (
            "peak memory through tables (VmHWM; through lower)",
            |f| {
                format!(
                    "{} ({})",
                    mib(num(f, "hwm_tables")),
                    mib(num(f, "hwm_lowered"))
                )
            },
            "≤ 1 GiB",
        ),
        (
            "peak memory with codegen",
            |f| mib(num(f, "hwm_codegen")),
            "",
        ),
        (
            "heap left by parse / validate / lower / tables (peak within each)",
            |f| {
                ["parse", "check", "lower", "tables"]
                    .map(|phase| {
                        let at = |i: usize| {
                            f.get("heap")
                                .and_then(|h| h.get(phase))
                                .and_then(|v| v.get(i))
                                .and_then(Value::as_f64)
                                .unwrap_or(f64::NAN)
                        };
                        format!("{} ({})", mib(at(0)), mib(at(1)))
                    })
                    .join(" / ")
            },
            "",
        ),
        (
            "incremental: one workload's labels change (median of 9)",
            |f| {
                format!(
                    "{:.1} ms (max {:.1})",
                    num(f, "incr_median"),
                    num(f, "incr_max")
                )
            },
            "≤ 50 ms",
        ),
        (
            "full compile per policy",
            |f| format!("{:.1} µs", num(f, "compile") * 1e6 / num(f, "policies")),
            "near-constant",
        ),
        (
            "full compile per identity",
            |f| format!("{:.0} µs", num(f, "compile") * 1e6 / num(f, "identities")),
            "near-constant",
        ),
        (
            "per policy: parse / validate / lower",
            |f| {
                let per = |k: &str| num(f, k) * 1e6 / num(f, "policies");
                format!(
                    "{:.1} / {:.1} / {:.1} µs",
                    per("parse"),
                    per("check"),
                    per("lower")
                )
            },
            "near-constant",
        ),
        (
            "per identity: tables / codegen",
            |f| {
                let per = |k: &str| num(f, k) * 1e6 / num(f, "identities");
                format!("{:.0} / {:.0} µs", per("tables"), per("codegen"))
            },
            "near-constant",
        ),
        (
            "per table: class members listed, rows",
            |f| {
                format!(
                    "{:.0}, {:.2}",
                    num(f, "members") / num(f, "table_count"),
                    num(f, "rows") / num(f, "table_count")
                )
            },
            "",
        ),
        (
            "peak memory per policy (VmHWM through tables)",
            |f| format!("{:.1} KiB", num(f, "hwm_tables") / num(f, "policies")),
            "near-constant",
        ),
        (
            "tables / classes / rows",
            |f| {
                format!(
                    "{} / {} / {}",
                    thousands(num(f, "table_count")),
                    thousands(num(f, "classes")),
                    thousands(num(f, "rows"))
                )
            },
            "",
        ),
        (
            "class members listed, all tables",
            |f| thousands(num(f, "members")),
            "",
        ),
        (
            "entries of a per-(identity, peer, port prefix) map",
            |f| {
                format!(
                    "{} ({:.0}× the rows)",
                    thousands(num(f, "cilium_entries")),
                    num(f, "cilium_entries") / num(f, "rows").max(1.0)
                )
            },
            "",
        ),
        (
            "programs: objects, bytes",
            |f| {
                format!(
                    "{}, {}",
                    thousands(num(f, "objects")),
                    bytes(num(f, "object_bytes"))
                )
            },
            "",
        ),
        (
            "table map images: count, bytes, largest",
            |f| {
                format!(
                    "{}, {}, {}",
                    thousands(num(f, "images")),
                    bytes(num(f, "image_bytes")),
                    bytes(num(f, "largest_image"))
                )
            },
            "",
        ),
        (
            "everything `cnpc compile` writes",
            |f| bytes(num(f, "written")),
            "",
        ),
    ];
    for (name, cell, target) in lines {
        let cells: Vec<String> = rows.iter().map(|(_, f)| cell(f)).collect();
        println!("| {name} | {} | {target} |", cells.join(" | "));
    }
    let one = rows.iter().find(|(n, _)| *n == "1x").map(|(_, f)| f);
    let ten = rows.iter().find(|(n, _)| *n == "10x").map(|(_, f)| f);
    if let (Some(a), Some(b)) = (one, ten) {
        let per = |f: &Map<String, Value>, k: &str, by: &str| num(f, k) / num(f, by);
        println!("\n10× against 1× (1.00 is linear):");
        for (phase, by) in [
            ("compile", "policies"),
            ("compile", "identities"),
            ("parse", "policies"),
            ("check", "policies"),
            ("lint_check", "policies"),
            ("lower", "policies"),
            ("tables", "identities"),
            ("codegen", "identities"),
            ("incr_median", "identities"),
            ("hwm_tables", "policies"),
            ("members", "identities"),
        ] {
            println!(
                "  {phase} per {by}: {:.2}",
                per(b, phase, by) / per(a, phase, by)
            );
        }
    }
    if let Some(f) = one {
        if f.contains_key("wide_entries") {
            let e = num(f, "wide_entries");
            println!(
                "\nwide rule (cluster -> 1024-65535/TCP+UDP) at 1×: a per-peer map needs {} entries ({} Cilium's 16,384 per endpoint); the table has {} rows in {} class(es)",
                thousands(e),
                if e > 16384.0 { "over" } else { "under" },
                num(f, "wide_rows"),
                num(f, "wide_classes")
            );
        }
    }
}

/// The release `cnpc` binary: `CNPC_BIN`, or built beside this benchmark.
fn cnpc_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CNPC_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace directory")?;
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "cnpc"])
        .current_dir(workspace)
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release -p cnpc: {status}"));
    }
    // This benchmark runs from target/release/deps; the binary is in target/release.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory")?
        .join("cnpc");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("{} was not built", bin.display()))
    }
}

fn dir_bytes(dir: &Path) -> (u64, usize, u64) {
    // (all bytes, table map images, bytes of those images)
    let (mut all, mut images, mut image_bytes) = (0, 0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
                continue;
            }
            all += meta.len();
            let name = e.file_name().to_string_lossy().into_owned();
            if d.ends_with("maps") && !name.starts_with("ipcache") && !name.starts_with("fqdn") {
                images += 1;
                image_bytes += meta.len();
            }
        }
    }
    (all, images, image_bytes)
}

/// The whole CLI on the independent set: `cnpc tables` and `cnpc compile` of every identity.
fn cli_row() -> Result<(), String> {
    let bin = cnpc_binary()?;
    let dir = std::env::temp_dir().join(format!("cnpc-bench-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cluster, policies) = egress::write_set(&egress::EgressShape::standard(), &dir)
        .map_err(|e| format!("writing the set: {e}"))?;
    let result = (|| {
        let text = dir.join("tables.txt");
        let file = std::fs::File::create(&text).map_err(|e| e.to_string())?;
        let tables = run_measured(
            Command::new(&bin)
                .arg("tables")
                .arg(&policies)
                .arg("--cluster")
                .arg(&cluster)
                .stdout(file),
            false,
        )
        .map_err(|e| e.to_string())?;
        let text_bytes = std::fs::metadata(&text).map(|m| m.len()).unwrap_or(0);
        let out = dir.join("out");
        let compile = run_measured(
            Command::new(&bin)
                .arg("compile")
                .arg(&policies)
                .arg("--cluster")
                .arg(&cluster)
                .arg("-o")
                .arg(&out)
                .stderr(Stdio::null()),
            true,
        )
        .map_err(|e| e.to_string())?;
        let (written, images, image_bytes) = dir_bytes(&out);
        println!(
            "\nWhole CLI (release `cnpc`, {}), independent set as 100 files:",
            bin.display()
        );
        println!("| command | wall | peak RSS | output | target |");
        println!("|---|---|---|---|---|");
        println!(
            "| `cnpc tables` | {:.2} s | {} | {} of text (exit {}) | ≤ 3 s |",
            secs(tables.wall),
            mib(tables.maxrss_kib as f64),
            bytes(text_bytes as f64),
            tables.code
        );
        println!(
            "| `cnpc compile` | {:.2} s | {} | {} in all; {} table map images, {} (exit {}) | ≤ 10 s, ≤ 1 GiB |",
            secs(compile.wall),
            mib(compile.maxrss_kib as f64),
            bytes(written as f64),
            thousands(images as f64),
            bytes(image_bytes as f64),
            compile.code
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let scale: f64 = value("--scale").and_then(|s| s.parse().ok()).unwrap_or(1.0);
    if let Some(dir) = value("--write-egress") {
        match egress::write_set(&egress::EgressShape::standard(), Path::new(dir)) {
            Ok((c, p)) => println!("{} {}", c.display(), p.display()),
            Err(e) => {
                eprintln!("writing the set: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    if let Some(dir) = value("--write-synthetic") {
        // The 1x set (10x with `--scale 10`) as files, split as the rows read them.
        let s = shape(scale);
        let (clusters, policies) = split(&cluster_yaml(&s), &policies_yaml(&s));
        let dir = Path::new(dir);
        let written = [("cluster", &clusters), ("policies", &policies)]
            .into_iter()
            .try_for_each(|(sub, files)| {
                std::fs::create_dir_all(dir.join(sub))?;
                files
                    .iter()
                    .try_for_each(|(name, text)| std::fs::write(dir.join(sub).join(name), text))
            });
        if let Err(e) = written {
            eprintln!("writing the set: {e}");
            std::process::exit(2);
        }
        return;
    }
    if let Some(row) = value("--child") {
        if let Err(e) = child(row, scale) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return;
    }
    // Rows named on the command line (cargo bench passes `--bench` too), or all of them.
    let skip: Vec<&str> = ["--scale", "--child", "--write-egress", "--write-synthetic"]
        .iter()
        .filter_map(|f| value(f).map(String::as_str))
        .collect();
    let mut wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && !skip.contains(a))
        .collect();
    if wanted.is_empty() {
        wanted = vec!["1x", "10x", "egress", "cli"];
    }
    let start = Instant::now();
    println!(
        "compile benchmark: rows {} (scale {scale}); each library row in a child process of its own",
        wanted.join(", ")
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {} cores ({cpu}), kernel {}; {date}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    );
    let mut library = Vec::new();
    for row in wanted
        .iter()
        .filter(|r| ["1x", "10x", "egress"].contains(r))
    {
        match library_row(row, scale) {
            Ok(f) => library.push((*row, f)),
            Err(e) => println!("row {row}: {e}"),
        }
    }
    if !library.is_empty() {
        print_library(&library);
        let walls: Vec<String> = library
            .iter()
            .map(|(n, f)| format!("{n} {:.0} s", num(f, "wall")))
            .collect();
        println!(
            "\nrow run times (each child: generate, compile, codegen, incremental): {}",
            walls.join(", ")
        );
    }
    if wanted.contains(&"cli") {
        if let Err(e) = cli_row() {
            println!("whole CLI: {e}");
        }
    }
    println!(
        "\nbenchmark run time: {:.0} s",
        start.elapsed().as_secs_f64()
    );
}
