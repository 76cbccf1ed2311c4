//! Lints: policies that Cilium accepts but that almost certainly do not do what their author
//! meant. All are warnings; `cnpc check --deny-warnings` makes them fatal.
//!
//! Lints that relate rules to each other or to the cluster look candidates up in indexes
//! rather than trying every pair: the rules that may cover a rule's endpoints (a DNS rule for
//! toFQDNs, a deny rule shadowing an allow) by scope and by label ([`CoverIndex`]), and the
//! workloads and nodes a selector may match by label ([`ScopedSets`]). Candidates are then
//! judged by the same predicates as before, so the cost grows with the policies and workloads
//! (and with what is reported), not with their products, and the diagnostics are the same, in
//! the same order: `compiler/tests/lint_oracle.rs` keeps the quadratic implementation and
//! compares the two on the corpus, the examples, the benchmark's set and random sets.

use crate::ast::*;
use crate::cluster::Cluster;
use crate::diag::{Code, Diagnostic};
use crate::labels::split_source;
use crate::labels::{LabelSet, Selector};
use crate::source::Span;
use crate::vocab::{self, PortRef, Protocol};
use rustc_hash::FxHashMap;
use std::collections::BTreeSet;

pub fn lint(policies: &[Policy], cluster: Option<&Cluster>) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let scoped: Vec<ScopedRule> = policies
        .iter()
        .flat_map(|p| {
            let ns = scope(p);
            p.body.cilium_rules().map(move |r| ScopedRule {
                ns: ns.clone(),
                rule: r,
                labels: r.endpoint_selector.as_ref().and_then(|s| plain_labels(s)),
            })
        })
        .collect();
    // Only rules with DNS proxy rules can cover a toFQDNs rule, and only rules with deny
    // sections can shadow an allow: index those alone, so each rule meets only the few that
    // may cover its endpoints ([`CoverIndex`]) rather than all of them.
    let dns_rules = CoverIndex::new(&scoped, |s| has_dns_rule(&s.rule.value));
    let deny_rules = CoverIndex::new(&scoped, |s| {
        s.rule.ingress_deny.is_some() || s.rule.egress_deny.is_some()
    });
    // Each deny rule's entries, worked out once rather than once per rule it covers.
    let denies: FxHashMap<u32, Denies> = deny_rules
        .members
        .iter()
        .map(|&i| (i, Denies::of(&scoped[i as usize].rule.value)))
        .collect();
    let mut covering = Vec::new();
    for sr in &scoped {
        fqdn_without_dns(sr, &scoped, &dns_rules, &mut out);
        covering.clear();
        deny_rules.covering(&scoped, sr, &mut covering);
        deny_shadows_allow(sr, &covering, &denies, &mut out);
        for sel in selectors_of(&sr.rule.value) {
            contradictory_selector(sel, &mut out);
            suspicious_keys(sel, &mut out);
        }
        cidrs_meaning_world(&sr.rule.value, &mut out);
        namespace_overridden(sr, &mut out);
        l7_not_enforced(&sr.rule.value, &mut out);
    }
    // Each distinct endpoint's labels, built once and indexed: policies × workloads would
    // otherwise rebuild and scan them.
    let endpoints: Vec<(Option<&str>, LabelSet)> = cluster.map_or_else(Vec::new, |c| {
        // Workloads of one namespace, service account and labels have the same security
        // labels (`Cluster::security_labels`): one stands for all of them.
        let mut seen = rustc_hash::FxHashSet::default();
        let distinct: Vec<&crate::cluster::Workload> = c
            .workloads
            .iter()
            .filter(|w| seen.insert((&w.namespace, &w.service_account, &w.labels)))
            .collect();
        distinct
            .iter()
            .map(|w| Some(w.namespace.as_str()))
            .zip(c.security_labels_of(&distinct))
            .collect()
    });
    let nodes: Vec<(Option<&str>, LabelSet)> = cluster.map_or_else(Vec::new, |c| {
        c.nodes.iter().map(|n| (None, c.node_labels(n))).collect()
    });
    let population = Population {
        endpoints: ScopedSets::new(&endpoints),
        nodes: ScopedSets::new(&nodes),
    };
    for p in policies {
        if let PolicyBody::Kubernetes { spec: Some(spec) } = &p.body {
            np_cidrs_meaning_world(spec, &mut out);
            for sel in spec.pod_selector.iter() {
                contradictory_selector(sel, &mut out);
            }
        }
        if cluster.is_some() {
            selects_nothing(p, &population, &mut out);
        }
    }
    out
}

/// The namespace a policy's selectors are confined to; `None` for cluster-wide policies.
fn scope(p: &Policy) -> Option<String> {
    p.kind.is_namespaced().then(|| {
        p.metadata
            .namespace
            .as_ref()
            .map_or("default".to_string(), |n| n.value.clone())
    })
}

