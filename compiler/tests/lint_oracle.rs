//! The indexed lints (`cnpc_compiler::lint::lint`) give exactly the diagnostics of the quadratic
//! implementation they replaced (`lint_oracle/reference.rs`, kept verbatim as the oracle), in
//! the same order, every field equal: on the corpus of real policies (`../shared/corpus`), the
//! project's `policies/` examples, the compile benchmark's synthetic set, and random sets made to
//! exercise what the indexes narrow by: scopes (namespaced, cluster-wide, Kubernetes), plain and
//! expression selectors with and without sources, selectors repeated through YAML aliases (equal
//! spans included), DNS, toFQDNs and deny rules across files, node selectors, and clusters.

mod common;
#[path = "lint_oracle/reference.rs"]
mod reference;
#[path = "../benches/synthetic/mod.rs"]
mod synthetic;

use cnpc_compiler::{lint, Cluster, Code, PolicySet};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Lints `set` both ways and asserts they agree; the diagnostics.
fn same(set: &PolicySet, cluster: Option<&Cluster>, what: &str) -> Vec<cnpc_compiler::Diagnostic> {
    let new = lint::lint(&set.policies, cluster);
    let old = reference::lint(&set.policies, cluster);
    if new != old {
        let first = new
            .iter()
            .zip(&old)
            .position(|(a, b)| a != b)
            .unwrap_or(new.len().min(old.len()));
        panic!(
            "{what}: {} diagnostics, the reference {}; first difference at {first}:\nnew: {:#?}\nold: {:#?}",
            new.len(),
            old.len(),
            new.get(first),
            old.get(first)
        );
    }
    new
}

/// Policy files under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).expect("a readable directory") {
            let p = e.expect("a readable entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The set read from `paths`, with the examples' cluster when `with_cluster`.
fn load(paths: &[PathBuf], with_cluster: bool) -> (PolicySet, Option<Cluster>) {
    let mut set = PolicySet::load(paths).expect("readable files");
    let cluster = with_cluster.then(|| {
        Cluster::load(&[root().join("policies/cluster.yaml")], &mut set.sources)
            .expect("the examples' cluster")
    });
    (set, cluster)
}

#[test]
fn corpus_and_examples_lint_as_the_reference_does() {
    let mut dirs = vec![root().join("policies")];
    let corpus = root().join("../shared/corpus");
    if corpus.is_dir() {
        dirs.push(corpus.join("cilium-examples"));
        dirs.push(corpus.join("wild"));
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run with ../shared/corpus beside the repo"
        );
        eprintln!("skipped the corpus: {} not present", corpus.display());
    }
    let mut codes = std::collections::BTreeSet::new();
    let mut files = 0;
    for dir in &dirs {
        let all = files_under(dir);
        for with_cluster in [false, true] {
            // Each file alone, then every file of the directory as one set (rules of one file
            // covering another's).
            for f in &all {
                let (set, cluster) = load(std::slice::from_ref(f), with_cluster);
                for d in same(&set, cluster.as_ref(), &f.display().to_string()) {
                    codes.insert(d.code);
                }
                files += 1;
            }
            let (set, cluster) = load(&all, with_cluster);
            for d in same(&set, cluster.as_ref(), &dir.display().to_string()) {
                codes.insert(d.code);
            }
        }
    }
    assert!(files > 80, "only {files} files read");
    for code in [
        Code::DenyShadowsAllow,
        Code::FqdnWithoutDns,
        Code::SelectsNothing,
    ] {
        assert!(codes.contains(&code), "no {code:?} to compare");
    }
}

