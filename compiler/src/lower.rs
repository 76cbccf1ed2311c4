//! Lowering: a checked policy set and a cluster snapshot become an IR [`Program`].
//!
//! Semantics carried over from Cilium, each cited where it is applied:
//! - identities: reserved ones with Cilium's numbers; one identity per distinct label set of the
//!   cluster's endpoints (DESIGN.md §3);
//! - namespace scoping of selectors (pkg/k8s/apis/cilium.io/utils/utils.go, getEndpointSelector
//!   and ParseToCiliumRule);
//! - entities (pkg/policy/api/entity.go, EntitySelectorMapping and InitEntities);
//! - default deny per direction (pkg/policy/api/rule_validation.go, Rule.Sanitize);
//! - Kubernetes NetworkPolicy's own rules (policyTypes, peers, ports).

use crate::ast::{self, PeerLists, PolicyBody, Spanned};
use crate::cluster::{Cluster, DEFAULT_CLUSTER};
use crate::labels::{
    self, LabelSet, Operator, Selector, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
};
use crate::source::SourceMap;
use crate::vocab::{self, IcmpFamily, PortRef};
use cnpc_ir::*;
use std::collections::{BTreeMap, BTreeSet};

/// Reads a previous identity allocation: label set (as printed by [`LabelSet::to_strings`],
/// joined by `;`) → number. Reusing it keeps numbers stable when the cluster changes.
pub type Allocation = BTreeMap<String, u32>;

/// A program's cluster identities as an allocation, to persist and pass back as `previous`.
pub fn allocation_of(program: &Program) -> Allocation {
    program
        .identities
        .values()
        .filter(|i| i.kind == IdentityKind::Cluster)
        .map(|i| (allocation_key(&i.labels), i.numeric.0))
        .collect()
}

