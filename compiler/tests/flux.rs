//! Flux post-build variables in real GitOps repositories (issue 13): every file of
//! ../shared/corpus/wild with `${...}` reports each variable without a value exactly once, at its
//! place, and nothing that variable would cause; given values for its variables it checks clean
//! (but for its genuine mistakes). Plus the same rules on small inputs: spans, defaults, the
//! opt-out annotation, values from files.

use cnpc_compiler::load::load_str_with;
use cnpc_compiler::subst::Vars;
use cnpc_compiler::{check, Code, Diagnostic, PolicySet, Severity};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn corpus() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/wild");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run with ../shared/corpus beside the repo"
    );
    eprintln!("skipped: {} not present", dir.display());
    None
}

/// A reference in a file's text (outside comments): its name and whether it has a default.
#[derive(Debug)]
struct Reference {
    name: String,
    default: bool,
}

/// The `${...}` references of a YAML text, found without cnpc's YAML reader: comments (a `#` at
/// the start of a line or after a blank, outside quotes) are dropped, `$${` is a literal.
fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut quote = None;
        let mut code = String::new();
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev == ' ' || prev == '\t' => break,
                _ => {}
            }
            code.push(c);
            prev = c;
        }
        let b = code.as_bytes();
        let mut i = 0;
        while i + 1 < b.len() {
            if b[i] == b'$' && b[i + 1] == b'$' {
                i += 2;
                continue;
            }
            if b[i] == b'$' && b[i + 1] == b'{' {
                let start = i + 2;
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                out.push(Reference {
                    name: code[start..j].to_string(),
                    default: b.get(j) != Some(&b'}'),
                });
                i = j;
                continue;
            }
            i += 1;
        }
    }
    out
}

/// A value for each variable of the corpus, as a cluster's Flux Kustomization would give it.
fn value_for(name: &str) -> &'static str {
    match name {
        "CLUSTER_NAME" => "biohazard",
        "DRAGONFLY_NAME" => "dragonfly",
        "DRAGONFLY_ALLOW_GITLAB_NS" => "gitlab-system",
        "DRAGONFLY_ALLOW_HARBOR_NS" => "harbor",
        "DRAGONFLY_ALLOW_OBSERVABILITY_NS" => "observability",
        n if n.ends_with("_SUBNET") || n.ends_with("_CIDR") => "192.168.1.0/24",
        n if n.starts_with("IP_") || n.ends_with("_IP") => "192.168.1.10",
        // Flux writes a substituted value out unquoted (whatever quotes the file has) and reads
        // it back, so a port, a string field, stays a string only when the value carries its
        // quotes: Flux's documented way to give numbers to string fields.
        n if n.ends_with("_PORT") => "\"6379\"",
        n if n.contains("DOMAIN") => "example.com",
        n if n.ends_with("_NS") || n.ends_with("NAMESPACE") => "apps",
        other => panic!("no test value for the Flux variable {other}: add one to value_for"),
    }
}

/// A file with variables and errors that no missing value causes.
struct Expected {
    file: &'static str,
    /// Each error's code and the start of the text it points at.
    errors: &'static [(Code, &'static str)],
    why: &'static str,
}

/// Errors the files with variables have for reasons of their own (values given).
const GENUINE: &[Expected] = &[Expected {
    file: "JJGadgets__Biohazard__kube_deploy_vm_ad__deps_netpol.yaml",
    errors: &[(Code::UnsupportedCombination, "fromCIDRSet")],
    why: "fromEndpoints beside fromCIDRSet in one rule, which Cilium refuses",
}];

/// Errors the defaults in a file cause when no value is given.
const FROM_DEFAULTS: &[Expected] = &[Expected {
    file: "monosense-io__k8s-gitops__kubernetes_components_dragonfly_networkpolicy.yaml",
    errors: &[
        (Code::WrongType, "${DRAGONFLY_PORT:=6379}"),
        (Code::WrongType, "${DRAGONFLY_ADMIN_PORT:=6380}"),
        (Code::WrongType, "${DRAGONFLY_PORT:=6379}"),
        (Code::WrongType, "${DRAGONFLY_PORT:=6379}"),
        (Code::WrongType, "${DRAGONFLY_PORT:=6379}"),
        (Code::WrongType, "${DRAGONFLY_ADMIN_PORT:=6380}"),
        (Code::WrongType, "${DRAGONFLY_PORT:=6379}"),
        (Code::WrongType, "${DRAGONFLY_ADMIN_PORT:=6380}"),
    ],
    why: "`port: \"${DRAGONFLY_PORT:=6379}\"`: Flux writes the value out unquoted, so the default \
          6379 arrives as an integer, which the CRD's string `port` refuses",
}];

