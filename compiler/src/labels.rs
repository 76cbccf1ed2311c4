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

/// Label sets indexed by key (without source) and value: the positions of the sets holding each
/// pair, so that the sets a selector may match are found from its rarest `In` requirement
/// rather than by trying every set (a label set has one value per key, whatever the source).
/// The table compiler indexes rule subjects with it, the selects-nothing lint workloads and
/// nodes. Its maps hash with rustc's FxHash: the keys are label strings of the inputs, looked up
/// once per selector, not chosen to collide.
pub(crate) struct LabelIndex<'a> {
    by_kv: rustc_hash::FxHashMap<&'a str, rustc_hash::FxHashMap<&'a str, Vec<u32>>>,
}

impl<'a> LabelIndex<'a> {
    /// Indexes `sets`, numbered in order from 0.
    pub(crate) fn new(sets: impl IntoIterator<Item = &'a LabelSet>) -> LabelIndex<'a> {
        let mut by_kv: rustc_hash::FxHashMap<&str, rustc_hash::FxHashMap<&str, Vec<u32>>> =
            Default::default();
        for (i, set) in sets.into_iter().enumerate() {
            for (k, (_, v)) in &set.0 {
                by_kv
                    .entry(k.as_str())
                    .or_default()
                    .entry(v.as_str())
                    .or_default()
                    .push(i as u32);
            }
        }
        LabelIndex { by_kv }
    }

    /// The positions of the sets with `key` (without source) set to `value`, in order.
    pub(crate) fn positions(&self, key: &str, value: &str) -> Option<&Vec<u32>> {
        self.by_kv.get(key)?.get(value)
    }
}

/// The IR form of a selector as written. Malformed requirements (reported by validation) become
/// requirements that match nothing, so a broken selector never widens.
pub fn selector(sel: &LabelSelector) -> Selector {
    selector_skipping_label(sel, None)
}

/// The endpointSelector of a namespaced CNP: it always selects in the policy's namespace. Like
/// Cilium's ParseToCiliumRule (pkg/k8s/apis/cilium.io/utils/utils.go, AddMatch), a matchLabels
/// entry for the namespace key is replaced by the policy's namespace; matchExpressions on that
/// key stay and are ANDed.
pub fn namespaced_subject(sel: &LabelSelector, namespace: &str) -> Selector {
    let mut s = selector_skipping_label(sel, Some(NAMESPACE_LABEL));
    s.add(
        &format!("k8s:{NAMESPACE_LABEL}"),
        Operator::In,
        &[namespace],
    );
    s
}

/// The matchLabels entries of `sel` whose key (without source prefix) is `key`.
pub fn match_labels_of<'a>(
    sel: &'a LabelSelector,
    key: &'a str,
) -> impl Iterator<Item = &'a (crate::ast::SString, crate::ast::SString)> + 'a {
    sel.match_labels
        .iter()
        .flat_map(|m| m.value.0.iter())
        .filter(move |(k, _)| split_source(&k.value).1 == key)
}

fn selector_skipping_label(sel: &LabelSelector, skip: Option<&str>) -> Selector {
    let mut s = Selector::default();
    for (k, v) in sel.match_labels.iter().flat_map(|m| m.value.0.iter()) {
        if skip.is_some_and(|key| split_source(&k.value).1 == key) {
            continue;
        }
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
