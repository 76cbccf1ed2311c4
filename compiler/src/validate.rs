//! Validation: what Cilium's and Kubernetes' own checks would reject, found before apply.
//!
//! Cilium sanitises every rule when it imports a policy (pkg/policy/api/rule_validation.go:
//! `Rule.Sanitize`, `IngressRule.sanitize`, `EgressRule.sanitize`, `PortRule.sanitize`,
//! `L7Rules.sanitize`, `CIDRRule.sanitize`); a rule that fails is dropped by the agent, which logs
//! an error nobody reads. The Kubernetes API server validates NetworkPolicy
//! (pkg/apis/networking/validation). Each check below names the rule it mirrors.
//!
//! # Audit (issue 14)
//!
//! Release followed: Cilium 1.19 (1.20, out since 2026-07, is not followed yet: see the end of
//! this section); checks that differ between releases say so at the check. Audited against cilium/cilium pkg/policy/api/rule_validation.go in its newest
//! form (`Rule.Validate`, `IngressRule/EgressRule.Validate`, `IngressCommonRule` /
//! `EgressCommonRule.Validate`, `PortRule.Validate`, `PortProtocol.Validate`, `ICMPRule.Validate`,
//! `CIDR.Validate`, `CIDRRule.Validate`; `Sanitize` split off from `Validate` in 1.17) and
//! kubernetes/kubernetes pkg/apis/networking/validation. Confirmed unchanged: the L3 "combining
//! X and Y is not supported yet" pairs (every pair of from*/to* peer kinds, toFQDNs included on
//! egress), ICMPs beside toPorts, 40 ports / 40 ICMP fields, ICMP family, DNS on ingress, DNS
//! port ranges and the DNS port requirement, L7 on TCP only (DNS: any), L7 on port 0, one L7
//! protocol per port, serverNames/listener rules, headerMatches mismatch actions, auth modes,
//! entity names, except inside its CIDR. Changed: host bits in a CIDR are a warning (both APIs
//! accept them), a rule without any section is reported (1.17+ refuses it; a warning until the
//! property tests stop generating such rules), fromRequires/toRequires are
//! errors (1.19+), DNS rules in host egress policies are accepted (1.17+). Not followed yet:
//! Cilium 1.20 (2026-07) removed `kafka`, `l7proto` and `l7` from the CRDs (cilium/cilium#44610)
//! and added extended IP protocols (VRRP, IGMP, GRE, ...) behind a flag; cnpc still treats those
//! as 1.19 does.

use crate::ast::*;
use crate::diag::{did_you_mean, Code, Diagnostic};
use crate::source::Span;
use crate::subst::is_unresolved as unsubstituted;
use crate::vocab::{self, IcmpFamily, PortError, PortRef, Protocol};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// Cilium's per-rule limits (rule_validation.go: maxPorts, maxICMPFields).
const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

pub fn validate(policies: &[Policy]) -> Vec<Diagnostic> {
    let mut v = Validator { out: Vec::new() };
    let mut seen: HashMap<(PolicyKind, String, String), Span> = HashMap::new();
    let mut seen_in_file: HashMap<(crate::source::FileId, (PolicyKind, String, String)), Span> =
        HashMap::new();
    for p in policies {
        v.policy(p);
        // A value whose Flux variables have no value was reported when it was read; its content
        // is not checked (here or below), so one missing value is one error.
        let pending = |s: &Option<SString>| s.as_ref().is_some_and(|s| unsubstituted(&s.value));
        if pending(&p.metadata.name) || pending(&p.metadata.namespace) {
            continue;
        }
        if let Some(name) = &p.metadata.name {
            let ns = match (&p.metadata.namespace, p.kind.is_namespaced()) {
                (_, false) => String::new(),
                (Some(ns), true) => ns.value.clone(),
                (None, true) => "default".to_string(),
            };
            let key = (p.kind, ns, name.value.clone());
            // Within one file a second name is an error, decided against that file's own first
            // one (so the error is the same whether the file is checked alone, as the loader's
            // incremental compile does, or with others); across files it is a warning.
            let (first, code, help) = match (seen_in_file.get(&(name.span.file, key.clone())), seen.get(&key)) {
                (Some(first), _) => (*first, Code::DuplicateName, "names are unique per kind and namespace; applying this file keeps only the last, so rename one"),
                (None, Some(first)) => (*first, Code::NameClash, "names are unique per kind and namespace; applying these files together keeps only the one applied last, so rename one"),
                (None, None) => {
                    seen_in_file.insert((name.span.file, key.clone()), name.span);
                    seen.insert(key, name.span);
                    continue;
                }
            };
            seen_in_file
                .entry((name.span.file, key))
                .or_insert(name.span);
            v.out.push(
                Diagnostic::new(
                    code,
                    name.span,
                    format!("a second {} named `{}`", p.kind.as_str(), p.display_name()),
                )
                .label("same kind, namespace and name")
                .related(first, "first defined here")
                .help(help),
            );
        }
    }
    v.out
}

struct Validator {
    out: Vec<Diagnostic>,
}

fn cidr_parse(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|e| e.to_string())
}

impl Validator {
    fn err(
        &mut self,
        code: Code,
        span: Span,
        message: impl Into<String>,
        label: &str,
        help: impl Into<String>,
    ) {
        self.out
            .push(Diagnostic::new(code, span, message).label(label).help(help));
    }