fn expected<'a>(list: &'a [Expected], file: &str) -> (&'a [(Code, &'static str)], &'a str) {
    list.iter()
        .find(|e| e.file == file)
        .map_or((&[][..], ""), |e| (e.errors, e.why))
}

/// Whether errors (code, text) are the expected ones, in order.
fn same(found: &[(Code, &str)], expected: &[(Code, &str)]) -> bool {
    found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|(f, e)| f.0 == e.0 && f.1.starts_with(e.1))
}

fn span_text<'a>(set: &'a PolicySet, d: &Diagnostic) -> &'a str {
    set.sources.text(d.span)
}

fn errors(diags: &[Diagnostic]) -> Vec<&Diagnostic> {
    diags
        .iter()
        .filter(|d| d.severity() == Severity::Error)
        .collect()
}

#[test]
fn wild_corpus_variables_one_diagnostic_each_and_clean_with_values() {
    let Some(dir) = corpus() else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut with_variables = 0;
    let mut reported = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        if !text.contains("${") {
            continue;
        }
        with_variables += 1;
        let refs = references(&text);

        // Without values: one diagnostic per variable that has no default, at a `${NAME}`, the
        // other uses of it as related places.
        let bare = check(PolicySet::load(std::slice::from_ref(path)).unwrap(), None);
        let missing: BTreeSet<&str> = refs
            .iter()
            .filter(|r| !r.default)
            .map(|r| r.name.as_str())
            .collect();
        let unsubstituted: Vec<&Diagnostic> = bare
            .diagnostics
            .iter()
            .filter(|d| d.code == Code::UnsubstitutedVariable)
            .collect();
        let named: BTreeSet<&str> = unsubstituted
            .iter()
            .map(|d| {
                let var = span_text(&bare.set, d)
                    .strip_prefix("${")
                    .and_then(|s| s.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("{name}: {d:?} is not at a ${{NAME}}"));
                for (s, _) in &d.related {
                    assert_eq!(bare.set.sources.text(*s), format!("${{{var}}}"), "{name}");
                }
                let uses = refs.iter().filter(|r| !r.default && r.name == var).count();
                assert_eq!(d.related.len() + 1, uses, "{name}: every use of {var}");
                assert!(d.message.contains(var) && d.help.contains("--var"), "{d:?}");
                var
            })
            .collect();
        assert_eq!(unsubstituted.len(), named.len(), "{name}: one per variable");
        assert_eq!(named, missing, "{name}");
        reported += unsubstituted.len();

        // With values for every variable: clean but for the file's own mistakes.
        let mut vars = Vars::new();
        for r in &refs {
            vars.set(&r.name, value_for(&r.name), "test").unwrap();
        }
        let given = check(
            PolicySet::load_with(std::slice::from_ref(path), &vars).unwrap(),
            None,
        );
        let given_errors: Vec<(Code, &str)> = errors(&given.diagnostics)
            .iter()
            .map(|d| (d.code, span_text(&given.set, d)))
            .collect();
        let (genuine, why) = expected(GENUINE, &name);
        assert!(
            same(&given_errors, genuine),
            "{name} ({why}): {:#?}",
            given.diagnostics
        );

        // The missing values cause nothing else: every other error without values is one the
        // file has with values too, or one its defaults cause.
        let (defaults, why) = expected(FROM_DEFAULTS, &name);
        let mut from_defaults = Vec::new();
        for d in errors(&bare.diagnostics) {
            if d.code == Code::UnsubstitutedVariable {
                continue;
            }
            let also_given = given
                .diagnostics
                .iter()
                .any(|g| g.code == d.code && g.span == d.span);
            if !also_given {
                from_defaults.push((d.code, span_text(&bare.set, d)));
            }
        }
        assert!(
            same(&from_defaults, defaults),
            "{name} ({why}): {from_defaults:?} {:#?}",
            bare.diagnostics
        );
        // And no warning either.
        for w in bare
            .diagnostics
            .iter()
            .filter(|d| d.severity() == Severity::Warning)
        {
            assert!(
                given
                    .diagnostics
                    .iter()
                    .any(|g| g.code == w.code && g.span == w.span),
                "{name}: a warning only without values: {w:#?}"
            );
        }
    }
    assert!(
        with_variables >= 8,
        "corpus looks truncated: {with_variables}"
    );
    assert!(reported >= 8, "{reported}");
    for e in GENUINE.iter().chain(FROM_DEFAULTS) {
        assert!(
            dir.join(e.file).is_file(),
            "{} is listed but missing",
            e.file
        );
    }
}

