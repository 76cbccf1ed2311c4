//! `cnpc check` end to end: exit codes, output formats and the fixtures in policies/.

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
    Run {
        code: out.status.code().expect("cnpc exited by signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout))
}

fn fixtures(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "expected fixtures in {dir}");
    v
}

/// The `# expect: CODE line N` header of a fixture.
fn expectation(path: &str) -> (String, u64) {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let first = text.lines().next().unwrap();
    let rest = first
        .strip_prefix("# expect: ")
        .unwrap_or_else(|| panic!("{path}: no expect header"));
    let (code, line) = rest.split_once(" line ").unwrap();
    (code.to_string(), line.trim().parse().unwrap())
}

fn has(report: &Value, code: &str, line: u64) -> bool {
    report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["code"] == code && d["line"] == line)
}

fn validator(schema_file: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(schema_file),
        )
        .unwrap(),
    )
    .unwrap();
    jsonschema::validator_for(&schema).expect("valid schema")
}

fn assert_valid(v: &jsonschema::Validator, doc: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not validate:\n{}\n{doc:#}",
        errors.join("\n")
    );
}

#[test]
fn bundled_example_checks_clean() {
    let run = cnpc(&[
        "check",
        "policies/",
        "--cluster",
        "policies/cluster.yaml",
        "--deny-warnings",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("0 errors, 0 warnings"),
        "{}",
        run.stdout
    );
    // The ignore file keeps the fixtures out of the directory walk.
    assert!(!run.stdout.contains("broken"), "{}", run.stdout);
}

#[test]
fn each_broken_fixture_fails_on_its_line_with_help() {
    let schema = validator("check-output.schema.json");
    for f in fixtures("policies/broken") {
        let (code, line) = expectation(&f);
        let run = cnpc(&["check", &f, "--format", "json"]);
        assert_eq!(run.code, 1, "{f} should fail: {}", run.stdout);
        let report = json(&run);
        assert_valid(&schema, &report, &f);
        assert!(
            has(&report, &code, line),
            "{f}: expected {code} at line {line}, got {report:#}"
        );
        assert!(report["errors"].as_u64().unwrap() >= 1);
        // Human output names the file and line and carries the help.
        let human = cnpc(&["check", &f]);
        assert_eq!(human.code, 1);
        assert!(
            human.stdout.contains(&format!("{f}:{line}:")),
            "{f}: human output lacks the place:\n{}",
            human.stdout
        );
        assert!(
            human.stdout.contains("help:"),
            "{f}: no help:\n{}",
            human.stdout
        );
        assert!(
            human.stdout.contains(&code),
            "{f}: no code:\n{}",
            human.stdout
        );
    }
}

#[test]
fn each_warning_fixture_warns_and_fails_only_with_deny_warnings() {
    for f in fixtures("policies/warnings") {
        let (code, line) = expectation(&f);
        // name-clash needs the policy it clashes with; the others must not mind its presence.
        let args = [
            "check",
            "policies/starwars-l4/deathstar.yaml",
            f.as_str(),
            "--cluster",
            "policies/cluster.yaml",
            "--format",
            "json",
        ];
        let run = cnpc(&args);
        assert_eq!(
            run.code, 0,
            "{f}: warnings alone must not fail: {}",
            run.stdout
        );
        let report = json(&run);
        assert_eq!(report["errors"], 0, "{f}: {report:#}");
        assert!(
            has(&report, &code, line),
            "{f}: expected {code} at line {line}, got {report:#}"
        );
        let mut strict = args.to_vec();
        strict.push("--deny-warnings");
        assert_eq!(cnpc(&strict).code, 1, "{f}: --deny-warnings must fail");
    }
}

#[test]
fn every_problem_of_every_file_is_reported_in_one_run() {
    let run = cnpc(&["check", "policies/broken", "--format", "json"]);
    assert_eq!(run.code, 1);
    let report = json(&run);
    let files: std::collections::BTreeSet<&str> = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), fixtures("policies/broken").len(), "{files:?}");
    // One file with three independent mistakes yields three diagnostics.
    let netpol = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| {
            d["file"]
                .as_str()
                .unwrap()
                .ends_with("netpol-policy-type.yaml")
        })
        .count();
    assert_eq!(netpol, 3, "{report:#}");
}