struct ScopedRule<'a> {
    ns: Option<String>,
    rule: &'a Spanned<Rule>,
    /// The endpoint selector's labels without sources, when it has no expressions.
    labels: Option<BTreeSet<(String, String)>>,
}

/// L7 rules the node cannot enforce: Kafka and generic `l7proto` rules have no proxy in cnpc.
/// (DNS rules get their proxy with issue 10; until then their flows are dropped too, said in the
/// README rather than on every policy with a DNS rule.) The loader fails closed (DESIGN.md §6a): a flow such a
/// rule would let through goes to a proxy that does not speak its protocol, so it is dropped,
/// never passed unfiltered. Users should know before deploying.
fn l7_not_enforced(r: &Rule, out: &mut Vec<Diagnostic>) {
    let port_rules = r
        .ingress
        .iter()
        .flat_map(|l| l.value.iter())
        .flat_map(|i| i.to_ports.iter().flat_map(|l| l.value.iter()))
        .chain(
            r.egress
                .iter()
                .flat_map(|l| l.value.iter())
                .flat_map(|e| e.to_ports.iter().flat_map(|l| l.value.iter())),
        );
    for pr in port_rules {
        let Some(rules) = &pr.rules else { continue };
        let kinds = [
            ("Kafka", rules.kafka.as_ref().map(|k| k.span)),
            ("l7proto", rules.l7proto.as_ref().map(|k| k.span)),
        ];
        for (kind, span) in kinds {
            let Some(span) = span else { continue };
            out.push(
                Diagnostic::new(
                    Code::NotEnforced,
                    span,
                    format!("cnpc-loader does not enforce {kind} rules"),
                )
                .label("not enforced on a node")
                .help(format!(
                    "`cnpc check`, `trace` and `diff` model these rules, but on a node cnpc drops the traffic they would allow rather than pass it unfiltered; keep Cilium's agent for {kind} policy until cnpc enforces it"
                )),
            );
        }
    }
}

/// A namespaced CNP's endpointSelector that names another namespace in matchLabels: Cilium's
/// ParseToCiliumRule (pkg/k8s/apis/cilium.io/utils/utils.go) replaces the entry with the
/// policy's namespace ("EndpointSelector always applies in namespace of the policy resource,
/// removing illegal namespace match"), so the rule selects pods of its own namespace.
fn namespace_overridden(sr: &ScopedRule, out: &mut Vec<Diagnostic>) {
    let (Some(ns), Some(es)) = (&sr.ns, &sr.rule.value.endpoint_selector) else {
        return;
    };
    for (k, v) in crate::labels::match_labels_of(es, crate::labels::NAMESPACE_LABEL) {
        if v.value != *ns {
            out.push(
                Diagnostic::new(
                    Code::NamespaceOverridden,
                    k.span.to(v.span),
                    format!(
                        "this policy lives in namespace `{ns}`, so Cilium selects pods of `{ns}` here, not of `{}`",
                        v.value
                    ),
                )
                .label("replaced by the policy's namespace")
                .help(format!(
                    "a CiliumNetworkPolicy only applies to its own namespace: move the policy to namespace `{}`, or use a CiliumClusterwideNetworkPolicy to select pods across namespaces",
                    v.value
                )),
            );
        }
    }
}

/// matchLabels as (key without source, value) pairs, when the selector has no expressions;
/// `None` when it has some (then we do not reason about it).
fn plain_labels(sel: &LabelSelector) -> Option<BTreeSet<(String, String)>> {
    if sel
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return None;
    }
    Some(
        sel.match_labels
            .iter()
            .flat_map(|m| m.value.0.iter())
            .map(|(k, v)| (split_source(&k.value).1.to_string(), v.value.clone()))
            .collect(),
    )
}

/// Whether rule `a` selects at least every endpoint that rule `b` selects, judged from the
/// selectors' text: same scope (or `a` cluster-wide), and `a`'s labels a subset of `b`'s.
fn covers_endpoints(a: &ScopedRule, b: &ScopedRule) -> bool {
    if a.ns.is_some() && a.ns != b.ns {
        return false;
    }
    let (Some(sa), Some(sb)) = (&a.rule.endpoint_selector, &b.rule.endpoint_selector) else {
        return false;
    };
    match (&a.labels, &b.labels) {
        (Some(la), Some(lb)) => la.is_subset(lb),
        _ => sa.value == sb.value,
    }
}

/// Rules that may cover the endpoints of others ([`covers_endpoints`]), indexed by what a
/// covering rule `a` must share with a covered rule `b`:
/// - its scope: cluster-wide, or `b`'s namespace;
/// - when both selectors are plain labels, `a`'s labels are a subset of `b`'s, so `a`'s rarest
///   label (its anchor) is one of `b`'s, or `a` has none;
/// - otherwise the selectors are equal, spans included (`Spanned`'s equality), so neither is
///   plain and their first matchExpressions entries are written at the same place. (A plain
///   selector has no matchExpressions entry, so it never equals one that has some.)
///
/// A rule is listed once, under its scope and its anchor or first entry's place; candidates
/// are then checked by [`covers_endpoints`] itself, so the index only narrows, never decides.
struct CoverIndex<'s> {
    /// Positions in the scoped rules, ascending.
    members: Vec<u32>,
    by_scope: FxHashMap<Option<&'s str>, ScopeIndex<'s>>,
}

