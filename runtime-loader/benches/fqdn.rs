//! Answer to enforced: how long the DNS proxy holds an answer whose name a toFQDNs selector
//! matches, measured where the loader does the work. A client stands in for the proxy on the
//! loader's learning socket (`fqdn::serve`, unix stream, JSON lines) and sends one request per
//! answer, each with a new address; the loader side (`fqdn::Learning`, as `cnpc-loader` runs
//! it) records it and writes the address into a real `fqdn` map in the kernel before replying.
//! Printed: the round trip's median and 99th percentile for answers one at a time and with 16
//! proxies' worth of requests in flight, against the target for the time DNS adds
//! (p99 ≤ 1 ms). Needs root (bpf map); prints why and exits otherwise.

use cnpc_codegen_bpf::gen;
use cnpc_ir::proxy::{LearnReply, LearnRequest, LearnedAddress};
use cnpc_ir::{DnsMatcher, NumericIdentity, FIRST_FQDN_IDENTITY};
use cnpc_runtime_loader::fqdn::{self, FqdnState, FqdnView, Learning};
use cnpc_runtime_loader::sys;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const ANSWERS: usize = 20_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn request(id: u64) -> Vec<u8> {
    let n = id as u32;
    let ip = IpAddr::V4(Ipv4Addr::from(0xc633_0000 | (n & 0xffff))); // 198.51.x.x
    let req = LearnRequest {
        id,
        name: format!("host{n}.github.com"),
        source: "10.0.1.40".parse().unwrap(),
        addresses: vec![LearnedAddress { ip, ttl: 600 }],
    };
    let mut line = serde_json::to_vec(&req).unwrap();
    line.push(b'\n');
    line
}

fn main() {
    let map = match sys::create_map(
        gen::BPF_MAP_TYPE_HASH,
        gen::HOSTS_KEY_SIZE,
        4,
        gen::FQDN_MAX_ENTRIES,
        0,
    ) {
        Ok(m) => m,
        Err(e) => {
            println!("fqdn bench skipped: cannot create a BPF map ({e}); run as root");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("cnpc-fqdn-bench-{}", std::process::id()));
    let socket = dir.join("fqdn.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    fqdn::serve(&socket, tx).expect("serve the learning socket");
    // The enforcing generation knows the identity of `*.github.com` names: every request is
    // answered without compiling (the common case; a new selector set compiles first).
    let selector = DnsMatcher::pattern("*.github.com");
    let mut view = FqdnView {
        selectors: vec![selector.clone()],
        ..FqdnView::default()
    };
    view.identities
        .insert((vec![selector], None), NumericIdentity(FIRST_FQDN_IDENTITY));
    std::thread::spawn(move || {
        let mut learning = Learning::new(FqdnState::new(0));
        learning
            .generation_applied(map.as_fd(), view)
            .expect("empty map written");
        for p in rx {
            learning.handle(map.as_fd(), p, Instant::now());
        }
    });
    let stream = UnixStream::connect(&socket).expect("connect");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut read_reply = |reader: &mut BufReader<UnixStream>| -> LearnReply {
        line.clear();
        reader.read_line(&mut line).expect("reply");
        serde_json::from_str(&line).expect("a LearnReply")
    };

    println!("answer to enforced (learning socket + fqdn map write), {ANSWERS} answers per row");
    println!("| in flight | answers/s | p50 | p99 | target p99 |");
    println!("|---|---|---|---|---|");
    let mut id = 0u64;
    for in_flight in [1usize, 16] {
        let mut times = Vec::with_capacity(ANSWERS);
        let mut sent: std::collections::VecDeque<(u64, Instant)> = Default::default();
        let start = Instant::now();
        let mut done = 0;
        while done < ANSWERS {
            while sent.len() < in_flight && done + sent.len() < ANSWERS {
                id += 1;
                writer.write_all(&request(id)).unwrap();
                sent.push_back((id, Instant::now()));
            }
            let reply = read_reply(&mut reader);
            assert!(reply.ok, "{reply:?}");
            let (want, at) = sent.pop_front().unwrap();
            assert_eq!(
                reply.id, want,
                "replies come in order when nothing compiles"
            );
            times.push(at.elapsed());
            done += 1;
        }
        let elapsed = start.elapsed();
        times.sort();
        let p99 = percentile(&times, 0.99);
        println!(
            "| {in_flight} | {:.0} | {:.1} µs | {:.1} µs | ≤ 1000 µs {} |",
            ANSWERS as f64 / elapsed.as_secs_f64(),
            percentile(&times, 0.5).as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            if p99 <= Duration::from_millis(1) {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