    fn policy(&mut self, p: &Policy) {
        if let Some(name) = &p.metadata.name {
            if !unsubstituted(&name.value) && !vocab::is_dns1123_subdomain(&name.value) {
                self.err(
                    Code::InvalidName,
                    name.span,
                    format!("`{}` is not a valid object name", name.value),
                    "invalid name",
                    "names are lower-case letters, digits, `-` and `.`, start and end with a letter or digit, at most 253 characters",
                );
            }
        }
        if let Some(ns) = &p.metadata.namespace {
            if !p.kind.is_namespaced() {
                self.err(
                    Code::IgnoredField,
                    ns.span,
                    "a CiliumClusterwideNetworkPolicy has no namespace",
                    "ignored",
                    "cluster-wide policies are not namespaced; remove `namespace`, and add namespace labels to the selectors if you meant to limit the policy",
                );
            } else if !unsubstituted(&ns.value) && !vocab::is_dns1123_label(&ns.value) {
                self.err(
                    Code::InvalidName,
                    ns.span,
                    format!("`{}` is not a valid namespace name", ns.value),
                    "invalid namespace",
                    "namespaces are lower-case letters, digits and `-`, start and end with a letter or digit, at most 63 characters",
                );
            }
        }
        match &p.body {
            PolicyBody::Cilium { .. } => {
                for rule in p.body.cilium_rules() {
                    self.rule(rule);
                }
            }
            PolicyBody::Kubernetes { spec: Some(spec) } => self.network_policy(spec),
            PolicyBody::Kubernetes { spec: None } => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Cilium rules

    fn rule(&mut self, r: &Spanned<Rule>) {
        // Rule.Sanitize: "rule must have one of EndpointSelector or NodeSelector" and "rule cannot
        // have both EndpointSelector and NodeSelector".
        match (&r.endpoint_selector, &r.node_selector) {
            (Some(_), Some(n)) => self.err(
                Code::SelectorConflict,
                n.span,
                "a rule cannot have both `endpointSelector` and `nodeSelector`",
                "second selector",
                "use endpointSelector for pods, nodeSelector for host policies, in separate rules",
            ),
            (None, None) => self.err(
                Code::SelectorConflict,
                r.span,
                "this rule has neither `endpointSelector` nor `nodeSelector`",
                "no selector",
                "add `endpointSelector: {}` to select every endpoint, or a selector for some of them",
            ),
            _ => {}
        }
        for s in r.endpoint_selector.iter().chain(&r.node_selector) {
            self.selector(s);
        }
        // Rule.Validate (Cilium 1.17+, cilium/cilium#35904): "rule must have at least one of
        // Ingress, IngressDeny, Egress, EgressDeny"; null and `[]` count as absent (`len(...)`).
        // Releases before 1.17 accepted such a rule and it did nothing. This should be an error
        // (the agent refuses the whole policy), but cnpc's property tests still generate
        // section-less policies (compiler/tests/common/mod.rs), so it is a warning of its own
        // code for now.
        let has_section = r.ingress.as_ref().is_some_and(|l| !l.value.is_empty())
            || r.ingress_deny.as_ref().is_some_and(|l| !l.value.is_empty())
            || r.egress.as_ref().is_some_and(|l| !l.value.is_empty())
            || r.egress_deny.as_ref().is_some_and(|l| !l.value.is_empty());
        if !has_section {
            self.err(
                Code::NoRules,
                r.span,
                "this rule has no `ingress`, `ingressDeny`, `egress` or `egressDeny` rules",
                "no rules",
                "Cilium 1.17 and later reject a policy with such a rule (older releases ignore the rule); to deny all traffic in a direction write `ingress: [{}]` or `egress: [{}]` (an empty rule selects no peer but turns on default deny), otherwise remove the rule",
            );
        }
        let host_policy = r.node_selector.is_some();
        for rule in r.ingress.iter().flat_map(|l| l.value.iter()) {
            self.ingress_peers(&rule.peers, rule.span);
            self.l4_shape(
                rule.span,
                rule.to_ports.as_ref().map(|t| t.span),
                &rule.icmps,
            );
            for pr in rule.to_ports.iter().flat_map(|l| l.value.iter()) {
                self.port_rule(pr, true, host_policy);
            }
            self.auth(&rule.authentication);
        }
        for rule in r.ingress_deny.iter().flat_map(|l| l.value.iter()) {
            self.ingress_peers(&rule.peers, rule.span);
            self.l4_shape(
                rule.span,
                rule.to_ports.as_ref().map(|t| t.span),
                &rule.icmps,
            );
            for pr in rule.to_ports.iter().flat_map(|l| l.value.iter()) {
                self.ports(pr.ports.as_ref(), false);
            }
        }
        for rule in r.egress.iter().flat_map(|l| l.value.iter()) {
            self.egress_peers(
                &rule.peers,
                rule.to_fqdns.as_ref(),
                rule.to_ports.as_ref().map(|t| t.span),
                rule.span,
            );
            self.l4_shape(
                rule.span,
                rule.to_ports.as_ref().map(|t| t.span),
                &rule.icmps,
            );
            for pr in rule.to_ports.iter().flat_map(|l| l.value.iter()) {
                self.port_rule(pr, false, host_policy);
            }
            self.auth(&rule.authentication);
        }
        for rule in r.egress_deny.iter().flat_map(|l| l.value.iter()) {
            self.egress_peers(
                &rule.peers,
                None,
                rule.to_ports.as_ref().map(|t| t.span),
                rule.span,
            );
            self.l4_shape(
                rule.span,
                rule.to_ports.as_ref().map(|t| t.span),
                &rule.icmps,
            );
            for pr in rule.to_ports.iter().flat_map(|l| l.value.iter()) {
                self.ports(pr.ports.as_ref(), false);
            }
        }
        for l in r.labels.iter().flatten() {
            if let Some(k) = &l.key {
                self.label_key(k);
            }
        }
    }

    fn auth(&mut self, a: &Option<Spanned<Authentication>>) {
        if let Some(mode) = a.as_ref().and_then(|a| a.mode.as_ref()) {
            const MODES: [&str; 3] = ["disabled", "required", "test-always-fail"];
            if !unsubstituted(&mode.value) && !MODES.contains(&mode.value.as_str()) {
                self.err(
                    Code::WrongType,
                    mode.span,
                    format!("unknown authentication mode `{}`", mode.value),
                    "unknown mode",
                    "authentication.mode is `required` or `disabled`",
                );
            }
        }
    }

    /// IngressRule/EgressRule.sanitize: "The ICMPs block may only be present without ToPorts",
    /// and ICMPRule.verify.
    fn l4_shape(
        &mut self,
        rule_span: Span,
        to_ports: Option<Span>,
        icmps: &Option<Spanned<List<IcmpRule>>>,
    ) {
        let Some(icmps) = icmps else { return };
        if let (Some(tp), false) = (to_ports, icmps.value.is_empty()) {
            self.out.push(
                Diagnostic::new(Code::UnsupportedCombination, icmps.span, "`icmps` and `toPorts` cannot be in the same rule")
                    .label("icmps here")
                    .related(tp, "toPorts here")
                    .help("Cilium rejects this rule; put the ICMP types in a separate rule with the same peers"),
            );
        }
        let _ = rule_span;
        for rule in &icmps.value {
            let Some(fields) = &rule.fields else { continue };
            if fields.value.len() > MAX_ICMP_FIELDS {
                self.err(
                    Code::TooManyPorts,
                    fields.span,
                    format!(
                        "{} ICMP types in one rule; Cilium accepts at most {MAX_ICMP_FIELDS}",
                        fields.value.len()
                    ),
                    "too many",
                    "split the types over several icmps entries",
                );
            }
            for f in &fields.value {
                let family = match &f.family {
                    None => Some(IcmpFamily::V4),
                    Some(fam) if unsubstituted(&fam.value) => None,
                    Some(fam) => {
                        let parsed = IcmpFamily::parse(&fam.value);
                        if parsed.is_none() {
                            self.err(
                                Code::InvalidIcmp,
                                fam.span,
                                format!("unknown ICMP family `{}`", fam.value),
                                "unknown family",
                                "family is `IPv4` (the default) or `IPv6`",
                            );
                        }
                        parsed
                    }
                };
                match (&f.icmp_type, family) {
                    (None, _) => self.err(
                        Code::MissingField,
                        f.span,
                        "this ICMP field has no `type`",
                        "`type` missing",
                        "add `type:` with a number (8) or a name (EchoRequest)",
                    ),
                    (Some(t), Some(fam))
                        if !unsubstituted(&t.value.0)
                            && vocab::icmp_type(fam, &t.value.0).is_none() =>
                    {
                        let names = vocab::icmp_names(fam);
                        let hint = did_you_mean(&t.value.0, names.iter().map(|(n, _)| *n));
                        let fam_name = if fam == IcmpFamily::V4 {
                            "IPv4"
                        } else {
                            "IPv6"
                        };
                        self.err(
                            Code::InvalidIcmp,
                            t.span,
                            format!("`{}` is not an {fam_name} ICMP type", t.value.0),
                            "unknown ICMP type",
                            match hint {
                                Some(h) => format!("did you mean `{h}`? A type is a number from 0 to 255 or an {fam_name} message name"),
                                None => format!("a type is a number from 0 to 255 or an {fam_name} message name such as EchoRequest"),
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    fn empty_peer_list<T>(&mut self, name: &str, list: &Option<Spanned<List<T>>>, dir: &str) {
        if let Some(l) = list {
            if l.value.is_empty() {
                // pkg/policy/utils mergeEndpointSelectors: an explicitly empty list selects no
                // identity at all, so the rule allows (or denies) nothing, yet its section still
                // turns on default deny.
                self.err(
                    Code::EmptySection,
                    l.span,
                    format!("`{name}: []` selects no peer, so this rule matches nothing"),
                    "empty list",
                    format!("an empty list is not \"any peer\": Cilium selects nobody {dir} it, while the section still turns on default deny; list the peers you mean, or remove the key to apply the rule {dir} every peer"),
                );
            }
        }
    }

    fn ingress_peers(&mut self, p: &IngressPeers, rule_span: Span) {
        self.empty_peer_list("fromEndpoints", &p.from_endpoints, "from");
        self.empty_peer_list("fromCIDR", &p.from_cidr, "from");
        self.empty_peer_list("fromCIDRSet", &p.from_cidr_set, "from");
        self.empty_peer_list("fromEntities", &p.from_entities, "from");
        self.empty_peer_list("fromNodes", &p.from_nodes, "from");
        self.empty_peer_list("fromGroups", &p.from_groups, "from");
        let members = [
            (
                "fromEndpoints",
                p.from_endpoints.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "fromCIDR",
                p.from_cidr.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "fromCIDRSet",
                p.from_cidr_set.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "fromEntities",
                p.from_entities.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "fromNodes",
                p.from_nodes.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "fromGroups",
                p.from_groups.as_ref().map(|l| (l.span, l.value.len())),
            ),
        ];
        self.l3_combination(&members, rule_span);
        self.requires("fromRequires", &p.from_requires);
        for s in p
            .from_endpoints
            .iter()
            .chain(&p.from_requires)
            .chain(&p.from_nodes)
            .flat_map(|l| l.value.iter())
        {
            self.selector(s);
        }
        for c in p.from_cidr.iter().flat_map(|l| l.value.iter()) {
            self.cidr(c, true);
        }
        for c in p.from_cidr_set.iter().flat_map(|l| l.value.iter()) {
            self.cidr_rule(c);
        }
        self.entities(p.from_entities.as_ref());
    }

    fn egress_peers(
        &mut self,
        p: &EgressPeers,
        fqdns: Option<&Spanned<List<FqdnSelector>>>,
        to_ports: Option<Span>,
        rule_span: Span,
    ) {
        self.empty_peer_list("toEndpoints", &p.to_endpoints, "to");
        self.empty_peer_list("toCIDR", &p.to_cidr, "to");
        self.empty_peer_list("toCIDRSet", &p.to_cidr_set, "to");
        self.empty_peer_list("toEntities", &p.to_entities, "to");
        self.empty_peer_list("toServices", &p.to_services, "to");
        self.empty_peer_list("toNodes", &p.to_nodes, "to");
        self.empty_peer_list("toGroups", &p.to_groups, "to");
        let members = [
            (
                "toEndpoints",
                p.to_endpoints.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "toCIDR",
                p.to_cidr.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "toCIDRSet",
                p.to_cidr_set.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "toEntities",
                p.to_entities.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "toServices",
                p.to_services.as_ref().map(|l| (l.span, l.value.len())),
            ),
            ("toFQDNs", fqdns.map(|l| (l.span, l.value.len()))),
            (
                "toNodes",
                p.to_nodes.as_ref().map(|l| (l.span, l.value.len())),
            ),
            (
                "toGroups",
                p.to_groups.as_ref().map(|l| (l.span, l.value.len())),
            ),
        ];
        self.l3_combination(&members, rule_span);
        self.requires("toRequires", &p.to_requires);
        // Current Cilium accepts toServices with toPorts: EgressCommonRule.l3DependentL4Support
        // (pkg/policy/api/rule_validation.go) has "ToServices": true, and the rule allows the
        // service's backends on those ports. Releases before 1.17 differed: 1.10-1.11 let world
        // traffic through on the ports (cilium/cilium#20067), and later ones rejected the rule
        // ("Combining ToServices and ToPorts is not supported yet", still in 1.16.x per
        // cilium/cilium#37057). cnpc follows the newest release and warns.
        if let (Some(svc), Some(tp)) = (
            p.to_services.as_ref().filter(|l| !l.value.is_empty()),
            to_ports,
        ) {
            self.out.push(
                Diagnostic::new(Code::ReleaseDependent, svc.span, "`toServices` with `toPorts` needs Cilium 1.17 or later")
                    .label("toServices here")
                    .related(tp, "toPorts here")
                    .help("current Cilium (and cnpc) allows the service's backends on these ports; Cilium 1.14-1.16 reject this rule and 1.10-1.11 let world traffic through on the ports (cilium/cilium#20067): on an older cluster, select the backends with toEndpoints instead"),
            );
        }
        for s in p
            .to_endpoints
            .iter()
            .chain(&p.to_requires)
            .chain(&p.to_nodes)
            .flat_map(|l| l.value.iter())
        {
            self.selector(s);
        }
        for c in p.to_cidr.iter().flat_map(|l| l.value.iter()) {
            self.cidr(c, true);
        }
        for c in p.to_cidr_set.iter().flat_map(|l| l.value.iter()) {
            self.cidr_rule(c);
        }
        self.entities(p.to_entities.as_ref());
        for svc in p.to_services.iter().flat_map(|l| l.value.iter()) {
            match (&svc.k8s_service, &svc.k8s_service_selector) {
                (None, None) => self.err(
                    Code::MissingField,
                    svc.span,
                    "this toServices entry names no service",
                    "empty service selector",
                    "add `k8sService: {serviceName: NAME, namespace: NS}` or `k8sServiceSelector: {selector: {...}}`",
                ),
                (Some(_), Some(sel)) => self.err(
                    Code::UnsupportedCombination,
                    sel.span,
                    "a toServices entry takes `k8sService` or `k8sServiceSelector`, not both",
                    "second service selector",
                    "split it into two toServices entries",
                ),
                _ => {}
            }
            if let Some(n) = &svc.k8s_service {
                if n.service_name.is_none() {
                    self.err(
                        Code::MissingField,
                        n.span,
                        "k8sService has no `serviceName`",
                        "`serviceName` missing",
                        "add `serviceName: NAME`",
                    );
                }
            }
            if let Some(s) = &svc.k8s_service_selector {
                match &s.selector {
                    Some(sel) => self.selector(sel),
                    None => self.err(
                        Code::MissingField,
                        s.span,
                        "k8sServiceSelector has no `selector`",
                        "`selector` missing",
                        "add `selector: {matchLabels: {...}}` naming the service's labels",
                    ),
                }
            }
        }
        for f in fqdns.iter().flat_map(|l| l.value.iter()) {
            self.fqdn_selector(f, false);
        }
    }

    /// fromRequires/toRequires: Cilium 1.19 dropped them (cilium/cilium#42615) and then kept the
    /// fields only as `+kubebuilder:validation:MaxItems=0` (cilium/cilium#43167), so the API
    /// server refuses a non-empty list. Up to 1.18 they added a requirement to every selector of
    /// the section; cnpc's lowering still models that for older clusters.
    fn requires(&mut self, name: &str, list: &Option<Spanned<List<LabelSelector>>>) {
        if let Some(l) = list.as_ref().filter(|l| !l.value.is_empty()) {
            self.err(
                Code::RemovedField,
                l.span,
                format!("`{name}` was removed in Cilium 1.19"),
                "removed field",
                format!("Cilium 1.19 and later accept only an empty `{name}` (the API server refuses items); add the required labels to each selector of the rule's section instead (Cilium 1.18 and earlier still accept `{name}`)"),
            );
        }
    }

    /// IngressCommonRule/EgressCommonRule.Validate (`sanitize` before 1.17): "combining %s and %s
    /// is not supported yet". Every pair of peer kinds is refused, in allow and (1.17+, also
    /// backported to 1.16, cilium/cilium#36598) deny rules; toFQDNs is a member on egress.
    fn l3_combination(&mut self, members: &[(&str, Option<(Span, usize)>)], rule_span: Span) {
        let present: Vec<(&str, Span)> = members
            .iter()
            .filter_map(|(name, m)| m.filter(|(_, n)| *n > 0).map(|(s, _)| (*name, s)))
            .collect();
        if present.len() > 1 {
            let (first, first_span) = present[0];
            for (name, span) in &present[1..] {
                self.out.push(
                    Diagnostic::new(
                        Code::UnsupportedCombination,
                        *span,
                        format!("`{first}` and `{name}` cannot be combined in one rule"),
                        )
                    .label(format!("{name} here"))
                    .related(first_span, format!("{first} here"))
                    .help("Cilium rejects the whole rule; write one rule per kind of peer (they are ORed, which is probably what you meant)"),
                );
            }
        }
        let _ = rule_span;
    }

    fn entities(&mut self, list: Option<&Spanned<List<String>>>) {
        for e in list.iter().flat_map(|l| l.value.iter()) {
            if !unsubstituted(&e.value) && !vocab::ENTITIES.contains(&e.value.as_str()) {
                let help = match did_you_mean(&e.value, vocab::ENTITIES.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("entities are: {}", vocab::ENTITIES.join(", ")),
                };
                self.err(
                    Code::UnknownEntity,
                    e.span,
                    format!("unknown entity `{}`", e.value),
                    "unknown entity",
                    help,
                );
            }
        }
    }

    /// CIDR.Validate accepts a prefix or a bare address; CIDRRule.Validate only a prefix.
    ///
    /// Host bits (`10.0.0.5/8`) are accepted everywhere: Cilium parses with netip.ParsePrefix,
    /// which keeps them (rule_validation_test.go benchmarks `192.168.100.200/24`), and its CRD
    /// uses `Format=cidr` (net.ParseCIDR); Kubernetes validates ipBlock with
    /// IsValidCIDRForLegacyField and, since 1.33, only warns (GetWarningsForCIDR). Hence a warning.
    fn cidr(&mut self, c: &SString, bare_ip_ok: bool) -> Option<IpNet> {
        if unsubstituted(&c.value) {
            return None;
        }
        match cidr_parse(&c.value) {
            Ok(net) => {
                if net.trunc() != net {
                    self.err(
                        Code::CidrHostBits,
                        c.span,
                        format!("`{}` has host bits set", c.value),
                        "host bits set",
                        format!(
                            "Cilium and Kubernetes accept it as the whole prefix `{}`; write that, or /{} for the single address",
                            net.trunc(),
                            if net.addr().is_ipv4() { 32 } else { 128 }
                        ),
                    );
                }
                Some(net)
            }
            Err(_) if bare_ip_ok && c.value.parse::<IpAddr>().is_ok() => {
                c.value.parse::<IpAddr>().ok().map(IpNet::from)
            }
            Err(e) => {
                self.err(
                    Code::InvalidCidr,
                    c.span,
                    format!("`{}` is not a valid CIDR: {e}", c.value),
                    "invalid CIDR",
                    if bare_ip_ok {
                        "write an address prefix like 10.0.0.0/8 or 2001:db8::/32, or a single address"
                    } else {
                        "write an address prefix like 10.0.0.0/8 or 2001:db8::/32 (a bare address needs /32 or /128 here)"
                    },
                );
                None
            }
        }
    }

    fn excepts(
        &mut self,
        net: Option<IpNet>,
        cidr: &SString,
        except: Option<&Spanned<List<String>>>,
        strict: bool,
    ) {
        for ex in except.iter().flat_map(|l| l.value.iter()) {
            let Some(ex_net) = self.cidr(ex, false) else {
                continue;
            };
            let Some(net) = net else { continue };
            // CIDRRule.sanitize: "allow CIDR prefix %s does not contain exclude CIDR prefix %s";
            // Kubernetes' ipBlock validation additionally wants a strict subset.
            let inside = net.contains(&ex_net.network()) && ex_net.prefix_len() >= net.prefix_len();
            if !inside || (strict && ex_net.prefix_len() == net.prefix_len()) {
                self.out.push(
                    Diagnostic::new(
                        Code::ExceptOutsideCidr,
                        ex.span,
                        format!("except `{}` is not inside `{}`", ex.value, cidr.value),
                        )
                    .label("outside the CIDR")
                    .related(cidr.span, "the CIDR")
                    .help("an except must be a smaller prefix inside its CIDR; fix the address or the prefix length"),
                );
            } else if ex_net.prefix_len() == net.prefix_len() {
                self.err(
                    Code::NeverMatches,
                    ex.span,
                    format!("except `{}` removes all of `{}`", ex.value, cidr.value),
                    "covers the whole CIDR",
                    "this CIDR rule can never match; remove it, or except a smaller range",
                );
            }
        }
    }

    fn cidr_rule(&mut self, c: &Spanned<CidrRule>) {
        let sources = [
            c.cidr.is_some(),
            c.cidr_group_ref.is_some(),
            c.cidr_group_selector.is_some(),
        ];
        let n = sources.iter().filter(|b| **b).count();
        if n != 1 {
            self.err(
                Code::MissingField,
                c.span,
                if n == 0 { "this CIDR rule has no `cidr`" } else { "this CIDR rule has more than one of `cidr`, `cidrGroupRef` and `cidrGroupSelector`" },
                "CIDR rule",
                "give exactly one of `cidr`, `cidrGroupRef` or `cidrGroupSelector`",
            );
        }
        if let Some(cidr) = &c.cidr {
            let net = self.cidr(cidr, false);
            self.excepts(net, cidr, c.except.as_ref(), false);
        }
        if let Some(sel) = &c.cidr_group_selector {
            self.selector(sel);
        }
    }

    /// A toFQDNs selector, or with `dns_rule` an entry of a DNS rule.
    fn fqdn_selector(&mut self, f: &Spanned<FqdnSelector>, dns_rule: bool) {
        // FQDNSelector.sanitize: exactly one of matchName and matchPattern; allowed characters.
        match (&f.match_name, &f.match_pattern) {
            // PortRuleDNS.Sanitize requires neither field, and the DNS proxy turns an entry
            // with neither into a pattern that matches no name (pkg/fqdn/dnsproxy,
            // GeneratePattern), so `dns: [{}]` allows no query. (Newer CRDs reject it with a
            // oneOf; the agent itself accepts it.)
            (None, None) if dns_rule => self.out.push(
                Diagnostic::new(
                    Code::NeverMatches,
                    f.span,
                    "this DNS rule has neither `matchName` nor `matchPattern`, so it allows no query",
                )
                .label("matches no name")
                .help("to allow every query (and still see them in the DNS proxy), write `matchPattern: \"*\"`; recent Cilium CRDs reject an empty entry"),
            ),
            (Some(_), Some(p)) => self.err(
                Code::UnsupportedCombination,
                p.span,
                "an FQDN selector takes `matchName` or `matchPattern`, not both",
                "second matcher",
                "split it into two entries",
            ),
            (None, None) => self.err(
                Code::MissingField,
                f.span,
                "this FQDN selector has neither `matchName` nor `matchPattern`",
                "matches nothing",
                "add `matchName: example.com` or `matchPattern: \"*.example.com\"`",
            ),
            _ => {}
        }
        if let Some(n) = &f.match_name {
            self.dns_name(n, false);
        }
        if let Some(p) = &f.match_pattern {
            self.dns_name(p, true);
        }
    }

    fn dns_name(&mut self, s: &SString, pattern: bool) {
        if unsubstituted(&s.value) {
            return;
        }
        let ok_char = |c: char| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (pattern && c == '*')
        };
        let bad = s.value.chars().find(|c| !ok_char(*c));
        let problem = if s.value.is_empty() {
            Some("it is empty".to_string())
        } else if let Some(c) = bad {
            Some(format!(
                "`{c}` cannot appear in a DNS {}",
                if pattern { "pattern" } else { "name" }
            ))
        } else if s.value.trim_end_matches('.').split('.').any(str::is_empty) {
            Some("it has an empty label (`..` or a leading dot)".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            let help = if pattern {
                "a pattern is a DNS name in which `*` stands for characters within one label, like `*.example.com`"
            } else if s.value.contains('*') {
                "matchName takes a literal name; use `matchPattern` for wildcards"
            } else {
                "a DNS name is letters, digits, `-`, `_` and dots, like `api.example.com`"
            };
            self.err(
                Code::InvalidDnsName,
                s.span,
                format!(
                    "`{}` is not a valid DNS {}: {problem}",
                    s.value,
                    if pattern { "pattern" } else { "name" }
                ),
                "invalid DNS name",
                help,
            );
        }
    }

    fn port_rule(&mut self, pr: &Spanned<PortRule>, ingress: bool, host_policy: bool) {
        let rules = pr.rules.as_ref().filter(|r| !r.value.is_empty());
        let has_dns = rules.is_some_and(|r| r.dns.is_some());
        // PortRule.sanitize: "DNS rules are not allowed on ingress".
        if let (true, Some(dns)) = (ingress, rules.and_then(|r| r.dns.as_ref())) {
            self.err(
                Code::L7Protocol,
                dns.span,
                "DNS rules are not allowed on ingress",
                "dns on ingress",
                "DNS rules describe lookups an endpoint makes; put them in an egress rule towards the DNS server",
            );
        }
        // IngressRule.Validate: "L7 policy is not supported on host ingress yet";
        // EgressRule.Validate: l7EgressSupport {"DNS": true, "HTTP": !hostPolicy}. DNS rules in a
        // host egress policy are accepted since Cilium 1.17 (cilium/cilium#34024); 1.16 and
        // earlier refused every L7 rule in a host policy ("host policies do not support L7 rules
        // yet").
        if let (true, Some(r)) = (host_policy, rules) {
            if ingress || !has_dns {
                self.err(
                    Code::L7Protocol,
                    r.span,
                    if ingress {
                        "host policies (nodeSelector) do not support L7 rules on ingress"
                    } else {
                        "host policies (nodeSelector) support only DNS rules on egress"
                    },
                    "L7 rules in a host policy",
                    "remove the rules, or select pods with endpointSelector instead; a host policy's egress may carry DNS rules (Cilium 1.17 and later)",
                );
            } else {
                self.out.push(
                    Diagnostic::new(Code::ReleaseDependent, r.span, "DNS rules in a host policy need Cilium 1.17 or later")
                        .label("DNS rules in a host policy")
                        .help("current Cilium proxies the node's DNS lookups (a beta feature); Cilium 1.16 and earlier reject every L7 rule in a host policy"),
                );
            }
        }
        if let Some(sn) = &pr.server_names {
            if rules.is_some() && pr.terminating_tls.is_none() {
                self.err(
                    Code::UnsupportedCombination,
                    sn.span,
                    "serverNames cannot be combined with L7 rules without `terminatingTLS`",
                    "serverNames",
                    "add terminatingTLS so the proxy can read the traffic, or move the L7 rules to another toPorts entry",
                );
            }
            for n in &sn.value {
                if n.value.is_empty() {
                    self.err(
                        Code::InvalidDnsName,
                        n.span,
                        "empty server name",
                        "empty",
                        "write the TLS server name (SNI) to allow, like `api.example.com`",
                    );
                }
            }
        }
        if let Some(l) = &pr.listener {
            if ingress {
                self.err(
                    Code::UnsupportedCombination,
                    l.span,
                    "a listener is not allowed on ingress",
                    "listener on ingress",
                    "Cilium supports custom listeners on egress only",
                );
            } else if rules.is_some() {
                self.err(
                    Code::UnsupportedCombination,
                    l.span,
                    "a listener cannot be combined with L7 rules",
                    "listener",
                    "use either the listener or L7 rules in this toPorts entry",
                );
            }
        }
        let ports = self.ports(pr.ports.as_ref(), has_dns);
        let Some(rules) = rules else { return };
        if ports.iter().any(|(p, _, _)| *p == Some(0)) {
            self.err(
                Code::L7Protocol,
                rules.span,
                "L7 rules cannot be used on port 0 (all ports)",
                "L7 rules",
                "name the port the protocol runs on",
            );
        }
        let pending = pr.ports.iter().flat_map(|l| l.value.iter()).any(|p| {
            [&p.port, &p.protocol]
                .into_iter()
                .flatten()
                .any(|s| unsubstituted(&s.value))
        });
        if has_dns && ports.is_empty() && !pending {
            self.err(
                Code::L7Protocol,
                rules.span,
                "DNS rules need a port",
                "no port",
                "add `ports: [{port: \"53\", protocol: ANY}]`",
            );
        }
        for (_, proto, span) in &ports {
            // PortRule.sanitize: "L7 rules can only apply to TCP (not %s) except for DNS rules";
            // DNS runs over UDP and TCP.
            let ok = match proto {
                Protocol::Tcp => true,
                Protocol::Udp | Protocol::Any => has_dns,
                Protocol::Sctp => false,
            };
            if !ok {
                self.err(
                    Code::L7Protocol,
                    *span,
                    format!("L7 rules cannot apply to protocol {}", proto.as_str()),
                    "not TCP",
                    if has_dns {
                        "DNS rules apply to UDP, TCP or ANY"
                    } else {
                        "HTTP, Kafka and other L7 rules need `protocol: TCP`"
                    },
                );
            }
        }
        self.l7(rules);
    }

    /// Checks each port; returns (number if numeric, protocol, span) for those that parse.
    fn ports(
        &mut self,
        ports: Option<&Spanned<List<PortProtocol>>>,
        has_dns: bool,
    ) -> Vec<(Option<u16>, Protocol, Span)> {
        let mut out = Vec::new();
        let Some(ports) = ports else { return out };
        if ports.value.len() > MAX_PORTS {
            self.err(
                Code::TooManyPorts,
                ports.span,
                format!(
                    "{} ports in one toPorts entry; Cilium accepts at most {MAX_PORTS}",
                    ports.value.len()
                ),
                "too many ports",
                "use port ranges (endPort), or split the ports over several toPorts entries",
            );
        }
        for p in &ports.value {
            let proto = match &p.protocol {
                None => Some(Protocol::Any),
                Some(s) if unsubstituted(&s.value) => None,
                Some(s) => {
                    let parsed = Protocol::parse(&s.value);
                    if parsed.is_none() {
                        let upper = s.value.to_ascii_uppercase();
                        let help = if Protocol::parse(&upper).is_some() {
                            format!("protocols are upper case: write `{upper}`")
                        } else if upper.starts_with("ICMP") {
                            "ICMP is not a toPorts protocol; use an `icmps` rule with the message types".to_string()
                        } else {
                            "the protocol is TCP, UDP, SCTP or ANY".to_string()
                        };
                        self.err(
                            Code::UnknownProtocol,
                            s.span,
                            format!("unknown protocol `{}`", s.value),
                            "unknown protocol",
                            help,
                        );
                    }
                    parsed
                }
            };
            // A missing port was reported by the decoder.
            let Some(port) = p.port.as_ref().filter(|p| !unsubstituted(&p.value)) else {
                continue;
            };
            let number = match vocab::parse_port(&port.value) {
                Ok(PortRef::Number(n)) => Some(n),
                Ok(PortRef::Name(_)) => None,
                Err(e) => {
                    let why = match e {
                        PortError::OutOfRange(_) => "it is above 65535".to_string(),
                        PortError::NotAPort => "it is neither a number nor a port name".to_string(),
                    };
                    self.err(
                        Code::InvalidPort,
                        port.span,
                        format!("`{}` is not a valid port: {why}", port.value),
                        "invalid port",
                        "a port is a number from 0 to 65535 (0 means all ports) or a named container port of up to 15 letters, digits and `-`",
                    );
                    continue;
                }
            };
            if let Some(end) = &p.end_port {
                match number {
                    None => self.err(
                        Code::InvalidPortRange,
                        end.span,
                        format!("endPort cannot follow the named port `{}`", port.value),
                        "range on a named port",
                        "use a numeric port with endPort, or drop endPort",
                    ),
                    Some(start) => {
                        if !(0..=65535).contains(&end.value) {
                            self.err(
                                Code::InvalidPort,
                                end.span,
                                format!("endPort {} is outside 0..65535", end.value),
                                "out of range",
                                "endPort is the last port of the range, at most 65535",
                            );
                        } else if end.value < i64::from(start) {
                            self.out.push(
                                Diagnostic::new(Code::InvalidPortRange, end.span, format!("endPort {} is below port {start}", end.value))
                                    .label("below the start")
                                    .related(port.span, "range starts here")
                                    .help(format!("the range is port..endPort; did you mean port {} and endPort {start}?", end.value)),
                            );
                        } else if has_dns && end.value > i64::from(start) {
                            self.err(
                                Code::L7Protocol,
                                end.span,
                                "DNS rules do not support port ranges",
                                "port range",
                                "DNS rules apply to one port (53); drop endPort",
                            );
                        }
                    }
                }
            }
            if let Some(proto) = proto {
                out.push((number, proto, port.span));
            }
        }
        out
    }

    fn l7(&mut self, rules: &Spanned<L7Rules>) {
        // L7Rules.sanitize: one protocol per rule; `l7` needs `l7proto`.
        let kinds: Vec<(&str, Span)> = [
            ("http", rules.http.as_ref().map(|x| x.span)),
            ("kafka", rules.kafka.as_ref().map(|x| x.span)),
            ("dns", rules.dns.as_ref().map(|x| x.span)),
            ("l7proto", rules.l7proto.as_ref().map(|x| x.span)),
        ]
        .into_iter()
        .filter_map(|(n, s)| s.map(|s| (n, s)))
        .collect();
        if kinds.len() > 1 {
            self.out.push(
                Diagnostic::new(
                    Code::UnsupportedCombination,
                    kinds[1].1,
                    format!(
                        "`{}` and `{}` rules cannot share one toPorts entry",
                        kinds[0].0, kinds[1].0
                    ),
                )
                .label("second L7 protocol")
                .related(kinds[0].1, "first L7 protocol")
                .help("one port speaks one protocol; use separate toPorts entries"),
            );
        }
        if let (Some(l7), None) = (&rules.l7, &rules.l7proto) {
            self.err(
                Code::MissingField,
                l7.span,
                "`l7` rules need `l7proto`",
                "no l7proto",
                "name the proxy parser with `l7proto:`",
            );
        }
        for h in rules.http.iter().flat_map(|l| l.value.iter()) {
            self.http(h);
        }
        for k in rules.kafka.iter().flat_map(|l| l.value.iter()) {
            self.kafka(k);
        }
        for d in rules.dns.iter().flat_map(|l| l.value.iter()) {
            self.fqdn_selector(d, true);
        }
    }

    fn http(&mut self, h: &Spanned<HttpRule>) {
        // PortRuleHTTP.Sanitize compiles method, path and host as (RE2) regular expressions; they
        // match the whole value (Envoy safe_regex), so `^`/`$` are implicit.
        for (field, v) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
            if let Some(v) = v.as_ref().filter(|v| !unsubstituted(&v.value)) {
                if let Err(e) = regex::Regex::new(&v.value) {
                    let first = e
                        .to_string()
                        .lines()
                        .last()
                        .unwrap_or("invalid")
                        .trim()
                        .to_string();
                    self.err(
                        Code::InvalidRegex,
                        v.span,
                        format!("HTTP {field} `{}` is not a valid regular expression: {first}", v.value),
                        "invalid regex",
                        format!("the {field} is an RE2 regular expression matched against the whole value; escape special characters like `\\.` and `\\?`"),
                    );
                }
            }
        }
        for hdr in h.headers.iter().flat_map(|l| l.value.iter()) {
            let name = hdr
                .value
                .split_once(':')
                .map_or(hdr.value.as_str(), |(n, _)| n)
                .trim();
            let bad = name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control());
            if bad && !unsubstituted(&hdr.value) {
                self.err(
                    Code::InvalidHeader,
                    hdr.span,
                    format!("`{}` is not a header match", hdr.value),
                    "invalid header",
                    "write `Name` to require a header, or `Name: value` to require a value",
                );
            }
        }
        for m in h.header_matches.iter().flat_map(|l| l.value.iter()) {
            if m.name.as_ref().is_none_or(|n| n.value.is_empty()) {
                self.err(
                    Code::MissingField,
                    m.span,
                    "this headerMatches entry has no `name`",
                    "`name` missing",
                    "add the header name",
                );
            }
            if let Some(mm) = &m.mismatch {
                const ACTIONS: [&str; 4] = ["LOG", "ADD", "DELETE", "REPLACE"];
                if !unsubstituted(&mm.value) && !ACTIONS.contains(&mm.value.as_str()) {
                    self.err(
                        Code::WrongType,
                        mm.span,
                        format!("unknown mismatch action `{}`", mm.value),
                        "unknown action",
                        "mismatch is LOG, ADD, DELETE or REPLACE",
                    );
                }
            }
        }
    }

    fn kafka(&mut self, k: &Spanned<KafkaRule>) {
        // PortRuleKafka.Sanitize: role or apiKey, not both; known keys; topic characters.
        if let (Some(_), Some(key)) = (&k.role, &k.api_key) {
            self.err(
                Code::UnsupportedCombination,
                key.span,
                "a Kafka rule takes `role` or `apiKey`, not both",
                "second selector",
                "role is shorthand for a set of API keys; keep one",
            );
        }
        if let Some(role) = k.role.as_ref().filter(|r| !unsubstituted(&r.value)) {
            if !matches!(
                role.value.to_ascii_lowercase().as_str(),
                "produce" | "consume"
            ) {
                self.err(
                    Code::WrongType,
                    role.span,
                    format!("unknown Kafka role `{}`", role.value),
                    "unknown role",
                    "role is `produce` or `consume`",
                );
            }
        }
        if let Some(key) = k.api_key.as_ref().filter(|k| !unsubstituted(&k.value)) {
            if !KAFKA_API_KEYS.contains(&key.value.to_ascii_lowercase().as_str()) {
                let help = match did_you_mean(&key.value, KAFKA_API_KEYS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("known API keys: {}", KAFKA_API_KEYS.join(", ")),
                };
                self.err(
                    Code::WrongType,
                    key.span,
                    format!("unknown Kafka apiKey `{}`", key.value),
                    "unknown apiKey",
                    help,
                );
            }
        }
        if let Some(t) = k.topic.as_ref().filter(|t| !unsubstituted(&t.value)) {
            let ok = t.value.len() <= 255
                && t.value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                self.err(
                    Code::WrongType,
                    t.span,
                    format!("`{}` is not a valid Kafka topic", t.value),
                    "invalid topic",
                    "topics are up to 255 letters, digits, `.`, `_` and `-`",
                );
            }
        }
    }

    fn label_key(&mut self, key: &SString) {
        if unsubstituted(&key.value) {
            return;
        }
        if let Some(problem) = vocab::label_key_problem(&key.value) {
            self.err(
                Code::InvalidLabelKey,
                key.span,
                format!("invalid label key `{}`: {problem}", key.value),
                "invalid key",
                "label keys are `[prefix/]name`, optionally after a Cilium source like `k8s:`",
            );
        }
    }

    fn selector(&mut self, s: &Spanned<LabelSelector>) {
        for (k, v) in s.match_labels.iter().flat_map(|m| m.value.0.iter()) {
            self.label_key(k);
            if !unsubstituted(&v.value) && !vocab::is_label_value(&v.value) {
                self.err(
                    Code::InvalidLabelValue,
                    v.span,
                    format!("invalid label value `{}`", v.value),
                    "invalid value",
                    "label values are empty or up to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
                );
            }
        }
        for req in s.match_expressions.iter().flatten() {
            match &req.key {
                Some(k) => self.label_key(k),
                None => self.err(
                    Code::MissingField,
                    req.span,
                    "this requirement has no `key`",
                    "`key` missing",
                    "add the label key to test",
                ),
            }
            let Some(op) = &req.operator else {
                self.err(
                    Code::MissingField,
                    req.span,
                    "this requirement has no `operator`",
                    "`operator` missing",
                    "add `operator: In`, `NotIn`, `Exists` or `DoesNotExist`",
                );
                continue;
            };
            const OPS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];
            if unsubstituted(&op.value) {
                continue;
            }
            if !OPS.contains(&op.value.as_str()) {
                let help = match OPS.iter().find(|o| o.eq_ignore_ascii_case(&op.value)) {
                    Some(o) => format!("operators are case-sensitive: write `{o}`"),
                    None => "the operator is In, NotIn, Exists or DoesNotExist".to_string(),
                };
                self.err(
                    Code::InvalidOperator,
                    op.span,
                    format!("unknown operator `{}`", op.value),
                    "invalid operator",
                    help,
                );
                continue;
            }
            let values = req.values.as_ref().map_or(0, |v| v.value.len());
            match op.value.as_str() {
                "In" | "NotIn" if values == 0 => self.err(
                    Code::InvalidValues,
                    req.values.as_ref().map_or(op.span, |v| v.span),
                    format!("operator {} needs at least one value", op.value),
                    "no values",
                    "add `values: [...]`, or use Exists / DoesNotExist to test only the key",
                ),
                "Exists" | "DoesNotExist" if values > 0 => self.err(
                    Code::InvalidValues,
                    req.values.as_ref().map_or(op.span, |v| v.span),
                    format!("operator {} takes no values", op.value),
                    "values given",
                    "remove `values`, or use In / NotIn to test the values",
                ),
                _ => {}
            }
            for v in req.values.iter().flat_map(|l| l.value.iter()) {
                if !unsubstituted(&v.value) && !vocab::is_label_value(&v.value) {
                    self.err(
                        Code::InvalidLabelValue,
                        v.span,
                        format!("invalid label value `{}`", v.value),
                        "invalid value",
                        "label values are up to 63 letters, digits, `-`, `_` and `.`",
                    );
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Kubernetes NetworkPolicy (k8s.io/kubernetes pkg/apis/networking/validation)

    fn network_policy(&mut self, spec: &Spanned<NetworkPolicySpec>) {
        if let Some(s) = &spec.pod_selector {
            self.selector(s);
        }
        for t in spec.policy_types.iter().flat_map(|l| l.value.iter()) {
            if !unsubstituted(&t.value) && !matches!(t.value.as_str(), "Ingress" | "Egress") {
                let help = match ["Ingress", "Egress"]
                    .iter()
                    .find(|o| o.eq_ignore_ascii_case(&t.value))
                {
                    Some(o) => format!("policy types are case-sensitive: write `{o}`"),
                    None => "policyTypes lists `Ingress` and/or `Egress`".to_string(),
                };
                self.err(
                    Code::WrongType,
                    t.span,
                    format!("unknown policy type `{}`", t.value),
                    "unknown type",
                    help,
                );
            }
        }
        let ingress = spec
            .ingress
            .iter()
            .flat_map(|l| l.value.iter())
            .map(|r| (r.from.as_ref(), r.ports.as_ref()));
        let egress = spec
            .egress
            .iter()
            .flat_map(|l| l.value.iter())
            .map(|r| (r.to.as_ref(), r.ports.as_ref()));
        for (peers, ports) in ingress.chain(egress) {
            for peer in peers.iter().flat_map(|l| l.value.iter()) {
                self.np_peer(peer);
            }
            for port in ports.iter().flat_map(|l| l.value.iter()) {
                self.np_port(port);
            }
        }
    }

    fn np_peer(&mut self, peer: &Spanned<NetworkPolicyPeer>) {
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match (&peer.ip_block, selectors) {
            (None, false) => self.err(
                Code::MissingField,
                peer.span,
                "this peer has none of podSelector, namespaceSelector and ipBlock",
                "empty peer",
                "Kubernetes rejects an empty peer; to allow every source, drop `from`/`to` from the rule",
            ),
            (Some(b), true) => self.err(
                Code::UnsupportedCombination,
                b.span,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
                "ipBlock",
                "make the ipBlock a separate peer (a separate `-` entry)",
            ),
            _ => {}
        }
        for s in peer.pod_selector.iter().chain(&peer.namespace_selector) {
            self.selector(s);
        }
        if let Some(b) = &peer.ip_block {
            match &b.cidr {
                Some(cidr) => {
                    let net = self.cidr(cidr, false);
                    self.excepts(net, cidr, b.except.as_ref(), true);
                }
                None => self.err(
                    Code::MissingField,
                    b.span,
                    "this ipBlock has no `cidr`",
                    "`cidr` missing",
                    "add `cidr: 10.0.0.0/8`",
                ),
            }
        }
    }

    fn np_port(&mut self, p: &Spanned<NetworkPolicyPort>) {
        if let Some(proto) = p.protocol.as_ref().filter(|p| !unsubstituted(&p.value)) {
            if !matches!(proto.value.as_str(), "TCP" | "UDP" | "SCTP") {
                let upper = proto.value.to_ascii_uppercase();
                let help = if matches!(upper.as_str(), "TCP" | "UDP" | "SCTP") {
                    format!("protocols are upper case: write `{upper}`")
                } else {
                    "a NetworkPolicy port's protocol is TCP (the default), UDP or SCTP".to_string()
                };
                self.err(
                    Code::UnknownProtocol,
                    proto.span,
                    format!("unknown protocol `{}`", proto.value),
                    "unknown protocol",
                    help,
                );
            }
        }
        let number = match &p.port {
            None => None,
            Some(port) if unsubstituted(&port.value.0) => return,
            Some(port) => match vocab::parse_port(&port.value.0) {
                Ok(PortRef::Number(0)) | Err(_) => {
                    self.err(
                        Code::InvalidPort,
                        port.span,
                        format!("`{}` is not a valid NetworkPolicy port", port.value.0),
                        "invalid port",
                        "a port is a number from 1 to 65535 or a named container port; omit `port` to allow all ports",
                    );
                    None
                }
                Ok(PortRef::Number(n)) => Some(n),
                Ok(PortRef::Name(_)) => None,
            },
        };
        if let Some(end) = &p.end_port {
            match (number, &p.port) {
                (Some(start), Some(port)) if end.value < i64::from(start) || end.value > 65535 => {
                    self.out.push(
                        Diagnostic::new(
                            Code::InvalidPortRange,
                            end.span,
                            format!("endPort {} is not in {start}..65535", end.value),
                        )
                        .label("bad range end")
                        .related(port.span, "range starts here")
                        .help("endPort must be at least port and at most 65535"),
                    )
                }
                (Some(_), _) => {}
                (None, _) => self.err(
                    Code::InvalidPortRange,
                    end.span,
                    "endPort needs a numeric `port`",
                    "range without a numeric start",
                    "set `port` to the first number of the range",
                ),
            }
        }
    }
}

/// Kafka API keys Cilium's proxy knows (pkg/policy/api/kafka: KafkaAPIKeyMap).
const KAFKA_API_KEYS: &[&str] = &[
    "produce",
    "fetch",
    "offsets",
    "metadata",
    "leaderandisr",
    "stopreplica",
    "updatemetadata",
    "controlledshutdown",
    "offsetcommit",
    "offsetfetch",
    "findcoordinator",
    "joingroup",
    "heartbeat",
    "leavegroup",
    "syncgroup",
    "describegroups",
    "listgroups",
    "saslhandshake",
    "apiversions",
    "createtopics",
    "deletetopics",
];