#[derive(Default)]
struct ScopeIndex<'s> {
    /// Plain selectors without labels: they cover every plain selector in scope.
    unlabelled: Vec<u32>,
    /// Plain selectors by their anchor: key (without source), then value.
    by_anchor: FxHashMap<&'s str, FxHashMap<&'s str, Vec<u32>>>,
    /// Selectors with matchExpressions, by the place of their first entry.
    by_expression: FxHashMap<Span, Vec<u32>>,
}

impl<'s> CoverIndex<'s> {
    fn new(scoped: &'s [ScopedRule<'s>], include: impl Fn(&ScopedRule) -> bool) -> Self {
        let members: Vec<u32> = (0..scoped.len() as u32)
            .filter(|&i| include(&scoped[i as usize]))
            .collect();
        // How often each label appears among the members: a rule is anchored at its rarest,
        // so a lookup by a common label (a namespace, a tier) meets few rules.
        let mut frequency: FxHashMap<(&str, &str), u32> = FxHashMap::default();
        for &i in &members {
            for (k, v) in scoped[i as usize].labels.iter().flatten() {
                *frequency.entry((k.as_str(), v.as_str())).or_default() += 1;
            }
        }
        let mut by_scope: FxHashMap<Option<&str>, ScopeIndex> = FxHashMap::default();
        for &i in &members {
            let sr = &scoped[i as usize];
            let Some(sel) = &sr.rule.value.endpoint_selector else {
                // Without an endpoint selector a rule covers nothing.
                continue;
            };
            let at = by_scope.entry(sr.ns.as_deref()).or_default();
            match &sr.labels {
                Some(labels) => {
                    let anchor = labels
                        .iter()
                        .min_by_key(|(k, v)| frequency.get(&(k.as_str(), v.as_str())));
                    match anchor {
                        None => at.unlabelled.push(i),
                        Some((k, v)) => at
                            .by_anchor
                            .entry(k.as_str())
                            .or_default()
                            .entry(v.as_str())
                            .or_default()
                            .push(i),
                    }
                }
                None => {
                    if let Some(first) = first_expression(&sel.value) {
                        at.by_expression.entry(first).or_default().push(i);
                    }
                }
            }
        }
        CoverIndex { members, by_scope }
    }

    /// Calls `found` with the position of each candidate that may cover `b`'s endpoints, each
    /// once, in no particular order, until it returns `true`; whether one did.
    fn candidates(&self, b: &ScopedRule, mut found: impl FnMut(u32) -> bool) -> bool {
        let Some(sel) = &b.rule.value.endpoint_selector else {
            return false;
        };
        // Cluster-wide rules, and rules of `b`'s namespace when it has one.
        let scopes = [Some(None), b.ns.as_deref().map(Some)];
        for scope in scopes.into_iter().flatten() {
            let Some(at) = self.by_scope.get(&scope) else {
                continue;
            };
            let hit = match &b.labels {
                Some(labels) => {
                    at.unlabelled.iter().any(|&i| found(i))
                        || labels.iter().any(|(k, v)| {
                            at.by_anchor
                                .get(k.as_str())
                                .and_then(|values| values.get(v.as_str()))
                                .is_some_and(|list| list.iter().any(|&i| found(i)))
                        })
                }
                None => first_expression(&sel.value)
                    .and_then(|first| at.by_expression.get(&first))
                    .is_some_and(|list| list.iter().any(|&i| found(i))),
            };
            if hit {
                return true;
            }
        }
        false
    }

    /// Positions of the members that cover `b`'s endpoints, ascending (the order in which the
    /// rules were written), appended to `out`.
    fn covering(&self, scoped: &[ScopedRule], b: &ScopedRule, out: &mut Vec<u32>) {
        self.candidates(b, |i| {
            if covers_endpoints(&scoped[i as usize], b) {
                out.push(i);
            }
            false
        });
        out.sort_unstable();
    }

    /// Whether a member covers `b`'s endpoints.
    fn any_covering(&self, scoped: &[ScopedRule], b: &ScopedRule) -> bool {
        self.candidates(b, |i| covers_endpoints(&scoped[i as usize], b))
    }
}

/// Where a selector's first matchExpressions entry is written, if it has one.
fn first_expression(sel: &LabelSelector) -> Option<Span> {
    sel.match_expressions
        .as_ref()
        .and_then(|e| e.first())
        .map(|r| r.span)
}

fn has_dns_rule(r: &Rule) -> bool {
    r.egress.iter().flat_map(|l| l.value.iter()).any(|e| {
        e.to_ports
            .iter()
            .flat_map(|l| l.value.iter())
            .any(|pr| pr.rules.as_ref().is_some_and(|r| r.dns.is_some()))
    })
}

