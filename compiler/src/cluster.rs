//! The cluster snapshot: plain Kubernetes objects as `kubectl get -o yaml` prints them
//! (DESIGN.md §2). Workload controllers stand for their pod template; each becomes an endpoint
//! with the security labels Cilium would derive for its pods.
//!
//! Reading is lenient: objects carry many fields cnpc does not need, and those are ignored. Only
//! malformed YAML and wrong types in the fields read here are reported.

use crate::diag::{Code, Diagnostic};
use crate::labels::{self, LabelSet};
use crate::source::{SourceMap, Span};
use crate::yaml::{parse_documents, Node, NodeKind};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A Pod, or a workload controller standing for its pods.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub replicas: u32,
    pub ips: Vec<IpAddr>,
    /// Named container ports: (name, protocol, number).
    pub named_ports: Vec<(String, String, u16)>,
    /// For a Pod, the controller it belongs to (`deathstar` for `deathstar-6fb5694d48-5hmds`,
    /// from its ReplicaSet owner); for a controller, its own name.
    pub workload: String,
    pub node: Option<String>,
    /// The host-side interface named by the Pod's `cnpc.io/interface` annotation, for nodes
    /// whose routes do not lead to their pods (the loader otherwise finds it by route).
    pub interface: Option<String>,
    pub span: Span,
}

/// The Pod annotation naming its host-side interface.
pub const INTERFACE_ANNOTATION: &str = "cnpc.io/interface";

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `None` for a Service without selector (backends managed by hand).
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Vec<ServicePort>,
    pub cluster_ip: Option<IpAddr>,
    /// Backend addresses from EndpointSlices (for Services without a selector).
    pub backends: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterNode {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

/// The cluster's objects. Its files' text lives in the [`SourceMap`] passed to [`Cluster::load`],
/// the same one the policies use, so every span resolves in one place.
#[derive(Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub nodes: Vec<ClusterNode>,
    pub diagnostics: Vec<Diagnostic>,
    /// EndpointSlices read so far: (namespace, service, addresses); joined to their Services.
    slices: Vec<(String, String, Vec<IpAddr>)>,
}

/// Cilium's default cluster name (`--cluster-name`).
pub const DEFAULT_CLUSTER: &str = "default";

const CONTROLLERS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
];

