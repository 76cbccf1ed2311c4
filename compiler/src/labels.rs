//! Cilium security labels and label-selector matching.
//!
//! Cilium gives each endpoint labels with a source prefix (pkg/labels): pod labels become
//! `k8s:key=value`, and Cilium adds `k8s:io.kubernetes.pod.namespace`,
//! `k8s:io.cilium.k8s.namespace.labels.<key>` for each namespace label,
//! `k8s:io.cilium.k8s.policy.serviceaccount` and `k8s:io.cilium.k8s.policy.cluster`. A selector
//! key with a source (`k8s:app`) matches only labels of that source; a key without one, or with
//! `any:`, matches any source (pkg/labels: `any` source).

use crate::ast::LabelSelector;
use std::collections::BTreeMap;

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// An endpoint's labels: key → (source, value). Keys are unique within an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct LabelSet(pub BTreeMap<String, (String, String)>);

impl LabelSet {
    pub fn insert(&mut self, source: &str, key: &str, value: &str) {
        self.0
            .insert(key.to_string(), (source.to_string(), value.to_string()));
    }

    /// The value of a selector key (`k8s:app`, `any:app` or `app`), if the label is present
    /// with a matching source.
    pub fn get(&self, selector_key: &str) -> Option<&str> {
        let (source, key) = split_source(selector_key);
        let (s, v) = self.0.get(key)?;
        (source == "any" || source == s).then_some(v.as_str())
    }

    /// Whether `sel` selects this label set (Kubernetes LabelSelector semantics: all of
    /// matchLabels and every matchExpressions requirement).
    pub fn matches(&self, sel: &LabelSelector) -> bool {
        let labels_ok = sel
            .match_labels
            .iter()
            .flat_map(|m| m.value.0.iter())
            .all(|(k, v)| self.get(&k.value) == Some(v.value.as_str()));
        labels_ok
            && sel.match_expressions.iter().flatten().all(|req| {
                let Some(key) = &req.key else { return false };
                let values: Vec<&str> = req
                    .values
                    .iter()
                    .flat_map(|l| l.value.iter())
                    .map(|v| v.value.as_str())
                    .collect();
                let have = self.get(&key.value);
                match req.operator.as_ref().map(|o| o.value.as_str()) {
                    Some("In") => have.is_some_and(|h| values.contains(&h)),
                    Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
                    Some("Exists") => have.is_some(),
                    Some("DoesNotExist") => have.is_none(),
                    _ => false,
                }
            })
    }
}

/// Splits `source:key`; a key without a known source prefix has source `any`.
pub fn split_source(key: &str) -> (&str, &str) {
    match key.split_once(':') {
        Some((source, rest)) if crate::vocab::LABEL_SOURCES.contains(&source) => (source, rest),
        _ => ("any", key),
    }
}