/// Cilium learns toFQDNs addresses only from DNS answers its DNS proxy sees, and the proxy sees
/// a lookup only when an egress rule with a `dns` L7 rule covers it (docs: "DNS based" policy,
/// "the DNS proxy must be in the path"). Without one the FQDN rule never allows anything.
fn fqdn_without_dns(
    sr: &ScopedRule,
    scoped: &[ScopedRule],
    dns_rules: &CoverIndex,
    out: &mut Vec<Diagnostic>,
) {
    // Whether a DNS rule covers these endpoints: the same for every egress entry, so asked
    // once, and only of a rule that has toFQDNs.
    let mut covered: Option<bool> = None;
    for e in sr.rule.egress.iter().flat_map(|l| l.value.iter()) {
        let Some(fqdns) = e.to_fqdns.as_ref().filter(|f| !f.value.is_empty()) else {
            continue;
        };
        let covered = *covered.get_or_insert_with(|| dns_rules.any_covering(scoped, sr));
        if !covered {
            out.push(
                Diagnostic::new(
                    Code::FqdnWithoutDns,
                    fqdns.span,
                    "toFQDNs without a DNS rule: Cilium never sees the lookups, so these names never resolve to an allowed address",
                )
                .label("no DNS proxy rule covers these endpoints")
                .help("add an egress rule to your DNS server with `toPorts: [{ports: [{port: \"53\", protocol: ANY}], rules: {dns: [{matchPattern: \"*\"}]}}]` for the same endpoints"),
            );
        }
    }
}

fn selectors_of(r: &Rule) -> Vec<&Spanned<LabelSelector>> {
    let mut v: Vec<&Spanned<LabelSelector>> =
        r.endpoint_selector.iter().chain(&r.node_selector).collect();
    for i in r.ingress.iter().flat_map(|l| l.value.iter()) {
        v.extend(
            i.peers
                .from_endpoints
                .iter()
                .chain(&i.peers.from_requires)
                .flat_map(|l| l.value.iter()),
        );
    }
    for i in r.ingress_deny.iter().flat_map(|l| l.value.iter()) {
        v.extend(
            i.peers
                .from_endpoints
                .iter()
                .chain(&i.peers.from_requires)
                .flat_map(|l| l.value.iter()),
        );
    }
    for e in r.egress.iter().flat_map(|l| l.value.iter()) {
        v.extend(
            e.peers
                .to_endpoints
                .iter()
                .chain(&e.peers.to_requires)
                .flat_map(|l| l.value.iter()),
        );
    }
    for e in r.egress_deny.iter().flat_map(|l| l.value.iter()) {
        v.extend(
            e.peers
                .to_endpoints
                .iter()
                .chain(&e.peers.to_requires)
                .flat_map(|l| l.value.iter()),
        );
    }
    v
}

/// A selector whose requirements contradict each other selects nothing.
fn contradictory_selector(sel: &Spanned<LabelSelector>, out: &mut Vec<Diagnostic>) {
    use std::collections::BTreeMap;
    // Most selectors are matchLabels alone, each key (without source) once: every key then
    // has one allowed value and must exist, which contradicts nothing. Said without building
    // the requirements below.
    let no_expressions = sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
    if no_expressions {
        let labels = sel
            .match_labels
            .as_ref()
            .map_or(&[][..], |m| &m.value.0[..]);
        let key = |i: usize| split_source(&labels[i].0.value).1;
        let distinct = (0..labels.len()).all(|i| (0..i).all(|j| key(j) != key(i)));
        if distinct {
            return;
        }
    }
    #[derive(Default)]
    struct KeyReq {
        allowed: Option<BTreeSet<String>>,
        excluded: BTreeSet<String>,
        must_exist: bool,
        must_not_exist: bool,
    }
    let mut reqs: BTreeMap<String, KeyReq> = BTreeMap::new();
    let restrict = |r: &mut KeyReq, vals: BTreeSet<String>| {
        r.allowed = Some(match r.allowed.take() {
            None => vals,
            Some(a) => a.intersection(&vals).cloned().collect(),
        });
    };
    for (k, v) in sel.match_labels.iter().flat_map(|m| m.value.0.iter()) {
        let r = reqs
            .entry(split_source(&k.value).1.to_string())
            .or_default();
        restrict(r, [v.value.clone()].into());
        r.must_exist = true;
    }
    for req in sel.match_expressions.iter().flatten() {
        let (Some(k), Some(op)) = (&req.key, &req.operator) else {
            continue;
        };
        let vals: BTreeSet<String> = req
            .values
            .iter()
            .flat_map(|l| l.value.iter())
            .map(|v| v.value.clone())
            .collect();
        let r = reqs
            .entry(split_source(&k.value).1.to_string())
            .or_default();
        match op.value.as_str() {
            "In" => {
                restrict(r, vals);
                r.must_exist = true;
            }
            "NotIn" => r.excluded.extend(vals),
            "Exists" => r.must_exist = true,
            "DoesNotExist" => r.must_not_exist = true,
            _ => {}
        }
    }
    for (key, r) in &reqs {
        let empty_allowed = r
            .allowed
            .as_ref()
            .is_some_and(|a| a.iter().all(|v| r.excluded.contains(v)));
        if (r.must_exist && r.must_not_exist) || empty_allowed {
            out.push(
                Diagnostic::new(Code::NeverMatches, sel.span, format!("this selector can never match: its requirements on `{key}` contradict each other"))
                    .label("selects nothing")
                    .help("an endpoint has one value per label key; check the matchLabels and matchExpressions for this key"),
            );
        }
    }
}

