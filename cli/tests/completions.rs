//! `cnpc completions SHELL`: the completion script for each shell, and for bash a check that
//! the script, sourced, registers a completion function that completes the subcommands.

use std::process::Command;

fn completions(shell: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(["completions", shell])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn each_shell_gets_a_script_that_knows_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, script) = completions(shell);
        assert_eq!(code, 0, "{shell}");
        for sub in ["check", "trace", "compile", "completions"] {
            assert!(script.contains(sub), "{shell}: no `{sub}` in\n{script}");
        }
        assert!(script.contains("cnpc"), "{shell}");
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let (code, script) = completions("tcsh");
    assert_eq!(code, 2);
    assert!(script.is_empty());
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[test]
fn the_bash_script_registers_a_completion_that_completes_subcommands() {
    if !on_path("bash") {
        eprintln!("bash is not on PATH: skipped");
        return;
    }
    // Source the script, show the registration, then complete `cnpc tr<TAB>` through the
    // registered function as bash's programmable completion would.
    let program = r#"
        source <("$0" completions bash) || exit 3
        spec=$(complete -p cnpc) || exit 4
        echo "$spec"
        fn=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$spec")
        COMP_WORDS=(cnpc tr)
        COMP_CWORD=1
        COMP_LINE="cnpc tr"
        COMP_POINT=${#COMP_LINE}
        "$fn" cnpc tr cnpc || exit 5
        echo "reply: ${COMPREPLY[*]}"
    "#;
    let out = Command::new("bash")
        .args([
            "--norc",
            "--noprofile",
            "-c",
            program,
            env!("CARGO_BIN_EXE_cnpc"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let spec = stdout.lines().next().unwrap_or("");
    assert!(
        spec.starts_with("complete ") && spec.contains(" -F _") && spec.ends_with(" cnpc"),
        "a completion function is registered for cnpc: {stdout}{stderr}"
    );
    let reply = stdout
        .lines()
        .find_map(|l| l.strip_prefix("reply: "))
        .unwrap_or_else(|| panic!("{stdout}{stderr}"));
    assert_eq!(reply.split_whitespace().collect::<Vec<_>>(), ["trace"]);
}