/// Reads an allocation written by `cnpc identities` (a JSON object: labels → number).
pub fn read_allocation(path: &std::path::Path) -> Result<Allocation, crate::LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| crate::LoadError::BadAllocation {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn allocation_key(labels: &LabelSet) -> String {
    // `to_strings` joined by `;`, written into one string.
    let mut key = String::new();
    for (i, (k, (s, v))) in labels.0.iter().enumerate() {
        if i > 0 {
            key.push(';');
        }
        key.push_str(s);
        key.push(':');
        key.push_str(k);
        if !v.is_empty() {
            key.push('=');
            key.push_str(v);
        }
    }
    key
}

/// FNV-1a, for a deterministic first-choice number per label set.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Assigns numbers to cluster label sets. Sets in `previous` keep their numbers, and a new set
/// takes the first number at or after a hash of its labels that is neither taken nor was ever
/// given to another set in `previous`. So with the previous allocation as input (what the loader
/// persists, `--identities`), adding or removing workloads never renumbers the others. Without
/// it, numbering is still deterministic, but two sets whose hashes collide are ordered by their
/// labels, so an addition can, rarely, shift a colliding set.
pub fn allocate(
    sets: &BTreeSet<LabelSet>,
    previous: &Allocation,
) -> BTreeMap<LabelSet, NumericIdentity> {
    let (numbers, _) = allocate_each(&sets.iter().collect::<Vec<_>>(), previous);
    sets.iter().cloned().zip(numbers).collect()
}

/// [`allocate`] over distinct label sets given by reference, in order: their numbers, in the
/// same order (without a copy of every set, which a snapshot of 50,000 pods made three times),
/// and their allocation keys (what [`allocation_of`] lists them under).
fn allocate_each(sets: &[&LabelSet], previous: &Allocation) -> (Vec<NumericIdentity>, Vec<String>) {
    let keys: Vec<String> = sets.iter().map(|s| allocation_key(s)).collect();
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut out: Vec<Option<NumericIdentity>> = vec![None; sets.len()];
    for (key, slot) in keys.iter().zip(out.iter_mut()) {
        if let Some(&n) = previous.get(key) {
            if taken.insert(n) {
                *slot = Some(NumericIdentity(n));
            }
        }
    }
    let given: rustc_hash::FxHashSet<u32> = previous.values().copied().collect();
    for (key, slot) in keys.iter().zip(out.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        let n = first_free_from(key, |n| taken.contains(&n) || given.contains(&n))
            .or_else(|| first_free_from(key, |n| taken.contains(&n)))
            .expect("fewer label sets than identity numbers");
        taken.insert(n.0);
        *slot = Some(n);
    }
    // Every slot was filled by one of the two loops above.
    (out.into_iter().flatten().collect(), keys)
}

/// The first number, counting from a hash of `set`'s labels and wrapping around the cluster
/// range, that `used` says is free: how [`allocate`] numbers a label set it has no number for.
/// `None` when every number is used.
pub fn first_free(set: &LabelSet, used: impl Fn(u32) -> bool) -> Option<NumericIdentity> {
    first_free_from(&allocation_key(set), used)
}

/// [`first_free`] of the set whose allocation key is `key`.
fn first_free_from(key: &str, used: impl Fn(u32) -> bool) -> Option<NumericIdentity> {
    let span = LAST_CLUSTER_IDENTITY - FIRST_CLUSTER_IDENTITY + 1;
    let start = (fnv(key) % u64::from(span)) as u32;
    (0..span)
        .map(|i| FIRST_CLUSTER_IDENTITY + (start + i) % span)
        .find(|&n| !used(n))
        .map(NumericIdentity)
}

fn reserved_labels(r: Reserved) -> LabelSet {
    let mut l = LabelSet::default();
    l.insert("reserved", r.name(), "");
    // The world identities are all "world" to selectors (reserved:world matches world-ipv4/6).
    if matches!(r, Reserved::WorldIpv4 | Reserved::WorldIpv6) {
        l.insert("reserved", "world", "");
    }
    l
}

/// Builds the identities and endpoints of a cluster snapshot.
pub fn cluster_program(cluster: &Cluster, previous: &Allocation) -> Program {
    cluster_program_numbered(cluster, previous).0
}

/// [`cluster_program`], with the allocation its identities got ([`allocation_of`] of it).
pub fn cluster_program_numbered(cluster: &Cluster, previous: &Allocation) -> (Program, Allocation) {
    let mut p = Program::default();
    for r in Reserved::ALL {
        p.identities.push(Identity {
            numeric: r.numeric(),
            kind: IdentityKind::Reserved(r),
            labels: reserved_labels(r),
        });
    }
    let endpoints = cluster.endpoints();
    // Each endpoint's labels, worked out once (a snapshot has thousands); the distinct sets
    // by reference to them, in order.
    let labelled = cluster.security_labels_of(&endpoints);
    // The distinct sets, found by hashing (each endpoint's set hashed once), then ordered:
    // comparing label sets (a dozen strings each) is most of the cost, and a search tree of
    // thousands of endpoints compares each one a dozen times.
    let mut first_of: rustc_hash::FxHashMap<&LabelSet, usize> = Default::default();
    first_of.reserve(labelled.len());
    let mut distinct: Vec<&LabelSet> = Vec::new();
    let which: Vec<usize> = labelled
        .iter()
        .map(|l| {
            *first_of.entry(l).or_insert_with(|| {
                distinct.push(l);
                distinct.len() - 1
            })
        })
        .collect();
    drop(first_of);
    let mut order: Vec<usize> = (0..distinct.len()).collect();
    order.sort_unstable_by(|a, b| distinct[*a].cmp(distinct[*b]));
    let sets: Vec<&LabelSet> = order.iter().map(|i| distinct[*i]).collect();
    let (numbers, keys) = allocate_each(&sets, previous);
    let numbered: Allocation = keys.into_iter().zip(numbers.iter().map(|n| n.0)).collect();
    let refs: Vec<IdentityRef> = sets
        .into_iter()
        .zip(numbers)
        .map(|(set, n)| {
            p.identities.push(Identity {
                numeric: n,
                kind: IdentityKind::Cluster,
                labels: set.clone(),
            })
        })
        .collect();
    let mut rank = vec![0; distinct.len()];
    for (at, i) in order.iter().enumerate() {
        rank[*i] = at;
    }
    let identity_of: Vec<IdentityRef> = which.iter().map(|i| refs[rank[*i]]).collect();
    for ((w, labels), identity) in endpoints.into_iter().zip(labelled).zip(identity_of) {
        let named_ports = w
            .named_ports
            .iter()
            .filter_map(|(n, proto, port)| Some((n.clone(), Protocol::parse(proto)?, *port)))
            .collect();
        p.endpoints.push(Endpoint {
            name: format!("{}/{}", w.namespace, w.name),
            workload: format!("{}/{}", w.namespace, w.workload),
            identity,
            labels,
            ips: w.ips.clone(),
            named_ports,
            is_pod: true,
            node: w.node.clone(),
            interface: w.interface.clone(),
        });
    }
    let host = p.reserved(Reserved::Host);
    for n in &cluster.nodes {
        p.endpoints.push(Endpoint {
            name: n.name.clone(),
            workload: n.name.clone(),
            identity: host,
            labels: cluster.node_labels(n),
            ips: n.ips.clone(),
            named_ports: Vec::new(),
            is_pod: false,
            node: Some(n.name.clone()),
            interface: None,
        });
    }
    (p, numbered)
}

/// Lowers every policy onto a program built by [`cluster_program`].
pub fn lower(
    policies: &[ast::Policy],
    sources: &SourceMap,
    cluster: &Cluster,
    program: &mut Program,
) {
    let mut cx = Lowering {
        sources,
        cluster,
        program,
    };
    for p in policies {
        cx.policy_compact(p);
    }
}

/// The peers of a CNP/CCNP rule that names none. Cilium gives such a rule the wildcard peer
/// only when it has L4 terms: `IngressRule.sanitize` / `EgressRule.sanitize`
/// (pkg/policy/api/rule_validation.go) set the wildcard endpoint selector when a rule has no
/// L3 member but `toPorts` or `icmps`. A rule with neither (`ingress: [{}]`, `egress: [{}]`)
/// selects no peer and allows nothing; its section only turns on default deny, which is what
/// Cilium's example `examples/policies/l3/egress-default-deny` ("deny-all-egress") relies on,
/// and what pkg/policy's TestL3Wildcarding CaseC3 (`Ingress: []api.IngressRule{{}}` gives an
/// empty policy map) fixes. Kubernetes NetworkPolicy differs: an empty rule there allows all
/// (`network_policy` below).
fn wildcard_peer(has_l4: bool) -> Vec<Peer> {
    if has_l4 {
        vec![Peer::Any]
    } else {
        Vec::new()
    }
}

/// L7 rules of an allow rule whose policy leaves its direction default-allow
/// (`enableDefaultDeny: false`) must not deny other L7 traffic, so Cilium adds a wildcard rule
/// beside them: an empty HTTP rule, or DNS `matchPattern: "*"` (pkg/policy/l4.go createL4Filter,
/// "Adding wildcard L7 rules for default-allow policy" / ensureWildcard; rule_test.go
/// TestHTTPWildcardInDefaultAllow, TestDNSWildcardInDefaultAllow). Other parsers are not modelled.
fn with_l7_wildcard(l7: L7Rules) -> L7Rules {
    match l7 {
        L7Rules::Http(mut rules) if !rules.is_empty() => {
            let any = HttpRule {
                method: None,
                path: None,
                host: None,
                headers: Vec::new(),
            };
            if !rules.contains(&any) {
                rules.push(any);
            }
            L7Rules::Http(rules)
        }
        // (An empty list here comes from entries matching no name, `dns: [{}]`, which are
        // rules all the same; `dns: []` already lowers to `*`.)
        L7Rules::Dns(mut names) => {
            let any = DnsMatcher::pattern("*");
            if !names.contains(&any) {
                names.push(any);
            }
            L7Rules::Dns(names)
        }
        other => other,
    }
}

/// Whether a `toPorts` entry names no port (`{}`, `ports: []`, or only `rules`): Cilium's
/// mergeIngress/mergeEgress (pkg/policy/rule.go) create L4 filters from the entry's
/// `GetPortProtocols()`, so an entry without ports covers nothing, L7 rules or not.
fn port_rule_covers_nothing(ports: &Option<Spanned<ast::List<ast::PortProtocol>>>) -> bool {
    ports.as_ref().is_none_or(|l| l.value.is_empty())
}

struct Lowering<'a> {
    sources: &'a SourceMap,
    cluster: &'a Cluster,
    program: &'a mut Program,
}

