//! The typed syntax tree of the three policy kinds, every node with its [`Span`].
//!
//! Field names and nesting follow Cilium's `pkg/policy/api` types (`Rule`, `IngressRule`,
//! `EgressRule`, `PortRule`, `L7Rules`, …) and Kubernetes' `networking.k8s.io/v1` types, so the
//! serialised form is the YAML users write and the derived JSON Schema (`cnpc schema`) matches
//! what the API servers accept. Fields are optional here even where the API requires them: the
//! decoder reports a missing field and keeps going, so one run finds every problem.

use crate::source::Span;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, Serializer};
use std::borrow::Cow;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Spanned<T> {
        Spanned { value, span }
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

pub type SString = Spanned<String>;
pub type List<T> = Vec<Spanned<T>>;

/// A Kubernetes-style string map (`matchLabels`, `labels`), keeping each key's and value's place.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelMap(pub Vec<(SString, SString)>);

impl Serialize for LabelMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(&k.value, &v.value)?;
        }
        m.end()
    }
}

impl JsonSchema for LabelMap {
    fn schema_name() -> Cow<'static, str> {
        "LabelMap".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({"type": "object", "additionalProperties": {"type": "string"}})
    }
}

/// A field that Kubernetes types as int-or-string (ports, ICMP types), kept as written.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct IntOrString(pub String);

impl JsonSchema for IntOrString {
    fn schema_name() -> Cow<'static, str> {
        "IntOrString".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({"anyOf": [{"type": "integer"}, {"type": "string"}]})
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl PolicyKind {
    pub fn from_kind(kind: &str) -> Option<PolicyKind> {
        Some(match kind {
            "CiliumNetworkPolicy" => PolicyKind::CiliumNetworkPolicy,
            "CiliumClusterwideNetworkPolicy" => PolicyKind::CiliumClusterwideNetworkPolicy,
            "NetworkPolicy" => PolicyKind::NetworkPolicy,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "networking.k8s.io/v1",
            _ => "cilium.io/v2",
        }
    }

    /// Namespaced kinds scope their selectors to their own namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, PolicyKind::CiliumClusterwideNetworkPolicy)
    }
}

/// One policy object from one YAML document (or one item of a `kind: List`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub kind: PolicyKind,
    pub api_version: Option<SString>,
    pub metadata: ObjectMeta,
    #[serde(flatten)]
    pub body: PolicyBody,
    /// The whole object.
    #[serde(skip)]
    pub span: Span,
    /// The `kind:` value, for diagnostics about the object as a whole.
    #[serde(skip)]
    pub kind_span: Span,
}

