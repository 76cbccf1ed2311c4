//! One test per semantic point of DESIGN.md §4, each named after it and citing where Cilium (or
//! Kubernetes) fixes the behaviour. Flows run through the reference evaluator over a small
//! two-namespace cluster.

use cnpc_compiler::eval::{evaluate, parse_peer, DirVerdict, Flow, HttpRequest, Verdict};
use cnpc_compiler::{check, load_str, lower, Cluster};
use cnpc_ir::{Program, Protocol};
use std::path::Path;

const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: {team: red}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {team: blue}}}
- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {role: worker}}, status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: a, labels: {app: web}}
  spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
  status: {podIPs: [{ip: 10.0.0.1}]}
- {apiVersion: v1, kind: Pod, metadata: {name: web2, namespace: a, labels: {app: web}}, status: {podIPs: [{ip: 10.0.0.2}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: a, labels: {app: client}}, status: {podIPs: [{ip: 10.0.0.3}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: b, labels: {app: client}}, status: {podIPs: [{ip: 10.0.1.3}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: b, labels: {app: db}}, status: {podIPs: [{ip: 10.0.1.4}]}}
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: b, labels: {tier: data}}
  spec: {selector: {app: db}, ports: [{port: 5432}]}
- apiVersion: v1
  kind: Service
  metadata: {name: ext, namespace: a}
  spec: {ports: [{port: 443}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: ext-x1, namespace: a, labels: {kubernetes.io/service-name: ext}}
  endpoints: [{addresses: [203.0.113.7]}]
"#;

struct World {
    program: Program,
    cluster: Cluster,
}

fn world(policies: &str) -> World {
    world_with_errors(policies, &[])
}

/// A world whose policies may have errors of the given codes only (semantics of fields current
/// Cilium rejects but older releases enforced).
fn world_with_errors(policies: &str, allowed: &[&str]) -> World {
    let mut set = load_str("p.yaml", policies);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), CLUSTER);
    let r = check(set, Some(cluster));
    let unexpected = r
        .diagnostics
        .iter()
        .filter(|d| d.severity() == cnpc_compiler::Severity::Error)
        .filter(|d| !allowed.contains(&d.code.as_str()))
        .count();
    assert_eq!(unexpected, 0, "{}", cnpc_compiler::report::human(&r, false));
    let cluster = r.cluster.unwrap();
    let program = lower::build(
        &r.set.policies,
        &r.set.sources,
        &cluster,
        &Default::default(),
    );
    World { program, cluster }
}

impl World {
    fn flow(&self, from: &str, to: &str, dport: &str) -> Flow {
        let (port, proto) = dport.split_once('/').unwrap_or((dport, "TCP"));
        Flow {
            src: parse_peer(&self.program, &self.cluster, from).unwrap(),
            dst: parse_peer(&self.program, &self.cluster, to).unwrap(),
            protocol: Protocol::parse(proto).unwrap(),
            port: port.parse().unwrap(),
            http: None,
            dns_query: None,
        }
    }

    fn verdict(&self, from: &str, to: &str, dport: &str) -> Verdict {
        evaluate(&self.program, &self.flow(from, to, dport))
    }

    fn allowed(&self, from: &str, to: &str, dport: &str) -> bool {
        self.verdict(from, to, dport).allowed
    }

    fn http(
        &self,
        from: &str,
        to: &str,
        dport: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> bool {
        let mut f = self.flow(from, to, dport);
        f.http = Some(HttpRequest {
            method: method.into(),
            path: path.into(),
            host: None,
            headers: headers
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        });
        evaluate(&self.program, &f).allowed
    }
}

fn cnp(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

fn ccnp(name: &str, spec: &str) -> String {
    format!("---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

const WEB: &str = "  endpointSelector: {matchLabels: {app: web}}\n";

#[test]
fn no_policy_means_not_enforced() {
    let w = world("");
    let v = w.verdict("pod:a/client", "pod:a/web", "80");
    assert!(v.allowed);
    assert_eq!(v.egress.verdict, DirVerdict::NotEnforced);
    assert_eq!(v.ingress.verdict, DirVerdict::NotEnforced);
}

/// rule_validation.go Rule.Sanitize: default deny for a direction once a rule has an allow or
/// deny section for it; the other direction stays open.
#[test]
fn default_deny_per_direction() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"),
    ));
    assert!(w.allowed("pod:a/client", "pod:a/web", "80"));
    let v = w.verdict("pod:b/db", "pod:a/web", "80");
    assert!(!v.allowed);
    assert!(v.ingress.rules[0].what.contains("default-deny"));
    // Egress from web is not enforced by an ingress-only policy.
    assert_eq!(
        w.verdict("pod:a/web", "pod:b/db", "5432").egress.verdict,
        DirVerdict::NotEnforced
    );
}

/// An explicitly empty peer list selects nobody (pkg/policy rule_test.go TestL3Wildcarding
/// B1-B3; pkg/policy/utils mergeEndpointSelectors), yet its section turns on default deny. (A
/// rule with no peer list at all: `l4_only_rule_allows_every_peer_on_its_ports` and
/// `empty_cilium_rule_allows_nothing_and_enables_default_deny`.)
#[test]
fn empty_peer_list_selects_no_one() {
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - fromEndpoints: []\n    toPorts: [{{ports: [{{port: \"80\"}}]}}]\n")));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(!w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  egress:\n  - toEntities: []\n"),
    ));
    assert!(!w.allowed("pod:a/web", "ip:1.1.1.1", "443"));
}

/// An empty rule (`egress: [{}]`, `ingress: [{}]`) allows nothing: it only puts the endpoint
/// into default deny for that direction. Cilium's own example
/// examples/policies/l3/egress-default-deny/egress-default-deny.yaml ("deny-all-egress") is
/// exactly `egress: [{}]`, and pkg/policy rule_test.go TestL3Wildcarding CaseC3
/// (`Ingress: []api.IngressRule{{}}` gives an empty L4 policy map) fixes it. The same holds
/// for deny sections: `ingressDeny: [{}]` denies nothing by itself (but enables default deny).
#[test]
fn empty_cilium_rule_allows_nothing_and_enables_default_deny() {
    let w = world(&cnp(
        "a",
        "deny-all-egress",
        &format!("{WEB}  egress:\n  - {{}}\n"),
    ));
    let v = w.verdict("pod:a/web", "pod:b/db", "5432");
    assert!(!v.allowed);
    assert_eq!(v.egress.verdict, DirVerdict::Denied);
    assert!(v.egress.rules[0].what.contains("default-deny"));
    assert!(!w.allowed("pod:a/web", "ip:1.1.1.1", "443"));
    assert!(!w.allowed("pod:a/web", "pod:a/web2", "80/UDP"));
    // Ingress is untouched by an egress-only policy.
    assert_eq!(
        w.verdict("pod:a/client", "pod:a/web", "80").ingress.verdict,
        DirVerdict::NotEnforced
    );

    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - {{}}\n")));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(!w.allowed("ip:1.1.1.1", "pod:a/web", "80"));

    // A deny section of one empty rule denies nothing, but enables default deny: an allow
    // beside it still allows.
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingressDeny:\n  - {{}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"),
    ));
    assert!(w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80"));

    // A CCNP behaves the same.
    let w = world(&ccnp("p", &format!("{WEB}  egress:\n  - {{}}\n")));
    assert!(!w.allowed("pod:a/web", "pod:b/db", "5432"));
}

/// TestL3Wildcarding CaseC1/C2: only a rule with `toPorts` (or `icmps`) and no L3 field gets
/// the implicit wildcard peer; `toPorts: []` counts as no L4 (`len(ToPorts) == 0`), so such a
/// rule allows nothing.
#[test]
fn only_rules_with_l4_get_the_wildcard_peer() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - icmps: [{{fields: [{{type: 8}}]}}]\n"),
    ));
    assert!(w.allowed("pod:b/db", "pod:a/web", "8/ICMP"));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - toPorts: []\n"),
    ));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80"));
}

