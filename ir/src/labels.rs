//! Label sets and label selectors, with Cilium's source prefixes.
//!
//! Cilium gives each label a source (pkg/labels): pod labels are `k8s:key=value`, reserved
//! identities carry `reserved:<name>`. A selector key with a source (`k8s:app`) matches only a
//! label of that source; a key without one, or with `any:`, matches a label of any source.

use std::collections::BTreeMap;

/// Sources a selector key may start with.
pub const LABEL_SOURCES: &[&str] = &[
    "k8s",
    "any",
    "reserved",
    "unspec",
    "container",
    "cni",
    "cidr",
    "fqdn",
    "kvstore",
    "cilium-generated",
    "k8s-annotation",
];

/// Splits `source:key`; a key without a known source prefix has source `any`.
pub fn split_source(key: &str) -> (&str, &str) {
    match key.split_once(':') {
        Some((source, rest)) if LABEL_SOURCES.contains(&source) => (source, rest),
        _ => ("any", key),
    }
}

/// An identity's labels: key → (source, value). Ordered, so equal sets compare and hash equal.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct LabelSet(pub BTreeMap<String, (String, String)>);

impl LabelSet {
    pub fn insert(&mut self, source: &str, key: &str, value: &str) {
        self.0
            .insert(key.to_string(), (source.to_string(), value.to_string()));
    }

    /// The value of a selector key (`k8s:app`, `any:app` or `app`), if present with a matching
    /// source.
    pub fn get(&self, selector_key: &str) -> Option<&str> {
        let (source, key) = split_source(selector_key);
        let (s, v) = self.0.get(key)?;
        (source == "any" || source == s).then_some(v.as_str())
    }

    /// `source:key=value` labels, sorted, for display.
    pub fn to_strings(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(k, (s, v))| {
                if v.is_empty() {
                    format!("{s}:{k}")
                } else {
                    format!("{s}:{k}={v}")
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A Kubernetes label selector over Cilium labels: all requirements must hold. An empty
/// selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub requirements: Vec<(String, Operator, Vec<String>)>,
}

impl Selector {
    pub fn add(&mut self, key: &str, op: Operator, values: &[&str]) {
        self.requirements.push((
            key.to_string(),
            op,
            values.iter().map(|v| v.to_string()).collect(),
        ));
    }

    pub fn with(mut self, key: &str, op: Operator, values: &[&str]) -> Selector {
        self.add(key, op, values);
        self
    }

    /// Whether any requirement names `key` (with any source prefix).
    pub fn has_key(&self, key: &str) -> bool {
        self.requirements
            .iter()
            .any(|(k, _, _)| split_source(k).1 == key)
    }

    /// Whether any requirement's key (without source) starts with `prefix`.
    pub fn has_key_prefix(&self, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|(k, _, _)| split_source(k).1.starts_with(prefix))
    }

    /// Whether any requirement uses the given source explicitly (`reserved:`).
    pub fn has_source(&self, source: &str) -> bool {
        self.requirements
            .iter()
            .any(|(k, _, _)| split_source(k).0 == source)
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|(k, op, values)| {
            let have = labels.get(k);
            match op {
                Operator::In => have.is_some_and(|h| values.iter().any(|v| v == h)),
                Operator::NotIn => have.is_none_or(|h| !values.iter().any(|v| v == h)),
                Operator::Exists => have.is_some(),
                Operator::DoesNotExist => have.is_none(),
            }
        })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|(k, op, v)| match op {
                Operator::In if v.len() == 1 => format!("{k}={}", v[0]),
                Operator::In => format!("{k} in ({})", v.join(",")),
                Operator::NotIn => format!("{k} notin ({})", v.join(",")),
                Operator::Exists => k.clone(),
                Operator::DoesNotExist => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_prefixes_scope_selector_keys() {
        let mut l = LabelSet::default();
        l.insert("k8s", "app", "web");
        l.insert("reserved", "host", "");
        assert_eq!(l.get("app"), Some("web"));
        assert_eq!(l.get("k8s:app"), Some("web"));
        assert_eq!(l.get("any:app"), Some("web"));
        assert_eq!(l.get("reserved:app"), None);
        assert!(Selector::default()
            .with("reserved:host", Operator::Exists, &[])
            .matches(&l));
        assert!(!Selector::default()
            .with("k8s:host", Operator::Exists, &[])
            .matches(&l));
    }
}