#[test]
fn a_number_substituted_into_a_quoted_port_is_an_integer_as_in_flux() {
    let Some(dir) = corpus() else { return };
    let path =
        dir.join("monosense-io__k8s-gitops__kubernetes_components_dragonfly_networkpolicy.yaml");
    let mut vars = Vars::new();
    vars.set_assignment("DRAGONFLY_PORT=6379").unwrap();
    vars.set_assignment("DRAGONFLY_ADMIN_PORT=!!str 6380")
        .unwrap();
    let report = check(PolicySet::load_with(&[path], &vars).unwrap(), None);
    let errs = errors(&report.diagnostics);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    for d in errs {
        assert_eq!(d.code, Code::WrongType);
        assert_eq!(span_text(&report.set, d), "${DRAGONFLY_PORT:=6379}");
        assert!(d.help.contains("do not survive"), "{}", d.help);
        assert!(
            d.help.contains("--var DRAGONFLY_PORT='\"6379\"'"),
            "{}",
            d.help
        );
    }
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: ${APP:=web}-ingress
  namespace: apps
spec:
  endpointSelector:
    matchLabels:
      app: ${APP:=web}
  ingress:
    - fromCIDRSet:
        - cidr: ${LAN_SUBNET}
        - cidr: "${ROUTER}/32"
      toPorts:
        - ports:
            # a comment mentioning ${NOT_A_VARIABLE}
            - port: "${PORT}"
              protocol: ${PROTO:-TCP}
"#;

fn load(text: &str, pairs: &[&str]) -> cnpc_compiler::CheckReport {
    let mut vars = Vars::new();
    for p in pairs {
        vars.set_assignment(p).unwrap();
    }
    check(load_str_with("p.yaml", text, &vars), None)
}

fn codes(r: &cnpc_compiler::CheckReport) -> Vec<Code> {
    r.diagnostics.iter().map(|d| d.code).collect()
}

#[test]
fn without_values_each_variable_is_one_error_and_nothing_else() {
    let r = load(POLICY, &[]);
    assert_eq!(codes(&r), vec![Code::UnsubstitutedVariable; 3], "{r:#?}");
    let at: Vec<(&str, u32, u32)> = r
        .diagnostics
        .iter()
        .map(|d| (span_text(&r.set, d), d.span.line, d.span.column))
        .collect();
    assert_eq!(
        at,
        [
            ("${LAN_SUBNET}", 12, 17),
            ("${ROUTER}", 13, 18),
            ("${PORT}", 17, 22)
        ]
    );
    // Defaults apply.
    let p = &r.set.policies[0];
    assert_eq!(p.metadata.name.as_ref().unwrap().value, "web-ingress");
}

#[test]
fn with_values_the_substituted_policy_is_checked_at_the_original_text() {
    let ok = load(
        POLICY,
        &[
            "LAN_SUBNET=192.168.1.0/24",
            "ROUTER=192.168.1.1",
            "PORT=\"443\"",
        ],
    );
    assert!(ok.diagnostics.is_empty(), "{:#?}", ok.diagnostics);

    // A bad value is reported where the variable is written: the whole `${...}` when the value
    // is nothing else, else the whole value.
    let bad = load(
        POLICY,
        &[
            "LAN_SUBNET=10.0.0.300/24",
            "ROUTER=10.1.1",
            "PORT=\"99999\"",
            "APP=Web!",
        ],
    );
    let found: Vec<(Code, &str, u32)> = bad
        .diagnostics
        .iter()
        .map(|d| (d.code, span_text(&bad.set, d), d.span.line))
        .collect();
    assert_eq!(
        found,
        [
            (Code::InvalidName, "${APP:=web}-ingress", 4),
            (Code::InvalidLabelValue, "${APP:=web}", 9),
            (Code::InvalidCidr, "${LAN_SUBNET}", 12),
            (Code::InvalidCidr, "\"${ROUTER}/32\"", 13),
            (Code::InvalidPort, "${PORT}", 17),
        ],
        "{:#?}",
        bad.diagnostics
    );
    assert!(bad.diagnostics[2].message.contains("10.0.0.300/24"));
}

#[test]
fn objects_that_opt_out_and_objects_that_are_not_policies() {
    let text = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{a: '${{UNSET}}'}}\n",
        POLICY.replace(
            "  namespace: apps\n",
            "  namespace: apps\n  annotations:\n    kustomize.toolkit.fluxcd.io/substitute: disabled\n",
        )
    );
    let r = load(&text, &[]);
    // Taken as written: the API server gets `${LAN_SUBNET}`, an invalid CIDR, and so on; the
    // ConfigMap is not a policy, so its variable is nobody's business here.
    assert!(!codes(&r).contains(&Code::UnsubstitutedVariable), "{r:#?}");
    assert!(codes(&r).contains(&Code::InvalidCidr), "{r:#?}");
    assert!(codes(&r).contains(&Code::InvalidName), "{r:#?}");
}