/// A `toPorts` entry without ports (`toPorts: [{}]`, `ports: []`, or only `rules`) covers no
/// port: pkg/policy/rule.go mergeIngress/mergeEgress iterate `GetPortProtocols()`, which is
/// empty, so no L4 filter is created and the rule allows nothing.
#[test]
fn port_rule_without_ports_covers_nothing() {
    for to_ports in ["[{}]", "[{ports: []}]"] {
        let w = world(&cnp(
            "a",
            "p",
            &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: {to_ports}\n"),
        ));
        assert!(
            !w.allowed("pod:a/client", "pod:a/web", "80"),
            "toPorts: {to_ports}"
        );
        assert!(
            !w.allowed("pod:a/client", "pod:a/web", "53/UDP"),
            "toPorts: {to_ports}"
        );
    }
}

/// Kubernetes NetworkPolicy keeps its own meaning: an empty ingress rule (`ingress: [{}]`)
/// allows all traffic to the selected pods (NetworkPolicySpec.Ingress: "If this field is
/// empty then this NetworkPolicy does not allow any traffic ... an empty rule matches all").
#[test]
fn network_policy_empty_rule_allows_all() {
    let np = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - {}\n";
    let w = world(np);
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(w.allowed("ip:1.1.1.1", "pod:a/web", "443"));
}