#[test]
fn sarif_output_is_valid_for_code_scanning() {
    let schema = validator("sarif-2.1.0-subset.schema.json");
    let run = cnpc(&[
        "check",
        "policies/broken",
        "policies/warnings",
        "--cluster",
        "policies/cluster.yaml",
        "--format",
        "sarif",
    ]);
    assert_eq!(run.code, 1);
    let sarif = json(&run);
    assert_valid(&schema, &sarif, "SARIF");
    let run0 = &sarif["runs"][0];
    let rules = run0["tool"]["driver"]["rules"].as_array().unwrap();
    let results = run0["results"].as_array().unwrap();
    assert!(results.len() > 20);
    for r in results {
        let i = r["ruleIndex"].as_u64().unwrap() as usize;
        assert_eq!(
            rules[i]["id"], r["ruleId"],
            "ruleIndex must point at the result's rule"
        );
        let uri = r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            .as_str()
            .unwrap();
        assert!(
            uri.starts_with("policies/"),
            "repository-relative uri: {uri}"
        );
    }
    let levels: std::collections::BTreeSet<&str> = results
        .iter()
        .map(|r| r["level"].as_str().unwrap())
        .collect();
    assert_eq!(levels, ["error", "warning"].into());
}

#[test]
fn missing_path_is_an_io_error() {
    let run = cnpc(&["check", "policies/does-not-exist"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("does-not-exist"), "{}", run.stderr);
}

#[test]
fn usage_error_exits_2() {
    assert_eq!(cnpc(&["check"]).code, 2);
    assert_eq!(cnpc(&["check", "policies", "--format", "xml"]).code, 2);
}

#[test]
fn a_path_without_policies_is_an_empty_set() {
    let dir = std::env::temp_dir().join(format!("cnpc-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    let run = cnpc(&["check", dir.to_str().unwrap(), "--format", "json"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(run.code, 0, "{}", run.stdout);
    let report = json(&run);
    assert_eq!(report["diagnostics"].as_array().unwrap().len(), 0);
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("ConfigMap") && notes.contains("no policy found"),
        "{notes}"
    );
}

#[test]
fn schema_accepts_every_example_and_rejects_a_typo() {
    let run = cnpc(&["schema"]);
    assert_eq!(run.code, 0);
    let schema = json(&run);
    let v = jsonschema::validator_for(&schema).expect("cnpc schema is a valid JSON Schema");
    let set = cnpc_compiler::PolicySet::load(&[root().join("policies")]).unwrap();
    assert!(set.policies.len() >= 6);
    for (_, file) in set.sources.files() {
        for doc in yaml_docs(&file.text) {
            if doc["kind"] == "List" {
                continue;
            }
            assert_valid(&v, &doc, &file.path.display().to_string());
        }
    }
    let typo = yaml_docs(
        &std::fs::read_to_string(root().join("policies/broken/selector-typo.yaml")).unwrap(),
    );
    assert!(!v.is_valid(&typo[0]), "the schema must flag `matchLabel`");
}

/// YAML documents as JSON values, through cnpc's own YAML reader (plain scalars typed as the
/// Kubernetes API reads them).
fn yaml_docs(text: &str) -> Vec<Value> {
    use cnpc_compiler::yaml::{parse_documents, Node, NodeKind, ScalarType};
    fn to_json(n: &Node) -> Value {
        match &n.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Scalar(s) => match s.scalar_type() {
                ScalarType::Integer => s
                    .text
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(s.text.clone())),
                ScalarType::Boolean => Value::Bool(s.text.eq_ignore_ascii_case("true")),
                ScalarType::Float => s
                    .text
                    .parse::<f64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(s.text.clone())),
                ScalarType::String => Value::String(s.text.clone()),
            },
            NodeKind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap_or("").to_string(), to_json(v)))
                    .collect(),
            ),
        }
    }
    let f = cnpc_compiler::source::SourceFile::new("x", text);
    parse_documents(cnpc_compiler::FileId(0), &f)
        .unwrap()
        .iter()
        .map(to_json)
        .collect()
}

