//! `cnpc test` end to end: the Star Wars expectations pass, a policy broken on purpose fails
//! at the expectation's line with what decided it, selectors expand over several namespaces,
//! malformed expectations are diagnostics (exit 2), the JUnit report has the shape CI systems
//! read, the schema matches the files, and `--engine bpf` agrees with the reference.

use quick_xml::events::Event;
use quick_xml::reader::Reader;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cnpc(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cnpc"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("run cnpc");
    let run = Run {
        code: out.status.code().expect("cnpc exited by signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

/// A scratch directory for this test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnpc-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Star Wars L4 policies with rule1's port moved from 80 to 8080: empire ships can no
/// longer land, and 8080 opens.
fn broken_starwars(dir: &Path) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for f in [
        "deathstar.yaml",
        "tiefighter-egress.yaml",
        "xwing-egress-deny.yaml",
    ] {
        let text = std::fs::read_to_string(root().join("policies/starwars-l4").join(f)).unwrap();
        let broken = text.replace("port: \"80\"", "port: \"8080\"");
        assert_eq!(broken != text, f == "deathstar.yaml", "{f}");
        std::fs::write(policies.join(f), broken).unwrap();
    }
    policies
}

/// The 1-based line of the `expect:` of the case named `name` in an expectations file.
fn expect_line(file: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    let start = text
        .lines()
        .position(|l| l.contains(&format!("name: {name}")))
        .unwrap_or_else(|| panic!("no case {name} in {file}"));
    let offset = text
        .lines()
        .skip(start)
        .position(|l| l.trim_start().starts_with("expect:"))
        .unwrap();
    (start + offset + 1) as u64
}

#[test]
fn the_star_wars_expectations_pass() {
    for (policies, expect, checks) in [
        (
            "policies/starwars-l4",
            "policies/expect/starwars-l4.yaml",
            16,
        ),
        (
            "policies/starwars-l7",
            "policies/expect/starwars-l7.yaml",
            4,
        ),
    ] {
        let run = cnpc(&[
            "test",
            policies,
            "--cluster",
            "policies/cluster.yaml",
            "--expect",
            expect,
        ]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        assert!(
            run.stdout.contains(&format!("{checks} passed, 0 failed")),
            "{}",
            run.stdout
        );
        assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    }
}

#[test]
fn a_broken_policy_fails_at_the_expectation_line() {
    let dir = scratch("broken");
    let policies = broken_starwars(&dir);
    let expect = "policies/expect/starwars-l4.yaml";
    let args = |out: &'static str| {
        let p = policies.to_str().unwrap().to_string();
        let v: Vec<String> = [
            "test",
            &p,
            "--cluster",
            "policies/cluster.yaml",
            "--expect",
            expect,
            "-o",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v
    };
    let json_args = args("json");
    let run = cnpc(&json_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["failed"], 3, "{v:#}");
    let land = expect_line(expect, "empire ships land on the deathstar");
    let failed: Vec<&Value> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    let landing: Vec<&&Value> = failed.iter().filter(|c| c["expectLine"] == land).collect();
    // Both empire ships the selector names fail, each with the rule that now denies it.
    assert_eq!(landing.len(), 2, "{v:#}");
    for c in &landing {
        assert_eq!(c["verdict"], "denied");
        let rule = &c["trace"]["ingress"]["rules"][0];
        assert!(
            rule["file"].as_str().unwrap().ends_with("deathstar.yaml"),
            "{c:#}"
        );
        assert_eq!(rule["policy"], "CiliumNetworkPolicy default/rule1");
    }
    // The range case fails on 8080 alone.
    let range = expect_line(expect, "the deathstar exposes nothing else");
    let ranged = failed
        .iter()
        .find(|c| c["expectLine"] == range)
        .expect("the range case fails");
    assert_eq!(ranged["port"], "81-65535/TCP");
    assert_eq!(ranged["mismatches"][0]["port"], "8080/TCP");
    assert_eq!(ranged["mismatches"].as_array().unwrap().len(), 1);

    // The text report: a diagnostic at the expectation's line, then the deciding rule.
    let text_args = args("text");
    let run = cnpc(&text_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("cnpc::expectation-failed"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("[{expect}:{land}:")),
        "the diagnostic points at line {land}:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("CiliumNetworkPolicy default/rule1  ")
            && run
                .stdout
                .contains("deathstar.yaml:8  selects the endpoint"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("13 passed, 3 failed"), "{}", run.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A snapshot with three namespaces and the payments namespace isolated.
const CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: payments}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Namespace, metadata: {name: monitoring}}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ledger, namespace: payments}
  spec: {template: {metadata: {labels: {app: ledger}}}}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: gateway, namespace: payments}
  spec: {template: {metadata: {labels: {app: gateway}}}}
- {apiVersion: v1, kind: Pod, metadata: {name: cart, namespace: shop, labels: {app: cart}}, status: {podIPs: [{ip: 10.5.0.1}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, status: {podIPs: [{ip: 10.5.0.2}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: prometheus, namespace: monitoring, labels: {app: prometheus}}, status: {podIPs: [{ip: 10.6.0.1}]}}
"#;

const ISOLATION: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-payments, namespace: payments}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
"#;

#[test]
fn selectors_expand_over_several_namespaces() {
    let dir = scratch("namespaces");
    std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/isolation.yaml"), ISOLATION).unwrap();
    std::fs::write(
        dir.join("expect.yaml"),
        "cases:\n\
         - name: nothing outside payments gets in\n  from: [{workloads: {namespace: shop}}, {workloads: {namespace: monitoring}}]\n  to: {workloads: {namespace: payments}}\n  port: any\n  expect: denied\n\
         - name: payments talks within itself\n  from: {workloads: {namespace: payments}}\n  to: {workloads: {namespace: payments}}\n  port: 443/TCP\n  expect: allowed\n\
         - name: payments reaches out\n  from: {workloads: {namespace: payments}}\n  to: {labels: {app: web}}\n  port: 443/TCP\n  expect: allowed\n",
    )
    .unwrap();
    let d = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let run = cnpc(&[
        "test",
        &d("policies"),
        "--cluster",
        &d("cluster.yaml"),
        "--expect",
        &d("expect.yaml"),
        "-o",
        "json",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let pairs: Vec<String> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} -> {}",
                c["from"].as_str().unwrap(),
                c["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            // shop's and monitoring's three workloads times payments' two.
            "shop/cart -> payments/gateway",
            "shop/cart -> payments/ledger",
            "shop/web -> payments/gateway",
            "shop/web -> payments/ledger",
            "monitoring/prometheus -> payments/gateway",
            "monitoring/prometheus -> payments/ledger",
            // Within payments: each ordered pair, never a workload with itself.
            "payments/gateway -> payments/ledger",
            "payments/ledger -> payments/gateway",
            "payments/gateway -> shop/web",
            "payments/ledger -> shop/web",
        ]
    );
    assert_eq!(v["passed"], 10);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_expectations_are_diagnostics_and_exit_2() {
    let dir = scratch("malformed");
    let cases = [
        ("syntax.yaml", "cases: [\n  {from: pod:default/xwing\n", "cnpc::yaml-syntax", 2),
        (
            "typo.yaml",
            "cases:\n- from: pod:default/xwing\n  too: pod:default/deathstar\n  port: 80\n  expect: denied\n",
            "cnpc::invalid-expectation",
            3,
        ),
        (
            "verdict.yaml",
            "cases:\n- from: pod:default/xwing\n  to: pod:default/deathstar\n  port: 80\n  expect: blocked\n",
            "cnpc::invalid-expectation",
            5,
        ),
        (
            "unknown-pod.yaml",
            "cases:\n- from: pod:default/xwing\n  to: pod:default/deathstr\n  port: 80\n  expect: denied\n",
            "cnpc::invalid-expectation",
            3,
        ),
        (
            "unknown-namespace.yaml",
            "cases:\n- from: pod:default/xwing\n  to:\n    workloads: {namespace: empire}\n  port: 80\n  expect: denied\n",
            "cnpc::invalid-expectation",
            4,
        ),
        ("binary.yaml", "cases:\n- \u{0}\u{1}\n", "cnpc::", 0),
        ("empty.yaml", "", "cnpc::invalid-expectation", 1),
        (
            "policy.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n",
            "cnpc::invalid-expectation",
            1,
        ),
    ];
    for (name, text, code, line) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let run = cnpc(&[
            "test",
            "policies/starwars-l4",
            "--cluster",
            "policies/cluster.yaml",
            "--expect",
            p,
        ]);
        assert_eq!(run.code, 2, "{name}: {}{}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty(), "{name}: {}", run.stdout);
        assert!(run.stderr.contains(code), "{name}: {}", run.stderr);
        if line > 0 {
            assert!(
                run.stderr.contains(&format!("[{p}:{line}:")),
                "{name}: expected a diagnostic at line {line}:\n{}",
                run.stderr
            );
        }
    }
    // A file that cannot be read is an I/O error, also exit 2.
    let run = cnpc(&[
        "test",
        "policies/starwars-l4",
        "--cluster",
        "policies/cluster.yaml",
        "--expect",
        "policies/expect/no-such-file.yaml",
    ]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("no-such-file.yaml"), "{}", run.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// JUnit

/// An XML element as read from the report.
#[derive(Debug)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole document with quick-xml into elements; any malformed XML fails the test.
fn parse_xml(text: &str) -> Element {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    let open = |e: &quick_xml::events::BytesStart| Element {
        name: e.name().as_ref().to_string(),
        attributes: e
            .attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                (
                    a.key.as_ref().to_string(),
                    a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .expect("attribute value")
                        .into_owned(),
                )
            })
            .collect(),
        children: Vec::new(),
        text: String::new(),
    };
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) => stack.push(open(&e)),
            Event::Empty(e) => {
                let el = open(&e);
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack.pop().expect("an open element");
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text
                        .push_str(&t.xml_content(quick_xml::XmlVersion::Implicit1_0));
                }
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().expect("a valid reference") {
                    Some(c) => c,
                    None => match &*r {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "quot" => '"',
                        "apos" => '\'',
                        other => panic!("undeclared entity &{other};"),
                    },
                };
                if let Some(el) = stack.last_mut() {
                    el.text.push(c);
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) => {}
            other => panic!("unexpected XML event {other:?}"),
        }
    }
    assert!(stack.is_empty(), "unclosed elements");
    root.expect("a root element")
}

/// The JUnit schema CI systems accept (Jenkins' junit-10.xsd, which GitLab, GitHub actions such
/// as test reporters, and Surefire consumers read), as far as this report uses it: which
/// attributes each element may and must have, which children it may have and in what order.
fn check_junit(doc: &Element) {
    fn attrs(e: &Element, required: &[&str], allowed: &[&str]) {
        for r in required {
            assert!(e.attr(r).is_some(), "<{}> lacks required `{r}`", e.name);
        }
        for (k, _) in &e.attributes {
            assert!(
                required.contains(&k.as_str()) || allowed.contains(&k.as_str()),
                "<{}> has `{k}`, which the schema does not allow",
                e.name
            );
        }
    }
    /// Children in the order of `sequence`, each (name, at most).
    fn sequence(e: &Element, sequence: &[(&str, usize)]) {
        let mut at = 0;
        let mut count = 0;
        for c in &e.children {
            while at < sequence.len() && sequence[at].0 != c.name {
                at += 1;
                count = 0;
            }
            assert!(
                at < sequence.len(),
                "<{}> inside <{}>, or out of order",
                c.name,
                e.name
            );
            count += 1;
            assert!(
                count <= sequence[at].1,
                "too many <{}> in <{}>",
                c.name,
                e.name
            );
        }
    }
    /// xs:int, and SUREFIRE_TIME: digits, optionally a fraction.
    fn number(e: &Element, name: &str, fraction: bool) -> f64 {
        let Some(v) = e.attr(name) else { return 0.0 };
        let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
        assert!(
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && frac.bytes().all(|b| b.is_ascii_digit())
                && (fraction || !v.contains('.')),
            "<{}> {name}=\"{v}\" is not a number of the schema",
            e.name
        );
        v.parse().unwrap()
    }
    const MANY: usize = usize::MAX;
    assert_eq!(doc.name, "testsuites");
    attrs(
        doc,
        &[],
        &["name", "time", "tests", "failures", "disabled", "errors"],
    );
    sequence(doc, &[("testsuite", MANY)]);
    let (mut tests, mut failures) = (0.0, 0.0);
    for suite in &doc.children {
        attrs(
            suite,
            &["name", "tests"],
            &[
                "failures",
                "errors",
                "time",
                "disabled",
                "skipped",
                "skips",
                "timestamp",
                "hostname",
                "id",
                "package",
                "file",
                "log",
                "url",
                "version",
                "group",
            ],
        );
        sequence(
            suite,
            &[
                ("properties", 1),
                ("testcase", MANY),
                ("system-out", 1),
                ("system-err", 1),
            ],
        );
        for name in ["tests", "failures", "errors", "skipped"] {
            number(suite, name, false);
        }
        number(suite, "time", true);
        let cases: Vec<&Element> = suite
            .children
            .iter()
            .filter(|c| c.name == "testcase")
            .collect();
        assert_eq!(number(suite, "tests", false) as usize, cases.len());
        for p in suite.children.iter().filter(|c| c.name == "properties") {
            sequence(p, &[("property", MANY)]);
            for prop in &p.children {
                attrs(prop, &["name", "value"], &[]);
            }
        }
        let mut failed = 0;
        for case in cases {
            attrs(
                case,
                &["name"],
                &[
                    "assertions",
                    "time",
                    "classname",
                    "status",
                    "class",
                    "file",
                    "line",
                ],
            );
            number(case, "time", true);
            number(case, "line", false);
            sequence(
                case,
                &[
                    ("skipped", 1),
                    ("error", MANY),
                    ("failure", MANY),
                    ("system-out", MANY),
                    ("system-err", MANY),
                ],
            );
            for f in case.children.iter().filter(|c| c.name == "failure") {
                // `type` is optional in junit-10.xsd and required by Ant's schema: always there.
                attrs(f, &["message", "type"], &[]);
                assert!(f.children.is_empty());
                failed += 1;
            }
            let name = case.attr("name").unwrap();
            assert!(
                name.contains(" → "),
                "a case is named from → to port: {name}"
            );
        }
        assert_eq!(number(suite, "failures", false) as usize, failed);
        tests += number(suite, "tests", false);
        failures += number(suite, "failures", false);
    }
    assert_eq!(number(doc, "tests", false), tests);
    assert_eq!(number(doc, "failures", false), failures);
}

#[test]
fn junit_has_the_shape_ci_systems_accept() {
    let dir = scratch("junit");
    let policies = broken_starwars(&dir);
    let run = cnpc(&[
        "test",
        policies.to_str().unwrap(),
        "--cluster",
        "policies/cluster.yaml",
        "--expect",
        "policies/expect",
        "-o",
        "junit",
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run
        .stdout
        .starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
    let doc = parse_xml(&run.stdout);
    check_junit(&doc);
    // One suite per expectations file, in order.
    let suites: Vec<&str> = doc
        .children
        .iter()
        .map(|s| s.attr("name").unwrap())
        .collect();
    assert_eq!(
        suites,
        [
            "policies/expect/starwars-l4.yaml",
            "policies/expect/starwars-l7.yaml"
        ]
    );
    // The L4 file's landing case fails twice (tiefighter and mediabot), the range case once;
    // the L7 file is run against the broken L4 set too, and its landing case fails twice.
    assert_eq!(doc.attr("tests"), Some("20"));
    assert_eq!(doc.attr("failures"), Some("5"));
    let land = expect_line(
        "policies/expect/starwars-l4.yaml",
        "empire ships land on the deathstar",
    );
    let case = doc.children[0]
        .children
        .iter()
        .find(|c| c.attr("name") == Some("default/tiefighter → default/deathstar 80/TCP"))
        .expect("the tiefighter's landing");
    assert_eq!(case.attr("line"), Some(land.to_string().as_str()));
    assert_eq!(
        case.attr("classname"),
        Some("empire ships land on the deathstar")
    );
    let failure = &case.children[0];
    assert_eq!(failure.attr("type"), Some("cnpc::expectation-failed"));
    assert!(
        failure.text.contains("Ingress to default/deathstar"),
        "{}",
        failure.text
    );
    assert!(
        failure.text.contains("deathstar.yaml:8"),
        "{}",
        failure.text
    );
    // The text keeps its line breaks and the arrows of the trace.
    assert!(
        failure.text.contains("\nVerdict: denied"),
        "{}",
        failure.text
    );
    assert!(
        failure.text.contains(" -> default/deathstar"),
        "{}",
        failure.text
    );

    // The checker itself rejects what the schema rejects.
    let bad = parse_xml("<testsuites><testsuite tests=\"1\"><testcase name=\"a → b 1/TCP\"/></testsuite></testsuites>");
    assert!(
        std::panic::catch_unwind(|| check_junit(&bad)).is_err(),
        "a suite needs a name"
    );
    let bad = parse_xml("<testsuites><testsuite name=\"s\" tests=\"1\"><testcase name=\"a → b 1/TCP\"><system-out/><failure type=\"x\" message=\"m\"/></testcase></testsuite></testsuites>");
    assert!(
        std::panic::catch_unwind(|| check_junit(&bad)).is_err(),
        "order matters"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Schema

/// YAML documents as JSON values, through cnpc's own YAML reader.
fn yaml_docs(text: &str) -> Vec<Value> {
    use cnpc_compiler::yaml::{parse_documents, Node, NodeKind, ScalarType};
    fn to_json(n: &Node) -> Value {
        match &n.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Scalar(s) => match s.scalar_type() {
                ScalarType::Integer => s
                    .text
                    .parse::<i64>()
                    .map_or(Value::String(s.text.clone()), Value::from),
                ScalarType::Boolean => Value::Bool(s.text.eq_ignore_ascii_case("true")),
                _ => Value::String(s.text.clone()),
            },
            NodeKind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), to_json(v)))
                    .collect(),
            ),
        }
    }
    let file = cnpc_compiler::source::SourceFile::new("x.yaml", text);
    parse_documents(cnpc_compiler::FileId(0), &file)
        .unwrap()
        .iter()
        .map(to_json)
        .collect()
}

#[test]
fn the_schema_accepts_the_expectations_and_rejects_mistakes() {
    let run = cnpc(&["schema", "--expectations"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let schema: Value = serde_json::from_str(&run.stdout).unwrap();
    let v = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let mut files = 0;
    for entry in std::fs::read_dir(root().join("policies/expect")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&std::fs::read_to_string(&path).unwrap()) {
            let errors: Vec<String> = v.iter_errors(&doc).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
        files += 1;
    }
    assert!(files >= 2);
    for bad in [
        "cases:\n- from: pod:a/b\n  to: pod:a/c\n  port: 80\n  expect: allow\n",
        "cases:\n- from: pod:a/b\n  too: pod:a/c\n  port: 80\n  expect: denied\n",
        "cases:\n- from: nope\n  to: pod:a/c\n  port: 80\n  expect: denied\n",
        "cases:\n- from: pod:a/b\n  to: pod:a/c\n  port: 80/TCPP\n  expect: denied\n",
        "cases:\n- from: pod:a/b\n  to: {workloads: {namespace: x}, labels: {}}\n  port: 80\n  expect: denied\n",
        "cases:\n- from: pod:a/b\n  to: pod:a/c\n  port: 80\n  http: {method: GET, path: /}\n  dns: x.io\n  expect: denied\n",
        "cases: []\n",
    ] {
        let doc = &yaml_docs(bad)[0];
        assert!(!v.is_valid(doc), "the schema accepts:\n{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// --engine bpf

#[test]
fn the_bpf_engine_agrees_on_the_star_wars_expectations() {
    for (policies, expect) in [
        ("policies/starwars-l4", "policies/expect/starwars-l4.yaml"),
        ("policies/starwars-l7", "policies/expect/starwars-l7.yaml"),
    ] {
        let run = cnpc(&[
            "test",
            policies,
            "--cluster",
            "policies/cluster.yaml",
            "--expect",
            expect,
            "--engine",
            "bpf",
            "-o",
            "json",
        ]);
        if run.code == 2 && run.stderr.contains("--engine bpf") {
            assert!(
                std::env::var("CNPC_REQUIRE_KERNEL").map_or(true, |v| v != "1"),
                "CNPC_REQUIRE_KERNEL=1 but: {}",
                run.stderr
            );
            eprintln!("skipped: {}", run.stderr.trim());
            return;
        }
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(v["engine"], "bpf");
        assert_eq!(v["failed"], 0, "{v:#}");
        // Every case with addresses on both sides went through the kernel; only `entity:world`,
        // which has no address to craft a packet from, is noted as not run.
        for c in v["cases"].as_array().unwrap() {
            match c["note"].as_str() {
                None => {}
                Some(n) => {
                    assert_eq!(c["to"], "entity:world", "{c:#}");
                    assert!(n.contains("bpf engine not run"), "{n}");
                }
            }
        }
    }
}

/// An --expect directory holding no expectation file checks nothing: a usage error (exit 2),
/// not a pass a CI job would take for green.
#[test]
fn no_expectations_found_is_a_usage_error() {
    let dir = scratch("empty");
    std::fs::write(dir.join("README.txt"), "expectations go here\n").unwrap();
    let run = cnpc(&[
        "test",
        "policies/starwars-l4",
        "--cluster",
        "policies/cluster.yaml",
        "--expect",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("nothing would be checked"),
        "{}",
        run.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}