impl Cluster {
    pub fn load(
        paths: &[impl AsRef<Path>],
        sources: &mut SourceMap,
    ) -> Result<Cluster, crate::LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let p = p.as_ref();
            let text = std::fs::read_to_string(p).map_err(|source| crate::LoadError::Io {
                path: p.to_path_buf(),
                source,
            })?;
            files.push((p.to_path_buf(), text));
        }
        let mut c = Cluster::default();
        c.add_strs(sources, files);
        Ok(c)
    }

    /// [`Self::add_str`] of each file in turn, with the files parsed on every core
    /// ([`crate::parallel::map_in_order`]): each file's objects are read into a cluster of their
    /// own and appended in file order, and Services are joined to their EndpointSlices once all
    /// are in, which is what joining after each file leaves too.
    pub fn add_strs(&mut self, sources: &mut SourceMap, files: Vec<(std::path::PathBuf, String)>) {
        let ids: Vec<crate::source::FileId> = files
            .into_iter()
            .map(|(path, text)| sources.add(path, text))
            .collect();
        let sources: &SourceMap = sources;
        let parts = crate::parallel::map_in_order(&ids, |file| {
            let mut part = Cluster::default();
            part.read_file(sources, *file);
            part
        });
        for part in parts {
            self.namespaces.extend(part.namespaces);
            self.workloads.extend(part.workloads);
            self.services.extend(part.services);
            self.nodes.extend(part.nodes);
            self.diagnostics.extend(part.diagnostics);
            self.slices.extend(part.slices);
        }
        self.join_slices();
    }

    pub fn add_str(&mut self, sources: &mut SourceMap, path: &Path, text: &str) {
        let file = sources.add(path, text);
        self.add_file(sources, file);
    }

    /// Adds the objects of a file already in `sources`.
    fn add_file(&mut self, sources: &SourceMap, file: crate::source::FileId) {
        self.read_file(sources, file);
        self.join_slices();
    }

    /// The objects of a file already in `sources`, not yet joined ([`Self::join_slices`]).
    fn read_file(&mut self, sources: &SourceMap, file: crate::source::FileId) {
        let source = sources.get(file).clone();
        match parse_documents(file, &source) {
            Err(e) => self.diagnostics.push(
                Diagnostic::new(
                    Code::YamlSyntax,
                    e.span,
                    format!("malformed YAML in cluster snapshot: {}", e.message),
                )
                .label("the parser stopped here")
                .help("the snapshot should be what `kubectl get -o yaml` prints"),
            ),
            Ok(docs) => {
                for d in &docs {
                    self.add_object(d);
                }
            }
        }
    }

    /// [`Self::add_str`], reusing what `cache` parsed of the same objects before: a long-running
    /// caller (the loader) reads the snapshot again whenever it changes, and re-parsing every
    /// object for one pod's new label cost more than the rest of enforcing it (issue 12).
    ///
    /// A file is cut into chunks where YAML's own structure delimits objects: the items of a
    /// `kind: List` document (`kubectl get -o yaml`), whose entries start with `- ` at column
    /// 0 and continue on indented lines; an object inside an entry cannot reach past the next
    /// line at column 0, which starts another entry or ends the sequence. Each chunk is parsed on its
    /// own and kept under its text; the objects, diagnostics and their places are what parsing
    /// the whole file gives (tested against [`Self::add_str`]). Anything else (several
    /// documents, anchors and aliases, which can reach across entries, a chunk that does not
    /// parse alone, or a skeleton that is not a List) is parsed whole, as `add_str` does.
    /// Returns how many chunks were parsed this time (a file parsed whole counts as one).
    pub fn add_str_cached(
        &mut self,
        sources: &mut SourceMap,
        path: &Path,
        text: &str,
        cache: &mut SnapshotCache,
    ) -> usize {
        let Some(chunks) = list_items(text) else {
            cache.chunks.clear();
            self.add_str(sources, path, text);
            return 1;
        };
        let file = sources.add(path, text);
        let mut parsed = 0;
        let mut kept: FxHashMap<Box<str>, Fragment> = FxHashMap::default();
        kept.reserve(chunks.len());
        let mut fragments = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let body = &text[c.start..c.end];
            // An entry kept from the last read keeps its key: its text is not copied again.
            // (The cache first: most entries are there; `kept` holds an entry written twice.)
            let (key, fragment) = match cache
                .chunks
                .remove_entry(body)
                .or_else(|| kept.remove_entry(body))
            {
                Some(entry) => entry,
                None => match Fragment::parse(path, body) {
                    Some(f) => {
                        parsed += 1;
                        (body.into(), f)
                    }
                    None => {
                        // Not an object on its own: the whole file's parse decides.
                        cache.chunks.clear();
                        self.add_file(sources, file);
                        return 1;
                    }
                },
            };
            fragments.push(body);
            kept.insert(key, fragment);
        }
        for (c, body) in chunks.iter().zip(&fragments) {
            let f = &kept[*body];
            let shift = |span: Span| Span {
                file,
                start: span.start + c.start as u32,
                end: span.end + c.start as u32,
                line: span.line + c.line - 1,
                ..span
            };
            self.namespaces.extend(f.objects.namespaces.iter().cloned());
            self.nodes.extend(f.objects.nodes.iter().cloned());
            self.services.extend(f.objects.services.iter().cloned());
            self.slices.extend(f.objects.slices.iter().cloned());
            self.workloads
                .extend(f.objects.workloads.iter().map(|w| Workload {
                    span: shift(w.span),
                    ..w.clone()
                }));
            self.diagnostics
                .extend(f.objects.diagnostics.iter().map(|d| {
                    Diagnostic {
                        span: shift(d.span),
                        related: d
                            .related
                            .iter()
                            .map(|(s, t)| (shift(*s), t.clone()))
                            .collect(),
                        ..d.clone()
                    }
                }));
        }
        cache.chunks = kept;
        self.join_slices();
        parsed
    }

    /// Gives each Service the addresses of its EndpointSlices.
    fn join_slices(&mut self) {
        // Slices may come before or after their Service, in this file or another.
        for svc in &mut self.services {
            svc.backends = self
                .slices
                .iter()
                .filter(|(ns, name, _)| *ns == svc.namespace && *name == svc.name)
                .flat_map(|(_, _, ips)| ips.iter().copied())
                .collect();
            svc.backends.sort();
            svc.backends.dedup();
        }
    }

    fn add_object(&mut self, node: &Node) {
        let kind = node.get("kind").and_then(Node::as_str).unwrap_or("");
        if kind == "List" || kind.ends_with("List") {
            if let Some(NodeKind::Seq(items)) = node.get("items").map(|n| &n.kind) {
                for item in items {
                    self.add_object(item);
                }
            }
            return;
        }
        let meta = node.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Node::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Node::as_str)
            .unwrap_or("default")
            .to_string();
        let own_labels = self.string_map(meta.and_then(|m| m.get("labels")));
        match kind {
            "Namespace" => self.namespaces.push(Namespace {
                name,
                labels: own_labels,
            }),
            "Node" => {
                let ips = seq(node.get("status").and_then(|s| s.get("addresses")))
                    .iter()
                    .filter(|a| a.get("type").and_then(Node::as_str) == Some("InternalIP"))
                    .filter_map(|a| a.get("address")?.as_str()?.parse().ok())
                    .collect();
                self.nodes.push(ClusterNode {
                    name,
                    labels: own_labels,
                    ips,
                })
            }
            // discovery.k8s.io/v1: the slice names its Service in the kubernetes.io/service-name label.
            "EndpointSlice" => {
                let service = own_labels
                    .get("kubernetes.io/service-name")
                    .cloned()
                    .unwrap_or_default();
                let ips: Vec<IpAddr> = seq(node.get("endpoints"))
                    .iter()
                    .flat_map(|e| seq(e.get("addresses")))
                    .filter_map(|a| a.as_str()?.parse().ok())
                    .collect();
                self.slices.push((namespace, service, ips));
            }
            "Service" => {
                let spec = node.get("spec");
                let selector = spec
                    .and_then(|s| s.get("selector"))
                    .filter(|n| !n.is_null())
                    .map(|n| self.string_map(Some(n)));
                let ports = seq(spec.and_then(|s| s.get("ports")))
                    .iter()
                    .filter_map(|p| {
                        Some(ServicePort {
                            name: p
                                .get("name")
                                .and_then(Node::as_str)
                                .unwrap_or("")
                                .to_string(),
                            port: p.get("port")?.as_str()?.parse().ok()?,
                            protocol: p
                                .get("protocol")
                                .and_then(Node::as_str)
                                .unwrap_or("TCP")
                                .to_string(),
                        })
                    })
                    .collect();
                let cluster_ip = spec
                    .and_then(|s| s.get("clusterIP"))
                    .and_then(Node::as_str)
                    .and_then(|ip| ip.parse().ok());
                self.services.push(Service {
                    namespace,
                    name,
                    labels: own_labels,
                    selector,
                    ports,
                    cluster_ip,
                    backends: Vec::new(),
                });
            }
            "Pod" => {
                let spec = node.get("spec");
                let ips = node
                    .get("status")
                    .and_then(|s| s.get("podIPs"))
                    .and_then(|l| match &l.kind {
                        NodeKind::Seq(items) => Some(
                            items
                                .iter()
                                .filter_map(|i| i.get("ip")?.as_str()?.parse().ok())
                                .collect(),
                        ),
                        _ => None,
                    })
                    .unwrap_or_default();
                let workload = meta.map_or_else(|| name.clone(), |m| owner_workload(m, &name));
                self.workloads.push(Workload {
                    kind: kind.to_string(),
                    namespace,
                    name,
                    labels: own_labels,
                    service_account: service_account(spec),
                    replicas: 1,
                    ips,
                    named_ports: named_ports(spec),
                    workload,
                    node: spec
                        .and_then(|s| s.get("nodeName"))
                        .and_then(Node::as_str)
                        .map(str::to_string),
                    interface: meta
                        .and_then(|m| m.get("annotations"))
                        .and_then(|a| a.get(INTERFACE_ANNOTATION))
                        .and_then(Node::as_str)
                        .map(str::to_string),
                    span: node.span,
                });
            }
            k if CONTROLLERS.contains(&k) => {
                let spec = node.get("spec");
                let template = spec.and_then(|s| s.get("template"));
                let labels = self.string_map(
                    template
                        .and_then(|t| t.get("metadata"))
                        .and_then(|m| m.get("labels")),
                );
                let replicas = spec
                    .and_then(|s| s.get("replicas"))
                    .and_then(Node::as_str)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(1);
                let pod_spec = template.and_then(|t| t.get("spec"));
                self.workloads.push(Workload {
                    kind: kind.to_string(),
                    namespace,
                    workload: name.clone(),
                    name,
                    labels,
                    service_account: service_account(pod_spec),
                    replicas,
                    ips: Vec::new(),
                    named_ports: named_ports(pod_spec),
                    node: None,
                    interface: None,
                    span: node.span,
                });
            }
            _ => {}
        }
    }

    fn string_map(&mut self, node: Option<&Node>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(node) = node else { return out };
        match &node.kind {
            NodeKind::Map(entries) => {
                for (k, v) in entries {
                    match (k.as_str(), v.as_str()) {
                        (Some(k), Some(v)) => {
                            out.insert(k.to_string(), v.to_string());
                        }
                        _ => self.diagnostics.push(
                            Diagnostic::new(
                                Code::WrongType,
                                v.span,
                                "expected a string label value",
                            )
                            .label("not a string")
                            .help("labels map strings to strings"),
                        ),
                    }
                }
            }
            NodeKind::Null => {}
            _ => self.diagnostics.push(
                Diagnostic::new(Code::WrongType, node.span, "expected a label mapping")
                    .label("not a mapping")
                    .help("labels map strings to strings"),
            ),
        }
        out
    }

    /// The security labels Cilium derives for a workload's pods (see [`crate::labels`]).
    pub fn security_labels(&self, w: &Workload) -> LabelSet {
        self.security_labels_with(w, &self.namespace_label_keys(&w.namespace))
    }

    /// [`Self::security_labels`] of many workloads, looking each namespace up once.
    pub fn security_labels_of(&self, ws: &[&Workload]) -> Vec<LabelSet> {
        let mut namespaces: HashMap<&str, Vec<(String, String)>> = HashMap::new();
        ws.iter()
            .map(|w| {
                let ns = namespaces
                    .entry(w.namespace.as_str())
                    .or_insert_with(|| self.namespace_label_keys(&w.namespace));
                self.security_labels_with(w, ns)
            })
            .collect()
    }

    /// A namespace's labels as its workloads carry them (keys under
    /// `labels::NAMESPACE_LABELS_PREFIX`): written out once per namespace, not per workload.
    fn namespace_label_keys(&self, ns: &str) -> Vec<(String, String)> {
        self.namespace_labels(ns)
            .into_iter()
            .map(|(k, v)| (format!("{}{k}", labels::NAMESPACE_LABELS_PREFIX), v))
            .collect()
    }

    fn security_labels_with(&self, w: &Workload, namespace: &[(String, String)]) -> LabelSet {
        let mut set = LabelSet::default();
        for (k, v) in &w.labels {
            set.insert("k8s", k, v);
        }
        set.insert("k8s", labels::NAMESPACE_LABEL, &w.namespace);
        for (k, v) in namespace {
            set.insert("k8s", k, v);
        }
        set.insert("k8s", labels::SERVICE_ACCOUNT_LABEL, &w.service_account);
        set.insert("k8s", labels::CLUSTER_LABEL, DEFAULT_CLUSTER);
        set
    }

    /// The endpoints policy applies to: every Pod, and each workload controller whose pods are
    /// not in the snapshot (it then stands for its pod template).
    pub fn endpoints(&self) -> Vec<&Workload> {
        let pods: Vec<&Workload> = self.workloads.iter().filter(|w| w.kind == "Pod").collect();
        let mut out = pods.clone();
        for w in self.workloads.iter().filter(|w| w.kind != "Pod") {
            let has_pods = pods.iter().any(|p| {
                p.namespace == w.namespace
                    && (p.workload == w.name
                        || w.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            });
            if !has_pods {
                out.push(w);
            }
        }
        out
    }

    /// A namespace's labels, with the `kubernetes.io/metadata.name` label Kubernetes always sets.
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.name == ns)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels
            .entry("kubernetes.io/metadata.name".to_string())
            .or_insert_with(|| ns.to_string());
        labels
    }

    /// A node's labels as host policies see them.
    pub fn node_labels(&self, n: &ClusterNode) -> LabelSet {
        let mut set = LabelSet::default();
        for (k, v) in &n.labels {
            set.insert("k8s", k, v);
        }
        set
    }
}