/// `k8s.io.kubernetes.pod.namespace` is a valid key, but almost always a typo of the source
/// prefix `k8s:`; as written it matches no endpoint.
fn suspicious_keys(sel: &Spanned<LabelSelector>, out: &mut Vec<Diagnostic>) {
    let keys = sel
        .match_labels
        .iter()
        .flat_map(|m| m.value.0.iter().map(|(k, _)| k))
        .chain(
            sel.match_expressions
                .iter()
                .flatten()
                .filter_map(|r| r.key.as_ref()),
        );
    for k in keys {
        for source in ["k8s", "any", "reserved"] {
            if let Some(rest) = k
                .value
                .strip_prefix(source)
                .and_then(|r| r.strip_prefix('.'))
            {
                if rest.starts_with("io.") || rest.starts_with("k8s-app") {
                    out.push(
                        Diagnostic::new(
                            Code::SuspiciousLabelKey,
                            k.span,
                            format!("`{}` looks like a misspelt `{source}:{rest}`", k.value),
                        )
                        .label("`.` where `:` was probably meant")
                        .help(format!(
                            "the source prefix is separated by a colon: write `{source}:{rest}`"
                        )),
                    );
                }
            }
        }
    }
}

fn world_cidr(s: &str) -> bool {
    matches!(s, "0.0.0.0/0" | "::/0")
}

const WORLD_HELP: &str = "Cilium applies CIDR rules only to peers outside the cluster, and 0.0.0.0/0 covers IPv4 only; write `toEntities: [world]` (or `fromEntities`) for everything outside the cluster, or `all` for every peer";

fn cidrs_meaning_world(r: &Rule, out: &mut Vec<Diagnostic>) {
    let mut check = |s: &SString| {
        if world_cidr(&s.value) {
            out.push(
                Diagnostic::new(
                    Code::CidrMeansWorld,
                    s.span,
                    format!("`{}` selects the world, not every peer", s.value),
                )
                .label("use an entity")
                .help(WORLD_HELP),
            );
        }
    };
    for i in r
        .ingress
        .iter()
        .flat_map(|l| l.value.iter())
        .map(|i| &i.peers)
        .chain(
            r.ingress_deny
                .iter()
                .flat_map(|l| l.value.iter())
                .map(|i| &i.peers),
        )
    {
        i.from_cidr
            .iter()
            .flat_map(|l| l.value.iter())
            .for_each(&mut check);
        i.from_cidr_set
            .iter()
            .flat_map(|l| l.value.iter())
            .filter_map(|c| c.cidr.as_ref())
            .for_each(&mut check);
    }
    for e in r
        .egress
        .iter()
        .flat_map(|l| l.value.iter())
        .map(|e| &e.peers)
        .chain(
            r.egress_deny
                .iter()
                .flat_map(|l| l.value.iter())
                .map(|e| &e.peers),
        )
    {
        e.to_cidr
            .iter()
            .flat_map(|l| l.value.iter())
            .for_each(&mut check);
        e.to_cidr_set
            .iter()
            .flat_map(|l| l.value.iter())
            .filter_map(|c| c.cidr.as_ref())
            .for_each(&mut check);
    }
}

