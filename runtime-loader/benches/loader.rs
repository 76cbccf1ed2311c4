//! Loader benchmark (issue 5, item 9): file change to enforced verdict, and the loader's memory.
//!
//! - Demo: the Star Wars namespaces of the end-to-end test; an edit of the deathstar policy that
//!   lets the xwing land, then its revert. Latency is from the write to the first request whose
//!   outcome shows the new verdict (requests are tried back to back with a 10 ms timeout; a
//!   refused request's timeout is not counted).
//! - Synthetic: the compile benchmark's 5,000 workloads and 10,000 policies (100 files), with 20
//!   of the workloads on this node (veth interfaces routed to their addresses). Latency is from
//!   the write of one policy file to the loader's state file recording the new generation (it is
//!   written after every hook has switched; read every millisecond). Then one pod of the
//!   snapshot gains a label and loses it again: a pod no table of this node names, and one
//!   that a table here names (its program is loaded again).
//!
//! - Demo with a subscriber of the event stream that never reads (issue 11): the same latency
//!   rows, then a burst of allowed connections larger than a subscriber's queue; the loader's
//!   verdict counters (`/metrics`) must equal the records a subscriber reading along received,
//!   with and without the stalled one.
//!
//! Both go through the real `cnpc-loader` binary: file watch, debounce (30 ms), compile, load,
//! switch. Memory is the loader's peak RSS (VmHWM). Root, bpffs and `ip` needed.
//!
//!     cargo bench -p cnpc-runtime-loader --bench loader

#[path = "../tests/netns/mod.rs"]
mod netns;
#[path = "../../compiler/benches/synthetic/mod.rs"]
mod synthetic;

use cnpc_runtime_loader::{events, sys};
use netns::{Net, PODS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the synthetic rows read the state file for the new generation: a latency is late
/// by up to this much (it was 10 ms, a tenth of the target).
const POLL: Duration = Duration::from_millis(1);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// A subscriber of the loader's event stream that asks to follow and never reads (issue 11:
/// it must cost the loader nothing but the records it loses).
fn stalled_subscriber(net: &Net) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::{BufRead, Write};
    let path = net.tmp.join("state/events.sock");
    let s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| e.to_string())?;
    let mut greeting = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut greeting)
        .map_err(|e| e.to_string())?;
    writeln!(&s, "{{\"last\":0,\"follow\":true}}").map_err(|e| e.to_string())?;
    Ok(s)
}

/// The loader's /metrics inside the node's namespace (the demo rows).
const METRICS: &str = "127.0.0.1:9965";

