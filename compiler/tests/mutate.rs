//! Property test: mutated policies never panic the front end, and every diagnostic has a real
//! place (a span inside its file whose line and column agree with its byte offset), a message
//! and a help text. Inputs are the bundled examples, the fixtures and the shared corpus, mutated
//! line by line and character by character the way hand edits go wrong.

use cnpc_compiler::{check, load_str, report, Cluster};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let mut dirs = vec![
            root.join("policies"),
            root.join("../shared/corpus/cilium-examples"),
        ];
        let mut out = Vec::new();
        while let Some(d) = dirs.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd {
                let p: PathBuf = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "yaml") {
                    out.push(std::fs::read_to_string(p).unwrap());
                }
            }
        }
        out.sort();
        assert!(out.len() >= 20, "seed policies not found");
        out
    })
}

/// Tokens that stress types and syntax where a value was.
const TOKENS: &[&str] = &[
    "",
    "~",
    "null",
    "{}",
    "[]",
    "[{}]",
    "80",
    "\"80\"",
    "-1",
    "70000",
    "true",
    "1.5",
    "0x10",
    "In",
    "in",
    "\"*\"",
    "*.x.com",
    "0.0.0.0/0",
    "10.0.0.0/33",
    "::/0",
    "&a x",
    "*a",
    "!!str 5",
    "'",
    "\"",
    "[",
    "{",
    "a: b",
    "- x",
    "é",
    "\t",
    "|\n  x",
    ">-",
    "!",
    "%",
    "@",
    "`",
    "ANY",
    "ICMP",
    "EchoRequest",
    "all",
];

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Indent(usize, bool),
    ReplaceValue(usize, usize),
    RenameKey(usize, u8),
    InsertChar(usize, char),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<usize>(), any::<bool>()).prop_map(|(a, b)| Mutation::Indent(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, b)| Mutation::ReplaceValue(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::RenameKey(a, b)),
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Mutation::InsertChar(a, c)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn floor_boundary(s: &str, mut pos: usize) -> usize {
    while !s.is_char_boundary(pos) {
        pos -= 1;
    }
    pos
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return text.to_string();
    }
    let n = lines.len();
    match *m {
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Indent(i, deeper) => {
            let l = &mut lines[i % n];
            if deeper {
                l.insert_str(0, "  ");
            } else if l.starts_with("  ") {
                l.drain(..2);
            }
        }
        Mutation::ReplaceValue(i, t) => {
            let l = &mut lines[i % n];
            if let Some(at) = l.find(": ").or_else(|| l.find("- ")) {
                l.truncate(at + 2);
                l.push_str(TOKENS[t]);
            }
        }
        Mutation::RenameKey(i, c) => {
            let l = &mut lines[i % n];
            if let Some(at) = l.find(':') {
                let start = l.len() - l.trim_start_matches([' ', '-']).len();
                if at > start {
                    let pos = floor_boundary(l, start + (c as usize % (at - start)));
                    l.insert(pos, (b'a' + c % 26) as char);
                }
            }
        }
        Mutation::InsertChar(i, c) => {
            let mut s = lines.join("\n");
            let pos = floor_boundary(&s, i % (s.len() + 1));
            s.insert(pos, c);
            return s;
        }
        Mutation::Truncate(i) => {
            let s = lines.join("\n");
            let pos = floor_boundary(&s, i % (s.len() + 1));
            return s[..pos].to_string();
        }
    }
    lines.join("\n") + "\n"
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES raises this for a longer hunt.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(768),
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_policies_never_panic_and_every_diagnostic_has_a_place(
        seed in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let seeds = seeds();
        let mut text = seeds[seed.index(seeds.len())].clone();
        for m in &mutations {
            text = apply(&text, m);
        }
        let set = load_str("mutated.yaml", &text);
        let r = check(set, Some(Cluster::default()));
        for d in &r.diagnostics {
            let file = r.set.sources.get(d.span.file);
            prop_assert!(d.span.start <= d.span.end, "{d:?}");
            prop_assert!((d.span.end as usize) <= file.text.len(), "{d:?}");
            prop_assert!(file.text.is_char_boundary(d.span.start as usize), "{d:?}");
            prop_assert_eq!(file.line_col(d.span.start as usize), (d.span.line, d.span.column), "{:?}", d);
            prop_assert!(!d.message.is_empty() && !d.help.is_empty(), "{d:?}");
        }
        // Rendering never panics either.
        let _ = report::human(&r, false);
        let _ = report::json(&r);
        let _ = report::sarif(&r);
    }
}
