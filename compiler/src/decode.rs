//! Decoding positioned YAML into the typed AST.
//!
//! Why not serde: a serde deserializer stops at the first error and forgets where values were.
//! `cnpc check` must report every unknown field, wrong type and missing value of every file in one
//! run, each at its own line, so decoding walks the [`Node`] tree itself and records diagnostics
//! as it goes. Each AST struct lists its fields once, in [`decode_struct!`].
//!
//! Unknown fields matter for security, not just tidiness: the Kubernetes API server prunes fields
//! a CRD schema does not know, so a misspelt `matchLabel` inside a selector silently becomes an
//! empty selector that matches every pod.

use crate::ast::*;
use crate::diag::{did_you_mean, Code, Diagnostic};
use crate::yaml::{Node, NodeKind, ScalarType};

/// Decoding context: where diagnostics go.
pub struct Cx<'a> {
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Cx<'_> {
    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn wrong_type(&mut self, node: &Node, expected: &str) {
        let mut d = Diagnostic::new(
            Code::WrongType,
            node.span,
            format!("expected {expected}, found {}", node.describe()),
        )
        .label(format!("this should be {expected}"));
        if let (NodeKind::Scalar(s), true) = (&node.kind, expected == "a string") {
            d = d.help(format!(
                "the API server rejects {} here; quote it to make it a string: \"{}\"",
                node.describe(),
                s.text
            ));
        } else {
            d = d.help(format!("write {expected} here"));
        }
        self.push(d);
    }

    /// Opens a mapping node for field-by-field decoding. `null` reads as an empty mapping, as the
    /// Kubernetes API reads it.
    pub fn fields<'n>(&mut self, node: &'n Node, what: &'static str) -> Option<Fields<'n>> {
        let entries: &'n [(Node, Node)] = match &node.kind {
            NodeKind::Map(entries) => entries,
            NodeKind::Null => &[],
            _ => {
                self.wrong_type(node, "a mapping");
                return None;
            }
        };
        for (i, (k, _)) in entries.iter().enumerate() {
            if let Some(first) = entries[..i].iter().find(|(k0, _)| k0.kind == k.kind) {
                self.push(
                    Diagnostic::new(
                        Code::DuplicateKey,
                        k.span,
                        format!(
                            "key `{}` appears twice in this {what}",
                            k.as_str().unwrap_or("?")
                        ),
                    )
                    .label("second occurrence")
                    .related(first.0.span, "first occurrence")
                    .help("remove one of them; the API server keeps only the last"),
                );
            }
        }
        Some(Fields {
            node,
            entries,
            used: vec![false; entries.len()],
            known: Vec::new(),
            what,
        })
    }
}

/// The fields of one mapping, read by name; what nobody asked for is reported by [`Fields::finish`].
pub struct Fields<'n> {
    pub node: &'n Node,
    entries: &'n [(Node, Node)],
    used: Vec<bool>,
    known: Vec<&'static str>,
    what: &'static str,
}

impl<'n> Fields<'n> {
    /// The raw value of `key`, null included. With a duplicated key (already reported) the last
    /// one wins, as in the API server's JSON decoding.
    pub fn raw(&mut self, key: &'static str) -> Option<&'n Node> {
        self.known.push(key);
        let mut found = None;
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if k.as_str() == Some(key) {
                self.used[i] = true;
                found = Some(v);
            }
        }
        found
    }