#[test]
fn list_items_malformed_references_and_a_default_set() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}",
        POLICY.replace('\n', "\n  ")
    );
    let r = load(&list, &["LAN_SUBNET=10.0.0.0/8", "ROUTER=10.0.0.1"]);
    assert_eq!(codes(&r), [Code::UnsubstitutedVariable], "{r:#?}");
    assert_eq!(span_text(&r.set, &r.diagnostics[0]), "${PORT}");

    let r = load(&POLICY.replace("${ROUTER}", "${ROUTER"), &[]);
    let d: Vec<_> = r
        .diagnostics
        .iter()
        .filter(|d| d.message.contains("malformed"))
        .collect();
    assert_eq!(d.len(), 1, "{r:#?}");
    assert_eq!(d[0].span.line, 13);

    // A set made for objects from the API server substitutes nothing.
    let mut set = PolicySet::default();
    set.add_bytes(PathBuf::from("p.yaml"), POLICY.as_bytes());
    let r = check(set, None);
    assert!(!codes(&r).contains(&Code::UnsubstitutedVariable));
    assert!(codes(&r).contains(&Code::InvalidCidr));
}

#[test]
fn values_from_files() {
    let dir = std::env::temp_dir().join(format!("cnpc-flux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let env = dir.join("cluster.env");
    std::fs::write(&env, "LAN_SUBNET=10.0.0.0/8\nPORT='\"443\"'\n").unwrap();
    let secret = dir.join("secret.yaml");
    // ROUTER=10.0.0.1 in base64.
    std::fs::write(
        &secret,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata:\n  ROUTER: MTAuMC4wLjE=\n",
    )
    .unwrap();
    let mut vars = Vars::new();
    vars.read_file(&env).unwrap();
    vars.read_file(&secret).unwrap();
    let r = check(load_str_with("p.yaml", POLICY, &vars), None);
    assert!(r.diagnostics.is_empty(), "{:#?}", r.diagnostics);
    std::fs::write(&env, "LAN_SUBNET=10.0.0.0/8\noops\n").unwrap();
    let e = Vars::new().read_file(&env).unwrap_err();
    assert!(e.to_string().contains("cluster.env:2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unresolved_values_anywhere_cause_nothing_but_their_own_error() {
    let text = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: ${NAME}
  namespace: ${NS}
spec:
  endpointSelector:
    matchLabels:
      io.kubernetes.pod.namespace: ${NS}
      k8s.${KEY}: x
  egress:
    - toCIDR: ["${CIDR}"]
    - toEntities: ["${ENTITY}"]
    - toFQDNs:
        - matchName: ${HOST}
      toPorts:
        - ports: [{port: "${P}", protocol: "${PROTO}", endPort: "${END}"}]
          rules:
            http: [{path: "${PATH}", method: "${M}"}]
  ingressDeny:
    - fromEndpoints: [{matchLabels: {app: "${APP}"}}]
  ingress:
    - fromEndpoints: [{matchLabels: {app: "${APP}"}}]
      icmps: [{fields: [{type: "${T}", family: "${F}"}]}]
"#;
    let r = load(text, &[]);
    let unsubstituted = codes(&r)
        .iter()
        .filter(|c| **c == Code::UnsubstitutedVariable)
        .count();
    assert_eq!(unsubstituted, 14, "{:#?}", r.diagnostics);
    // What is left holds whatever the values: toFQDNs without a DNS rule, and a deny rule with
    // the same peers as an allow rule.
    let rest: Vec<Code> = codes(&r)
        .into_iter()
        .filter(|c| *c != Code::UnsubstitutedVariable)
        .collect();
    assert_eq!(
        rest,
        [Code::FqdnWithoutDns, Code::DenyShadowsAllow],
        "{:#?}",
        r.diagnostics
    );
}