/// ParseToCiliumRule (pkg/k8s/apis/cilium.io/utils/utils.go): "EndpointSelector always applies
/// in namespace of the policy resource, removing illegal namespace match". A namespaced CNP's
/// `endpointSelector` naming another namespace in matchLabels is overwritten with the
/// policy's own namespace (AddMatch replaces the matchLabels entry), so it selects its own
/// namespace's pods, not nothing and not the other namespace's.
#[test]
fn cnp_subject_is_always_in_its_own_namespace() {
    let w = world(&cnp(
        "a",
        "p",
        "  endpointSelector: {matchLabels: {app: client, k8s:io.kubernetes.pod.namespace: b}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n",
    ));
    // The subject is a/client: b/client's ingress is not enforced by this policy.
    assert_eq!(
        w.verdict("pod:a/web", "pod:b/client", "80").ingress.verdict,
        DirVerdict::NotEnforced
    );
    assert!(w.allowed("pod:a/web", "pod:a/client", "80"));
    assert_eq!(
        w.verdict("pod:b/db", "pod:a/client", "80").ingress.verdict,
        DirVerdict::Denied
    );
}

/// Rule.Sanitize: `len(IngressDeny) > 0` also enables default deny, so a deny-only policy
/// blocks everything it does not allow (Cilium's from_world_deny example pairs its deny with an
/// allow-all for that reason).
#[test]
fn deny_only_policy_enables_default_deny() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"),
    ));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80"));
}

/// `enableDefaultDeny: {ingress: false}` makes the rule's allows additive to default allow.
#[test]
fn enable_default_deny_false_keeps_other_traffic() {
    let w = world(&cnp("a", "p", &format!("{WEB}  enableDefaultDeny: {{ingress: false}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n")));
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert_eq!(
        w.verdict("pod:b/db", "pod:a/web", "80").ingress.verdict,
        DirVerdict::NotEnforced
    );
}

/// Deny policies take precedence over allow policies regardless of kind (Cilium docs, "Deny
/// Policies"): a CCNP deny beats a NetworkPolicy allow.
#[test]
fn deny_beats_allow_across_cnp_ccnp_and_networkpolicy() {
    let np = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {}}]\n";
    let deny = ccnp("d", "  endpointSelector: {matchLabels: {app: web}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n  ingress:\n  - fromEntities: [all]\n");
    let w = world(&format!("{np}{deny}"));
    let v = w.verdict("pod:a/client", "pod:a/web", "80");
    assert!(!v.allowed);
    assert!(v
        .ingress
        .rules
        .iter()
        .all(|r| r.origin.policy.contains("CiliumClusterwideNetworkPolicy")));
    assert!(
        !w.allowed("pod:b/client", "pod:a/web", "80"),
        "the CCNP deny is cluster-wide"
    );
}

/// utils.go getEndpointSelector: in a namespaced policy a peer selector without a namespace
/// selects only the policy's namespace.
#[test]
fn namespaced_policy_peer_selectors_stay_in_their_namespace() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"),
    ));
    assert!(w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(!w.allowed("pod:b/client", "pod:a/web", "80"));
}