/// What [`Cluster::add_str_cached`] kept of snapshot chunks, by their text.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    /// Keys are a few hundred bytes of YAML, hashed thousands of times a read: FxHash, not
    /// SipHash (the snapshot is the cluster's, not an attacker's choice of collisions).
    chunks: FxHashMap<Box<str>, Fragment>,
}

/// The objects of one chunk, with places counted from the chunk's first byte and line.
#[derive(Debug)]
struct Fragment {
    objects: Cluster,
}

impl Fragment {
    /// Parses one List entry (`- ...`) alone; `None` when it is not one entry that parses.
    fn parse(path: &Path, body: &str) -> Option<Fragment> {
        let mut sources = SourceMap::new();
        let file = sources.add(path, body);
        let docs = parse_documents(file, sources.get(file)).ok()?;
        let [doc] = docs.as_slice() else { return None };
        let NodeKind::Seq(items) = &doc.kind else {
            return None;
        };
        let [item] = items.as_slice() else {
            return None;
        };
        let mut objects = Cluster::default();
        objects.add_object(item);
        Some(Fragment { objects })
    }
}

/// A chunk of a snapshot file: bytes `start..end`, beginning at column 0 of 1-based `line`.
struct Chunk {
    start: usize,
    end: usize,
    line: u32,
}