    /// The span of `key` itself (not its value), if present.
    pub fn key_span(&self, key: &str) -> Option<crate::source::Span> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k.span)
    }

    /// The decoded value of `key`; absent and null both read as `None`.
    pub fn opt<T: Decode>(&mut self, cx: &mut Cx, key: &'static str) -> Option<T> {
        let node = self.raw(key)?;
        if node.is_null() {
            return None;
        }
        T::decode(node, cx)
    }

    /// Like [`Fields::opt`], but a missing or null value is an error.
    pub fn req<T: Decode>(&mut self, cx: &mut Cx, key: &'static str, help: &str) -> Option<T> {
        let present = self.raw(key).is_some_and(|n| !n.is_null());
        if !present {
            cx.push(
                Diagnostic::new(
                    Code::MissingField,
                    self.node.span,
                    format!("this {} has no `{key}`", self.what),
                )
                .label(format!("`{key}` missing here"))
                .help(help.to_string()),
            );
            return None;
        }
        self.opt(cx, key)
    }

    /// Reports every key nobody read, as `code` (an error inside a spec, a warning outside it).
    pub fn finish_with(self, cx: &mut Cx, code: Code) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let name = match &k.kind {
                NodeKind::Scalar(s) => s.text.clone(),
                _ => {
                    cx.wrong_type(k, "a string key");
                    continue;
                }
            };
            let suggestion = did_you_mean(&name, self.known.iter().copied());
            let mut d = Diagnostic::new(
                code,
                k.span,
                format!("unknown field `{name}` in {}", self.what),
            );
            d = match (code, suggestion) {
                (Code::IgnoredField, _) => d
                    .label("not part of the object")
                    .help(match suggestion {
                        Some(s) => format!("did you mean `{s}`? The API server drops unknown top-level fields"),
                        None if name == "description" => {
                            "the API server drops it; move it under `spec:` as `spec.description`".to_string()
                        }
                        None => "the API server drops it; remove it".to_string(),
                    }),
                // Cilium 1.14 renamed the rule field `auth` to `authentication`; a policy
                // written for older releases keeps `auth`, which the API server now prunes.
                (_, Some("authentication")) if name == "auth" => d.label("renamed field").help(
                    "`auth` became `authentication` in Cilium 1.14 (`authentication: {mode: required}`); the API server silently drops `auth`, so this rule no longer asks for authentication",
                ),
                (_, Some(s)) => d.label("unknown field").help(format!(
                    "did you mean `{s}`? The API server silently drops unknown fields, so this one has no effect"
                )),
                (_, None) => d.label("unknown field").help(format!(
                    "{} has these fields: {}. The API server silently drops unknown fields",
                    self.what,
                    self.known.join(", ")
                )),
            };
            if self.what == "label selector" {
                let labels_null = self.node.get("matchLabels").is_some_and(Node::is_null);
                if labels_null && code == Code::UnknownField {
                    d.help = format!(
                        "`matchLabels` above is empty and `{name}` sits beside it; indent `{name}` under `matchLabels` to make it a label. As written the API server drops `{name}` and the selector matches every endpoint"
                    );
                } else {
                    d.help.push_str(
                        "; in a selector that leaves fewer constraints, and an empty selector matches every endpoint",
                    );
                }
            }
            cx.push(d);
        }
    }

    pub fn finish(self, cx: &mut Cx) {
        self.finish_with(cx, Code::UnknownField)
    }
}

/// Something the decoder can build from a node. `None` means a diagnostic was recorded.
pub trait Decode: Sized {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self>;
}

impl<T: Decode> Decode for Spanned<T> {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        T::decode(node, cx).map(|v| Spanned::new(v, node.span))
    }
}

impl<T: Decode> Decode for Box<T> {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        T::decode(node, cx).map(Box::new)
    }
}

impl<T: Decode> Decode for Vec<Spanned<T>> {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        match &node.kind {
            NodeKind::Seq(items) => {
                // Sized to the list: collecting a filter grows from four slots, and most lists
                // in policies hold one item, so a large policy set would carry mostly spare
                // capacity.
                let mut out = Vec::with_capacity(items.len());
                out.extend(items.iter().filter_map(|n| Spanned::<T>::decode(n, cx)));
                Some(out)
            }
            _ => {
                cx.wrong_type(node, "a list");
                None
            }
        }
    }
}

impl Decode for String {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        match &node.kind {
            NodeKind::Scalar(s) if s.scalar_type() == ScalarType::String => Some(s.text.clone()),
            _ => {
                cx.wrong_type(node, "a string");
                None
            }
        }
    }
}

impl Decode for IntOrString {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        match &node.kind {
            NodeKind::Scalar(s)
                if matches!(s.scalar_type(), ScalarType::String | ScalarType::Integer) =>
            {
                Some(IntOrString(s.text.clone()))
            }
            _ => {
                cx.wrong_type(node, "an integer or a string");
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        match &node.kind {
            NodeKind::Scalar(s) if s.scalar_type() == ScalarType::Boolean => {
                Some(s.text.eq_ignore_ascii_case("true"))
            }
            _ => {
                cx.wrong_type(node, "a boolean (true or false)");
                None
            }
        }
    }
}

impl Decode for i64 {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        match &node.kind {
            NodeKind::Scalar(s) if s.scalar_type() == ScalarType::Integer => match s.text.parse() {
                Ok(v) => Some(v),
                Err(_) => {
                    cx.push(
                        Diagnostic::new(
                            Code::WrongType,
                            node.span,
                            format!("`{}` is not a decimal integer", s.text),
                        )
                        .label("not a decimal integer")
                        .help("write the number in decimal, within 0..65535 for ports"),
                    );
                    None
                }
            },
            _ => {
                cx.wrong_type(node, "an integer");
                None
            }
        }
    }
}