fn ns_of(p: &ast::Policy) -> Option<String> {
    p.kind.is_namespaced().then(|| {
        p.metadata
            .namespace
            .as_ref()
            .map_or("default".to_string(), |n| n.value.clone())
    })
}

impl Lowering<'_> {
    fn origin(&self, p: &ast::Policy, span: crate::Span) -> Origin {
        Origin {
            policy: format!("{} {}", p.kind.as_str(), p.display_name()),
            file: self.sources.path(span.file).display().to_string(),
            line: span.line,
        }
    }

    /// [`Self::policy`], then [`compact`] what it appended.
    fn policy_compact(&mut self, p: &ast::Policy) {
        let from = (
            self.program.rules.len(),
            self.program.enforcement.len(),
            self.program.requirements.len(),
        );
        self.policy(p);
        compact(self.program, from);
    }

    fn policy(&mut self, p: &ast::Policy) {
        match &p.body {
            PolicyBody::Cilium { .. } => {
                for r in p.body.cilium_rules() {
                    self.cilium_rule(p, r);
                }
            }
            PolicyBody::Kubernetes { spec: Some(spec) } => self.network_policy(p, spec),
            PolicyBody::Kubernetes { spec: None } => {}
        }
    }

    /// ParseToCiliumRule: a CNP's endpointSelector always gets its namespace.
    fn subject(&self, p: &ast::Policy, r: &ast::Rule) -> Option<Subject> {
        if let Some(es) = &r.endpoint_selector {
            let sel = match ns_of(p) {
                // A namespaced CNP selects in its own namespace whatever its selector says
                // (lint: `cnpc::namespace-overridden`).
                Some(ns) => labels::namespaced_subject(es, &ns),
                None => {
                    // CCNPs select only Cilium-managed pods: every pod has a namespace label.
                    let mut sel = labels::selector(es);
                    sel.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::Exists, &[]);
                    sel
                }
            };
            return Some(Subject::Endpoints(sel));
        }
        r.node_selector
            .as_ref()
            .map(|ns| Subject::Nodes(labels::selector(ns)))
    }

    /// getEndpointSelector: peer selectors in a namespaced policy are confined to its namespace
    /// unless they name a namespace, select on namespace labels, or use reserved labels; in a
    /// cluster-wide policy they are confined to pods (a namespace label must exist).
    fn peer_selector(&self, ns: &Option<String>, sel: &ast::LabelSelector) -> Selector {
        let mut s = labels::selector(sel);
        if s.has_source("reserved") || s.has_key(NAMESPACE_LABEL) {
            return s;
        }
        match ns {
            None => s.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::Exists, &[]),
            Some(ns) if !s.has_key_prefix(NAMESPACE_LABELS_PREFIX) => {
                s.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::In, &[ns]);
            }
            Some(_) => {}
        }
        s
    }

    fn entity(&self, name: &str, out: &mut Vec<Peer>) {
        let reserved = |r: Reserved| {
            Peer::Selector(Selector::default().with(
                &format!("reserved:{}", r.name()),
                Operator::Exists,
                &[],
            ))
        };
        match name {
            "all" => out.push(Peer::Any),
            "world" => out.push(reserved(Reserved::World)),
            "world-ipv4" => out.push(reserved(Reserved::WorldIpv4)),
            "world-ipv6" => out.push(reserved(Reserved::WorldIpv6)),
            "host" => out.push(reserved(Reserved::Host)),
            "remote-node" => out.push(reserved(Reserved::RemoteNode)),
            "kube-apiserver" => out.push(reserved(Reserved::KubeApiserver)),
            "init" => out.push(reserved(Reserved::Init)),
            "health" => out.push(reserved(Reserved::Health)),
            "unmanaged" => out.push(reserved(Reserved::Unmanaged)),
            "ingress" => out.push(reserved(Reserved::Ingress)),
            // InitEntities: the cluster is every reserved in-cluster identity plus every endpoint
            // with this cluster's name label.
            "cluster" => {
                for r in [
                    Reserved::Host,
                    Reserved::RemoteNode,
                    Reserved::Init,
                    Reserved::Health,
                    Reserved::Unmanaged,
                    Reserved::KubeApiserver,
                    Reserved::Ingress,
                ] {
                    out.push(reserved(r));
                }
                out.push(Peer::Selector(Selector::default().with(
                    &format!("k8s:{CLUSTER_LABEL}"),
                    Operator::In,
                    &[DEFAULT_CLUSTER],
                )));
            }
            // `none` and unknown names (already reported) select nothing.
            _ => {}
        }
    }

    fn cidr(&self, s: &str) -> Option<Peer> {
        let net = s
            .parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))?;
        Some(Peer::Cidr {
            net: net.trunc(),
            except: Vec::new(),
        })
    }

    fn cidr_rule(&self, c: &ast::CidrRule) -> Option<Peer> {
        let net = c.cidr.as_ref()?.value.parse::<IpNet>().ok()?;
        let except = c
            .except
            .iter()
            .flat_map(|l| l.value.iter())
            .filter_map(|e| e.value.parse::<IpNet>().ok())
            .collect();
        Some(Peer::Cidr {
            net: net.trunc(),
            except,
        })
    }

    /// The peers both directions share: endpoint and node selectors, CIDRs, CIDR sets, entities.
    fn common_peers(
        &self,
        ns: &Option<String>,
        [endpoints, nodes]: [&Option<Spanned<ast::List<ast::LabelSelector>>>; 2],
        cidrs: &Option<Spanned<ast::List<String>>>,
        cidr_sets: &Option<Spanned<ast::List<ast::CidrRule>>>,
        entities: &Option<Spanned<ast::List<String>>>,
    ) -> Vec<Peer> {
        fn items<T>(l: &Option<Spanned<ast::List<T>>>) -> impl Iterator<Item = &Spanned<T>> {
            l.iter().flat_map(|l| l.value.iter())
        }
        let mut out: Vec<Peer> = Vec::new();
        out.extend(items(endpoints).map(|s| Peer::Selector(self.peer_selector(ns, s))));
        out.extend(items(nodes).map(|s| Peer::Nodes(labels::selector(s))));
        out.extend(items(cidrs).filter_map(|c| self.cidr(&c.value)));
        out.extend(items(cidr_sets).filter_map(|c| self.cidr_rule(c)));
        for e in items(entities) {
            self.entity(&e.value, &mut out);
        }
        out
    }

    /// Peers of an ingress rule. A rule that names no peer selects every peer only when it has
    /// L4 terms (`has_l4`); see [`wildcard_peer`].
    fn ingress_peers(&self, ns: &Option<String>, p: &ast::IngressPeers, has_l4: bool) -> Vec<Peer> {
        let out = self.common_peers(
            ns,
            [&p.from_endpoints, &p.from_nodes],
            &p.from_cidr,
            &p.from_cidr_set,
            &p.from_entities,
        );
        match p.lists() {
            PeerLists::ExplicitlyEmpty => Vec::new(),
            PeerLists::Absent if out.is_empty() && p.from_groups.is_none() => wildcard_peer(has_l4),
            _ => out,
        }
    }

    fn egress_peers(
        &self,
        ns: &Option<String>,
        p: &ast::EgressPeers,
        fqdns: Option<&Spanned<ast::List<ast::FqdnSelector>>>,
        has_l4: bool,
    ) -> Vec<Peer> {
        let mut out = self.common_peers(
            ns,
            [&p.to_endpoints, &p.to_nodes],
            &p.to_cidr,
            &p.to_cidr_set,
            &p.to_entities,
        );
        for svc in p.to_services.iter().flat_map(|l| l.value.iter()) {
            self.services(ns, svc, &mut out);
        }
        for f in fqdns.iter().flat_map(|l| l.value.iter()) {
            if let Some(n) = &f.match_name {
                out.push(Peer::Fqdn(DnsMatcher::name(&n.value)));
            }
            if let Some(pt) = &f.match_pattern {
                out.push(Peer::Fqdn(DnsMatcher::pattern(&pt.value)));
            }
        }
        let names_other = p.to_services.as_ref().is_some_and(|l| !l.value.is_empty())
            || fqdns.is_some_and(|l| !l.value.is_empty())
            || p.to_groups.is_some();
        match p.lists() {
            PeerLists::ExplicitlyEmpty => Vec::new(),
            PeerLists::Absent if out.is_empty() && !names_other => wildcard_peer(has_l4),
            _ => out,
        }
    }

    /// toServices: a Service with a selector stands for its backends, the pods its selector
    /// matches in its namespace (the "toServices through Service selectors").
    fn services(&self, ns: &Option<String>, svc: &ast::ServiceSelector, out: &mut Vec<Peer>) {
        let policy_ns = ns.clone().unwrap_or_else(|| "default".to_string());
        let mut matched = Vec::new();
        if let Some(n) = &svc.k8s_service {
            let name = n.service_name.as_ref().map(|s| s.value.as_str());
            let sns = n
                .namespace
                .as_ref()
                .map_or(policy_ns.as_str(), |s| s.value.as_str());
            matched.extend(
                self.cluster
                    .services
                    .iter()
                    .filter(|s| Some(s.name.as_str()) == name && s.namespace == sns),
            );
        }
        if let Some(sel) = &svc.k8s_service_selector {
            let want = sel
                .selector
                .as_ref()
                .map(|s| labels::selector(s))
                .unwrap_or_default();
            let sns = sel.namespace.as_ref().map(|s| s.value.clone());
            for s in &self.cluster.services {
                let mut l = LabelSet::default();
                for (k, v) in &s.labels {
                    l.insert("k8s", k, v);
                }
                if want.matches(&l) && sns.as_ref().is_none_or(|n| *n == s.namespace) {
                    matched.push(s);
                }
            }
        }
        for s in matched {
            let Some(selector) = &s.selector else {
                // A Service without a selector stands for the addresses of its EndpointSlices,
                // which Cilium turns into CIDR rules (pkg/policy/api: ToServices, Generated
                // ToCIDRSet entries).
                out.extend(s.backends.iter().map(|ip| Peer::Cidr {
                    net: IpNet::from(*ip),
                    except: Vec::new(),
                }));
                continue;
            };
            let mut sel = Selector::default().with(
                &format!("k8s:{NAMESPACE_LABEL}"),
                Operator::In,
                &[&s.namespace],
            );
            for (k, v) in selector {
                sel.add(&format!("k8s:{k}"), Operator::In, &[v]);
            }
            out.push(Peer::Selector(sel));
        }
    }

    fn ports(&self, ports: Option<&Spanned<ast::List<ast::PortProtocol>>>) -> Vec<L4Term> {
        let mut out = Vec::new();
        for p in ports.iter().flat_map(|l| l.value.iter()) {
            let protocols = match p.protocol.as_ref().map(|s| s.value.as_str()) {
                None | Some("ANY") => Vec::new(),
                Some(s) => Protocol::parse(s).into_iter().collect(),
            };
            match p.port.as_ref().map(|s| vocab::parse_port(&s.value)) {
                Some(Ok(PortRef::Number(0))) | None => out.push(L4Term::Ports {
                    protocols,
                    range: PortRange::ALL,
                }),
                Some(Ok(PortRef::Number(n))) => {
                    let hi = p
                        .end_port
                        .as_ref()
                        .and_then(|e| u16::try_from(e.value).ok())
                        .filter(|e| *e >= n)
                        .unwrap_or(n);
                    out.push(L4Term::Ports {
                        protocols,
                        range: PortRange { lo: n, hi },
                    });
                }
                Some(Ok(PortRef::Name(name))) => out.push(L4Term::Named { protocols, name }),
                Some(Err(_)) => {}
            }
        }
        out
    }

    fn icmps(&self, icmps: &Option<Spanned<ast::List<ast::IcmpRule>>>) -> Vec<L4Term> {
        let mut out = Vec::new();
        for f in icmps
            .iter()
            .flat_map(|l| l.value.iter())
            .flat_map(|r| r.fields.iter().flat_map(|l| l.value.iter()))
        {
            let family = f
                .family
                .as_ref()
                .map_or(Some(IcmpFamily::V4), |s| IcmpFamily::parse(&s.value));
            let (Some(family), Some(t)) = (family, &f.icmp_type) else {
                continue;
            };
            if let Some(icmp_type) = vocab::icmp_type(family, &t.value.0) {
                let protocol = if family == IcmpFamily::V4 {
                    Protocol::Icmp
                } else {
                    Protocol::Icmpv6
                };
                out.push(L4Term::Icmp {
                    protocol,
                    icmp_type,
                });
            }
        }
        out
    }

    fn l7(&self, rules: &Option<Spanned<ast::L7Rules>>) -> Option<L7Rules> {
        let r = rules.as_ref().filter(|r| !r.value.is_empty())?;
        if let Some(http) = &r.http {
            let s = |v: &Option<ast::SString>| v.as_ref().map(|x| x.value.clone());
            return Some(L7Rules::Http(
                http.value
                    .iter()
                    .map(|h| HttpRule {
                        method: s(&h.method),
                        path: s(&h.path),
                        host: s(&h.host),
                        headers: h
                            .headers
                            .iter()
                            .flat_map(|l| l.value.iter())
                            .map(|hdr| match hdr.value.split_once(':') {
                                Some((n, v)) => (n.trim().to_string(), Some(v.trim().to_string())),
                                None => (hdr.value.trim().to_string(), None),
                            })
                            .chain(
                                h.header_matches
                                    .iter()
                                    .flat_map(|l| l.value.iter())
                                    .filter(|m| m.mismatch.is_none())
                                    .filter_map(|m| {
                                        Some((
                                            m.name.as_ref()?.value.clone(),
                                            m.value.value.as_ref().map(|v| v.value.clone()),
                                        ))
                                    }),
                            )
                            .collect(),
                    })
                    .collect(),
            ));
        }
        if let Some(dns) = &r.dns {
            // No DNS rule at all (`dns: []`) lets every query through (the DNS proxy's
            // match-all pattern for a port with zero DNS rules, pkg/fqdn/dnsproxy); an entry
            // with neither matchName nor matchPattern matches no name.
            if dns.value.is_empty() {
                return Some(L7Rules::Dns(vec![DnsMatcher::pattern("*")]));
            }
            let mut m = Vec::new();
            for d in &dns.value {
                m.extend(d.match_name.as_ref().map(|n| DnsMatcher::name(&n.value)));
                m.extend(
                    d.match_pattern
                        .as_ref()
                        .map(|n| DnsMatcher::pattern(&n.value)),
                );
            }
            return Some(L7Rules::Dns(m));
        }
        if r.kafka.is_some() {
            return Some(L7Rules::Other("kafka".into()));
        }
        Some(L7Rules::Other(
            r.l7proto.as_ref().map_or("l7".into(), |p| p.value.clone()),
        ))
    }

    /// A deny rule's L4: the ports of all its toPorts entries (deny rules carry no L7), or its
    /// ICMP types; `None` when its toPorts entries cover no port, so the rule denies nothing.
    fn deny_l4(
        &self,
        to_ports: Option<&Spanned<ast::List<ast::PortDenyRule>>>,
        icmps: &Option<Spanned<ast::List<ast::IcmpRule>>>,
    ) -> Option<Vec<L4Term>> {
        match to_ports.filter(|t| !t.value.is_empty()) {
            Some(tp) => Some(
                tp.value
                    .iter()
                    .filter(|pr| !port_rule_covers_nothing(&pr.ports))
                    .flat_map(|pr| self.ports(pr.ports.as_ref()))
                    .collect(),
            )
            .filter(|l4: &Vec<L4Term>| !l4.is_empty()),
            None => Some(self.icmps(icmps)),
        }
    }

    fn push(&mut self, base: &Rule, l4: Vec<L4Term>, l7: Option<L7Rules>) {
        let mut r = base.clone();
        r.l4 = l4;
        r.l7 = l7;
        self.program.rules.push(r);
    }

    /// One IR rule per toPorts entry (each may carry its own L7), or one for the whole rule.
    /// `default_deny` is whether the rule's policy puts this direction into default deny.
    fn push_with_ports(
        &mut self,
        base: Rule,
        to_ports: Option<&Spanned<ast::List<ast::PortRule>>>,
        icmps: Vec<L4Term>,
        default_deny: bool,
    ) {
        match to_ports.filter(|t| !t.value.is_empty()) {
            Some(tp) => {
                // A port rule without ports covers no port (`port_rule_covers_nothing`).
                for pr in tp
                    .value
                    .iter()
                    .filter(|pr| !port_rule_covers_nothing(&pr.ports))
                {
                    let l4 = self.ports(pr.ports.as_ref());
                    let mut l7 = self.l7(&pr.rules);
                    if !default_deny {
                        l7 = l7.map(with_l7_wildcard);
                    }
                    self.push(&base, l4, l7);
                }
            }
            None => self.push(&base, icmps, None),
        }
    }

    fn cilium_rule(&mut self, p: &ast::Policy, r: &Spanned<ast::Rule>) {
        let Some(subject) = self.subject(p, r) else {
            return;
        };
        let ns = ns_of(p);
        // Rule.Sanitize: default deny for a direction unless enableDefaultDeny says otherwise,
        // when the rule has an allow or deny section for it.
        let dd = r.enable_default_deny.as_ref();
        let has = |a: Option<usize>, b: Option<usize>| a.unwrap_or(0) + b.unwrap_or(0) > 0;
        let ingress_dd = dd.and_then(|d| d.ingress.as_ref()).map_or_else(
            || {
                has(
                    r.ingress.as_ref().map(|l| l.value.len()),
                    r.ingress_deny.as_ref().map(|l| l.value.len()),
                )
            },
            |b| b.value,
        );
        let egress_dd = dd.and_then(|d| d.egress.as_ref()).map_or_else(
            || {
                has(
                    r.egress.as_ref().map(|l| l.value.len()),
                    r.egress_deny.as_ref().map(|l| l.value.len()),
                )
            },
            |b| b.value,
        );
        let origin = self.origin(p, r.span);
        for (dir, on) in [
            (Direction::Ingress, ingress_dd),
            (Direction::Egress, egress_dd),
        ] {
            if on {
                self.program.enforcement.push(Enforcement {
                    subject: subject.clone(),
                    direction: dir,
                    origin: origin.clone(),
                });
            }
        }
        let rule = |dir, action, peers, span: crate::Span, this: &Self| Rule {
            origin: this.origin(p, span),
            subject: subject.clone(),
            direction: dir,
            action,
            peers,
            l4: Vec::new(),
            l7: None,
        };
        for i in r.ingress.iter().flat_map(|l| l.value.iter()) {
            let base = rule(
                Direction::Ingress,
                Action::Allow,
                self.ingress_peers(&ns, &i.peers, ast::has_l4(&i.to_ports, &i.icmps)),
                i.span,
                self,
            );
            self.requirements(
                &subject,
                Direction::Ingress,
                &ns,
                i.peers.from_requires.as_ref(),
                &base.origin,
            );
            let icmps = self.icmps(&i.icmps);
            self.push_with_ports(base, i.to_ports.as_ref(), icmps, ingress_dd);
        }
        for i in r.ingress_deny.iter().flat_map(|l| l.value.iter()) {
            let base = rule(
                Direction::Ingress,
                Action::Deny,
                self.ingress_peers(&ns, &i.peers, ast::has_l4(&i.to_ports, &i.icmps)),
                i.span,
                self,
            );
            if let Some(l4) = self.deny_l4(i.to_ports.as_ref(), &i.icmps) {
                self.push(&base, l4, None);
            }
        }
        for e in r.egress.iter().flat_map(|l| l.value.iter()) {
            let base = rule(
                Direction::Egress,
                Action::Allow,
                self.egress_peers(
                    &ns,
                    &e.peers,
                    e.to_fqdns.as_ref(),
                    ast::has_l4(&e.to_ports, &e.icmps),
                ),
                e.span,
                self,
            );
            self.requirements(
                &subject,
                Direction::Egress,
                &ns,
                e.peers.to_requires.as_ref(),
                &base.origin,
            );
            let icmps = self.icmps(&e.icmps);
            self.push_with_ports(base, e.to_ports.as_ref(), icmps, egress_dd);
        }
        for e in r.egress_deny.iter().flat_map(|l| l.value.iter()) {
            let base = rule(
                Direction::Egress,
                Action::Deny,
                self.egress_peers(&ns, &e.peers, None, ast::has_l4(&e.to_ports, &e.icmps)),
                e.span,
                self,
            );
            if let Some(l4) = self.deny_l4(e.to_ports.as_ref(), &e.icmps) {
                self.push(&base, l4, None);
            }
        }
    }

    /// fromRequires/toRequires: constraints every peer of the subject must also meet; they
    /// grant nothing themselves (pkg/policy/api/ingress.go, FromRequires).
    fn requirements(
        &mut self,
        subject: &Subject,
        direction: Direction,
        ns: &Option<String>,
        list: Option<&Spanned<ast::List<ast::LabelSelector>>>,
        origin: &Origin,
    ) {
        for s in list.iter().flat_map(|l| l.value.iter()) {
            self.program.requirements.push(Requirement {
                subject: subject.clone(),
                direction,
                selector: self.peer_selector(ns, s),
                origin: origin.clone(),
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Kubernetes NetworkPolicy (networking.k8s.io/v1 semantics)

    fn network_policy(&mut self, p: &ast::Policy, spec: &Spanned<ast::NetworkPolicySpec>) {
        let ns = ns_of(p).unwrap_or_else(|| "default".to_string());
        let mut sel = spec
            .pod_selector
            .as_ref()
            .map(|s| labels::selector(s))
            .unwrap_or_default();
        sel.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::In, &[&ns]);
        let subject = Subject::Endpoints(sel);
        // policyTypes defaults to Ingress, plus Egress when the spec has an egress section.
        let types: Vec<String> = match &spec.policy_types {
            Some(t) => t.value.iter().map(|s| s.value.clone()).collect(),
            None => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.is_some() {
                    t.push("Egress".into());
                }
                t
            }
        };
        let origin = self.origin(p, spec.span);
        for (name, dir) in [
            ("Ingress", Direction::Ingress),
            ("Egress", Direction::Egress),
        ] {
            if types.iter().any(|t| t == name) {
                self.program.enforcement.push(Enforcement {
                    subject: subject.clone(),
                    direction: dir,
                    origin: origin.clone(),
                });
            }
        }
        let rules = spec
            .ingress
            .iter()
            .flat_map(|l| l.value.iter())
            .map(|r| {
                (
                    Direction::Ingress,
                    r.from.as_ref(),
                    r.ports.as_ref(),
                    r.span,
                )
            })
            .chain(
                spec.egress
                    .iter()
                    .flat_map(|l| l.value.iter())
                    .map(|r| (Direction::Egress, r.to.as_ref(), r.ports.as_ref(), r.span)),
            );
        let rules: Vec<_> = rules.collect();
        for (dir, peers, ports, span) in rules {
            if !types.iter().any(|t| t == dir_name(dir)) {
                continue;
            }
            let mut out = Vec::new();
            for peer in peers.iter().flat_map(|l| l.value.iter()) {
                self.np_peer(&ns, peer, &mut out);
            }
            // An absent or empty `from`/`to` matches every peer.
            if peers.is_none_or(|l| l.value.is_empty()) {
                out.push(Peer::Any);
            }
            let l4 = ports
                .iter()
                .flat_map(|l| l.value.iter())
                .filter_map(np_port)
                .collect();
            self.program.rules.push(Rule {
                origin: self.origin(p, span),
                subject: subject.clone(),
                direction: dir,
                action: Action::Allow,
                peers: out,
                l4,
                l7: None,
            });
        }
    }

    fn np_peer(&self, ns: &str, peer: &ast::NetworkPolicyPeer, out: &mut Vec<Peer>) {
        if let Some(b) = &peer.ip_block {
            if let Some(net) = b.cidr.as_ref().and_then(|c| c.value.parse::<IpNet>().ok()) {
                let except = b
                    .except
                    .iter()
                    .flat_map(|l| l.value.iter())
                    .filter_map(|e| e.value.parse().ok())
                    .collect();
                out.push(Peer::Cidr {
                    net: net.trunc(),
                    except,
                });
            }
            return;
        }
        let mut sel = peer
            .pod_selector
            .as_ref()
            .map(|s| labels::selector(s))
            .unwrap_or_default();
        match &peer.namespace_selector {
            // A namespaceSelector selects namespaces by their labels, which Cilium carries on
            // each pod as io.cilium.k8s.namespace.labels.<key>.
            Some(nsel) => {
                for (k, op, values) in labels::selector(nsel).requirements {
                    let (_, key) = labels::split_source(&k);
                    sel.requirements.push((
                        format!("k8s:{NAMESPACE_LABELS_PREFIX}{key}"),
                        op,
                        values,
                    ));
                }
                sel.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::Exists, &[]);
            }
            None => sel.add(&format!("k8s:{NAMESPACE_LABEL}"), Operator::In, &[ns]),
        }
        out.push(Peer::Selector(sel));
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    }
}