/// The entries of a file that is one `kind: List` document whose `items:` is a block sequence
/// at column 0, or `None`. The rest of the file (the skeleton) must parse, without the entries,
/// as one List document whose `items` is empty; entries must hold no anchors or aliases.
fn list_items(text: &str) -> Option<Vec<Chunk>> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut skeleton = String::new();
    // Before `items:`, inside the entries, after them.
    let mut phase = 0;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let at = offset;
        offset += line.len();
        let bare = line.trim_end_matches(['\n', '\r']);
        if phase == 1 {
            if bare.starts_with("- ") || bare == "-" {
                chunks.push(Chunk {
                    start: at,
                    end: offset,
                    line: i as u32 + 1,
                });
                continue;
            }
            if bare.is_empty() || bare.starts_with([' ', '#']) {
                // Continues the current entry (or precedes the first: a comment or blank).
                match chunks.last_mut() {
                    Some(c) => c.end = offset,
                    None => skeleton.push_str(line),
                }
                continue;
            }
            phase = 2;
        }
        if phase == 0 && bare == "items:" {
            phase = 1;
            skeleton.push_str("items: []\n");
            continue;
        }
        skeleton.push_str(line);
    }
    if chunks.is_empty() || text.contains(['&', '*']) {
        return None;
    }
    let mut sources = SourceMap::new();
    let file = sources.add("skeleton", skeleton);
    let docs = parse_documents(file, sources.get(file)).ok()?;
    let [doc] = docs.as_slice() else { return None };
    let kind = doc.get("kind").and_then(Node::as_str)?;
    let empty = matches!(doc.get("items").map(|n| &n.kind), Some(NodeKind::Seq(v)) if v.is_empty());
    (kind.ends_with("List") && empty).then_some(chunks)
}

