//! The loader's debounce (`cnpc_runtime_loader::settle`) with the real `cnpc-loader`: a policy
//! file written broken and fixed within the quiet time is compiled early, but the broken version
//! is never reported nor enforced; left broken, it is reported once quiet, and the last good
//! generation keeps enforcing. The demo's namespaces (`netns`), removed at the end.

mod netns;

use cnpc_runtime_loader::sys;
use netns::Net;
use std::path::Path;
use std::time::Duration;

#[test]
fn a_file_broken_for_less_than_the_quiet_time_is_neither_reported_nor_enforced() {
    if let Err(e) = sys::bpffs_for_tests(Path::new("/sys/fs/bpf")) {
        return sys::skip_or_fail(&e);
    }
    let mut net = match Net::demo() {
        Ok(n) => n,
        Err(e) => return sys::skip_or_fail(&format!("cannot build the test network: {e}")),
    };
    // A quiet time long enough that the fix always lands within it.
    net.loader_args = vec!["--debounce-ms".into(), "500".into()];
    net.start_loader().unwrap();
    assert!(
        net.until(Duration::from_secs(30), || net.generation() >= 1)
            .is_some(),
        "the loader never applied:\n{}",
        net.log()
    );
    let file = net.policies.join("deathstar.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    let edited = good.replace("port: \"80\"", "port: \"8080\"");
    let broken = good.replace("protocol: TCP", "protocol: TPC");
    assert!(edited != good && broken != good);
    let failures = |log: &str| log.matches("compile failed").count();
    let before = net.generation();
    std::fs::write(&file, &broken).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&file, &edited).unwrap();
    assert!(
        net.until(Duration::from_secs(10), || net.generation() > before)
            .is_some(),
        "the edit never applied:\n{}",
        net.log()
    );
    // Nothing more comes of it.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        net.generation(),
        before + 1,
        "one generation:\n{}",
        net.log()
    );
    assert_eq!(
        failures(&net.log()),
        0,
        "the broken version was reported:\n{}",
        net.log()
    );
    // Left broken: reported once quiet; nothing switches.
    std::fs::write(&file, &broken).unwrap();
    assert!(
        net.until(Duration::from_secs(10), || failures(&net.log()) > 0)
            .is_some(),
        "the broken file was never reported:\n{}",
        net.log()
    );
    assert_eq!(
        net.generation(),
        before + 1,
        "the last good generation enforces"
    );
}