/// getEndpointSelector: a selector naming `io.kubernetes.pod.namespace` keeps its namespace.
#[test]
fn peer_selector_naming_a_namespace_crosses_namespaces() {
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client, k8s:io.kubernetes.pod.namespace: b}}}}]\n")));
    assert!(w.allowed("pod:b/client", "pod:a/web", "80"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
}

/// getEndpointSelector: selecting on namespace labels (io.cilium.k8s.namespace.labels.*) does
/// not add the policy's namespace.
#[test]
fn namespace_label_selectors_cross_namespaces() {
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{io.cilium.k8s.namespace.labels.team: blue}}}}]\n")));
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
}

/// ParseToCiliumRule: a CNP's endpointSelector applies in its own namespace only.
#[test]
fn namespaced_policy_selects_only_its_namespace() {
    let w = world(&cnp(
        "b",
        "p",
        "  endpointSelector: {matchLabels: {app: client}}\n  egress: [{toEntities: [world]}]\n",
    ));
    assert!(
        w.allowed("pod:a/client", "pod:a/web", "80"),
        "a/client is not selected by a policy in b"
    );
    assert!(!w.allowed("pod:b/client", "pod:a/web", "80"));
}

/// getEndpointSelector for clusterwide policies: peer selectors get `io.kubernetes.pod.namespace`
/// Exists, so `fromEndpoints: [{}]` means every pod, not the world or the host.
#[test]
fn ccnp_selectors_match_only_managed_pods() {
    let w = world(&ccnp(
        "c",
        "  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{}]\n",
    ));
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(!w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    assert!(!w.allowed("entity:host", "pod:a/web", "80"));
}

/// entity.go InitEntities: `cluster` is the host, remote nodes, init, health, unmanaged and
/// every endpoint of this cluster; not the world. `all` is everything.
#[test]
fn entities_map_to_identity_sets() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEntities: [cluster]\n"),
    ));
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(w.allowed("entity:host", "pod:a/web", "80"));
    assert!(
        w.allowed("ip:192.168.0.1", "pod:a/web", "80"),
        "a node address is remote-node"
    );
    assert!(!w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEntities: [all]\n"),
    ));
    assert!(w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEntities: [world]\n"),
    ));
    assert!(w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
}

/// CIDRRule with except; CIDR rules select only addresses outside the cluster (Cilium docs,
/// "CIDR based": not traffic between Cilium-managed endpoints).
#[test]
fn cidr_set_with_except_applies_to_the_world_only() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  egress:\n  - toCIDRSet: [{{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}}]\n"),
    ));
    assert!(w.allowed("pod:a/web", "ip:10.1.2.3", "443"));
    assert!(
        !w.allowed("pod:a/web", "ip:10.96.0.1", "443"),
        "inside the except"
    );
    assert!(!w.allowed("pod:a/web", "ip:11.0.0.1", "443"));
    assert!(
        !w.allowed("pod:a/web", "pod:b/db", "5432"),
        "a pod address in 10/8 is not a CIDR peer"
    );
}

/// IngressRule without peers (L4-only) applies to every peer on its ports.
#[test]
fn l4_only_rule_allows_every_peer_on_its_ports() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"),
    ));
    assert!(w.allowed("ip:1.1.1.1", "pod:a/web", "80"));
    assert!(w.allowed("pod:b/db", "pod:a/web", "80"));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "81"));
    assert!(!w.allowed("pod:b/db", "pod:a/web", "80/UDP"));
}