/// Errors cnpc reports in the corpus of real policies (../shared/corpus/cilium-examples), each a
/// genuine defect of its file. Every other file must check without an error.
const CORPUS_ERRORS: &[(&str, &[&str])] = &[
    // `auth: {type: "null"}` is the pre-1.14 spelling; today's field is `authentication`, and the
    // API server prunes `auth`, so the rule silently stops requiring authentication.
    ("auth/auth.yaml", &["cnpc::unknown-field"]),
    // Operators are case-sensitive (`In`); Cilium rejects `in`.
    (
        "l3/match-expressions/or-statement.yaml",
        &["cnpc::invalid-operator", "cnpc::invalid-operator"],
    ),
    // `fromRequires` was removed in Cilium 1.19: the CRD keeps the field with MaxItems=0, so the
    // API server refuses the policy (it was valid up to 1.18).
    ("l3/requires/requires.yaml", &["cnpc::removed-field"]),
    // `role: frontend` is indented beside `matchLabels:` (null), not under it: the selector
    // loses its only label and selects every endpoint.
    ("l4/l3_l4_combined.yaml", &["cnpc::unknown-field"]),
    // Upper-case `HTTP` is not a field; the API server prunes it and port 80 is then allowed
    // without any L7 filtering.
    ("l7/http/http.yaml", &["cnpc::unknown-field"]),
];

/// `cnpc check` on one corpus file, which must not crash: its JSON report and its error codes,
/// sorted.
fn check_corpus_file(f: &Path, name: &str) -> (Value, Vec<String>) {
    let run = cnpc(&["check", f.to_str().unwrap(), "--format", "json"]);
    assert!(
        run.code == 0 || run.code == 1,
        "{name}: exit {} (crash?)\n{}",
        run.code,
        run.stderr
    );
    let report = json(&run);
    let mut errors: Vec<String> = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["severity"] == "error")
        .map(|d| d["code"].as_str().unwrap().to_string())
        .collect();
    errors.sort();
    (report, errors)
}

