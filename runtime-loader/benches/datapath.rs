//! Datapath benchmark (issue 4, item 7): nanoseconds per packet in the kernel, measured with
//! BPF_PROG_TEST_RUN's own timer over a large repeat count, for programs the same generator
//! builds from one table:
//! - `cnpc`: the specialised program, in the form the generator picks for the table's size,
//!   given the ipcache's host addresses (`gen::generate_inlined`, as the loader generates): the
//!   peers the table tells apart are found by address (`peers`: compared in code, or, for large
//!   tables, in address windows: array lookups the verifier inlines), and only other peers take
//!   the ipcache lookup;
//! - `adr map`: the same with address windows refused (`max_window_slots` 0), so large tables
//!   take the address map, a hash lookup whose hit is the verdict (the form before windows);
//!   `-` where that is the `cnpc` program itself (addresses in code);
//! - `looked-up`: the same table generated without the addresses (`gen::generate`, what
//!   `cnpc compile` writes): every peer is looked up in the ipcache;
//! - `base`: Cilium's way of looking policy up, hash lookups of (identity, port, protocol),
//!   then (identity, any port), then (identity, any), then (any);
//! - `floor`: parses the headers and returns;
//! - `lookups`: parses, looks the peer up in the ipcache and consults conntrack, then allows:
//!   everything a policy program must do but the decision.
//!
//! All parse the same way; `looked-up` and base also do everything `lookups` does, so their
//! difference is the decision alone, and `cnpc` saves the ipcache lookup for the peers it knows.
//! The ipcache holds the same 10,000 peers for every rule count, so growth measures the rules.
//! Rounds are interleaved and medians reported, with ratios computed within this one run: the
//! machine is shared and only ratios are comparable across runs. The targets (issue 12) are
//! printed beside the figures and checked against this run's own ratios.
//!
//! `cargo bench -p cnpc-runtime-loader --bench datapath` (root, bpf(2)); CNPC_BENCH_REPEAT and
//! CNPC_BENCH_ROUNDS change the repeat count (default 200,000) and rounds (default 9).

use cnpc_codegen_bpf::gen::{self, Strategy};
use cnpc_ir::*;
use cnpc_runtime_loader::sys;
use cnpc_runtime_loader::testrun::{craft_ports, Kernel};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;

const SUBJECT: u32 = 1000;
const FIRST_PEER: u32 = 5000;
/// Peers in the ipcache, whatever the number of rules.
const CLUSTER: u32 = 10_000;

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + 0x100 + i)
}

fn port_of(i: u32) -> u16 {
    1000 + (i % 20_000) as u16
}

/// An ingress table of `rules` rules, each allowing one peer identity on one TCP port; every
/// peer behaves differently, so rules = classes = rows.
fn table(rules: u32) -> DecisionTable {
    DecisionTable {
        subject: NumericIdentity(SUBJECT),
        direction: Direction::Ingress,
        default: TableVerdict::Deny,
        classes: (0..rules)
            .map(|i| IdentityClass {
                members: vec![NumericIdentity(FIRST_PEER + i)],
            })
            .collect(),
        rows: (0..rules)
            .map(|i| TableRow {
                class: i,
                protocol: Protocol::Tcp,
                ports: PortRange::single(port_of(i)),
                verdict: TableVerdict::Allow,
            })
            .collect(),
    }
}

fn median(mut v: Vec<u32>) -> f64 {
    v.sort_unstable();
    f64::from(v[v.len() / 2])
}

/// Issue 12's targets: for tables up to this many rules, cnpc ≤ BASELINE × the baseline and
/// ≤ FLOOR × the parse-only floor; cnpc at 10,000 rules ≤ GROWTH × cnpc at 10.
const SMALL: u32 = 64;
const TARGET_BASELINE: f64 = 0.7;
const TARGET_FLOOR: f64 = 1.5;
const TARGET_GROWTH: f64 = 1.3;

