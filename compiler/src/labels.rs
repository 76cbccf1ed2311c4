//! Cilium security labels of endpoints, and AST selectors as IR [`Selector`]s.
//!
//! Cilium gives each endpoint labels with a source prefix (pkg/labels): pod labels become
//! `k8s:key=value`, and Cilium adds `k8s:io.kubernetes.pod.namespace`,
//! `k8s:io.cilium.k8s.namespace.labels.<key>` for each namespace label,
//! `k8s:io.cilium.k8s.policy.serviceaccount` and `k8s:io.cilium.k8s.policy.cluster`.

pub use cnpc_ir::labels::{split_source, LabelSet, Operator, Selector, LABEL_SOURCES};

use crate::ast::LabelSelector;

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// The IR form of a selector as written. Malformed requirements (reported by validation) become
/// requirements that match nothing, so a broken selector never widens.
pub fn selector(sel: &LabelSelector) -> Selector {
    let mut s = Selector::default();
    for (k, v) in sel.match_labels.iter().flat_map(|m| m.value.0.iter()) {
        s.add(&k.value, Operator::In, &[&v.value]);
    }
    for req in sel.match_expressions.iter().flatten() {
        let key = req.key.as_ref().map_or("", |k| k.value.as_str());
        let values: Vec<&str> = req
            .values
            .iter()
            .flat_map(|l| l.value.iter())
            .map(|v| v.value.as_str())
            .collect();
        let op = match req.operator.as_ref().map(|o| o.value.as_str()) {
            Some("In") => Operator::In,
            Some("NotIn") => Operator::NotIn,
            Some("Exists") => Operator::Exists,
            Some("DoesNotExist") => Operator::DoesNotExist,
            _ => {
                s.add(key, Operator::In, &[]);
                continue;
            }
        };
        s.add(key, op, &values);
    }
    s
}

/// Whether `sel` selects `labels`.
pub fn matches(labels: &LabelSet, sel: &LabelSelector) -> bool {
    selector(sel).matches(labels)
}