impl Decode for LabelMap {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let f = cx.fields(node, "label map")?;
        let mut out = Vec::with_capacity(f.entries.len());
        for (k, v) in f.entries {
            let key = Spanned::<String>::decode(k, cx);
            let value = if v.is_null() {
                cx.push(
                    Diagnostic::new(
                        Code::WrongType,
                        k.span,
                        format!("label `{}` has no value", k.as_str().unwrap_or("?")),
                    )
                    .label("null value")
                    .help("write `key: \"\"` for an empty value; if the next line was meant to be inside this map, indent it"),
                );
                None
            } else {
                Spanned::<String>::decode(v, cx)
            };
            if let (Some(k), Some(v)) = (key, value) {
                out.push((k, v));
            }
        }
        Some(LabelMap(out))
    }
}

/// Implements [`Decode`] for an AST struct: each field from its YAML key, flattened parts from
/// the same mapping, and every other key reported as unknown.
macro_rules! decode_struct {
    ($ty:ident, $what:literal { $(@flatten $ff:ident,)* $($field:ident : $key:literal),* $(,)? }) => {
        impl DecodeFields for $ty {
            fn decode_fields(f: &mut Fields, cx: &mut Cx) -> Self {
                $ty {
                    $( $ff: DecodeFields::decode_fields(f, cx), )*
                    $( $field: f.opt(cx, $key), )*
                }
            }
        }
        impl Decode for $ty {
            fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
                let mut f = cx.fields(node, $what)?;
                let v = <$ty as DecodeFields>::decode_fields(&mut f, cx);
                f.finish(cx);
                Some(v)
            }
        }
    };
}

/// Decodes the fields of a struct from an already opened mapping (used for flattened parts).
pub trait DecodeFields: Sized {
    fn decode_fields(f: &mut Fields, cx: &mut Cx) -> Self;
}

decode_struct!(ObjectMeta, "metadata" { name: "name", namespace: "namespace", labels: "labels", annotations: "annotations" });
decode_struct!(LabelSelector, "label selector" { match_labels: "matchLabels", match_expressions: "matchExpressions" });
decode_struct!(LabelSelectorRequirement, "matchExpressions entry" { key: "key", operator: "operator", values: "values" });
decode_struct!(IngressPeers, "ingress rule" {
    from_endpoints: "fromEndpoints", from_requires: "fromRequires", from_cidr: "fromCIDR",
    from_cidr_set: "fromCIDRSet", from_entities: "fromEntities", from_groups: "fromGroups",
    from_nodes: "fromNodes",
});
decode_struct!(EgressPeers, "egress rule" {
    to_endpoints: "toEndpoints", to_requires: "toRequires", to_cidr: "toCIDR",
    to_cidr_set: "toCIDRSet", to_entities: "toEntities", to_services: "toServices",
    to_groups: "toGroups", to_nodes: "toNodes",
});
decode_struct!(IngressRule, "ingress rule" {
    @flatten peers, to_ports: "toPorts", icmps: "icmps", authentication: "authentication",
});
decode_struct!(IngressDenyRule, "ingressDeny rule" { @flatten peers, to_ports: "toPorts", icmps: "icmps" });
decode_struct!(EgressRule, "egress rule" {
    @flatten peers, to_fqdns: "toFQDNs", to_ports: "toPorts", icmps: "icmps", authentication: "authentication",
});
decode_struct!(EgressDenyRule, "egressDeny rule" { @flatten peers, to_ports: "toPorts", icmps: "icmps" });
decode_struct!(CidrRule, "CIDR rule" {
    cidr: "cidr", cidr_group_ref: "cidrGroupRef", cidr_group_selector: "cidrGroupSelector", except: "except",
});
decode_struct!(ServiceSelector, "service selector" { k8s_service: "k8sService", k8s_service_selector: "k8sServiceSelector" });
decode_struct!(K8sServiceName, "k8sService" { service_name: "serviceName", namespace: "namespace" });
decode_struct!(K8sServiceSelector, "k8sServiceSelector" { selector: "selector", namespace: "namespace" });
decode_struct!(FqdnSelector, "FQDN selector" { match_name: "matchName", match_pattern: "matchPattern" });
decode_struct!(Groups, "groups selector" { aws: "aws" });
decode_struct!(AwsGroup, "aws group" {
    labels: "labels", security_groups_ids: "securityGroupsIds", security_groups_names: "securityGroupsNames", region: "region",
});
decode_struct!(PortRule, "toPorts entry" {
    ports: "ports", terminating_tls: "terminatingTLS", originating_tls: "originatingTLS",
    server_names: "serverNames", listener: "listener", rules: "rules",
});
decode_struct!(PortDenyRule, "toPorts entry of a deny rule" { ports: "ports" });
decode_struct!(TlsContext, "TLS context" {
    secret: "secret", trusted_ca: "trustedCA", certificate: "certificate", private_key: "privateKey",
});
decode_struct!(SecretRef, "secret reference" { namespace: "namespace", name: "name" });
decode_struct!(Listener, "listener" { envoy_config: "envoyConfig", name: "name", priority: "priority" });
decode_struct!(EnvoyConfigRef, "envoyConfig" { kind: "kind", name: "name" });
decode_struct!(L7Rules, "L7 rules" { http: "http", kafka: "kafka", dns: "dns", l7proto: "l7proto", l7: "l7" });
decode_struct!(HttpRule, "HTTP rule" {
    path: "path", method: "method", host: "host", headers: "headers", header_matches: "headerMatches",
});
decode_struct!(HeaderMatch, "headerMatches entry" { mismatch: "mismatch", name: "name", secret: "secret", value: "value" });
decode_struct!(KafkaRule, "Kafka rule" {
    role: "role", api_key: "apiKey", api_version: "apiVersion", client_id: "clientID", topic: "topic",
});
decode_struct!(IcmpRule, "icmps entry" { fields: "fields" });
decode_struct!(IcmpField, "ICMP field" { family: "family", icmp_type: "type" });
decode_struct!(Authentication, "authentication" { mode: "mode" });
decode_struct!(DefaultDeny, "enableDefaultDeny" { ingress: "ingress", egress: "egress" });
decode_struct!(RuleLabel, "rule label" { key: "key", value: "value", source: "source" });
decode_struct!(LogConfig, "log" { value: "value" });
decode_struct!(NetworkPolicySpec, "NetworkPolicy spec" {
    pod_selector: "podSelector", ingress: "ingress", egress: "egress", policy_types: "policyTypes",
});
decode_struct!(NetworkPolicyIngressRule, "NetworkPolicy ingress rule" { from: "from", ports: "ports" });
decode_struct!(NetworkPolicyEgressRule, "NetworkPolicy egress rule" { to: "to", ports: "ports" });
decode_struct!(NetworkPolicyPeer, "NetworkPolicy peer" {
    pod_selector: "podSelector", namespace_selector: "namespaceSelector", ip_block: "ipBlock",
});
decode_struct!(IpBlock, "ipBlock" { cidr: "cidr", except: "except" });
decode_struct!(NetworkPolicyPort, "NetworkPolicy port" { protocol: "protocol", port: "port", end_port: "endPort" });