fn main() {
    let env = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let repeat = env("CNPC_BENCH_REPEAT", 200_000);
    let rounds = env("CNPC_BENCH_ROUNDS", 9);
    let subject_ip = Ipv4Addr::new(10, 0, 0, 1);
    println!(
        "datapath: ns per packet, median of {rounds} rounds of {repeat} runs; an allowed TCP \
         packet of an established connection; {CLUSTER} peers in the ipcache"
    );
    println!(
        "{:>6} {:>13} {:>7} {:>6} {:>6} {:>7} {:>9} {:>7} {:>6} {:>6} {:>10} {:>13} {:>15} {:>7}",
        "rules",
        "decision",
        "peers",
        "insns",
        "floor",
        "lookups",
        "looked-up",
        "adr map",
        "cnpc",
        "base",
        "cnpc/floor",
        "cnpc/baseline",
        "decision c/b ns",
        "growth"
    );
    let mut first: Option<f64> = None;
    let mut verdicts = Vec::new();
    for rules in [10u32, 64, 1000, 10_000] {
        let t = table(rules);
        let mut entries: Vec<(IpNet, NumericIdentity)> = (0..CLUSTER)
            .map(|i| {
                (
                    IpNet::from(IpAddr::V4(peer_ip(i))),
                    NumericIdentity(FIRST_PEER + i),
                )
            })
            .collect();
        entries.push((
            IpNet::from(IpAddr::V4(subject_ip)),
            NumericIdentity(SUBJECT),
        ));
        let mut kernel = match Kernel::new(&entries) {
            Ok(k) => k,
            Err(e) => return sys::skip_or_fail(&format!("datapath bench: {e}")),
        };
        let hosts = gen::HostAddresses::new(&entries);
        let specialised = gen::generate_inlined(&t, true, &gen::Inline::new(&hosts));
        assert!(
            !specialised.inlined.is_empty(),
            "the benchmark's peers are decided by address"
        );
        let has =
            |g: &gen::Generated, prefix| g.maps.iter().any(|m| m.def.name.starts_with(prefix));
        let peers = if has(&specialised, gen::ADDRESS_WINDOW_MAP_PREFIX) {
            "windows"
        } else if has(&specialised, gen::ADDRESS_MAP_PREFIX) {
            "map"
        } else {
            "code"
        };
        let address_map = gen::generate_inlined(
            &t,
            true,
            &gen::Inline {
                max_window_slots: 0,
                ..gen::Inline::new(&hosts)
            },
        );
        // Only where it differs from `cnpc` (large tables).
        let address_map = has(&address_map, gen::ADDRESS_MAP_PREFIX).then_some(address_map);
        let looked_up = gen::generate(&t, true);
        let baseline = gen::build(&t, true, Strategy::HashBaseline);
        let floor = gen::build(&t, true, Strategy::ParseOnly);
        let allow_all = DecisionTable {
            classes: Vec::new(),
            rows: Vec::new(),
            default: TableVerdict::Allow,
            ..t.clone()
        };
        let lookups = gen::build(&allow_all, true, Strategy::Branches);
        let mut load = |g: &gen::Generated| -> Option<OwnedFd> {
            match kernel.load_generated(g) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    sys::skip_or_fail(&format!("datapath bench: {e}"));
                    None
                }
            }
        };
        let (Some(s), Some(u), Some(b), Some(f), Some(l)) = (
            load(&specialised),
            load(&looked_up),
            load(&baseline),
            load(&floor),
            load(&lookups),
        ) else {
            return;
        };
        let a = match &address_map {
            Some(g) => match load(g) {
                Some(fd) => Some(fd),
                None => return,
            },
            None => None,
        };
        // The middle peer, on its port: allowed by every program.
        let i = rules / 2;
        let packet = craft_ports(
            IpAddr::V4(peer_ip(i)),
            IpAddr::V4(subject_ip),
            Protocol::Tcp,
            40000,
            port_of(i),
        );
        for fd in [&s, &u, &b, &l].into_iter().chain(&a) {
            // Opens the connection, so the timed runs take the established path.
            let out = kernel.run_keep(fd, &packet).expect("test run");
            assert!(out.allowed(), "the benchmark packet must be allowed");
        }
        let mut times: [Vec<u32>; 6] = Default::default();
        for _ in 0..rounds {
            let programs = [Some(&f), Some(&l), Some(&u), a.as_ref(), Some(&s), Some(&b)];
            for (k, fd) in programs.into_iter().enumerate() {
                let Some(fd) = fd else { continue };
                let (code, _, ns) = sys::test_run_repeat(fd, &packet, repeat).expect("test run");
                assert_eq!(code, gen::TC_ACT_OK as u32);
                times[k].push(ns);
            }
        }
        let am = (!times[3].is_empty()).then(|| median(times[3].clone()));
        let [fm, lm, um, _, sm, bm] = times.map(|t| if t.is_empty() { 0.0 } else { median(t) });
        let growth = sm / *first.get_or_insert(sm);
        println!(
            "{:>6} {:>13} {:>7} {:>6} {:>6.0} {:>7.0} {:>9.0} {:>7} {:>6.0} {:>6.0} {:>10.2} {:>13.2} {:>7.0}/{:<7.0} {:>6.2}x",
            rules,
            specialised.strategy.as_str(),
            peers,
            specialised.program.slot_count(),
            fm,
            lm,
            um,
            am.map_or("-".to_string(), |v| format!("{v:.0}")),
            sm,
            bm,
            sm / fm,
            sm / bm,
            // The decision's own cost: the looked-up program and the baseline against `lookups`.
            um - lm,
            bm - lm,
            growth
        );
        if rules <= SMALL {
            verdicts.push((
                format!("{rules} rules: cnpc/baseline ≤ {TARGET_BASELINE}"),
                sm / bm,
                sm / bm <= TARGET_BASELINE,
            ));
            verdicts.push((
                format!("{rules} rules: cnpc/floor ≤ {TARGET_FLOOR}"),
                sm / fm,
                sm / fm <= TARGET_FLOOR,
            ));
        }
        if rules == 10_000 {
            verdicts.push((
                format!("growth 10 to 10,000 rules ≤ {TARGET_GROWTH}x"),
                growth,
                growth <= TARGET_GROWTH,
            ));
        }
    }
    println!("targets (issue 12), from this run:");
    for (what, value, met) in verdicts {
        println!(
            "  {what:<40} {value:>5.2}  {}",
            if met { "met" } else { "MISSED" }
        );
    }
}
