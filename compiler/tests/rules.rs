//! One case per validation or lint rule that has no fixture file in policies/: a minimal policy
//! and the diagnostic code it must produce (or must not). Each names the Cilium or Kubernetes
//! check it mirrors.

use cnpc_compiler::{check, load_str, Code};

/// The codes of `yaml`'s diagnostics, without `not-enforced`, which every Kafka rule gets
/// (policies/warnings/not-enforced.yaml tests it) and would crowd the Kafka validation cases.
fn codes(yaml: &str) -> Vec<Code> {
    let r = check(load_str("case.yaml", yaml), None);
    r.diagnostics
        .iter()
        .map(|d| d.code)
        .filter(|c| *c != Code::NotEnforced)
        .collect()
}

/// A CNP around `spec_body`, which is indented by two spaces already.
fn cnp(spec_body: &str) -> String {
    format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: case\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n{spec_body}")
}

fn assert_codes(case: &str, yaml: &str, expected: &[Code]) {
    let got = codes(yaml);
    assert_eq!(got, expected, "{case}:\n{yaml}");
}

#[test]
fn egress_rule_checks() {
    // EgressCommonRule.l3DependentL4Support["ToServices"] = true in current Cilium; releases
    // before 1.17 rejected or mishandled it: accepted with a warning.
    assert_codes(
        "toServices with toPorts",
        &cnp("  egress:\n  - toServices:\n    - k8sService: {serviceName: db, namespace: x}\n    toPorts:\n    - ports: [{port: \"5432\", protocol: TCP}]\n"),
        &[Code::ReleaseDependent],
    );
    // PortRule.sanitize: "Listener is not allowed on ingress".
    assert_codes(
        "listener on ingress",
        &cnp("  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      listener: {envoyConfig: {name: cfg}, name: l}\n"),
        &[Code::UnsupportedCombination],
    );
    // PortRule.sanitize: "ServerNames are not allowed with L7 rules without TLS termination".
    assert_codes(
        "serverNames with http rules",
        &cnp("  egress:\n  - toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n      serverNames: [api.example.com]\n      rules:\n        http: [{method: GET}]\n"),
        &[Code::UnsupportedCombination],
    );
    // PortProtocol.sanitize: "DNS rules do not support port ranges".
    assert_codes(
        "dns with a port range",
        &cnp("  egress:\n  - toPorts:\n    - ports: [{port: \"53\", endPort: 54, protocol: UDP}]\n      rules:\n        dns: [{matchPattern: \"*\"}]\n"),
        &[Code::L7Protocol],
    );
    // PortRule.sanitize: "L7 rules can not be used when a port is 0".
    assert_codes(
        "http on port 0",
        &cnp("  ingress:\n  - toPorts:\n    - ports: [{port: \"0\", protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n"),
        &[Code::L7Protocol],
    );
    // L7Rules.sanitize: "multiple L7 protocol rule types specified in single rule".
    assert_codes(
        "http and kafka together",
        &cnp("  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n        kafka: [{topic: t}]\n"),
        &[Code::UnsupportedCombination],
    );
    // FQDNSelector.sanitize: only one of matchName and matchPattern.
    assert_codes(
        "matchName and matchPattern",
        &cnp("  egress:\n  - toFQDNs: [{matchName: a.com, matchPattern: \"*.a.com\"}]\n  - toEndpoints: [{}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: ANY}]\n      rules: {dns: [{matchPattern: \"*\"}]}\n"),
        &[Code::UnsupportedCombination],
    );
    // rule_validation.go: maxPorts = 40.
    let ports: String = (1..=41)
        .map(|p| format!("      - port: \"{p}\"\n"))
        .collect();
    assert_codes(
        "41 ports",
        &cnp(&format!("  ingress:\n  - toPorts:\n    - ports:\n{ports}")),
        &[Code::TooManyPorts],
    );
    // fromRequires/toRequires: MaxItems=0 since Cilium 1.19 (cilium/cilium#43167); an empty
    // list is still accepted.
    assert_codes(
        "fromRequires",
        &cnp(
            "  ingress:\n  - fromEndpoints: [{}]\n    fromRequires: [{matchLabels: {env: prod}}]\n",
        ),
        &[Code::RemovedField],
    );
    assert_codes(
        "toRequires",
        &cnp("  egress:\n  - toEndpoints: [{}]\n    toRequires: [{matchLabels: {env: prod}}]\n"),
        &[Code::RemovedField],
    );
    assert_codes(
        "empty toRequires",
        &cnp("  egress:\n  - toEndpoints: [{}]\n    toRequires: []\n"),
        &[],
    );
    // IngressRule.Validate: "L7 policy is not supported on host ingress yet"; EgressRule.Validate
    // accepts DNS (only) on host egress since Cilium 1.17.
    let ccnp = |body: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: case\nspec:\n  nodeSelector: {{}}\n{body}")
    };
    assert_codes(
        "host policy, DNS on egress",
        &ccnp("  egress:\n  - toEndpoints: [{}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: UDP}]\n      rules: {dns: [{matchPattern: \"*\"}]}\n"),
        &[Code::ReleaseDependent],
    );
    assert_codes(
        "host policy, HTTP on egress",
        &ccnp("  egress:\n  - toEndpoints: [{}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{method: GET}]}\n"),
        &[Code::L7Protocol],
    );
    assert_codes(
        "host policy, HTTP on ingress",
        &ccnp("  ingress:\n  - fromEntities: [cluster]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{method: GET}]}\n"),
        &[Code::L7Protocol],
    );
    // CIDR.Validate / CIDRRule.Validate (netip.ParsePrefix) and the CRD's Format=cidr accept
    // host bits; so does Kubernetes' ipBlock (a warning since 1.33).
    assert_codes(
        "CIDR with host bits",
        &cnp("  egress:\n  - toCIDRSet: [{cidr: 10.0.0.5/8}]\n"),
        &[Code::CidrHostBits],
    );
    assert_codes(
        "ipBlock with host bits",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n, namespace: d}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 192.168.1.7/24}}]\n",
        &[Code::CidrHostBits],
    );
    // PortRuleKafka.Sanitize: role or apiKey.
    assert_codes(
        "kafka role and apiKey",
        &cnp("  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules:\n        kafka: [{role: produce, apiKey: produce, topic: t}]\n"),
        &[Code::UnsupportedCombination],
    );
    assert_codes(
        "kafka apiKey typo",
        &cnp("  ingress:\n  - toPorts:\n    - ports: [{port: \"9092\", protocol: TCP}]\n      rules:\n        kafka: [{apiKey: prodcue}]\n"),
        &[Code::WrongType],
    );
}

