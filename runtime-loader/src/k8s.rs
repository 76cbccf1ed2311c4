//! Kubernetes mode (`cnpc-loader --kubernetes`, the DaemonSet): the cluster is read from the
//! API server instead of files.
//!
//! - Watchers (kube-rs) list and watch CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
//!   NetworkPolicy, Namespaces, Nodes, Pods, Services and EndpointSlices into [`Objects`]. All
//!   Pods are watched, not only this node's: peers' identities come from their labels and
//!   addresses, and without Cilium's own CRDs the Pods are where those live.
//! - [`desired`], the reconcile core, is a pure function of the objects: each object becomes a
//!   source named `Kind/namespace/name`, so a diagnostic names the object, and the compiler
//!   builds the generation exactly as it does from files.
//! - Identities agree on every node ([`agree`]): the allocation lives in the ConfigMap
//!   `cnpc-identities`; a node compiles with the ConfigMap's allocation as `previous`, and
//!   when it needs numbers for new label sets it writes them back with the resourceVersion it
//!   read (optimistic concurrency). On a conflict it re-reads and recompiles, so every number a
//!   node enforces with has been committed to the ConfigMap first, and a committed number is
//!   never changed or reused (lower::allocate keeps `previous`).
//! - Status: each policy object gets this node's result, `status.cnpc.<node>` for Cilium's
//!   kinds (through the status subresource) and the annotation `status.cnpc.io/<node>` for
//!   NetworkPolicy, written only when it changes, so `kubectl get -o yaml` shows whether it
//!   compiled here.

use crate::generation::{self, CompileError, Generation};
use crate::node::Route;
use cnpc_compiler::lower::Allocation;
use cnpc_compiler::{Cluster, PolicySet};
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A kind the loader watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// A policy kind (the rest describe the cluster).
    pub policy: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

pub const KINDS: [Kind; 8] = [
    Kind {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumNetworkPolicy",
        plural: "ciliumnetworkpolicies",
        policy: true,
    },
    Kind {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumClusterwideNetworkPolicy",
        plural: "ciliumclusterwidenetworkpolicies",
        policy: true,
    },
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        policy: true,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        policy: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        policy: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        policy: false,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        policy: false,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        policy: false,
    },
];