/// The benchmark's set, small enough for the quadratic reference, and again altered so that
/// both indexed lints report: every other FQDN policy loses its DNS rule, and every third deny
/// policy becomes cluster-wide and also denies every peer (covering the allows of its app's
/// policies in every namespace).
#[test]
fn synthetic_set_lints_as_the_reference_does() {
    let shape = synthetic::Shape {
        workloads: 1000,
        identities: 400,
        policies: 2000,
        namespaces: 50,
    };
    let cy = synthetic::cluster_yaml(&shape);
    let py = synthetic::policies_yaml(&shape);
    let altered: String = py
        .split("---\n")
        .filter(|d| !d.is_empty())
        .enumerate()
        .map(|(i, d)| {
            let d = if i % 10 == 3 {
                // The FQDN rule alone: cut the DNS rule that follows it.
                match d.find("  - toEndpoints") {
                    Some(at) => &d[..at],
                    None => d,
                }
            } else {
                d
            };
            let d = if i % 5 == 4 && i % 3 == 0 {
                d.replace(
                    "kind: CiliumNetworkPolicy",
                    "kind: CiliumClusterwideNetworkPolicy",
                )
                .replace(
                    "  ingressDeny:\n",
                    "  ingressDeny:\n  - fromEntities: [all]\n",
                )
            } else {
                d.to_string()
            };
            format!("---\n{d}")
        })
        .collect();
    for (name, text) in [("synthetic", &py), ("altered", &altered)] {
        let mut set = PolicySet::default();
        set.add_bytes(PathBuf::from(format!("{name}.yaml")), text.as_bytes());
        let mut cluster = Cluster::default();
        cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), &cy);
        let out = same(&set, Some(&cluster), name);
        if name == "altered" {
            for code in [Code::DenyShadowsAllow, Code::FqdnWithoutDns] {
                assert!(out.iter().any(|d| d.code == code), "no {code:?} in {name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random sets aimed at the indexes.

/// Labels from a small vocabulary, so that selectors overlap often: keys with and without
/// sources, the namespace key, values that clash.
const LABELS: [(&str, &str); 9] = [
    ("app", "a"),
    ("app", "b"),
    ("k8s:app", "a"),
    ("any:app", "b"),
    ("tier", "front"),
    ("k8s:tier", "back"),
    ("io.kubernetes.pod.namespace", "ns0"),
    ("k8s:io.kubernetes.pod.namespace", "ns1"),
    ("io.cilium.k8s.namespace.labels.env", "prod"),
];

const EXPRESSIONS: [&str; 6] = [
    "{key: app, operator: In, values: [a, b]}",
    "{key: k8s:app, operator: NotIn, values: [a]}",
    "{key: tier, operator: Exists}",
    "{key: tier, operator: DoesNotExist}",
    "{key: k8s:io.kubernetes.pod.namespace, operator: In, values: [ns1]}",
    "{key: app, operator: In, values: []}",
];

/// A label selector in flow style: plain labels (possibly none, possibly with an empty
/// matchExpressions), or with expressions; often one of two common ones, so that rules cover
/// each other often and an allow meets several covering denies (whose order then matters).
fn selector() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("{}".to_string()),
        1 => Just("{matchLabels: {app: a}}".to_string()),
        3 => any_selector(),
    ]
}

fn any_selector() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(0..LABELS.len(), 0..3),
        prop::collection::vec(0..EXPRESSIONS.len(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(labels, exprs, empty_exprs)| {
            let mut parts = Vec::new();
            if !labels.is_empty() {
                let mut ls: Vec<usize> = labels;
                ls.sort_unstable();
                ls.dedup();
                let ls: Vec<String> = ls
                    .iter()
                    .map(|&i| format!("{}: {}", LABELS[i].0, LABELS[i].1))
                    .collect();
                parts.push(format!("matchLabels: {{{}}}", ls.join(", ")));
            }
            if !exprs.is_empty() {
                let es: Vec<&str> = exprs.iter().map(|&i| EXPRESSIONS[i]).collect();
                parts.push(format!("matchExpressions: [{}]", es.join(", ")));
            } else if empty_exprs {
                parts.push("matchExpressions: []".to_string());
            }
            format!("{{{}}}", parts.join(", "))
        })
}

/// Peers of an ingress (`from`) or egress (`to`) entry, or none.
fn peers(dir: &'static str) -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        selector().prop_map(move |s| Some(format!("{dir}Endpoints: [{s}]"))),
        prop::sample::select(vec!["all", "all", "cluster", "world"])
            .prop_map(move |e| Some(format!("{dir}Entities: [{e}]"))),
        prop::sample::select(vec!["0.0.0.0/0", "1.0.0.0/8"])
            .prop_map(move |c| Some(format!("{dir}CIDR: [\"{c}\"]"))),
    ]
}

fn ports() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(
            "toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]".to_string()
        )),
        Just(Some(
            "toPorts: [{ports: [{port: \"0\", protocol: ANY}]}]".to_string()
        )),
        Just(Some(
            "toPorts: [{ports: [{port: \"70\", endPort: 90, protocol: TCP}]}]".to_string()
        )),
        Just(Some(
            "toPorts: [{ports: [{port: http, protocol: TCP}]}]".to_string()
        )),
    ]
}

/// One entry of a rule section, as a flow mapping.
fn entry(dir: &'static str) -> impl Strategy<Value = String> {
    (peers(dir), ports()).prop_map(|(p, t)| {
        let parts: Vec<String> = p.into_iter().chain(t).collect();
        format!("{{{}}}", parts.join(", "))
    })
}

