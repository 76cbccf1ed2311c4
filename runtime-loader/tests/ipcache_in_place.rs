//! A generation that changes only the ipcache (a pod on another node relabelled) keeps every
//! running program and writes the new entries into the ipcache maps they read; one whose tables
//! change loads those programs, with new ipcache maps, and still writes in place under the
//! others (`cnpc_runtime_loader::ipcache`). In the kernel: an interface in a network
//! namespace of the test's own (a veth pair), TCX links, and BPF_PROG_TEST_RUN of the programs the links run.

use cnpc_codegen_bpf::gen::{self, event};
use cnpc_ir::NumericIdentity;
use cnpc_runtime_loader::generation::{self, Generation};
use cnpc_runtime_loader::ipcache::{self, IpcacheImage};
use cnpc_runtime_loader::loader::{Config, Loader, SwapReport};
use cnpc_runtime_loader::node::Route;
use cnpc_runtime_loader::sys;
use std::path::{Path, PathBuf};

const INTERFACE: &str = "cnpcipc0";
const INGRESS_HOOK: &str = "ingress_cnpcipc0";
const EGRESS_HOOK: &str = "egress_cnpcipc0";

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

/// The web pod here (10.0.0.1); a frontend and a pod labelled `app: <other>` (10.0.1.2)
/// elsewhere.
fn cluster(other: &str) -> String {
    let pod = |name: &str, app: &str, ip: &str| {
        format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}, status: {{podIPs: [{{ip: {ip}}}]}}}}\n")
    };
    format!(
        "apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: default}}}}\n{}{}{}",
        pod("web", "web", "10.0.0.1"),
        pod("front", "frontend", "10.0.1.1"),
        pod("other", other, "10.0.1.2"),
    )
}

/// A TCP SYN from 10.0.1.2:40000 to the web pod's port 80, with its Ethernet header.
fn syn_from_other() -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend([10, 0, 1, 2, 10, 0, 0, 1]);
    p.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    p.extend(tcp);
    p
}

struct Setup {
    dir: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The web pod's address is routed to the dummy interface.
fn routes() -> Vec<Route> {
    vec![Route {
        prefix: "10.0.0.1".parse().unwrap(),
        len: 32,
        interface: INTERFACE.into(),
    }]
}

fn compile(setup: &Setup, other: &str, previous: &cnpc_compiler::lower::Allocation) -> Generation {
    let path = setup.dir.join("cluster.yaml");
    std::fs::write(&path, cluster(other)).unwrap();
    generation::compile(
        &[setup.dir.join("policies")],
        &path,
        previous,
        Some(&routes()),
        None,
    )
    .expect("the generation compiles")
}

fn identity_of(g: &Generation, ip: &str) -> u32 {
    let net: cnpc_ir::IpNet = format!("{ip}/32").parse().unwrap();
    g.ipcache
        .iter()
        .find(|(n, _)| *n == net)
        .map(|(_, NumericIdentity(id))| *id)
        .expect("in the ipcache")
}

/// The id of the program the hook's pinned link runs.
fn program_id(pin_dir: &Path, hook: &str) -> u32 {
    let link = sys::obj_get(&pin_dir.join("links").join(hook)).expect("the hook's link");
    sys::link_info(&link).expect("link info").1
}

/// Runs the SYN through the program on the ingress hook: its verdict, and the peer identity
/// and verdict of the event it emitted.
fn judge(loader: &Loader, pin_dir: &Path) -> (u32, Vec<(u32, u8)>) {
    let prog = sys::prog_by_id(program_id(pin_dir, INGRESS_HOOK)).expect("the program");
    let mut ring = sys::RingBuf::new(loader.events(), gen::EVENTS_BYTES as usize).unwrap();
    ring.drain();
    let (code, _) = sys::test_run(&prog, &syn_from_other()).expect("test run");
    let events = ring
        .drain()
        .iter()
        .map(|e| {
            let peer = u32::from_le_bytes(e[event::PEER..event::PEER + 4].try_into().unwrap());
            (peer, e[event::VERDICT])
        })
        .collect();
    (code, events)
}

fn assert_maps_hold(loader: &Loader, hook: &str, g: &Generation) {
    let maps = loader
        .ipcache_maps(hook)
        .expect("a program this loader loaded");
    let held = ipcache::read(maps).expect("the maps read back");
    let want = IpcacheImage::new(&g.ipcache);
    assert_eq!(held.hosts, want.hosts, "{hook}: host entries");
    assert_eq!(held.prefixes, want.prefixes, "{hook}: prefixes");
}

#[test]
fn ipcache_changes_in_place_under_running_programs() {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let id = std::process::id();
    let setup = Setup {
        dir: std::env::temp_dir().join(format!("cnpc-ipcache-test-{id}")),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/cnpc-ipcache-test-{id}")),
    };
    let _ = std::fs::remove_dir_all(&setup.dir);
    std::fs::create_dir_all(setup.dir.join("policies")).unwrap();
    std::fs::write(setup.dir.join("policies/web.yaml"), POLICY).unwrap();
    // The loader attaches in the network namespace of the thread that calls it, and `ip`
    // runs in the one of the thread that starts it: a thread in a namespace of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return sys::skip_or_fail(&format!(
                    "unshare(CLONE_NEWNET): {}",
                    std::io::Error::last_os_error()
                ));
            }
            for args in [
                &[
                    "link", "add", INTERFACE, "type", "veth", "peer", "name", "cnpcipc1",
                ][..],
                &["link", "set", INTERFACE, "up"],
            ] {
                let ok = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return sys::skip_or_fail(&format!("ip {}: failed", args.join(" ")));
                }
            }
            run(&setup);
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    });
}