/// The sum of `cnpc_policy_verdicts_total` over its labels.
fn verdicts_counted(net: &Net) -> Result<u64, String> {
    let (_, text) = net
        .loader_get(METRICS, "/metrics")
        .ok_or("/metrics does not answer")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("cnpc_policy_verdicts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Counts what a subscriber reading along receives: datapath verdict records and loss notices.
#[derive(Clone, Default)]
struct Tally(Arc<(AtomicU64, AtomicU64)>);

impl std::io::Write for Tally {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(b);
        for line in text.lines() {
            if line.contains("\"type\":\"l3l4\"") {
                self.0 .0.fetch_add(1, Ordering::Relaxed);
            } else if line.contains("\"type\":\"lost\"") {
                self.0 .1.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn demo(rounds: usize, stalled: bool) -> Result<(), String> {
    let mut net = Net::demo()?;
    let (xw, ds1) = ("xw", PODS[0].2);
    net.loader_args = vec!["--metrics".into(), METRICS.into()];
    net.start_loader()?;
    net.until(Duration::from_secs(30), || {
        net.log().contains("applied") && !net.land(xw, ds1, Duration::from_millis(50))
    })
    .ok_or("the loader never enforced")?;
    let _subscriber = if stalled {
        Some(stalled_subscriber(&net)?)
    } else {
        None
    };
    // A subscriber that reads everything, and the counters when it started.
    let tally = Tally::default();
    {
        let socket = net.tmp.join("state/events.sock");
        let mut out = tally.clone();
        std::thread::spawn(move || {
            let _ = events::observe(&socket, 0, true, &events::Filter::default(), true, &mut out);
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    // Records a subscriber received before the scrape were counted before it (the loader counts
    // an event, then publishes it): read the tally around each scrape.
    let seen = || tally.0 .0.load(Ordering::Relaxed);
    let seen_before = (seen(), verdicts_counted(&net)?, seen());
    let rule1 = std::fs::read_to_string(net.policies.join("deathstar.yaml")).unwrap();
    let deny = std::fs::read_to_string(net.policies.join("xwing-egress-deny.yaml")).unwrap();
    let open = rule1.replace(
        "  - fromEndpoints:\n    - matchLabels:\n        org: empire\n",
        "  - fromEndpoints:\n    - {}\n",
    );
    let probe = Duration::from_millis(10);
    let (mut allow, mut block) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        std::fs::remove_file(net.policies.join("xwing-egress-deny.yaml")).unwrap();
        let t = Instant::now();
        std::fs::write(net.policies.join("deathstar.yaml"), &open).unwrap();
        while !net.land(xw, ds1, probe) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("the edit never applied".into());
            }
        }
        allow.push(t.elapsed());
        let t = Instant::now();
        std::fs::write(net.policies.join("xwing-egress-deny.yaml"), &deny).unwrap();
        std::fs::write(net.policies.join("deathstar.yaml"), &rule1).unwrap();
        while net.land(xw, ds1, probe) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("the revert never applied".into());
            }
        }
        block.push(t.elapsed().saturating_sub(probe));
        std::thread::sleep(Duration::from_millis(100));
    }
    // A burst of allowed connections (tiefighter to deathstar), more verdicts than a
    // subscriber's queue holds: the stalled subscriber loses records, the loader's counters
    // must not.
    const BURST: usize = 1500;
    let (tf, t) = ("tf", Instant::now());
    let landed = (0..BURST)
        .filter(|_| net.land(tf, ds1, Duration::from_millis(200)))
        .count();
    let burst = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let seen_after = (seen(), verdicts_counted(&net)?, seen());
    let counted = seen_after.1 - seen_before.1;
    let (at_least, at_most) = (seen_after.0 - seen_before.2, seen_after.2 - seen_before.0);
    let lost = tally.0 .1.load(Ordering::Relaxed);
    let counters = format!(
        "  counters: {counted} verdicts counted by the loader, {at_least} records read by a subscriber reading along ({lost} loss notices); burst of {BURST} connections ({landed} landed) in {:.2} s",
        burst.as_secs_f64()
    );
    if counted < at_least || counted > at_most || lost != 0 || (counted as usize) < landed {
        return Err(format!(
            "the loader's counters ({counted}) differ from the stream ({at_least}..={at_most}, {lost} loss notices) or miss the burst ({landed} connections)"
        ));
    }
    // The stalled subscriber now reads: its queue's records, then (with the next flow) the
    // notice of how many it lost.
    let stalled_lost = match &_subscriber {
        None => String::new(),
        Some(s) => {
            use std::io::BufRead;
            let s = s.try_clone().map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let reader = std::thread::spawn(move || {
                std::io::BufReader::new(s)
                    .lines()
                    .map_while(Result::ok)
                    .find_map(|l| {
                        let v: serde_json::Value = serde_json::from_str(&l).ok()?;
                        (v["type"] == "lost").then(|| v["count"].as_u64().unwrap_or(0))
                    })
            });
            std::thread::sleep(Duration::from_millis(300));
            net.land(tf, ds1, Duration::from_millis(200));
            match reader.join().ok().flatten() {
                Some(n) => format!("; the stalled subscriber was told it lost {n} records"),
                None => return Err("the stalled subscriber was never told of its losses".into()),
            }
        }
    };
    let counters = format!("{counters}{stalled_lost}");
    let pid = net.loader.as_ref().map(|c| c.id()).unwrap_or(0);
    if let Some(l) = net.log().lines().rev().find(|l| l.contains("applied")) {
        println!(
            "  demo, last apply: {}",
            l.split("applied").nth(1).unwrap_or("").trim()
        );
    }
    let with = if stalled {
        ", a subscriber that never reads"
    } else {
        ""
    };
    println!(
        "demo ({rounds} rounds{with}): file change to enforced verdict, median {:.0} ms to allow, {:.0} ms to block (target 100 ms); max {:.0} / {:.0} ms; loader peak RSS {:.1} MiB",
        median(allow.clone()).as_secs_f64() * 1e3,
        median(block.clone()).as_secs_f64() * 1e3,
        allow.iter().max().unwrap().as_secs_f64() * 1e3,
        block.iter().max().unwrap().as_secs_f64() * 1e3,
        peak_rss_mib(pid).unwrap_or(f64::NAN)
    );
    println!("{counters}");
    Ok(())
}

/// Relabels a pod in the snapshot `rounds` times (gaining `canary: c1`, then back): the time
/// from each write to the new generation recorded.
fn relabel_rounds(net: &Net, rounds: usize, plain: &str) -> Result<Vec<Duration>, String> {
    let snapshot = std::fs::read_to_string(&net.cluster).unwrap();
    let labelled = plain.replace("}}", ", canary: c1}}");
    let relabelled = snapshot.replacen(plain, &labelled, 1);
    if relabelled == snapshot {
        return Err(format!("the synthetic relabel of {plain} does not apply"));
    }
    let mut times = Vec::new();
    for r in 0..rounds {
        let before = net.generation();
        let t = Instant::now();
        std::fs::write(
            &net.cluster,
            if r % 2 == 0 { &relabelled } else { &snapshot },
        )
        .unwrap();
        net.until_polling(Duration::from_secs(60), POLL, || net.generation() > before)
            .ok_or("the relabel never applied")?;
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(times)
}

fn synthetic(rounds: usize) -> Result<(), String> {
    let mut net = Net::node()?;
    let shape = synthetic::Shape {
        workloads: 5000,
        identities: 2000,
        policies: 10_000,
        namespaces: 50,
    };
    let cluster = net.tmp.join("cluster.yaml");
    std::fs::write(&cluster, synthetic::cluster_yaml(&shape)).map_err(|e| e.to_string())?;
    net.cluster = cluster;
    // 100 files of 100 policies.
    let all = synthetic::policies_yaml(&shape);
    let docs: Vec<&str> = all.split("---\n").filter(|d| !d.is_empty()).collect();
    for (i, chunk) in docs.chunks(100).enumerate() {
        let text: String = chunk.iter().map(|d| format!("---\n{d}")).collect();
        std::fs::write(net.policies.join(format!("p{i:03}.yaml")), text)
            .map_err(|e| e.to_string())?;
    }
    // Workloads w1..w20 (10.0.0.1..20) are on this node.
    let node = net.ns("node");
    for w in 1..=20 {
        let dev = format!("{}b{w}", net.prefix);
        let peer = format!("{dev}p");
        net.ip(&[
            "-n", &node, "link", "add", &dev, "type", "veth", "peer", "name", &peer,
        ])?;
        net.ip(&["-n", &node, "link", "set", &dev, "up"])?;
        net.ip(&["-n", &node, "link", "set", &peer, "up"])?;
        net.ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("10.0.0.{w}/32"),
            "dev",
            &dev,
        ])?;
    }
    let t = Instant::now();
    net.start_loader()?;
    net.until(Duration::from_secs(300), || net.generation() >= 1)
        .ok_or_else(|| format!("the loader never applied:\n{}", net.log()))?;
    let first = t.elapsed();
    let file = net.policies.join("p000.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    // Policy p5 selects app a5, whose workload w5 is local: its ingress port changes.
    let edited = original.replacen("port: \"8005\"", "port: \"8999\"", 1);
    if edited == original {
        return Err("the synthetic edit does not apply".into());
    }
    let mut lat = Vec::new();
    for r in 0..rounds {
        let before = net.generation();
        let t = Instant::now();
        std::fs::write(&file, if r % 2 == 0 { &edited } else { &original }).unwrap();
        net.until_polling(Duration::from_secs(60), POLL, || net.generation() > before)
            .ok_or_else(|| {
                format!(
                    "the edit never applied:\n{}",
                    net.log()
                        .lines()
                        .rev()
                        .take(6)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })?;
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    // One pod's labels change in the snapshot: a workload elsewhere gains a label, a new
    // identity. First one that no table of this node names (w4005, app a5 in ns5): every
    // program stays, the ipcache maps change in place. Then one that a table here names (w4038,
    // app a38 in ns38, a peer of the local a5's ingress): its new identity joins that table,
    // whose program is loaded again; the others stay.
    let relabel = relabel_rounds(
        &net,
        rounds,
        "{name: w4005, namespace: ns5, labels: {app: a5, tier: t2}}",
    )?;
    let applies_before = net.log().lines().filter(|l| l.contains("applied")).count();
    let relabel_named = relabel_rounds(
        &net,
        rounds,
        "{name: w4038, namespace: ns38, labels: {app: a38, tier: t2}}",
    )?;
    let pid = net.loader.as_ref().map(|c| c.id()).unwrap_or(0);
    // The state file is written before the log line: let the line land.
    std::thread::sleep(Duration::from_millis(100));
    let applies: Vec<String> = net
        .log()
        .lines()
        .filter(|l| l.contains("applied"))
        .map(|l| l.split("applied").nth(1).unwrap_or("").trim().to_string())
        .collect();
    let last = net
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("applied"))
        .unwrap_or("")
        .to_string();
    // Programs loaded by the second relabel's applies (the first's load none).
    let loaded: Vec<String> = applies
        .iter()
        .skip(applies_before)
        .map(|a| {
            a.split_whitespace()
                .find_map(|f| f.strip_prefix("programs="))
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    println!(
        "synthetic (5,000 workloads, 10,000 policies, 20 local endpoints; {rounds} rounds): first generation {:.2} s; policy file edit to enforced, median {:.0} ms, max {:.0} ms (target 100 / 150 ms); one pod relabelled in the snapshot to enforced, median {:.0} ms, max {:.0} ms (target 100 ms); a pod a table here names relabelled, median {:.0} ms, max {:.0} ms (programs loaded per apply: {}); loader peak RSS {:.1} MiB (target 100 MiB)",
        first.as_secs_f64(),
        median(lat.clone()).as_secs_f64() * 1e3,
        lat.iter().max().unwrap().as_secs_f64() * 1e3,
        median(relabel.clone()).as_secs_f64() * 1e3,
        relabel.iter().max().unwrap().as_secs_f64() * 1e3,
        median(relabel_named.clone()).as_secs_f64() * 1e3,
        relabel_named.iter().max().unwrap().as_secs_f64() * 1e3,
        loaded.join(" "),
        peak_rss_mib(pid).unwrap_or(f64::NAN)
    );
    println!(
        "  first apply: {}",
        applies.first().map_or("", |s| s.as_str())
    );
    // Each apply's phases, for where an edit's time goes.
    let field = |a: &str, name: &str| -> String {
        a.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or("?".into(), |v| format!("{v:.0}"))
    };
    println!(
        "  applies, check/tables/load/total ms: {}",
        applies
            .iter()
            .skip(1)
            .map(|a| {
                ["check_ms", "tables_ms", "load_ms", "total_ms"]
                    .map(|n| field(a, n))
                    .join("/")
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  last apply: {}",
        applies.last().map_or("", |s| s.as_str())
    );
    let _ = last;
    Ok(())
}

fn main() {
    if !sys::is_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail("loader bench: bpffs is not mounted at /sys/fs/bpf");
    }
    // `cargo bench --bench loader -- demo` runs the demo rows alone.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.starts_with(o.as_str()));
    type Run = fn() -> Result<(), String>;
    let runs: [(&str, Run); 3] = [
        ("demo", || demo(15, false)),
        ("demo-stalled-subscriber", || demo(15, true)),
        ("synthetic", || synthetic(12)),
    ];
    for (name, run) in runs {
        if !wanted(name) {
            continue;
        }
        if let Err(e) = run() {
            sys::skip_or_fail(&format!("loader bench, {name}: {e}"));
        }
    }
}
