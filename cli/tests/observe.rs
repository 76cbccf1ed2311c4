//! `cnpc observe` against sockets that are not a running loader's (issue 11): a clear error and
//! exit code 2, never a hang. The stream itself is exercised end to end in
//! runtime-loader/tests/dns.rs, through the library call this command makes.

use std::process::Command;
use std::time::{Duration, Instant};

fn observe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .arg("observe")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_loader_and_foreign_sockets_exit_2() {
    let dir = std::env::temp_dir().join(format!("cnpc-observe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.to_str().unwrap();
    let (code, err) = observe(&["--state-dir", state, "-o", "json"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is the loader running"), "{err}");
    // Something else listens there and never greets.
    let listener = std::os::unix::net::UnixListener::bind(dir.join("events.sock")).unwrap();
    std::thread::spawn(move || {
        let _kept: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
    });
    let started = Instant::now();
    let (code, err) = observe(&["--state-dir", state, "--follow"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a cnpc event socket"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "no hang");
    // A peer form records cannot match (they carry addresses, not names).
    let (code, err) = observe(&["--state-dir", state, "--to", "fqdn:api.github.com"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ip:ADDRESS"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