/// PortProtocol: endPort makes an inclusive range; protocol ANY (or absent) covers TCP, UDP and
/// SCTP but not ICMP; port 0 is every port.
#[test]
fn port_ranges_and_any_protocol() {
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - toPorts: [{{ports: [{{port: \"8000\", endPort: 8010, protocol: ANY}}]}}]\n")));
    assert!(w.allowed("pod:a/client", "pod:a/web", "8000"));
    assert!(w.allowed("pod:a/client", "pod:a/web", "8010/UDP"));
    assert!(w.allowed("pod:a/client", "pod:a/web", "8005/SCTP"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "8011"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "7999"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "8/ICMP"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - toPorts: [{{ports: [{{port: \"0\", protocol: UDP}}]}}]\n"),
    ));
    assert!(w.allowed("pod:a/client", "pod:a/web", "65535/UDP"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "53/TCP"));
}

/// ICMPRule: types by number or name, per family.
#[test]
fn icmp_types() {
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - icmps: [{{fields: [{{type: EchoRequest, family: IPv4}}, {{type: 128, family: IPv6}}]}}]\n")));
    assert!(w.allowed("pod:a/client", "pod:a/web", "8/ICMP"));
    assert!(w.allowed("pod:a/client", "pod:a/web", "128/ICMPv6"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "0/ICMP"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "8/TCP"));
}

/// Named ports resolve against the destination pod's container ports.
#[test]
fn named_ports_resolve_on_the_destination() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - toPorts: [{{ports: [{{port: http, protocol: TCP}}]}}]\n"),
    ));
    assert!(w.allowed("pod:a/client", "pod:a/web", "8080"));
    assert!(!w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(
        !w.allowed("pod:a/client", "pod:a/web2", "8080"),
        "web2 declares no port named http"
    );
}

/// PortRuleHTTP: method, path and host are regular expressions matched against the whole value
/// (Envoy safe_regex full match); headers must be present with the given value.
#[test]
fn http_rules_are_anchored_regexes_with_required_headers() {
    let rules = "      rules:\n        http:\n        - {method: GET, path: \"/v1/.*\"}\n        - {method: POST, path: /submit, headers: ['X-Token: yes']}\n";
    let w = world(&cnp("a", "p", &format!("{WEB}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n{rules}")));
    assert!(w.http("pod:a/client", "pod:a/web", "80", "GET", "/v1/items", &[]));
    assert!(
        !w.http(
            "pod:a/client",
            "pod:a/web",
            "80",
            "GET",
            "/v2/v1/items",
            &[]
        ),
        "anchored at the start"
    );
    assert!(
        !w.http("pod:a/client", "pod:a/web", "80", "GETX", "/v1/items", &[]),
        "anchored at the end"
    );
    assert!(!w.http("pod:a/client", "pod:a/web", "80", "POST", "/submit", &[]));
    assert!(w.http(
        "pod:a/client",
        "pod:a/web",
        "80",
        "POST",
        "/submit",
        &[("x-token", "yes")]
    ));
    assert!(!w.http(
        "pod:a/client",
        "pod:a/web",
        "80",
        "POST",
        "/submit",
        &[("X-Token", "no")]
    ));
}

/// An L3/L4 allow on the same port as an L7 allow lets every request through (Cilium merges it
/// into the proxy as an allow-all L7 rule).
#[test]
fn l4_allow_beside_l7_allow_lets_every_request_through() {
    let l7 = format!("{WEB}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n      rules: {{http: [{{method: GET}}]}}\n");
    let w = world(&cnp("a", "p", &l7));
    assert!(!w.http("pod:a/client", "pod:a/web", "80", "DELETE", "/", &[]));
    let both = format!("{l7}  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n");
    let w = world(&cnp("a", "p", &both));
    assert!(w.http("pod:a/client", "pod:a/web", "80", "DELETE", "/", &[]));
    assert!(
        !w.http("pod:b/db", "pod:a/web", "80", "DELETE", "/", &[]),
        "other peers still go through the L7 rule"
    );
}

/// toFQDNs: matchName exact and case-insensitive, matchPattern `*` within one label, trailing
/// dot ignored (pkg/fqdn/matchpattern); only addresses learned for those names are allowed.
#[test]
fn to_fqdns_match_names_and_patterns() {
    let spec = format!("{WEB}  egress:\n  - toFQDNs: [{{matchName: api.example.com}}, {{matchPattern: \"*.cdn.example.com\"}}]\n  - toEndpoints: [{{}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules: {{dns: [{{matchPattern: \"*\"}}]}}\n");
    let w = world(&cnp("a", "p", &spec));
    assert!(w.allowed("pod:a/web", "fqdn:API.Example.com.=93.184.216.34", "443"));
    assert!(w.allowed("pod:a/web", "fqdn:img.cdn.example.com=93.184.216.35", "443"));
    assert!(!w.allowed("pod:a/web", "fqdn:a.b.cdn.example.com=93.184.216.36", "443"));
    assert!(!w.allowed("pod:a/web", "fqdn:cdn.example.com=93.184.216.37", "443"));
    assert!(
        !w.allowed("pod:a/web", "ip:93.184.216.34", "443"),
        "an address not learned from DNS"
    );
}

/// DNS L7 rules judge the query names an endpoint may look up.
#[test]
fn dns_rules_filter_queries() {
    let spec = format!("{WEB}  egress:\n  - toEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: UDP}}]\n      rules: {{dns: [{{matchName: api.github.com}}, {{matchPattern: \"*.github.io\"}}]}}\n");
    let w = world(&cnp("a", "p", &spec));
    let query = |q: &str| {
        let mut f = w.flow("pod:a/web", "pod:a/client", "53/UDP");
        f.dns_query = Some(q.into());
        evaluate(&w.program, &f).allowed
    };
    assert!(query("api.github.com"));
    assert!(query("pages.github.io."));
    assert!(!query("github.com"));
}

/// toServices with a Service that has a selector stands for the pods it selects.
#[test]
fn to_services_through_service_selectors() {
    let w = world(&cnp(
        "a",
        "p",
        &format!(
            "{WEB}  egress:\n  - toServices: [{{k8sService: {{serviceName: db, namespace: b}}}}]\n"
        ),
    ));
    assert!(w.allowed("pod:a/web", "pod:b/db", "5432"));
    assert!(!w.allowed("pod:a/web", "pod:b/client", "5432"));
    let w = world(&cnp("a", "p", &format!("{WEB}  egress:\n  - toServices: [{{k8sServiceSelector: {{selector: {{matchLabels: {{tier: data}}}}}}}}]\n")));
    assert!(w.allowed("pod:a/web", "pod:b/db", "5432"));
}

/// toServices naming a Service without a selector stands for the addresses of its
/// EndpointSlices (Cilium generates CIDR rules for them).
#[test]
fn to_services_without_selector_use_endpoint_slices() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  egress:\n  - toServices: [{{k8sService: {{serviceName: ext}}}}]\n"),
    ));
    assert!(w.allowed("pod:a/web", "ip:203.0.113.7", "443"));
    assert!(!w.allowed("pod:a/web", "ip:203.0.113.8", "443"));
}

/// Kubernetes NetworkPolicy: policyTypes decide which directions are isolated; an empty
/// namespaceSelector selects pods in every namespace; ipBlock selects addresses outside.
#[test]
fn network_policy_semantics() {
    let np = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}}]\n    ports: [{port: 5432}]\n  - to: [{ipBlock: {cidr: 1.0.0.0/8, except: [1.1.1.0/24]}}]\n";
    let w = world(np);
    assert!(w.allowed("pod:a/web", "pod:b/db", "5432"));
    assert!(
        !w.allowed("pod:a/web", "pod:b/db", "5432/UDP"),
        "NetworkPolicy ports default to TCP"
    );
    assert!(!w.allowed("pod:a/web", "pod:b/db", "80"));
    assert!(w.allowed("pod:a/web", "ip:1.2.3.4", "443"));
    assert!(!w.allowed("pod:a/web", "ip:1.1.1.1", "443"));
    assert!(
        w.allowed("pod:b/db", "pod:a/web", "80"),
        "ingress is not in policyTypes"
    );
}