#[test]
fn well_formed_rules_pass() {
    for body in [
        "  ingress:\n  - fromEndpoints: [{matchLabels: {role: frontend}}]\n    toPorts:\n    - ports: [{port: \"80\", endPort: 90, protocol: TCP}, {port: http}]\n",
        "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n  - toCIDR: [192.0.2.1, 2001:db8::/32]\n",
        "  egress:\n  - icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}]}]\n",
        "  ingressDeny:\n  - fromEntities: [world]\n  ingress:\n  - fromEntities: [all]\n",
        "  enableDefaultDeny: {ingress: false}\n  ingress:\n  - fromEntities: [cluster]\n",
        "  egress:\n  - toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n      serverNames: [one.one.one.one]\n",
    ] {
        assert_codes("valid", &cnp(body), &[]);
    }
}

#[test]
fn policy_level_checks() {
    // A cluster-scoped object has no namespace; the API server drops it.
    assert_codes(
        "ccnp with namespace",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c, namespace: x}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [cluster]}]\n",
        &[Code::IgnoredField],
    );
    assert_codes(
        "empty name",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: \"\"}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n",
        &[Code::InvalidName],
    );
    // Rule.Validate (Cilium 1.17+): "rule must have at least one of Ingress, IngressDeny,
    // Egress, EgressDeny"; `[]` counts as absent (and gets empty-section from the decoder).
    assert_codes(
        "rule without sections",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  enableDefaultDeny: {ingress: true}\n",
        &[Code::NoRules],
    );
    assert_codes(
        "rule with only empty sections",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  egress: []\n",
        &[Code::NoRules, Code::EmptySection],
    );
    assert_codes(
        "neither spec nor specs",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n",
        &[Code::MissingField],
    );
    assert_codes(
        "wrong apiVersion",
        "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{}]}\n",
        &[Code::UnsupportedApiVersion],
    );
    assert_codes(
        "duplicate key",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  endpointSelector: {}\n  ingress: [{}]\n",
        &[Code::DuplicateKey],
    );
}

#[test]
fn network_policy_checks() {
    let np = |spec: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: d}}\nspec:\n{spec}")
    };
    // Kubernetes rejects an empty peer and ipBlock beside selectors.
    assert_codes(
        "empty peer",
        &np("  podSelector: {}\n  ingress:\n  - from: [{}]\n"),
        &[Code::MissingField],
    );
    assert_codes(
        "ipBlock with podSelector",
        &np("  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]\n"),
        &[Code::UnsupportedCombination],
    );
    assert_codes(
        "no podSelector",
        &np("  ingress: [{}]\n"),
        &[Code::MissingField],
    );
    assert_codes(
        "valid",
        &np("  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{namespaceSelector: {}}]\n    ports: [{port: 5432}, {port: metrics, protocol: TCP}, {port: 8000, endPort: 8080}]\n"),
        &[],
    );
}

#[test]
fn json_and_lists_are_read() {
    let json = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "j"},
        "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}"#;
    let set = load_str("p.json", json);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    assert_eq!(set.policies.len(), 1);

    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {name: a}\n  spec: {endpointSelector: {}}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: b}\n  spec: {podSelector: {}}\n";
    let set = load_str("l.yaml", list);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    assert_eq!(set.policies.len(), 2);
    assert_eq!(set.notes.len(), 1, "{:?}", set.notes);
    assert!(set.notes[0].message.contains("ConfigMap"));
}

/// A near miss of a policy kind in a policy API group is an error (the API server rejects the
/// object, so the policy never applies); the groups' other kinds stay skipped objects.
#[test]
fn kind_typos_are_errors() {
    let doc = |api: &str, kind: &str| {
        format!("apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: case\nspec:\n  endpointSelector: {{}}\n  ingress: [{{}}]\n")
    };
    for (api, kind) in [
        ("cilium.io/v2", "CiliumClusterWideNetworkPolicy"),
        ("cilium.io/v2", "CiliumNetworkPolicys"),
        ("networking.k8s.io/v1", "NetworkPolcy"),
    ] {
        assert_codes(kind, &doc(api, kind), &[Code::KindTypo]);
    }
    for (api, kind) in [
        ("cilium.io/v2", "CiliumEgressGatewayPolicy"),
        ("cilium.io/v2alpha1", "CiliumCIDRGroup"),
        ("networking.k8s.io/v1", "Ingress"),
        ("example.com/v1", "CiliumClusterWideNetworkPolicy"),
    ] {
        assert_codes(kind, &doc(api, kind), &[]);
    }
}