/// A NetworkPolicy port: protocol defaults to TCP; no port means every port of the protocol.
fn np_port(p: &Spanned<ast::NetworkPolicyPort>) -> Option<L4Term> {
    let proto = Protocol::parse(p.protocol.as_ref().map_or("TCP", |s| s.value.as_str()))?;
    let protocols = vec![proto];
    Some(
        match p.port.as_ref().map(|s| vocab::parse_port(&s.value.0)) {
            None => L4Term::Ports {
                protocols,
                range: PortRange::ALL,
            },
            Some(Ok(PortRef::Number(n))) => {
                let hi = p
                    .end_port
                    .as_ref()
                    .and_then(|e| u16::try_from(e.value).ok())
                    .filter(|e| *e >= n)
                    .unwrap_or(n);
                L4Term::Ports {
                    protocols,
                    range: PortRange { lo: n, hi },
                }
            }
            Some(Ok(PortRef::Name(name))) => L4Term::Named { protocols, name },
            Some(Err(_)) => return None,
        },
    )
}

/// The whole model: identities and endpoints of `cluster`, and every policy lowered onto them.
pub fn build(
    policies: &[ast::Policy],
    sources: &SourceMap,
    cluster: &Cluster,
    previous: &Allocation,
) -> Program {
    let mut program = cluster_program(cluster, previous);
    lower(policies, sources, cluster, &mut program);
    program
}