/// An egress entry that may be a toFQDNs rule or a DNS proxy rule.
fn egress_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => entry("to"),
        1 => Just("{toFQDNs: [{matchName: a.example.com}], toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]}".to_string()),
        1 => Just("{toFQDNs: []}".to_string()),
        1 => Just("{toEntities: [cluster], toPorts: [{ports: [{port: \"53\", protocol: ANY}], rules: {dns: [{matchPattern: \"*\"}]}}]}".to_string()),
    ]
}

#[derive(Debug, Clone)]
struct RuleText {
    /// `None`: the rule selects nodes instead.
    subject: Option<String>,
    /// Repeat the previous rule's endpoint selector through a YAML alias.
    alias: bool,
    sections: Vec<(usize, Vec<String>)>,
}

const SECTIONS: [&str; 4] = ["ingress", "ingressDeny", "egress", "egressDeny"];

fn rule() -> impl Strategy<Value = RuleText> {
    (
        prop::option::weighted(0.9, selector()),
        prop::bool::weighted(0.25),
        prop::collection::vec(
            (
                0..4usize,
                prop::collection::vec(
                    prop_oneof![entry("from"), egress_entry(), entry("to")],
                    1..3,
                ),
            ),
            0..3,
        ),
    )
        .prop_map(|(subject, alias, sections)| {
            // Entries of a section take its direction's field names.
            let sections = sections
                .into_iter()
                .map(|(s, entries)| {
                    let ingress = s < 2;
                    let entries = entries
                        .into_iter()
                        .map(|e| {
                            if ingress {
                                e.replace("toEndpoints", "fromEndpoints")
                                    .replace("toEntities", "fromEntities")
                                    .replace("toCIDR", "fromCIDR")
                                    .replace("toFQDNs: []", "fromCIDR: []")
                                    .replace(
                                        "toFQDNs: [{matchName: a.example.com}]",
                                        "fromEntities: [world]",
                                    )
                                    .replace(", rules: {dns: [{matchPattern: \"*\"}]}", "")
                            } else {
                                e.replace("fromEndpoints", "toEndpoints")
                                    .replace("fromEntities", "toEntities")
                                    .replace("fromCIDR", "toCIDR")
                            }
                        })
                        .collect();
                    (s, entries)
                })
                .collect();
            RuleText {
                subject,
                alias,
                sections,
            }
        })
}

#[derive(Debug, Clone)]
struct PolicyText {
    /// 0, 1: CNP in ns0 or ns1; 2: CNP without namespace (default); 3: CCNP; 4: NetworkPolicy.
    kind: usize,
    rules: Vec<RuleText>,
    /// The file it goes to.
    file: usize,
}

fn policy() -> impl Strategy<Value = PolicyText> {
    (0..5usize, prop::collection::vec(rule(), 1..4), 0..2usize)
        .prop_map(|(kind, rules, file)| PolicyText { kind, rules, file })
}

fn policy_yaml(i: usize, p: &PolicyText) -> String {
    let meta = match p.kind {
        0 | 1 => format!("{{name: p{i}, namespace: ns{}}}", p.kind),
        _ => format!("{{name: p{i}}}"),
    };
    if p.kind == 4 {
        let sel = p.rules[0].subject.clone().unwrap_or_else(|| "{}".into());
        return format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {meta}\nspec:\n  podSelector: {sel}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}]\n");
    }
    let kind = if p.kind == 3 {
        "CiliumClusterwideNetworkPolicy"
    } else {
        "CiliumNetworkPolicy"
    };
    let mut y = format!("---\napiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\nspecs:\n");
    let mut anchored = false;
    for (j, r) in p.rules.iter().enumerate() {
        match (&r.subject, r.alias && anchored) {
            (_, true) => y.push_str(&format!("- endpointSelector: *s{}\n", j - 1)),
            (Some(s), false) => y.push_str(&format!("- endpointSelector: &s{j} {s}\n")),
            (None, false) => y.push_str("- nodeSelector: {matchLabels: {role: worker}}\n"),
        }
        // An alias names the anchor of the rule just before, so only an anchored rule can be
        // repeated.
        anchored = r.subject.is_some() && !(r.alias && anchored);
        let mut seen = [false; 4];
        for (s, entries) in &r.sections {
            if std::mem::replace(&mut seen[*s], true) {
                continue;
            }
            y.push_str(&format!("  {}: [{}]\n", SECTIONS[*s], entries.join(", ")));
        }
    }
    y
}