/// fromRequires: constraints every allowed peer must also meet (pkg/policy/api/ingress.go, up
/// to Cilium 1.18). Removed in 1.19 (cilium/cilium#42615; the CRD keeps it with MaxItems=0),
/// so `cnpc check` reports `cnpc::removed-field`; what it meant is still what cnpc evaluates.
#[test]
fn from_requires_constrains_every_allow() {
    let spec = format!("{WEB}  ingress:\n  - fromRequires: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: a}}}}]\n  - fromEntities: [cluster]\n");
    let w = world_with_errors(&cnp("a", "p", &spec), &["cnpc::removed-field"]);
    assert!(w.allowed("pod:a/client", "pod:a/web", "80"));
    assert!(!w.allowed("pod:b/client", "pod:a/web", "80"));
}

/// Traffic between endpoints of the same identity follows policy like any other traffic.
#[test]
fn traffic_to_own_identity_follows_the_policy() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"),
    ));
    assert!(!w.allowed("pod:a/web2", "pod:a/web", "80"));
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: web}}}}]\n"),
    ));
    assert!(w.allowed("pod:a/web2", "pod:a/web", "80"));
}

/// Identities: one per distinct label set, reserved ones with Cilium's numbers, cluster ones
/// from 256, and the same numbers when an unrelated workload is added.
#[test]
fn identities_are_per_label_set_and_stable_under_change() {
    let w = world("");
    let id = |p: &str| {
        parse_peer(&w.program, &w.cluster, p)
            .unwrap()
            .identity
            .unwrap()
            .0
    };
    assert_eq!(id("pod:a/web"), id("pod:a/web2"));
    assert_ne!(
        id("pod:a/client"),
        id("pod:b/client"),
        "the namespace is part of the label set"
    );
    assert_eq!(id("entity:world"), 2);
    assert_eq!(id("entity:host"), 1);
    assert!(id("pod:a/web") >= 256);
    let mut bigger = Cluster::default();
    let mut sources = cnpc_compiler::SourceMap::new();
    bigger.add_str(&mut sources, Path::new("c.yaml"), &format!("{CLUSTER}- {{apiVersion: v1, kind: Pod, metadata: {{name: new, namespace: a, labels: {{app: new}}}}}}\n"));
    let p2 = lower::build(&[], &sources, &bigger, &Default::default());
    for name in ["pod:a/web", "pod:a/client", "pod:b/client", "pod:b/db"] {
        assert_eq!(
            parse_peer(&p2, &bigger, name).unwrap().identity.unwrap().0,
            id(name),
            "{name} renumbered"
        );
    }
}