/// Gives back the spare capacity of what lowering appended to `program` since `from` (its
/// rules, enforcement and requirements counts then): vectors grown by pushes hold up to twice
/// their length, and a program keeps hundreds of thousands of small ones (selector
/// requirements, peer and port lists).
fn compact(program: &mut Program, from: (usize, usize, usize)) {
    fn selector(s: &mut Selector) {
        for (_, _, values) in &mut s.requirements {
            values.shrink_to_fit();
        }
        s.requirements.shrink_to_fit();
    }
    fn subject(s: &mut Subject) {
        match s {
            Subject::Endpoints(s) | Subject::Nodes(s) => selector(s),
        }
    }
    for rule in program.rules.values_mut().skip(from.0) {
        subject(&mut rule.subject);
        for p in &mut rule.peers {
            match p {
                Peer::Selector(s) | Peer::Nodes(s) => selector(s),
                Peer::Cidr { except, .. } => except.shrink_to_fit(),
                Peer::Fqdn(_) | Peer::Any => {}
            }
        }
        rule.peers.shrink_to_fit();
        for t in &mut rule.l4 {
            if let L4Term::Ports { protocols, .. } | L4Term::Named { protocols, .. } = t {
                protocols.shrink_to_fit();
            }
        }
        rule.l4.shrink_to_fit();
    }
    for e in &mut program.enforcement[from.1..] {
        subject(&mut e.subject);
    }
    for q in &mut program.requirements[from.2..] {
        subject(&mut q.subject);
        selector(&mut q.selector);
    }
}