/// Errors cnpc reports in ../shared/corpus/wild (policies from public repositories, byte for
/// byte), each a genuine defect for current Cilium. Every other file checks without an error.
const WILD_ERRORS: &[(&str, &[&str], &str)] = &[
    // Flux post-build substitutions (`${VAR}`) with no value given: one diagnostic per variable,
    // at its first use, and nothing cascading from it (issue 13).
    (
        "JJGadgets__Biohazard__.archive_kube_deploy_apps_gts-robo_app_netpol.yaml",
        &[
            "cnpc::unsubstituted-variable",
            "cnpc::unsubstituted-variable",
        ],
        "Flux variables ${IP_ROBOROCK}, ${CLUSTER_NAME}",
    ),
    (
        "JJGadgets__Biohazard__.archive_kube_deploy_core_db_pg_clusters_enc_netpol.yaml",
        &["cnpc::unsubstituted-variable"],
        "Flux variable ${IP_TRUENAS}",
    ),
    (
        "JJGadgets__Biohazard__kube_deploy_vm_ad__deps_netpol.yaml",
        &[
            "cnpc::unsubstituted-variable",
            "cnpc::unsupported-combination",
        ],
        "Flux variable ${IP_ROUTER_LAN}; and fromEndpoints beside fromCIDRSet in one rule, which \
         Cilium's rule validation refuses (\"combining ... is not supported yet\")",
    ),
    (
        "deedee-ops__home-ops__kubernetes_apps_observability_gatus_networkpolicy.yaml",
        &["cnpc::unsubstituted-variable"],
        "Flux variable ${ROOT_DOMAIN} in a matchPattern",
    ),
    (
        "haraldkoch__kochhaus-home__kubernetes_apps_base_dev_forgejo-runner_ciliumnetworkpolicy.yaml",
        &["cnpc::unsubstituted-variable"],
        "Flux variable ${CLUSTER_DOMAIN} in a matchName",
    ),
    (
        "monosense-io__k8s-gitops__kubernetes_components_dragonfly_networkpolicy.yaml",
        &["cnpc::wrong-type"; 8],
        "Flux variables with defaults (\"${DRAGONFLY_PORT:=6379}\") as ports: Flux writes the \
         object out again before substituting, the quotes are lost and the port arrives as an \
         integer, which the API server rejects (fluxcd/flux2#1839)",
    ),
    (
        "zhorvath83__home-ops__kubernetes_apps_media_plex_app_ciliumnetworkpolicy.yaml",
        &[
            "cnpc::unsubstituted-variable",
            "cnpc::unsubstituted-variable",
        ],
        "Flux variables ${LAN_SUBNET}, ${IOT_SUBNET}",
    ),
    // Genuine mistakes.
    (
        "JJGadgets__Biohazard__kube_deploy_core__networking_cilium_netpols_kubevirt.yaml",
        &["cnpc::kind-typo"],
        "kind CiliumClusterWideNetworkPolicy: kinds are case-sensitive, the API server rejects it",
    ),
    (
        "JJGadgets__Biohazard__kube_deploy_core__networking_cilium_netpols_cluster-default-kube-dns.yaml",
        &["cnpc::l7-protocol"],
        "DNS rules on an ingress rule: Cilium's proxy sees only an endpoint's own lookups (egress)",
    ),
    (
        "isovalent__cilium-up-and-running__chapter12_invalid-policy.yaml",
        &["cnpc::unsupported-combination"],
        "toEndpoints beside toEntities in one rule (the book's example of a policy Cilium refuses)",
    ),
    (
        "jfroy__flatops__kubernetes_apps_default_jellyfin_app_networkpolicy.yaml",
        &["cnpc::invalid-regex"],
        "HTTP path `^/(?!metrics).*`: look-ahead is not RE2, which Cilium's validation and Envoy use",
    ),
    (
        "ragasindhun__cilium-ci-automation__cilium-policy.yaml",
        &["cnpc::yaml-syntax"],
        "a tab in block indentation: not YAML",
    ),
];

#[test]
fn wild_corpus_reads_without_crash_and_errors_are_genuine() {
    let corpus = root().join("../shared/corpus/wild");
    if !corpus.is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run with ../shared/corpus beside the repo"
        );
        eprintln!("skipped: {} not present", corpus.display());
        return;
    }
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 100,
        "corpus looks truncated: {}",
        files.len()
    );
    let mut listed = 0;
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let (report, errors) = check_corpus_file(f, &name);
        let expected = WILD_ERRORS
            .iter()
            .find(|(p, _, _)| *p == name)
            .map_or(&[][..], |(_, e, _)| *e);
        listed += usize::from(!expected.is_empty());
        assert_eq!(errors, expected, "{name}: {report:#}");
    }
    assert_eq!(listed, WILD_ERRORS.len(), "a listed wild file is missing");
}

#[test]
fn corpus_reads_without_crash_and_errors_are_genuine() {
    let corpus = root().join("../shared/corpus/cilium-examples");
    if !corpus.is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run with ../shared/corpus beside the repo"
        );
        eprintln!("skipped: {} not present", corpus.display());
        return;
    }
    let mut files = Vec::new();
    let mut stack = vec![corpus.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 25, "corpus looks truncated: {}", files.len());
    let mut listed = 0;
    for f in &files {
        let rel = f
            .strip_prefix(&corpus)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let (report, errors) = check_corpus_file(f, &rel);
        let expected = CORPUS_ERRORS
            .iter()
            .find(|(p, _)| *p == rel)
            .map_or(&[][..], |(_, e)| *e);
        listed += usize::from(!expected.is_empty());
        assert_eq!(errors, expected, "{rel}: {report:#}");
        for d in report["diagnostics"].as_array().unwrap() {
            assert!(
                !d["help"].as_str().unwrap().is_empty(),
                "{rel}: a diagnostic without help: {d}"
            );
        }
    }
    assert_eq!(
        listed,
        CORPUS_ERRORS.len(),
        "a listed corpus file is missing"
    );
    // The whole corpus in one run: no crash, the same errors.
    let run = cnpc(&["check", corpus.to_str().unwrap(), "--format", "json"]);
    assert_eq!(run.code, 1);
    let expected_total: usize = CORPUS_ERRORS.iter().map(|(_, e)| e.len()).sum();
    assert_eq!(json(&run)["errors"], expected_total);
}