impl Policy {
    /// `namespace/name`, or `name` for cluster-wide policies; for messages.
    pub fn display_name(&self) -> String {
        let name = self
            .metadata
            .name
            .as_ref()
            .map_or("<unnamed>", |n| n.value.as_str());
        match &self.metadata.namespace {
            Some(ns) => format!("{}/{}", ns.value, name),
            None => name.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PolicyBody {
    /// CNP or CCNP: `spec` and `specs` both hold Cilium rules; we keep them apart to report which.
    Cilium {
        // Boxed: a rule is large, and most bodies are read through `cilium_rules`.
        spec: Option<Box<Spanned<Rule>>>,
        specs: Option<List<Rule>>,
    },
    Kubernetes {
        spec: Option<Box<Spanned<NetworkPolicySpec>>>,
    },
}

impl PolicyBody {
    /// Every Cilium rule of the object, `spec` first.
    pub fn cilium_rules(&self) -> impl Iterator<Item = &Spanned<Rule>> {
        let (spec, specs) = match self {
            PolicyBody::Cilium { spec, specs } => (spec.as_deref(), specs.as_deref()),
            PolicyBody::Kubernetes { .. } => (None, None),
        };
        spec.into_iter().chain(specs.unwrap_or_default())
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<SString>,
    pub namespace: Option<SString>,
    pub labels: Option<Spanned<LabelMap>>,
    pub annotations: Option<Spanned<LabelMap>>,
}

// ---------------------------------------------------------------------------------------------
// Cilium rules (pkg/policy/api/rule.go and friends)

/// One Cilium policy rule: whom it selects and what it allows or denies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Rule {
    pub endpoint_selector: Option<Spanned<LabelSelector>>,
    pub node_selector: Option<Spanned<LabelSelector>>,
    pub ingress: Option<Spanned<List<IngressRule>>>,
    pub ingress_deny: Option<Spanned<List<IngressDenyRule>>>,
    pub egress: Option<Spanned<List<EgressRule>>>,
    pub egress_deny: Option<Spanned<List<EgressDenyRule>>>,
    pub labels: Option<List<RuleLabel>>,
    pub enable_default_deny: Option<Spanned<DefaultDeny>>,
    pub description: Option<SString>,
    pub log: Option<Spanned<LogConfig>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct LabelSelector {
    pub match_labels: Option<Spanned<LabelMap>>,
    pub match_expressions: Option<List<LabelSelectorRequirement>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: Option<SString>,
    pub operator: Option<SString>,
    pub values: Option<Spanned<List<String>>>,
}

/// Peers an ingress rule may name; Cilium's `IngressCommonRule`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressPeers {
    pub from_endpoints: Option<Spanned<List<LabelSelector>>>,
    pub from_requires: Option<Spanned<List<LabelSelector>>>,
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Spanned<List<String>>>,
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Spanned<List<CidrRule>>>,
    pub from_entities: Option<Spanned<List<String>>>,
    pub from_groups: Option<Spanned<List<Groups>>>,
    pub from_nodes: Option<Spanned<List<LabelSelector>>>,
}

/// Peers an egress rule may name; Cilium's `EgressCommonRule` plus `toFQDNs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPeers {
    pub to_endpoints: Option<Spanned<List<LabelSelector>>>,
    pub to_requires: Option<Spanned<List<LabelSelector>>>,
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Spanned<List<String>>>,
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Spanned<List<CidrRule>>>,
    pub to_entities: Option<Spanned<List<String>>>,
    pub to_services: Option<Spanned<List<ServiceSelector>>>,
    pub to_groups: Option<Spanned<List<Groups>>>,
    pub to_nodes: Option<Spanned<List<LabelSelector>>>,
}

/// How Cilium reads a rule's peer lists (pkg/policy/utils, mergeEndpointSelectors: "explicitly
/// check for empty non-nil slices, it should not result in any identity being selected"; the
/// reference flow finder: "nil L3 = match nothing. Empty L3 = match everything").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLists {
    /// No peer list given: the rule selects every peer.
    Absent,
    /// A list given but empty (`fromEndpoints: []`): the rule selects no peer.
    ExplicitlyEmpty,
    Given,
}

fn peer_lists(lens: [Option<usize>; 5]) -> PeerLists {
    if lens.contains(&Some(0)) {
        PeerLists::ExplicitlyEmpty
    } else if lens.iter().all(Option::is_none) {
        PeerLists::Absent
    } else {
        PeerLists::Given
    }
}

fn len<T>(l: &Option<Spanned<List<T>>>) -> Option<usize> {
    l.as_ref().map(|l| l.value.len())
}

/// Whether a rule has L4 terms in Cilium's sense (`len(ToPorts) > 0 || len(ICMPs) > 0`), which
/// decides whether a rule naming no peer selects every peer or none.
pub fn has_l4<P>(
    to_ports: &Option<Spanned<List<P>>>,
    icmps: &Option<Spanned<List<IcmpRule>>>,
) -> bool {
    to_ports.as_ref().is_some_and(|l| !l.value.is_empty())
        || icmps.as_ref().is_some_and(|l| !l.value.is_empty())
}

impl IngressPeers {
    /// The state of the lists Cilium checks: endpoints, nodes, entities, CIDR, CIDR set.
    pub fn lists(&self) -> PeerLists {
        peer_lists([
            len(&self.from_endpoints),
            len(&self.from_nodes),
            len(&self.from_entities),
            len(&self.from_cidr),
            len(&self.from_cidr_set),
        ])
    }
}

impl EgressPeers {
    /// The state of the lists Cilium checks: endpoints, nodes, entities, CIDR, CIDR set.
    pub fn lists(&self) -> PeerLists {
        peer_lists([
            len(&self.to_endpoints),
            len(&self.to_nodes),
            len(&self.to_entities),
            len(&self.to_cidr),
            len(&self.to_cidr_set),
        ])
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct IngressRule {
    #[serde(flatten)]
    pub peers: IngressPeers,
    pub to_ports: Option<Spanned<List<PortRule>>>,
    pub icmps: Option<Spanned<List<IcmpRule>>>,
    pub authentication: Option<Spanned<Authentication>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct IngressDenyRule {
    #[serde(flatten)]
    pub peers: IngressPeers,
    pub to_ports: Option<Spanned<List<PortDenyRule>>>,
    pub icmps: Option<Spanned<List<IcmpRule>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct EgressRule {
    #[serde(flatten)]
    pub peers: EgressPeers,
    #[serde(rename = "toFQDNs")]
    pub to_fqdns: Option<Spanned<List<FqdnSelector>>>,
    pub to_ports: Option<Spanned<List<PortRule>>>,
    pub icmps: Option<Spanned<List<IcmpRule>>>,
    pub authentication: Option<Spanned<Authentication>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct EgressDenyRule {
    #[serde(flatten)]
    pub peers: EgressPeers,
    pub to_ports: Option<Spanned<List<PortDenyRule>>>,
    pub icmps: Option<Spanned<List<IcmpRule>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct CidrRule {
    pub cidr: Option<SString>,
    pub cidr_group_ref: Option<SString>,
    pub cidr_group_selector: Option<Spanned<LabelSelector>>,
    pub except: Option<Spanned<List<String>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ServiceSelector {
    pub k8s_service: Option<Spanned<K8sServiceName>>,
    pub k8s_service_selector: Option<Spanned<K8sServiceSelector>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct K8sServiceName {
    pub service_name: Option<SString>,
    pub namespace: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct K8sServiceSelector {
    pub selector: Option<Spanned<LabelSelector>>,
    pub namespace: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct FqdnSelector {
    pub match_name: Option<SString>,
    pub match_pattern: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Groups {
    pub aws: Option<Spanned<AwsGroup>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct AwsGroup {
    pub labels: Option<Spanned<LabelMap>>,
    pub security_groups_ids: Option<List<String>>,
    pub security_groups_names: Option<List<String>>,
    pub region: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct PortRule {
    pub ports: Option<Spanned<List<PortProtocol>>>,
    #[serde(rename = "terminatingTLS")]
    pub terminating_tls: Option<Spanned<TlsContext>>,
    #[serde(rename = "originatingTLS")]
    pub originating_tls: Option<Spanned<TlsContext>>,
    pub server_names: Option<Spanned<List<String>>>,
    pub listener: Option<Spanned<Listener>>,
    pub rules: Option<Spanned<L7Rules>>,
}

/// `toPorts` entry of a deny rule: ports only, no L7.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct PortDenyRule {
    pub ports: Option<Spanned<List<PortProtocol>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct PortProtocol {
    /// A number ("80") or an IANA service name ("http"); Cilium types it as a string.
    pub port: Option<SString>,
    pub end_port: Option<Spanned<i64>>,
    pub protocol: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct TlsContext {
    pub secret: Option<Spanned<SecretRef>>,
    #[serde(rename = "trustedCA")]
    pub trusted_ca: Option<SString>,
    pub certificate: Option<SString>,
    pub private_key: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct SecretRef {
    pub namespace: Option<SString>,
    pub name: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Listener {
    pub envoy_config: Option<Spanned<EnvoyConfigRef>>,
    pub name: Option<SString>,
    pub priority: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct EnvoyConfigRef {
    pub kind: Option<SString>,
    pub name: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct L7Rules {
    pub http: Option<Spanned<List<HttpRule>>>,
    pub kafka: Option<Spanned<List<KafkaRule>>>,
    pub dns: Option<Spanned<List<FqdnSelector>>>,
    pub l7proto: Option<SString>,
    pub l7: Option<Spanned<List<LabelMap>>>,
}

impl L7Rules {
    /// Whether any L7 rule is present (Cilium's `!L7Rules.IsEmpty()`).
    pub fn is_empty(&self) -> bool {
        self.http.is_none()
            && self.kafka.is_none()
            && self.dns.is_none()
            && self.l7proto.is_none()
            && self.l7.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct HttpRule {
    pub path: Option<SString>,
    pub method: Option<SString>,
    pub host: Option<SString>,
    pub headers: Option<Spanned<List<String>>>,
    pub header_matches: Option<Spanned<List<HeaderMatch>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct HeaderMatch {
    pub mismatch: Option<SString>,
    pub name: Option<SString>,
    pub secret: Option<Spanned<SecretRef>>,
    pub value: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct KafkaRule {
    pub role: Option<SString>,
    pub api_key: Option<SString>,
    pub api_version: Option<SString>,
    #[serde(rename = "clientID")]
    pub client_id: Option<SString>,
    pub topic: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct IcmpRule {
    pub fields: Option<Spanned<List<IcmpField>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct IcmpField {
    pub family: Option<SString>,
    /// A number (8) or a message name (EchoRequest).
    #[serde(rename = "type")]
    pub icmp_type: Option<Spanned<IntOrString>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Authentication {
    pub mode: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct DefaultDeny {
    pub ingress: Option<Spanned<bool>>,
    pub egress: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct RuleLabel {
    pub key: Option<SString>,
    pub value: Option<SString>,
    pub source: Option<SString>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct LogConfig {
    pub value: Option<SString>,
}

// ---------------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy (networking.k8s.io/v1)

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct NetworkPolicySpec {
    pub pod_selector: Option<Spanned<LabelSelector>>,
    pub ingress: Option<Spanned<List<NetworkPolicyIngressRule>>>,
    pub egress: Option<Spanned<List<NetworkPolicyEgressRule>>>,
    pub policy_types: Option<Spanned<List<String>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    pub from: Option<Spanned<List<NetworkPolicyPeer>>>,
    pub ports: Option<Spanned<List<NetworkPolicyPort>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    pub to: Option<Spanned<List<NetworkPolicyPeer>>>,
    pub ports: Option<Spanned<List<NetworkPolicyPort>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    pub pod_selector: Option<Spanned<LabelSelector>>,
    pub namespace_selector: Option<Spanned<LabelSelector>>,
    pub ip_block: Option<Spanned<IpBlock>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: Option<SString>,
    pub except: Option<Spanned<List<String>>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct NetworkPolicyPort {
    pub protocol: Option<SString>,
    pub port: Option<Spanned<IntOrString>>,
    pub end_port: Option<Spanned<i64>>,
}