fn seq(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.kind) {
        Some(NodeKind::Seq(items)) => items,
        _ => &[],
    }
}

fn named_ports(pod_spec: Option<&Node>) -> Vec<(String, String, u16)> {
    seq(pod_spec.and_then(|s| s.get("containers")))
        .iter()
        .flat_map(|c| seq(c.get("ports")))
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?.to_string();
            let number = p.get("containerPort")?.as_str()?.parse().ok()?;
            let proto = p
                .get("protocol")
                .and_then(Node::as_str)
                .unwrap_or("TCP")
                .to_string();
            Some((name, proto, number))
        })
        .collect()
}

/// The workload a pod belongs to: its owner, with a ReplicaSet's pod-template hash dropped so
/// that pods of a Deployment name the Deployment.
fn owner_workload(meta: &Node, pod_name: &str) -> String {
    let Some(owner) = seq(meta.get("ownerReferences")).first() else {
        return pod_name.to_string();
    };
    let name = owner.get("name").and_then(Node::as_str).unwrap_or(pod_name);
    match owner.get("kind").and_then(Node::as_str) {
        Some("ReplicaSet") => match name.rsplit_once('-') {
            Some((deployment, hash))
                if hash.len() >= 5 && hash.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                deployment.to_string()
            }
            _ => name.to_string(),
        },
        _ => name.to_string(),
    }
}