fn np_cidrs_meaning_world(spec: &NetworkPolicySpec, out: &mut Vec<Diagnostic>) {
    let peers = spec
        .ingress
        .iter()
        .flat_map(|l| l.value.iter())
        .flat_map(|r| r.from.iter().flat_map(|l| l.value.iter()))
        .chain(
            spec.egress
                .iter()
                .flat_map(|l| l.value.iter())
                .flat_map(|r| r.to.iter().flat_map(|l| l.value.iter())),
        );
    for p in peers {
        if let Some(c) = p
            .ip_block
            .as_ref()
            .and_then(|b| b.cidr.as_ref())
            .filter(|c| world_cidr(&c.value))
        {
            out.push(
                Diagnostic::new(Code::CidrMeansWorld, c.span, format!("`{}` does not include pods under Cilium", c.value))
                    .label("only outside the cluster")
                    .help("Cilium enforces ipBlock only for peers outside the cluster; add `podSelector: {}` with `namespaceSelector: {}` as another peer if pods should be allowed too"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deny shadowing allow. pkg/policy: deny rules take precedence over allow rules for the same
// traffic (docs: "Deny policies ... take precedence over allow policies").

#[derive(Debug, PartialEq)]
enum Peers {
    /// No L3 field, or the `all` entity: every peer.
    All,
    /// One kind of peer field and its entries, as canonical text.
    Some(&'static str, BTreeSet<String>),
}

#[derive(Debug)]
enum Ports {
    All,
    Ranges(Vec<(Protocol, u16, u16)>),
    /// Named ports or ICMP: not reasoned about.
    Opaque,
}

fn canon<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn peer_set<T: serde::Serialize>(
    fields: &[(&'static str, Option<&Spanned<List<T>>>)],
    entities: (&'static str, Option<&Spanned<List<String>>>),
) -> Peers {
    if entities
        .1
        .is_some_and(|l| l.value.iter().any(|e| e.value == "all"))
    {
        return Peers::All;
    }
    for (name, list) in fields {
        if let Some(l) = list.filter(|l| !l.value.is_empty()) {
            return Peers::Some(name, l.value.iter().map(|x| canon(&x.value)).collect());
        }
    }
    if let Some(l) = entities.1.filter(|l| !l.value.is_empty()) {
        return Peers::Some(
            entities.0,
            l.value.iter().map(|x| x.value.clone()).collect(),
        );
    }
    Peers::All
}

fn port_list<'a>(
    ports: impl Iterator<Item = &'a Spanned<PortProtocol>>,
    any_port_rule: bool,
) -> Ports {
    if !any_port_rule {
        return Ports::All;
    }
    let mut v = Vec::new();
    for p in ports {
        let proto = p
            .protocol
            .as_ref()
            .map_or(Some(Protocol::Any), |s| Protocol::parse(&s.value));
        let Some(proto) = proto else {
            return Ports::Opaque;
        };
        match p.port.as_ref().map(|s| vocab::parse_port(&s.value)) {
            Some(Ok(PortRef::Number(0))) => v.push((proto, 0, u16::MAX)),
            Some(Ok(PortRef::Number(n))) => {
                let end = p
                    .end_port
                    .as_ref()
                    .map_or(n, |e| u16::try_from(e.value).unwrap_or(n).max(n));
                v.push((proto, n, end));
            }
            _ => return Ports::Opaque,
        }
    }
    Ports::Ranges(v)
}

fn peers_cover(deny: &Peers, allow: &Peers) -> bool {
    match (deny, allow) {
        (Peers::All, _) => true,
        (Peers::Some(dk, ds), Peers::Some(ak, a)) => dk == ak && a.is_subset(ds),
        _ => false,
    }
}

fn ports_cover(deny: &Ports, allow: &Ports) -> bool {
    match (deny, allow) {
        (Ports::All, _) => true,
        (Ports::Ranges(d), Ports::Ranges(a)) => a.iter().all(|(ap, alo, ahi)| {
            d.iter()
                .any(|(dp, dlo, dhi)| dp.covers(*ap) && dlo <= alo && ahi <= dhi)
        }),
        _ => false,
    }
}

struct Entry {
    peers: Peers,
    ports: Ports,
    span: Span,
}

/// Peers as [`Peers`]; a rule that names no peer selects every peer only when it has L4 terms
/// (`has_l4`), as lowering's `wildcard_peer` says.
fn ingress_peers(p: &IngressPeers, has_l4: bool) -> Peers {
    let absent = p.lists() == PeerLists::Absent && p.from_groups.is_none();
    if p.lists() == PeerLists::ExplicitlyEmpty || (absent && !has_l4) {
        return Peers::Some("nobody", BTreeSet::new());
    }
    let sel = [
        ("fromEndpoints", p.from_endpoints.as_ref()),
        ("fromNodes", p.from_nodes.as_ref()),
    ];
    match peer_set(&sel, ("fromEntities", p.from_entities.as_ref())) {
        Peers::All if p.from_cidr.as_ref().is_some_and(|l| !l.value.is_empty()) => {
            peer_set(&[("fromCIDR", p.from_cidr.as_ref())], ("", None))
        }
        Peers::All
            if p.from_cidr_set
                .as_ref()
                .is_some_and(|l| !l.value.is_empty()) =>
        {
            peer_set(&[("fromCIDRSet", p.from_cidr_set.as_ref())], ("", None))
        }
        Peers::All if p.from_groups.as_ref().is_some_and(|l| !l.value.is_empty()) => {
            Peers::Some("fromGroups", BTreeSet::from(["?".to_string()]))
        }
        other => other,
    }
}

fn egress_peers(
    p: &EgressPeers,
    fqdns: Option<&Spanned<List<FqdnSelector>>>,
    has_l4: bool,
) -> Peers {
    let absent = p.lists() == PeerLists::Absent
        && p.to_services.is_none()
        && fqdns.is_none()
        && p.to_groups.is_none();
    if p.lists() == PeerLists::ExplicitlyEmpty || (absent && !has_l4) {
        return Peers::Some("nobody", BTreeSet::new());
    }
    let sel = [
        ("toEndpoints", p.to_endpoints.as_ref()),
        ("toNodes", p.to_nodes.as_ref()),
    ];
    let base = peer_set(&sel, ("toEntities", p.to_entities.as_ref()));
    if base != Peers::All {
        return base;
    }
    if p.to_cidr.as_ref().is_some_and(|l| !l.value.is_empty()) {
        return peer_set(&[("toCIDR", p.to_cidr.as_ref())], ("", None));
    }
    if p.to_cidr_set.as_ref().is_some_and(|l| !l.value.is_empty()) {
        return peer_set(&[("toCIDRSet", p.to_cidr_set.as_ref())], ("", None));
    }
    if p.to_services.as_ref().is_some_and(|l| !l.value.is_empty()) {
        return peer_set(&[("toServices", p.to_services.as_ref())], ("", None));
    }
    if fqdns.is_some_and(|l| !l.value.is_empty()) {
        return peer_set(&[("toFQDNs", fqdns)], ("", None));
    }
    if p.to_groups.as_ref().is_some_and(|l| !l.value.is_empty()) {
        return Peers::Some("toGroups", BTreeSet::from(["?".to_string()]));
    }
    Peers::All
}

fn allow_ports(to_ports: Option<&Spanned<List<PortRule>>>, icmps: bool) -> Ports {
    if icmps {
        return Ports::Opaque;
    }
    let rules = to_ports.map_or(&[][..], |l| &l.value[..]);
    port_list(
        rules
            .iter()
            .flat_map(|r| r.ports.iter().flat_map(|l| l.value.iter())),
        !rules.is_empty(),
    )
}

fn deny_ports(to_ports: Option<&Spanned<List<PortDenyRule>>>, icmps: bool) -> Ports {
    if icmps {
        return Ports::Opaque;
    }
    let rules = to_ports.map_or(&[][..], |l| &l.value[..]);
    port_list(
        rules
            .iter()
            .flat_map(|r| r.ports.iter().flat_map(|l| l.value.iter())),
        !rules.is_empty(),
    )
}

fn has_icmps(i: &Option<Spanned<List<IcmpRule>>>) -> bool {
    i.as_ref().is_some_and(|l| !l.value.is_empty())
}

/// A deny rule's entries, as [`Entry`]s by direction.
struct Denies {
    ingress: Vec<Entry>,
    egress: Vec<Entry>,
}

impl Denies {
    fn of(o: &Rule) -> Denies {
        Denies {
            ingress: o
                .ingress_deny
                .iter()
                .flat_map(|l| l.value.iter())
                .map(|d| Entry {
                    peers: ingress_peers(&d.peers, crate::ast::has_l4(&d.to_ports, &d.icmps)),
                    ports: deny_ports(d.to_ports.as_ref(), has_icmps(&d.icmps)),
                    span: d.span,
                })
                .collect(),
            egress: o
                .egress_deny
                .iter()
                .flat_map(|l| l.value.iter())
                .map(|d| Entry {
                    peers: egress_peers(&d.peers, None, crate::ast::has_l4(&d.to_ports, &d.icmps)),
                    ports: deny_ports(d.to_ports.as_ref(), has_icmps(&d.icmps)),
                    span: d.span,
                })
                .collect(),
        }
    }
}

/// `covering`: the positions of the deny rules that cover `sr`'s endpoints, in the order they
/// were written ([`CoverIndex::covering`]); `denies`: each deny rule's entries by position.
fn deny_shadows_allow(
    sr: &ScopedRule,
    covering: &[u32],
    denies: &FxHashMap<u32, Denies>,
    out: &mut Vec<Diagnostic>,
) {
    if covering.is_empty() {
        return;
    }
    let r = &sr.rule.value;
    let allows_in: Vec<Entry> = r
        .ingress
        .iter()
        .flat_map(|l| l.value.iter())
        .map(|i| Entry {
            peers: ingress_peers(&i.peers, crate::ast::has_l4(&i.to_ports, &i.icmps)),
            ports: allow_ports(i.to_ports.as_ref(), has_icmps(&i.icmps)),
            span: i.span,
        })
        .collect();
    let allows_out: Vec<Entry> = r
        .egress
        .iter()
        .flat_map(|l| l.value.iter())
        .map(|e| Entry {
            peers: egress_peers(
                &e.peers,
                e.to_fqdns.as_ref(),
                crate::ast::has_l4(&e.to_ports, &e.icmps),
            ),
            ports: allow_ports(e.to_ports.as_ref(), has_icmps(&e.icmps)),
            span: e.span,
        })
        .collect();
    if allows_in.is_empty() && allows_out.is_empty() {
        return;
    }
    // Deny rules of any rule that selects at least the same endpoints apply to these allows.
    for other in covering {
        let Some(o) = denies.get(other) else {
            // Every member of the deny index has its entries; a position without would be a
            // rule without deny sections, which shadows nothing.
            continue;
        };
        for (denies, allows, dir) in [
            (&o.ingress, &allows_in, "ingress"),
            (&o.egress, &allows_out, "egress"),
        ] {
            for a in allows {
                if let Some(d) = denies
                    .iter()
                    .find(|d| peers_cover(&d.peers, &a.peers) && ports_cover(&d.ports, &a.ports))
                {
                    let mut diag = Diagnostic::new(Code::DenyShadowsAllow, a.span, format!("this {dir} allow can never take effect: a deny rule covers all of it"))
                        .label("dead allow")
                        .help("deny rules win over allow rules in Cilium; narrow the deny (peers or ports) or remove this allow");
                    if d.span.file == a.span.file {
                        diag = diag.related(d.span, "covering deny");
                    }
                    out.push(diag);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Label sets (of workloads, with their namespace, or of nodes) with their index
/// ([`crate::labels::LabelIndex`]), so that whether a selector matches one of them is answered
/// from the sets holding its rarest `In` value rather than by trying every set.
struct ScopedSets<'c> {
    sets: &'c [(Option<&'c str>, LabelSet)],
    index: crate::labels::LabelIndex<'c>,
}

impl<'c> ScopedSets<'c> {
    fn new(sets: &'c [(Option<&'c str>, LabelSet)]) -> ScopedSets<'c> {
        let index = crate::labels::LabelIndex::new(sets.iter().map(|(_, labels)| labels));
        ScopedSets { sets, index }
    }

    /// The sets holding one of an `In` requirement's values, list by list.
    fn holding<'a>(
        &'a self,
        (key, _, values): &'a (String, crate::labels::Operator, Vec<String>),
    ) -> impl Iterator<Item = &'a Vec<u32>> + 'a {
        let key = split_source(key).1;
        values
            .iter()
            .filter_map(move |v| self.index.positions(key, v))
    }

    /// Whether `selector` matches a set (of namespace `ns`, when given). A set it matches
    /// holds, for each `In` requirement, the requirement's key with one of its values (a
    /// label set has one value per key, whatever the source): the sets under the requirement
    /// with the fewest are the only candidates, each checked in full.
    fn any_match(&self, selector: &Selector, ns: Option<&str>) -> bool {
        let narrowest = selector
            .requirements
            .iter()
            .filter(|(_, op, _)| *op == crate::labels::Operator::In)
            .min_by_key(|r| self.holding(r).map(Vec::len).sum::<usize>());
        let fits = |i: u32| {
            let (n, labels) = &self.sets[i as usize];
            ns.is_none_or(|want| *n == Some(want)) && selector.matches(labels)
        };
        match narrowest {
            Some(r) => self.holding(r).any(|l| l.iter().any(|&i| fits(i))),
            None => (0..self.sets.len() as u32).any(fits),
        }
    }
}

/// The cluster as the selects-nothing lint looks at it.
struct Population<'c> {
    /// Each distinct workload's namespace and security labels.
    endpoints: ScopedSets<'c>,
    /// Each node's labels.
    nodes: ScopedSets<'c>,
}

fn selects_nothing(p: &Policy, population: &Population, out: &mut Vec<Diagnostic>) {
    let ns = scope(p);
    let mut check = |sel: &Spanned<LabelSelector>, nodes: bool| {
        // A namespaced policy's subject selects in its namespace whatever it says
        // (`namespace_overridden`).
        let selector = match &ns {
            Some(n) if !nodes => crate::labels::namespaced_subject(sel, n),
            _ => crate::labels::selector(sel),
        };
        let any = if nodes {
            population.nodes.any_match(&selector, None)
        } else {
            population.endpoints.any_match(&selector, ns.as_deref())
        };
        if !any {
            let where_ = match (&ns, nodes) {
                (_, true) => "no node in the cluster snapshot".to_string(),
                (Some(n), false) => {
                    format!("no workload in namespace `{n}` of the cluster snapshot")
                }
                (None, false) => "no workload in the cluster snapshot".to_string(),
            };
            out.push(
                Diagnostic::new(Code::SelectsNothing, sel.span, format!("policy `{}` selects {where_}", p.display_name()))
                    .label("matches nothing")
                    .help("check the labels against `kubectl get pods --show-labels`, and the policy's namespace"),
            );
        }
    };
    match &p.body {
        PolicyBody::Kubernetes { spec: Some(spec) } => {
            if let Some(sel) = &spec.pod_selector {
                check(sel, false);
            }
        }
        _ => {
            for r in p.body.cilium_rules() {
                if let Some(sel) = &r.endpoint_selector {
                    check(sel, false);
                }
                if let Some(sel) = &r.node_selector {
                    check(sel, true);
                }
            }
        }
    }
}