/// Flux variables from the command line (issue 13): without values each is one diagnostic;
/// `--var` and `--vars-file` (dotenv or a Flux ConfigMap) supply them and the policy checks
/// clean; a malformed vars file is a usage error naming its file and line.
#[test]
fn flux_variables_take_values_from_var_and_vars_file() {
    let wild = root().join("../shared/corpus/wild");
    if !wild.is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run with ../shared/corpus beside the repo"
        );
        eprintln!("skipped: ../shared/corpus/wild is not beside the repo");
        return;
    }
    let plex =
        wild.join("zhorvath83__home-ops__kubernetes_apps_media_plex_app_ciliumnetworkpolicy.yaml");
    let plex = plex.to_str().unwrap();
    let without = cnpc(&["check", plex, "--format", "json"]);
    assert_eq!(without.code, 1, "{}", without.stderr);
    let codes: Vec<String> = json(&without)["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(codes, ["cnpc::unsubstituted-variable"; 2]);

    let given = cnpc(&[
        "check",
        plex,
        "--var",
        "LAN_SUBNET=192.168.1.0/24",
        "--var",
        "IOT_SUBNET=192.168.20.0/24",
    ]);
    assert_eq!(given.code, 0, "{}{}", given.stdout, given.stderr);

    let dir = std::env::temp_dir().join(format!("cnpc-vars-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dotenv = dir.join("cluster.env");
    std::fs::write(
        &dotenv,
        "# home lab\nLAN_SUBNET=192.168.1.0/24\nIOT_SUBNET=192.168.20.0/24\n",
    )
    .unwrap();
    let from_file = cnpc(&["check", plex, "--vars-file", dotenv.to_str().unwrap()]);
    assert_eq!(
        from_file.code, 0,
        "{}{}",
        from_file.stdout, from_file.stderr
    );

    let configmap = dir.join("cluster-settings.yaml");
    std::fs::write(
        &configmap,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cluster-settings\ndata:\n  LAN_SUBNET: 192.168.1.0/24\n  IOT_SUBNET: not-a-cidr\n",
    )
    .unwrap();
    // A bad value is checked like any policy value, at the variable's place.
    let bad_value = cnpc(&[
        "check",
        plex,
        "--vars-file",
        configmap.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(bad_value.code, 1, "{}", bad_value.stderr);
    let d = &json(&bad_value)["diagnostics"][0];
    assert_eq!(d["code"], "cnpc::invalid-cidr", "{d}");
    assert_eq!(d["line"], 28, "{d}");
    // --var wins over the file.
    let overridden = cnpc(&[
        "check",
        plex,
        "--vars-file",
        configmap.to_str().unwrap(),
        "--var",
        "IOT_SUBNET=192.168.20.0/24",
    ]);
    assert_eq!(
        overridden.code, 0,
        "{}{}",
        overridden.stdout, overridden.stderr
    );

    let malformed = dir.join("broken.env");
    std::fs::write(
        &malformed,
        "LAN_SUBNET=192.168.1.0/24\nthis line has no equals sign\n",
    )
    .unwrap();
    let bad = cnpc(&["check", plex, "--vars-file", malformed.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{}{}", bad.stdout, bad.stderr);
    assert!(
        bad.stderr.contains("broken.env") && bad.stderr.contains('2'),
        "{}",
        bad.stderr
    );
    let bad_var = cnpc(&["check", plex, "--var", "no-equals"]);
    assert_eq!(bad_var.code, 2, "{}", bad_var.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