fn service_account(pod_spec: Option<&Node>) -> String {
    pod_spec
        .and_then(|s| {
            s.get("serviceAccountName")
                .or_else(|| s.get("serviceAccount"))
        })
        .and_then(Node::as_str)
        .unwrap_or("default")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What parsing `text` whole gives, and what the cached path gives with `cache` (and how
    /// many chunks it parsed). Debug output compares every object, diagnostic and place.
    fn both(text: &str, cache: &mut SnapshotCache) -> (String, String, usize) {
        let path = Path::new("snapshot.yaml");
        let mut whole = Cluster::default();
        whole.add_str(&mut SourceMap::new(), path, text);
        let mut cached = Cluster::default();
        let parsed = cached.add_str_cached(&mut SourceMap::new(), path, text, cache);
        (format!("{whole:#?}"), format!("{cached:#?}"), parsed)
    }

    /// A `kubectl get -o yaml` List: block entries, a trailer after the items, comments, blank
    /// lines, a flow entry, an EndpointSlice before its Service, and a wrong-typed label
    /// (a diagnostic whose place must be the whole file's).
    const LIST: &str = "apiVersion: v1\nitems:\n# pods first\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: a\n    namespace: ns1\n    labels:\n      app: a\n  status:\n    podIPs:\n    - ip: 10.0.0.1\n\n- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: ns1, labels: {app: b}}, status: {podIPs: [{ip: 10.0.0.2}]}}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: s-1\n    namespace: ns1\n    labels:\n      kubernetes.io/service-name: s\n  endpoints:\n  - addresses: [10.0.0.1]\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s, namespace: ns1}\n  spec:\n    selector: {app: a}\n    ports:\n    - {port: 80}\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: c\n    namespace: ns2\n    labels:\n      app: [not, a, string]\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: ns2, labels: {team: x}}\nkind: List\nmetadata:\n  resourceVersion: \"\"\n";

    #[test]
    fn cached_snapshot_equals_whole_parse_across_edits() {
        let mut cache = SnapshotCache::default();
        let (whole, cached, parsed) = both(LIST, &mut cache);
        assert_eq!(whole, cached);
        assert_eq!(parsed, 6, "every entry parsed the first time");
        assert!(whole.contains("expected a string label value"));
        // Nothing changed: nothing parsed.
        let (whole, cached, parsed) = both(LIST, &mut cache);
        assert_eq!((whole, parsed), (cached, 0));
        // One entry's label changes (and grows the file): only it is parsed, and the places of
        // every later entry and diagnostic move with it.
        let edited = LIST.replace("labels: {app: b}", "labels: {app: b, canary: yes-indeed}");
        assert_ne!(edited, LIST);
        let (whole, cached, parsed) = both(&edited, &mut cache);
        assert_eq!(whole, cached);
        assert_eq!(parsed, 1);
        // An entry removed and one added.
        let edited = LIST.replace(
            "- apiVersion: v1\n  kind: Namespace\n  metadata: {name: ns2, labels: {team: x}}\n",
            "- {apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}}\n",
        );
        assert_ne!(edited, LIST);
        let (whole, cached, parsed) = both(&edited, &mut cache);
        assert_eq!(whole, cached);
        // The new Node, and pod b as it was before the last edit.
        assert_eq!(parsed, 2);
        // CRLF line ends.
        let (whole, cached, _) = both(&LIST.replace('\n', "\r\n"), &mut cache);
        assert_eq!(whole, cached);
        // The demo's snapshot.
        let demo = std::fs::read_to_string("../policies/cluster.yaml").unwrap();
        let (whole, cached, parsed) = both(&demo, &mut cache);
        assert_eq!(whole, cached);
        assert!(parsed > 10);
    }

    /// Files parsed on several threads give what reading them one after another gives: objects
    /// in file order, a Service joined to a slice in a later file, and diagnostics (with their
    /// files) in order.
    #[test]
    fn files_parsed_in_parallel_equal_files_in_turn() {
        let files: Vec<(std::path::PathBuf, String)> = (0..6)
            .map(|i| {
                let text = match i % 3 {
                    0 => LIST.to_string(),
                    1 => format!("kind: List\nitems:\n- {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: s-{i}, namespace: ns1, labels: {{kubernetes.io/service-name: s}}}}, endpoints: [{{addresses: [10.9.0.{i}]}}]}}\n"),
                    _ => "kind: List\nitems:\n- {kind: Pod, metadata: {name: x, labels: {a: [b]}}}\n- {kind: Pod\n".to_string(),
                };
                (format!("f{i}.yaml").into(), text)
            })
            .collect();
        let (mut s1, mut s2) = (SourceMap::new(), SourceMap::new());
        let mut in_turn = Cluster::default();
        for (path, text) in &files {
            in_turn.add_str(&mut s1, path, text);
        }
        let mut parallel = Cluster::default();
        parallel.add_strs(&mut s2, files);
        assert_eq!(format!("{in_turn:#?}"), format!("{parallel:#?}"));
        assert!(format!("{parallel:?}").contains("10.9.0.4"));
    }

    /// Files the cut cannot vouch for are parsed whole, with the same result: several
    /// documents, anchors, a broken entry, a List whose items are indented, a mapping that is
    /// not a List, and a line at column 0 that breaks an entry in two.
    #[test]
    fn what_cannot_be_cut_is_parsed_whole() {
        let cases = [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\n".to_string(),
            LIST.replace("labels:\n      app: a\n", "labels: &l\n      app: a\n").replace("{app: b}", "*l"),
            LIST.replace("{app: b}", "{app: b"),
            "kind: List\nitems:\n  - {kind: Pod, metadata: {name: a}}\n  - {kind: Pod, metadata: {name: b}}\n".to_string(),
            "kind: Config\nitems:\n- {kind: Pod, metadata: {name: a}}\n".to_string(),
            "kind: List\nitems:\n- {kind: Pod,\nmetadata: {name: a}}\n".to_string(),
            LIST.replace("kind: List\n", "kind: List\n---\nkind: Pod\nmetadata: {name: z}\n"),
        ];
        for text in &cases {
            let mut cache = SnapshotCache::default();
            let (whole, cached, parsed) = both(text, &mut cache);
            assert_eq!(whole, cached, "{text}");
            assert_eq!(parsed, 1, "parsed whole: {text}");
        }
    }
}