fn run(setup: &Setup) {
    let cfg = Config {
        pin_dir: setup.pin_dir.clone(),
        state_file: setup.dir.join("state.json"),
        ..Config::default()
    };
    let mut loader = match Loader::open(cfg) {
        Ok(l) => l,
        Err(e) => return sys::skip_or_fail(&format!("cannot open the loader: {e}")),
    };
    let apply = |loader: &mut Loader, g: &Generation| -> SwapReport {
        let report = loader.apply(g, &routes(), false).expect("applied");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        report
    };

    // Generation 1: `other` is app=x, which the web pod's ingress does not allow.
    let g1 = compile(setup, "x", &Default::default());
    let r = apply(&mut loader, &g1);
    assert_eq!((r.attached, r.ipcache_updated), (2, 0), "{r:?}");
    let (ingress, egress) = (
        program_id(&setup.pin_dir, INGRESS_HOOK),
        program_id(&setup.pin_dir, EGRESS_HOOK),
    );
    let x = identity_of(&g1, "10.0.1.2");
    assert_eq!(
        judge(&loader, &setup.pin_dir),
        (gen::TC_ACT_SHOT as u32, vec![(x, 1)]),
        "generation 1 denies app=x"
    );

    // Generation 2: `other` becomes app=y, a new identity no table of this node names. No
    // program is loaded; both keep running and read the new identity.
    let g2 = compile(setup, "y", &g1.allocation);
    let y = identity_of(&g2, "10.0.1.2");
    assert_ne!(x, y, "a new identity");
    let r = apply(&mut loader, &g2);
    assert_eq!(
        (r.programs_loaded, r.ipcache_updated, r.swapped),
        (0, 2, 0),
        "{r:?}"
    );
    assert!(r.generation > 1, "a new generation: {r:?}");
    assert_eq!(program_id(&setup.pin_dir, INGRESS_HOOK), ingress);
    assert_eq!(program_id(&setup.pin_dir, EGRESS_HOOK), egress);
    for hook in [INGRESS_HOOK, EGRESS_HOOK] {
        assert_maps_hold(&loader, hook, &g2);
    }
    assert_eq!(
        judge(&loader, &setup.pin_dir),
        (gen::TC_ACT_SHOT as u32, vec![(y, 1)]),
        "the running program reads the identity written in place"
    );

    // Generation 3: `other` becomes a frontend: the ingress table changes and its program is
    // loaded (with new ipcache maps); the egress program stays, its maps written in place.
    let g3 = compile(setup, "frontend", &g2.allocation);
    let front = identity_of(&g3, "10.0.1.2");
    let r = apply(&mut loader, &g3);
    assert_eq!(
        (r.programs_loaded, r.swapped, r.ipcache_updated),
        (1, 1, 1),
        "{r:?}"
    );
    assert_ne!(program_id(&setup.pin_dir, INGRESS_HOOK), ingress);
    assert_eq!(program_id(&setup.pin_dir, EGRESS_HOOK), egress);
    for hook in [INGRESS_HOOK, EGRESS_HOOK] {
        assert_maps_hold(&loader, hook, &g3);
    }
    assert_eq!(
        judge(&loader, &setup.pin_dir),
        (gen::TC_ACT_OK as u32, vec![(front, 0)]),
        "the new program allows the frontend"
    );

    // The same generation again changes nothing.
    let r = apply(&mut loader, &g3);
    assert_eq!(
        (r.programs_loaded, r.ipcache_updated, r.unchanged),
        (0, 0, 2),
        "{r:?}"
    );
}