/// [`build`] that takes the policies and drops each one's syntax tree once it is lowered. The
/// trees are the largest thing a compile holds (in the compile benchmark's 10× set, 100,000
/// policies parse to 386 MiB of heap, against 221 MiB for the whole program with its 50,000
/// endpoints); freed as lowering goes, their memory is reused for the program instead of both
/// being held at once, so lowering no longer raises the compile's peak. Same program as
/// [`build`].
pub fn build_consuming(
    policies: Vec<ast::Policy>,
    sources: &SourceMap,
    cluster: &Cluster,
    previous: &Allocation,
) -> Program {
    // Lowering only appends rules, enforcement and requirements (it reads no identity), so the
    // rules are made first, while the trees go, and the snapshot's identities and endpoints
    // (with their transient copies of label sets) after.
    let mut rules = Program::default();
    let mut cx = Lowering {
        sources,
        cluster,
        program: &mut rules,
    };
    for p in policies {
        cx.policy_compact(&p);
    }
    cx.program.rules.shrink_to_fit();
    cx.program.enforcement.shrink_to_fit();
    cx.program.requirements.shrink_to_fit();
    let mut program = cluster_program(cluster, previous);
    program.rules = rules.rules;
    program.enforcement = rules.enforcement;
    program.requirements = rules.requirements;
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowering the policies while dropping them gives the program [`build`] gives, identity
    /// for identity and rule for rule (every example set, over the example cluster).
    #[test]
    fn build_consuming_builds_the_same_program() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the compiler crate sits in the workspace")
            .join("policies");
        let mut sets = 0;
        for dir in std::fs::read_dir(&root)
            .expect("policies/ exists")
            .flatten()
        {
            if !dir.path().is_dir() {
                continue;
            }
            let Ok(mut set) = crate::PolicySet::load(&[dir.path()]) else {
                continue;
            };
            let cluster = Cluster::load(&[root.join("cluster.yaml")], &mut set.sources)
                .expect("the example cluster loads");
            let previous = Allocation::default();
            let whole = build(&set.policies, &set.sources, &cluster, &previous);
            let policies = std::mem::take(&mut set.policies);
            let consumed = build_consuming(policies, &set.sources, &cluster, &previous);
            assert_eq!(
                format!("{whole:?}"),
                format!("{consumed:?}"),
                "{}",
                dir.path().display()
            );
            sets += 1;
        }
        assert!(sets >= 3, "{sets} example sets");
    }
}