/// toServices with toPorts (current Cilium: EgressCommonRule.l3DependentL4Support has
/// "ToServices": true): the service's backends are allowed on those ports only, as Cilium
/// generates the backends' selector (or their EndpointSlice addresses) with the rule's L4.
#[test]
fn to_services_with_to_ports_allows_the_backends_on_those_ports() {
    let w = world(&cnp(
        "a",
        "p",
        &format!("{WEB}  egress:\n  - toServices:\n    - k8sService: {{serviceName: db, namespace: b}}\n    - k8sService: {{serviceName: ext, namespace: a}}\n    toPorts:\n    - ports: [{{port: \"5432\", protocol: TCP}}]\n"),
    ));
    assert!(w.allowed("pod:a/web", "pod:b/db", "5432"));
    assert!(!w.allowed("pod:a/web", "pod:b/db", "5433"));
    assert!(!w.allowed("pod:a/web", "pod:b/db", "5432/UDP"));
    assert!(!w.allowed("pod:a/web", "pod:b/client", "5432"));
    // A Service without a selector: its EndpointSlice addresses, on those ports.
    assert!(w.allowed("pod:a/web", "ip:203.0.113.7", "5432"));
    assert!(!w.allowed("pod:a/web", "ip:203.0.113.7", "443"));
}

/// An entry of a DNS rule with neither matchName nor matchPattern (`dns: [{}]`) matches no
/// name: PortRuleDNS.Sanitize accepts it and the DNS proxy builds a pattern that nothing
/// matches (pkg/fqdn/dnsproxy GeneratePattern); a port with zero DNS rules (`dns: []`) gets
/// the proxy's match-all pattern instead. Both ports are proxied.
#[test]
fn empty_dns_rule_entry_allows_no_query_and_no_dns_rule_allows_all() {
    let spec = |dns: &str| {
        format!("{WEB}  egress:\n  - toEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: UDP}}]\n      rules: {{dns: {dns}}}\n")
    };
    for (dns, allowed) in [("[{}]", false), ("[]", true)] {
        let w = world(&cnp("a", "p", &spec(dns)));
        let mut f = w.flow("pod:a/web", "pod:a/client", "53/UDP");
        f.dns_query = Some("api.github.com".into());
        let v = evaluate(&w.program, &f);
        assert_eq!(v.allowed, allowed, "dns: {dns}");
        assert_eq!(v.l7().map(|l| l.protocol), Some("dns"), "dns: {dns}");
    }
}