impl Decode for PortProtocol {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let mut f = cx.fields(node, "port")?;
        // PortProtocol.sanitize: "Port must be specified".
        let p = PortProtocol {
            port: f.req(
                cx,
                "port",
                "add `port: \"80\"`; use `port: \"0\"` for all ports of the protocol",
            ),
            end_port: f.opt(cx, "endPort"),
            protocol: f.opt(cx, "protocol"),
        };
        f.finish(cx);
        Some(p)
    }
}

/// Rule sections whose absence, null and `[]` all mean the same to Cilium (`len(...) > 0`).
const SECTIONS: [&str; 4] = ["ingress", "ingressDeny", "egress", "egressDeny"];

impl Decode for Rule {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let mut f = cx.fields(node, "policy rule")?;
        for key in SECTIONS {
            let Some(v) = f.raw(key) else { continue };
            let empty = v.is_null() || matches!(&v.kind, NodeKind::Seq(items) if items.is_empty());
            if empty {
                let key_span = f.key_span(key).unwrap_or(v.span);
                let span = if v.is_null() {
                    key_span
                } else {
                    key_span.to(v.span)
                };
                // pkg/policy/api/rule_validation.go (Rule.Sanitize): default deny for a direction
                // is enabled by `len(r.Egress) > 0 || len(r.EgressDeny) > 0`; null and [] do not.
                let dir = if key.starts_with("ingress") {
                    "ingress"
                } else {
                    "egress"
                };
                cx.push(
                    Diagnostic::new(
                        Code::EmptySection,
                        span,
                        format!("`{key}` is {}, so Cilium treats it as absent", if v.is_null() { "null" } else { "empty" }),
                    )
                    .label("no rules here")
                    .help(format!(
                        "this does not deny {dir} traffic; to deny all {dir} write `{key}: [{{}}]`, or set `enableDefaultDeny: {{{dir}: true}}`; otherwise remove the key"
                    )),
                );
            }
        }
        let rule = Rule {
            endpoint_selector: f.opt(cx, "endpointSelector"),
            node_selector: f.opt(cx, "nodeSelector"),
            ingress: f.opt(cx, "ingress"),
            ingress_deny: f.opt(cx, "ingressDeny"),
            egress: f.opt(cx, "egress"),
            egress_deny: f.opt(cx, "egressDeny"),
            labels: f.opt(cx, "labels"),
            enable_default_deny: f.opt(cx, "enableDefaultDeny"),
            description: f.opt(cx, "description"),
            log: f.opt(cx, "log"),
        };
        f.finish(cx);
        Some(rule)
    }
}