fn kind_of(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.kind == name)
}

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn key_of(obj: &Value) -> String {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    match meta["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

/// The objects the API server last reported, by kind and key.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub by_kind: BTreeMap<&'static str, BTreeMap<String, Value>>,
}

/// One change a watcher reports.
#[derive(Clone, Debug)]
pub enum Change {
    /// A (re)list starts: the kind's objects are replaced by what follows up to `Synced`.
    Relist(&'static str),
    Apply(&'static str, Value),
    Delete(&'static str, Value),
    /// The list is complete (or the kind cannot be listed: it is then empty).
    Synced(&'static str),
}

/// Applies watcher changes, keeping a relist's objects aside until it completes.
#[derive(Debug, Default)]
pub struct Store {
    pub objects: Objects,
    pending: BTreeMap<&'static str, BTreeMap<String, Value>>,
    synced: std::collections::BTreeSet<&'static str>,
}

impl Store {
    pub fn change(&mut self, c: Change) {
        match c {
            Change::Relist(k) => {
                self.pending.insert(k, BTreeMap::new());
            }
            Change::Apply(k, o) => {
                let target = match self.pending.get_mut(k) {
                    Some(p) => p,
                    None => self.objects.by_kind.entry(k).or_default(),
                };
                target.insert(key_of(&o), o);
            }
            Change::Delete(k, o) => {
                self.objects
                    .by_kind
                    .entry(k)
                    .or_default()
                    .remove(&key_of(&o));
            }
            Change::Synced(k) => {
                if let Some(p) = self.pending.remove(k) {
                    self.objects.by_kind.insert(k, p);
                }
                self.synced.insert(k);
            }
        }
    }

    /// Whether every kind has been listed once.
    pub fn synced(&self) -> bool {
        KINDS.iter().all(|k| self.synced.contains(k.kind))
    }
}

/// An object as the compiler reads it: with its kind and apiVersion (lists leave them out)
/// and without the managed-fields bookkeeping.
fn normalised(kind: &Kind, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(kind.api_version());
    o["kind"] = json!(kind.kind);
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    o
}

/// The source name of a policy object: `Kind/namespace/name`.
pub fn source_name(kind: &str, key: &str) -> String {
    format!("{kind}/{key}")
}

/// The reconcile core: the generation `objects` describe, compiled with `previous` numbers.
pub fn desired(
    objects: &Objects,
    previous: &Allocation,
    routes: Option<&[Route]>,
    fqdn: Option<&mut crate::fqdn::FqdnState>,
) -> Result<Generation, CompileError> {
    let start = Instant::now();
    let mut set = PolicySet::default();
    let mut items = Vec::new();
    for kind in &KINDS {
        for (key, obj) in objects.by_kind.get(kind.kind).into_iter().flatten() {
            let o = normalised(kind, obj);
            if kind.policy {
                let text = serde_json::to_string_pretty(&o).expect("JSON values serialise");
                set.add_bytes(PathBuf::from(source_name(kind.kind, key)), text.as_bytes());
            } else {
                items.push(o);
            }
        }
    }
    set.finish_notes();
    let mut cluster = Cluster::default();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    cluster.add_str(
        &mut set.sources,
        Path::new("kubernetes/cluster"),
        &serde_json::to_string_pretty(&list).expect("JSON values serialise"),
    );
    generation::build(set, cluster, previous, routes, start, fqdn)
}

/// This node's result for each policy object: (kind, key, ok, message).
pub fn statuses(
    objects: &Objects,
    result: &Result<Generation, CompileError>,
) -> Vec<(&'static str, String, bool, String)> {
    let mut out = Vec::new();
    for kind in KINDS.iter().filter(|k| k.policy) {
        for key in objects
            .by_kind
            .get(kind.kind)
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            let (ok, message) = match result {
                Ok(_) => (true, "compiled and enforced".to_string()),
                Err(CompileError::Invalid { by_file, .. }) => {
                    match by_file.get(&source_name(kind.kind, key)) {
                        Some(m) => (false, m.clone()),
                        None => (false, "not enforced: another policy has errors".into()),
                    }
                }
                Err(e) => (false, e.to_string()),
            };
            out.push((kind.kind, key.clone(), ok, message));
        }
    }
    out
}

/// Streams every kind's changes into `tx` until the receiver goes away.
pub async fn watch(client: Client, tx: tokio::sync::mpsc::UnboundedSender<Change>) {
    let tasks = KINDS.iter().map(|kind| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
        let tx = tx.clone();
        async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            let mut listed = false;
            while let Some(event) = stream.next().await {
                let change = match event {
                    Ok(watcher::Event::Init) => Change::Relist(kind.kind),
                    Ok(watcher::Event::InitApply(o)) | Ok(watcher::Event::Apply(o)) => {
                        Change::Apply(kind.kind, serde_json::to_value(o).unwrap_or(Value::Null))
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        Change::Delete(kind.kind, serde_json::to_value(o).unwrap_or(Value::Null))
                    }
                    Ok(watcher::Event::InitDone) => {
                        listed = true;
                        Change::Synced(kind.kind)
                    }
                    Err(e) => {
                        tracing::warn!(kind = kind.kind, error = %e, "watch failed; retrying");
                        if listed {
                            continue;
                        }
                        // A kind that cannot be listed (a CRD not installed) is empty, not a
                        // reason to enforce nothing.
                        listed = true;
                        Change::Synced(kind.kind)
                    }
                };
                if tx.send(change).is_err() {
                    return;
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

pub const IDENTITIES_CONFIGMAP: &str = "cnpc-identities";
const ALLOCATION_KEY: &str = "allocation.json";

#[derive(Debug, thiserror::Error)]
pub enum AgreeError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("the identity ConfigMap: {0}")]
    Api(#[from] kube::Error),
    #[error("the identity ConfigMap kept changing under us ({0} tries)")]
    Contended(usize),
}

/// Compiles with the cluster-wide identity allocation, committing new numbers to the ConfigMap
/// `cnpc-identities` in `namespace` before returning a generation that uses them.
pub async fn agree(
    client: Client,
    namespace: &str,
    compile: impl Fn(&Allocation) -> Result<Generation, CompileError>,
) -> Result<Generation, AgreeError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    const TRIES: usize = 8;
    for _ in 0..TRIES {
        let cm = match api.get_opt(IDENTITIES_CONFIGMAP).await? {
            Some(cm) => cm,
            None => {
                let mut cm = ConfigMap::default();
                cm.metadata.name = Some(IDENTITIES_CONFIGMAP.into());
                cm.data = Some([(ALLOCATION_KEY.to_string(), "{}".to_string())].into());
                match api.create(&PostParams::default(), &cm).await {
                    Ok(cm) => cm,
                    // Another node created it first: read theirs.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let committed: Allocation = cm
            .data
            .as_ref()
            .and_then(|d| d.get(ALLOCATION_KEY))
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let g = compile(&committed)?;
        let new: Vec<(&String, &u32)> = g
            .allocation
            .iter()
            .filter(|(k, _)| !committed.contains_key(*k))
            .collect();
        if new.is_empty() {
            return Ok(g);
        }
        let mut merged = committed.clone();
        merged.extend(new.into_iter().map(|(k, v)| (k.clone(), *v)));
        let mut next = cm.clone();
        next.data = Some(
            [(
                ALLOCATION_KEY.to_string(),
                serde_json::to_string(&merged).expect("an allocation serialises"),
            )]
            .into(),
        );
        // `next` carries the resourceVersion read above: the API server refuses the write
        // (409) if anyone wrote in between.
        match api
            .replace(IDENTITIES_CONFIGMAP, &PostParams::default(), &next)
            .await
        {
            Ok(_) => return Ok(g),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AgreeError::Contended(TRIES))
}

/// Writes this node's result to each policy object whose status changed since `written`.
pub async fn write_statuses(
    client: Client,
    node: &str,
    statuses: &[(&'static str, String, bool, String)],
    written: &mut BTreeMap<(String, String), (bool, String)>,
) {
    for (kind, key, ok, message) in statuses {
        let id = (kind.to_string(), key.clone());
        if written.get(&id) == Some(&(*ok, message.clone())) {
            continue;
        }
        let Some(k) = kind_of(kind) else { continue };
        let (ns, name) = match key.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, key.as_str()),
        };
        let api: Api<DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &k.resource()),
            None => Api::all_with(client.clone(), &k.resource()),
        };
        let status = json!({"ok": ok, "message": message});
        let result = if k.group == "cilium.io" {
            let patch = json!({"status": {"cnpc": {node: status}}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        } else {
            let patch = json!({"metadata": {"annotations": {
                format!("status.cnpc.io/{node}"): status.to_string()
            }}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        };
        match result {
            Ok(_) => {
                written.insert(id, (*ok, message.clone()));
            }
            Err(e) => tracing::warn!(kind, key, error = %e, "cannot write the policy's status"),
        }
    }
}
