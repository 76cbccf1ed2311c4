//! Compile benchmark (issue 3): a synthetic cluster of 5,000 workloads with 2,000 identities and
//! 10,000 policies mixing L3, L4, CIDR, FQDN and deny rules. Prints figures and ratios from one
//! run; targets are checked by reading them, not by timing assertions (the machines are shared).
//!
//!     cargo bench -p cnpc-compiler --bench compile [-- --scale 0.1]

use cnpc_compiler::{check, load_str, lower, tables, Cluster};
use cnpc_ir::EntityRef;
use std::path::Path;
use std::time::Instant;

mod synthetic;
use synthetic::{cluster_yaml, policies_yaml, Shape};

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

fn main() {
    let scale: f64 = std::env::args()
        .skip_while(|a| a != "--scale")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let shape = Shape {
        workloads: (5000.0 * scale) as usize,
        identities: (2000.0 * scale) as usize,
        policies: (10000.0 * scale) as usize,
        namespaces: 50,
    };
    println!(
        "shape: {} workloads, {} identities, {} policies (scale {scale})",
        shape.workloads, shape.identities, shape.policies
    );
    let (cy, py) = (cluster_yaml(&shape), policies_yaml(&shape));

    let t = Instant::now();
    let mut set = load_str("policies.yaml", &py);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), &cy);
    let parse = t.elapsed();
    let report = check(set, Some(cluster));
    let checked = t.elapsed();
    assert_eq!(report.errors(), 0, "the synthetic policies must be valid");
    let cluster = report.cluster.as_ref().unwrap();
    let program = lower::build(
        &report.set.policies,
        &report.set.sources,
        cluster,
        &Default::default(),
    );
    let lowered = t.elapsed();
    let all = tables::all_tables(&program);
    let total = t.elapsed();
    let rows: usize = all.iter().map(|t| t.rows.len()).sum();
    println!("full compile to tables: {:.3} s (parse {:.3}, check {:.3}, lower {:.3}, tables {:.3}); target <= 2 s",
        total.as_secs_f64(), parse.as_secs_f64(), (checked - parse).as_secs_f64(), (lowered - checked).as_secs_f64(), (total - lowered).as_secs_f64());
    println!(
        "identities: {}, tables: {}, rows: {rows}",
        program.identities.len(),
        all.len()
    );

    // Cilium-style map entries: one per (peer identity, protocol, port prefix) per endpoint.
    let mut entries = 0u64;
    let mut worst = (0u64, 0usize);
    for t in &all {
        let e = map_entries(t);
        entries += e;
        if e > worst.0 {
            worst = (e, t.rows.len());
        }
    }
    println!("policy-map entries a per-(identity, peer, port) map needs: {entries}; table rows: {rows}; ratio {:.1}x", entries as f64 / rows.max(1) as f64);
    println!("largest table: {} rows where the per-peer map needs {} entries (Cilium's default limit is 16384 per endpoint)", worst.1, worst.0);

    // Incremental: one workload's labels change; the tables follow without a full recompile.
    let mut set = tables::TableSet::build(program.clone());
    assert_eq!(
        set.tables, all,
        "the incremental set starts from the same tables"
    );
    let mut times = Vec::new();
    for k in 0..9usize {
        let ep = cnpc_ir::EndpointRef::new((k * 557) % shape.workloads);
        let mut labels = set.program.endpoints[ep].labels.clone();
        labels.insert("k8s", "app", &format!("moved{k}"));
        let ports = set.program.endpoints[ep].named_ports.clone();
        let t = Instant::now();
        set.update_endpoint(ep, labels, ports);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!("incremental recompile after one workload's labels change: median {:.1} ms (min {:.1}, max {:.1}, 9 runs); target <= 50 ms; full compile is {:.0}x slower",
        times[4], times[0], times[8], total.as_secs_f64() * 1000.0 / times[4]);

    // A common wide rule: every cluster peer may reach the high ports. A per-peer map needs an
    // entry per peer identity and port prefix; the table needs one class and two rows.
    let wide = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: wide, namespace: ns1}\nspec:\n  endpointSelector: {matchLabels: {app: a1}}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: \"1024\", endPort: 65535, protocol: TCP}, {port: \"1024\", endPort: 65535, protocol: UDP}]}]\n";
    let mut set = load_str("wide.yaml", wide);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), &cy);
    let report = check(set, Some(cluster));
    let program = lower::build(
        &report.set.policies,
        &report.set.sources,
        report.cluster.as_ref().unwrap(),
        &Default::default(),
    );
    let wide_tables = tables::all_tables(&program);
    let t = wide_tables
        .iter()
        .find(|t| !t.rows.is_empty())
        .expect("the wide rule makes rows");
    let e = map_entries(t);
    println!("wide rule (cluster -> 1024-65535/TCP+UDP): per-peer map {e} entries ({}), cnpc table {} rows in {} class(es)",
        if e > 16384 { "over Cilium's 16384 limit" } else { "under the limit" }, t.rows.len(), t.classes.len());

    match peak_rss_kib() {
        Some(kib) => println!(
            "peak memory: {:.1} MiB; target <= 1024 MiB",
            kib as f64 / 1024.0
        ),
        None => println!("peak memory: not available on this system"),
    }
}