fn cluster_yaml(pods: &[(usize, usize, usize)]) -> String {
    let mut s = String::from("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns0, labels: {env: prod}}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns1}}\n- {apiVersion: v1, kind: Node, metadata: {name: n0, labels: {role: worker}}}\n");
    for (i, (ns, app, tier)) in pods.iter().enumerate() {
        let ns = ["ns0", "ns1", "default"][*ns];
        let app = ["a", "b", "c"][*app];
        let tier = ["", ", tier: front", ", tier: back"][*tier];
        s.push_str(&format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: w{i}, namespace: {ns}, labels: {{app: {app}{tier}}}}}, status: {{podIPs: [{{ip: 10.0.0.{}}}]}}}}\n", i + 1));
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_sets_lint_as_the_reference_does(
        policies in prop::collection::vec(policy(), 1..12),
        pods in prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 0..6),
        with_cluster in any::<bool>(),
    ) {
        let mut texts = [String::new(), String::new()];
        for (i, p) in policies.iter().enumerate() {
            texts[p.file].push_str(&policy_yaml(i, p));
        }
        let mut set = PolicySet::default();
        for (i, t) in texts.iter().enumerate() {
            set.add_bytes(PathBuf::from(format!("f{i}.yaml")), t.as_bytes());
        }
        let cluster = with_cluster.then(|| {
            let mut c = Cluster::default();
            c.add_str(&mut set.sources, Path::new("c.yaml"), &cluster_yaml(&pods));
            c
        });
        let new = lint::lint(&set.policies, cluster.as_ref());
        let old = reference::lint(&set.policies, cluster.as_ref());
        prop_assert!(new == old, "{}\n{}\nnew: {:#?}\nold: {:#?}", texts[0], texts[1], new, old);
    }

    /// The property tests' own generator (`common`), which the other suites use.
    #[test]
    fn common_sets_lint_as_the_reference_does(
        policies in prop::collection::vec(common::policy_gen(), 1..8),
        pods in prop::collection::vec(common::pod(), 0..6),
    ) {
        let yaml = common::policies_yaml(&policies);
        let mut set = cnpc_compiler::load_str("p.yaml", &yaml);
        let mut cluster = Cluster::default();
        cluster.add_str(&mut set.sources, Path::new("c.yaml"), &common::cluster_yaml(&pods));
        let new = lint::lint(&set.policies, Some(&cluster));
        let old = reference::lint(&set.policies, Some(&cluster));
        prop_assert!(new == old, "{}", yaml);
    }
}

/// The random generator reaches every indexed lint and the aliased selectors (else the
/// property above would prove little): a fixed set built from it reports each.
#[test]
fn the_random_generator_reaches_the_indexed_lints() {
    let p = |kind, rules: Vec<RuleText>| PolicyText {
        kind,
        rules,
        file: 0,
    };
    let r = |subject: &str, alias, sections: Vec<(usize, Vec<&str>)>| RuleText {
        subject: Some(subject.to_string()),
        alias,
        sections: sections
            .into_iter()
            .map(|(s, e)| (s, e.into_iter().map(str::to_string).collect()))
            .collect(),
    };
    let expr = "{matchExpressions: [{key: tier, operator: Exists}]}";
    let set_yaml = [
        p(
            0,
            vec![
                r(expr, false, vec![(1, vec!["{fromEntities: [all]}"])]),
                r(expr, true, vec![(0, vec!["{fromEntities: [world]}"])]),
            ],
        ),
        p(
            3,
            vec![r(
                "{matchLabels: {app: zzz}}",
                false,
                vec![(2, vec!["{toFQDNs: [{matchName: a.example.com}]}"])],
            )],
        ),
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| policy_yaml(i, p))
    .collect::<String>();
    assert!(set_yaml.contains("*s0"), "{set_yaml}");
    let mut set = PolicySet::default();
    set.add_bytes(PathBuf::from("f.yaml"), set_yaml.as_bytes());
    let mut cluster = Cluster::default();
    cluster.add_str(
        &mut set.sources,
        Path::new("c.yaml"),
        &cluster_yaml(&[(0, 0, 1)]),
    );
    let out = same(&set, Some(&cluster), "fixed");
    for code in [
        Code::DenyShadowsAllow,
        Code::FqdnWithoutDns,
        Code::SelectsNothing,
    ] {
        assert!(
            out.iter().any(|d| d.code == code),
            "no {code:?}: {out:#?}\n{set_yaml}"
        );
    }
}
