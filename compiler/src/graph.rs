//! `cnpc graph`: the effective connectivity between workloads, as Graphviz DOT or one
//! self-contained HTML page; and `cnpc diff -o dot|html`, the same picture of a change.
//!
//! **What it shows.** Nodes are the workloads of the cluster snapshot, named `namespace/name` of
//! their controller as `cnpc diff` names them and grouped by namespace, plus the peers outside
//! them that some edge touches: `world`, CIDR prefixes, FQDN selectors (`fqdn:NAME`) and entities
//! (`host`, `remote-node`, ...). A workload whose ingress or egress no policy enforces (no
//! default deny) says so on its node. An edge `A -> B` lists the ports on which A may open
//! connections to B, adjacent ports merged into ranges and protocols with equal ports grouped
//! (`80/TCP, 53/ANY`; `any` is every port of every protocol); ports whose allowed traffic is
//! handed to the L7 proxy say which rules apply (`80/TCP (HTTP rules)`, `53/ANY (DNS rules)`).
//! A second, dashed red edge lists the ports an explicit deny rule decided (`... denied by
//! POLICY`). Ports denied only by default deny draw nothing, and neither do flows that no policy
//! on either side has a say in (both directions not enforced): the node notes cover those.
//! Every edge keeps the rules that decided it (policy, file, line); the HTML page shows them on
//! click, the DOT output as the edge's tooltip.
//!
//! **How edges are decided.** Exactly as `cnpc diff` decides flows, by the same code
//! ([`crate::diff::FlowSpace`]): one representative party per peer identity, the port space of
//! every (source, destination, protocol) cut at every row boundary of the decision tables that
//! decide the pair, and one representative flow per piece judged by the reference evaluator
//! ([`crate::eval::evaluate`]), the oracle of DESIGN.md §5. No request is given, so a piece with
//! L7 rules is "proxied", not judged per request.
//!
//! **The diff picture.** Both versions are walked over one flow space (the union of their cut
//! points), so their edges compare port for port. An edge the change adds is green, one it
//! removes red and dashed, one it alters orange with the label `before → after`; unchanged edges
//! stay grey for context. Here an allowed port is allowed whether or not a rule said so, so
//! removing the policy of an unrestricted workload changes nothing in the picture, as in
//! `cnpc diff`.
//!
//! The graph is a [`petgraph::Graph`]; nodes and edges are inserted sorted, so every output is
//! deterministic. The HTML layout is layered and deterministic too: one column per namespace,
//! entities to the left, world, CIDR and FQDN peers to the right, nodes sorted within a column.

use crate::diff::FlowSpace;
use crate::eval::{evaluate, Decision, DirVerdict, Flow, Party};
use cnpc_ir::*;
use petgraph::graph::{Graph, NodeIndex};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// What a node stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeKind {
    /// An entity (reserved identity): host, remote-node, kube-apiserver, ...
    Entity,
    /// Pods of one workload controller (or a bare pod).
    Workload,
    /// Anything outside the cluster no CIDR or FQDN rule names.
    World,
    /// A CIDR prefix some rule names.
    Cidr,
    /// Addresses learned by resolving names a toFQDNs selector matches.
    Fqdn,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Entity => "entity",
            NodeKind::Workload => "workload",
            NodeKind::World => "world",
            NodeKind::Cidr => "cidr",
            NodeKind::Fqdn => "fqdn",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `namespace/workload`, `world`, `10.0.0.0/8`, `fqdn:api.github.com`, `host`, ...
    pub name: String,
    pub kind: NodeKind,
    /// The namespace of a workload.
    pub namespace: Option<String>,
    /// Remarks: `ingress not enforced`, `egress not enforced`.
    pub notes: Vec<String>,
}

/// How a piece of the port space between two peers is decided.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mark {
    /// Allowed by at least one rule.
    Allowed,
    /// Allowed and handed to the L7 proxy: `HTTP`, `DNS`, or the name of another parser.
    Proxied(String),
    /// Allowed because neither side enforces a policy in its direction.
    Open,
    /// Denied by these policies' deny rules.
    Denied(Vec<String>),
}

/// A contiguous range of ports (or ICMP types) of one protocol with one decision.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    pub protocol: Protocol,
    pub ports: PortRange,
    pub mark: Mark,
    /// The rules that decided it, sorted.
    pub rules: BTreeSet<Origin>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EdgeKind {
    /// Allowed ports (with their L7 marks).
    Allowed,
    /// Ports an explicit deny rule decided.
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub kind: EdgeKind,
    /// Sorted by protocol and port.
    pub segments: Vec<Segment>,
    /// `80/TCP, 53/ANY (DNS rules)` or `any denied by CiliumNetworkPolicy default/x`.
    pub label: String,
    /// Every rule behind the segments, sorted.
    pub rules: Vec<Origin>,
}

/// The connectivity picture of one policy set.
#[derive(Debug)]
pub struct Connectivity {
    pub graph: Graph<Node, Edge>,
}

/// What a change does to an edge of the picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    Added,
    Removed,
    Altered,
    Unchanged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Altered => "altered",
            Change::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffEdge {
    pub kind: EdgeKind,
    pub change: Change,
    /// The edge's label before and after (`None` where there was no edge).
    pub before: Option<String>,
    pub after: Option<String>,
    /// The rules behind the edge in either version, sorted.
    pub rules: Vec<Origin>,
}

/// The picture of a change: nodes of the new version, edges of both.
#[derive(Debug)]
pub struct GraphDiff {
    pub graph: Graph<Node, DiffEdge>,
}

impl GraphDiff {
    /// Edges the change adds, removes or alters.
    pub fn changed(&self) -> usize {
        self.graph
            .edge_weights()
            .filter(|e| e.change != Change::Unchanged)
            .count()
    }
}

/// The flow space of `programs`, with FQDN peers named by their selector (`fqdn:*.github.com`)
/// rather than by the name their representative flow resolved.
fn space_of(programs: &[&Program]) -> FlowSpace {
    let mut space = FlowSpace::new(programs);
    for (i, (name, _)) in space.parties.iter_mut().enumerate() {
        let peer = &space.universe[space.peers[i]];
        if let ([m], None, true) = (&peer.fqdn[..], peer.cidr, name.starts_with("fqdn:")) {
            *name = match m {
                DnsMatcher::Name(n) => format!("fqdn:{n}"),
                DnsMatcher::Pattern(p) => format!("fqdn:{p}"),
            };
        }
    }
    space
}

/// The connectivity of one program.
pub fn connectivity(program: &Program) -> Connectivity {
    let space = space_of(&[program]);
    let segments = segments_of(&space, program);
    let edges: Vec<(&(String, String), Edge)> = segments
        .iter()
        .flat_map(|(pair, segs)| {
            edges_of(segs, false)
                .into_iter()
                .map(move |(kind, e)| (pair, with_kind(e, kind)))
        })
        .collect();
    let mut graph = Graph::new();
    let index = add_nodes(
        &mut graph,
        &space,
        program,
        None,
        edges.iter().map(|(p, _)| *p),
    );
    for ((from, to), edge) in edges {
        graph.add_edge(index[from], index[to], edge);
    }
    Connectivity { graph }
}

fn with_kind(mut e: Edge, kind: EdgeKind) -> Edge {
    e.kind = kind;
    e
}

/// The picture of the change from `old` to `new` (built over the same cluster).
pub fn diff(old: &Program, new: &Program) -> GraphDiff {
    let space = space_of(&[old, new]);
    let (before, after) = (segments_of(&space, old), segments_of(&space, new));
    let pairs: BTreeSet<&(String, String)> = before.keys().chain(after.keys()).collect();
    let none = Vec::new();
    let mut edges: Vec<(&(String, String), DiffEdge)> = Vec::new();
    for pair in pairs {
        // Allowed is allowed, with a rule or without: a diff is about verdicts.
        let b: BTreeMap<EdgeKind, Edge> = edges_of(before.get(pair).unwrap_or(&none), true)
            .into_iter()
            .collect();
        let a: BTreeMap<EdgeKind, Edge> = edges_of(after.get(pair).unwrap_or(&none), true)
            .into_iter()
            .collect();
        // What the plain picture of the new version draws, for unchanged context.
        let drawn: BTreeSet<EdgeKind> = edges_of(after.get(pair).unwrap_or(&none), false)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for kind in [EdgeKind::Allowed, EdgeKind::Denied] {
            let (eb, ea) = (b.get(&kind), a.get(&kind));
            let change = match (eb, ea) {
                (None, None) => continue,
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Removed,
                (Some(x), Some(y)) if x.label != y.label => Change::Altered,
                _ if drawn.contains(&kind) => Change::Unchanged,
                _ => continue,
            };
            let rules: BTreeSet<Origin> = eb
                .into_iter()
                .chain(ea)
                .flat_map(|e| e.rules.iter().cloned())
                .collect();
            edges.push((
                pair,
                DiffEdge {
                    kind,
                    change,
                    before: eb.map(|e| e.label.clone()),
                    after: ea.map(|e| e.label.clone()),
                    rules: rules.into_iter().collect(),
                },
            ));
        }
    }
    let mut graph = Graph::new();
    let index = add_nodes(
        &mut graph,
        &space,
        new,
        Some(old),
        edges.iter().map(|(p, _)| *p),
    );
    for ((from, to), edge) in edges {
        graph.add_edge(index[from], index[to], edge);
    }
    GraphDiff { graph }
}

type Segments = BTreeMap<(String, String), Vec<Segment>>;

/// Every decided piece of every pair of peers under `program`, merged and sorted.
fn segments_of(space: &FlowSpace, program: &Program) -> Segments {
    let deny_origins: BTreeSet<&Origin> = program
        .rules
        .values()
        .filter(|r| r.action == Action::Deny)
        .map(|r| &r.origin)
        .collect();
    let mut out: Segments = BTreeMap::new();
    space.for_each(|(src_name, src), (dst_name, dst), proto, pieces| {
        let segs = out.entry((src_name.clone(), dst_name.clone())).or_default();
        for &ports in pieces {
            let Some((mark, rules)) = decide(program, &deny_origins, src, dst, proto, ports.lo)
            else {
                continue;
            };
            match segs.last_mut() {
                Some(last)
                    if last.protocol == proto
                        && last.mark == mark
                        && u32::from(last.ports.hi) + 1 == u32::from(ports.lo) =>
                {
                    last.ports.hi = ports.hi;
                    last.rules.extend(rules);
                }
                _ => segs.push(Segment {
                    protocol: proto,
                    ports,
                    mark,
                    rules,
                }),
            }
        }
    });
    out.retain(|_, segs| !segs.is_empty());
    // Two identities of one workload (pods with different labels) share a name: merge them.
    for segs in out.values_mut() {
        *segs = merge_touching(std::mem::take(segs));
    }
    out
}

/// `segs` sorted, with segments of one protocol and mark that overlap or touch merged into
/// one (their rules together).
fn merge_touching(mut segs: Vec<Segment>) -> Vec<Segment> {
    segs.sort();
    let mut merged: Vec<Segment> = Vec::with_capacity(segs.len());
    for s in segs {
        match merged.last_mut() {
            Some(last)
                if last.protocol == s.protocol
                    && last.mark == s.mark
                    && u32::from(last.ports.hi) + 1 >= u32::from(s.ports.lo) =>
            {
                last.ports.hi = last.ports.hi.max(s.ports.hi);
                last.rules.extend(s.rules);
            }
            _ => merged.push(s),
        }
    }
    merged
}

/// The mark and deciding rules of one flow; `None` when only default deny decided it.
fn decide(
    program: &Program,
    deny_origins: &BTreeSet<&Origin>,
    src: &Party,
    dst: &Party,
    protocol: Protocol,
    port: u16,
) -> Option<(Mark, BTreeSet<Origin>)> {
    let flow = Flow {
        src: src.clone(),
        dst: dst.clone(),
        protocol,
        port,
        http: None,
        dns_query: None,
    };
    let v = evaluate(program, &flow);
    let mut rules = BTreeSet::new();
    if !v.allowed {
        // A deny decision lists only the deny rules that matched; default deny lists the
        // policies that turned it on, which are no deny rules.
        let explicit = |d: &Decision| {
            d.verdict == DirVerdict::Denied
                && !d.rules.is_empty()
                && d.rules.iter().all(|r| deny_origins.contains(&r.origin))
        };
        for d in [&v.egress, &v.ingress].into_iter().filter(|d| explicit(d)) {
            rules.extend(d.rules.iter().map(|r| r.origin.clone()));
        }
        if rules.is_empty() {
            return None;
        }
        let policies: BTreeSet<String> = rules.iter().map(|o| o.policy.clone()).collect();
        return Some((Mark::Denied(policies.into_iter().collect()), rules));
    }
    for d in [&v.egress, &v.ingress] {
        rules.extend(d.rules.iter().map(|r| r.origin.clone()));
        if let Some(l7) = &d.l7 {
            rules.extend(l7.rules.iter().map(|r| r.origin.clone()));
        }
    }
    let mark = match v.l7() {
        Some(l7) => Mark::Proxied(match l7.protocol {
            "http" => "HTTP".to_string(),
            "dns" => "DNS".to_string(),
            other => other.to_ascii_uppercase(),
        }),
        None if rules.is_empty() => Mark::Open,
        None => Mark::Allowed,
    };
    Some((mark, rules))
}

/// The edges of one pair: allowed and explicitly denied. `open_as_allowed`: count ports no
/// policy has a say in as allowed (the diff) rather than leave them out (the plain picture).
fn edges_of(segs: &[Segment], open_as_allowed: bool) -> Vec<(EdgeKind, Edge)> {
    let mut allowed: Vec<Segment> = Vec::new();
    let mut denied: Vec<Segment> = Vec::new();
    for s in segs {
        match &s.mark {
            Mark::Denied(_) => denied.push(s.clone()),
            Mark::Open if !open_as_allowed => {}
            Mark::Open => allowed.push(Segment {
                mark: Mark::Allowed,
                ..s.clone()
            }),
            _ => allowed.push(s.clone()),
        }
    }
    let mut out = Vec::new();
    for (kind, segs) in [(EdgeKind::Allowed, allowed), (EdgeKind::Denied, denied)] {
        if segs.is_empty() {
            continue;
        }
        // Open pieces turned allowed may now touch allowed ones.
        let merged = merge_touching(segs);
        let rules: BTreeSet<Origin> = merged.iter().flat_map(|s| s.rules.clone()).collect();
        out.push((
            kind,
            Edge {
                kind,
                label: label_of(&merged),
                segments: merged,
                rules: rules.into_iter().collect(),
            },
        ));
    }
    out
}

/// `80/TCP, 53/ANY (DNS rules)`; for denied segments `any denied by POLICY`.
fn label_of(segs: &[Segment]) -> String {
    // Marks in order of first appearance by protocol and port.
    let mut by_mark: BTreeMap<&Mark, Vec<&Segment>> = BTreeMap::new();
    for s in segs {
        by_mark.entry(&s.mark).or_default().push(s);
    }
    let mut parts: Vec<((u32, usize), String)> = Vec::new();
    for (mark, segs) in by_mark {
        let suffix = match mark {
            Mark::Allowed | Mark::Open => String::new(),
            Mark::Proxied(kind) => format!(" ({kind} rules)"),
            Mark::Denied(policies) => format!(" denied by {}", policies.join(", ")),
        };
        let groups = port_groups(&segs);
        if matches!(mark, Mark::Denied(_)) {
            // One clause per policy set: `80/TCP, 53/ANY denied by P`.
            let key = groups.first().map(|g| g.0).unwrap_or_default();
            let text: Vec<&str> = groups.iter().map(|g| g.1.as_str()).collect();
            parts.push((key, format!("{}{suffix}", text.join(", "))));
        } else {
            parts.extend(groups.into_iter().map(|(k, t)| (k, format!("{t}{suffix}"))));
        }
    }
    parts.sort();
    let sep = if segs.iter().any(|s| matches!(s.mark, Mark::Denied(_))) {
        "; "
    } else {
        ", "
    };
    parts
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join(sep)
}

/// Port groups of segments with one mark: each port range (merged) with the protocols that
/// allow it (`53/ANY` for TCP, UDP and SCTP; `*` a protocol's every port; `any` every port of
/// every protocol), ranges with equal protocols in a row joined (`80,443/TCP`). Keyed by
/// (first port, protocol position) for sorting.
fn port_groups(segs: &[&Segment]) -> Vec<((u32, usize), String)> {
    let position = |p: Protocol| Protocol::ALL.iter().position(|q| *q == p).unwrap_or(0);
    let mut per_proto: BTreeMap<usize, Vec<PortRange>> = BTreeMap::new();
    for s in segs {
        let ranges = per_proto.entry(position(s.protocol)).or_default();
        match ranges.last_mut() {
            Some(last) if u32::from(last.hi) + 1 >= u32::from(s.ports.lo) => {
                last.hi = last.hi.max(s.ports.hi)
            }
            _ => ranges.push(s.ports),
        }
    }
    // (lo, hi) of a range, or None for a protocol's every port -> protocols.
    let mut by_range: BTreeMap<Option<(u16, u16)>, Vec<Protocol>> = BTreeMap::new();
    for (pos, ranges) in &per_proto {
        let p = Protocol::ALL[*pos];
        for r in ranges {
            let key = (r.lo != 0 || r.hi != p.max_port()).then_some((r.lo, r.hi));
            by_range.entry(key).or_default().push(p);
        }
    }
    let protocols = |protos: &[Protocol]| {
        if protos == [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            "ANY".to_string()
        } else {
            protos
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join("+")
        }
    };
    let mut out: Vec<((u32, usize), String)> = Vec::new();
    let mut run: Option<(u16, Vec<String>, Vec<Protocol>)> = None;
    let flush = |run: &mut Option<(u16, Vec<String>, Vec<Protocol>)>,
                 out: &mut Vec<((u32, usize), String)>| {
        if let Some((lo, ranges, protos)) = run.take() {
            out.push((
                (u32::from(lo), position(protos[0])),
                format!("{}/{}", ranges.join(","), protocols(&protos)),
            ));
        }
    };
    for (key, protos) in by_range {
        let Some((lo, hi)) = key else {
            let text = if protos.len() == Protocol::ALL.len() {
                "any".to_string()
            } else {
                format!("*/{}", protocols(&protos))
            };
            out.push(((0, 0), text));
            continue;
        };
        let text = if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        };
        match &mut run {
            Some((_, ranges, p)) if *p == protos => ranges.push(text),
            _ => {
                flush(&mut run, &mut out);
                run = Some((lo, vec![text], protos));
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Adds every workload, and every other peer an edge touches, sorted by kind and name; returns
/// name → index.
fn add_nodes<'p, E>(
    graph: &mut Graph<Node, E>,
    space: &FlowSpace,
    program: &Program,
    old: Option<&Program>,
    edges: impl Iterator<Item = &'p (String, String)>,
) -> BTreeMap<String, NodeIndex> {
    let touched: BTreeSet<&str> = edges.flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
    let mut nodes: BTreeMap<(NodeKind, String), Node> = BTreeMap::new();
    for (name, party) in &space.parties {
        let kind = kind_of(name, party);
        if kind != NodeKind::Workload && !touched.contains(name.as_str()) {
            continue;
        }
        let notes = match (&party.endpoint, old) {
            (Some(e), None) => notes_of(program, e),
            (Some(e), Some(old)) => {
                let (before, after) = (notes_of(old, e), notes_of(program, e));
                let mut notes: Vec<String> = after
                    .iter()
                    .map(|n| match before.contains(n) {
                        true => n.clone(),
                        false => format!("{n} (changed)"),
                    })
                    .collect();
                notes.extend(
                    before
                        .iter()
                        .filter(|n| !after.contains(n))
                        .map(|n| format!("before: {n}")),
                );
                notes
            }
            (None, _) => Vec::new(),
        };
        let node = nodes.entry((kind, name.clone())).or_insert_with(|| Node {
            name: name.clone(),
            kind,
            namespace: (kind == NodeKind::Workload)
                .then(|| name.split_once('/').map(|(ns, _)| ns.to_string()))
                .flatten(),
            notes: Vec::new(),
        });
        for n in notes {
            if !node.notes.contains(&n) {
                node.notes.push(n);
            }
        }
    }
    nodes
        .into_values()
        .map(|n| (n.name.clone(), graph.add_node(n)))
        .collect()
}

fn kind_of(name: &str, party: &Party) -> NodeKind {
    if party.endpoint.is_some() {
        NodeKind::Workload
    } else if name.starts_with("fqdn:") {
        NodeKind::Fqdn
    } else if name == "world" || name.starts_with("world-") {
        NodeKind::World
    } else if party.world && party.ip.is_some() {
        NodeKind::Cidr
    } else {
        NodeKind::Entity
    }
}

fn notes_of(program: &Program, e: &Endpoint) -> Vec<String> {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .filter(|dir| {
            !program
                .enforcement
                .iter()
                .any(|x| x.direction == *dir && x.subject.selects(e))
        })
        .map(|dir| format!("{} not enforced", dir.as_str()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rendering: both pictures become a list of drawn nodes and edges, then DOT or HTML.

struct Drawn<'a> {
    nodes: Vec<&'a Node>,
    edges: Vec<DrawnEdge>,
}

struct DrawnEdge {
    from: usize,
    to: usize,
    label: String,
    /// `allowed`, `denied`, `added`, `removed`, `altered`, `unchanged`.
    status: &'static str,
    color: &'static str,
    dashed: bool,
    rules: Vec<Origin>,
}

impl Connectivity {
    fn drawn(&self) -> Drawn<'_> {
        let g = &self.graph;
        Drawn {
            nodes: g.node_weights().collect(),
            edges: g
                .edge_indices()
                .map(|i| {
                    let (a, b) = g.edge_endpoints(i).expect("an edge of the graph");
                    let e = &g[i];
                    let denied = e.kind == EdgeKind::Denied;
                    DrawnEdge {
                        from: a.index(),
                        to: b.index(),
                        label: e.label.clone(),
                        status: if denied { "denied" } else { "allowed" },
                        color: if denied { "red" } else { "black" },
                        dashed: denied,
                        rules: e.rules.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Graphviz DOT.
    pub fn to_dot(&self) -> String {
        dot(&self.drawn(), "cnpc graph: allowed connectivity")
    }

    /// One self-contained HTML page (inline SVG and script; no network).
    pub fn to_html(&self, title: &str) -> String {
        html(&self.drawn(), title, false)
    }
}

impl GraphDiff {
    fn drawn(&self) -> Drawn<'_> {
        let g = &self.graph;
        Drawn {
            nodes: g.node_weights().collect(),
            edges: g
                .edge_indices()
                .map(|i| {
                    let (a, b) = g.edge_endpoints(i).expect("an edge of the graph");
                    let e = &g[i];
                    let (before, after) = (
                        e.before.clone().unwrap_or_default(),
                        e.after.clone().unwrap_or_default(),
                    );
                    let (label, color, dashed) = match e.change {
                        Change::Added => (after, "green", false),
                        Change::Removed => (before, "red", true),
                        Change::Altered => (format!("{before} → {after}"), "orange", false),
                        Change::Unchanged => (after, "gray", e.kind == EdgeKind::Denied),
                    };
                    DrawnEdge {
                        from: a.index(),
                        to: b.index(),
                        label,
                        status: e.change.as_str(),
                        color,
                        dashed,
                        rules: e.rules.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Graphviz DOT.
    pub fn to_dot(&self) -> String {
        dot(
            &self.drawn(),
            "cnpc diff: green added, red removed, orange altered",
        )
    }

    /// One self-contained HTML page (inline SVG and script; no network).
    pub fn to_html(&self, title: &str) -> String {
        html(&self.drawn(), title, true)
    }
}

fn dot_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn rule_text(o: &Origin) -> String {
    format!("{} ({}:{})", o.policy, o.file, o.line)
}

fn node_label(n: &Node) -> String {
    let short = match (&n.namespace, n.name.split_once('/')) {
        (Some(_), Some((_, rest))) => rest,
        _ => n.name.as_str(),
    };
    let mut label = short.to_string();
    for note in &n.notes {
        label.push('\n');
        label.push_str(note);
    }
    label
}

fn dot(d: &Drawn, title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph cnpc {{");
    let _ = writeln!(out, "  label={};", dot_str(title));
    let _ = writeln!(out, "  labelloc=t;");
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(
        out,
        "  node [shape=box, style=rounded, fontname=\"Helvetica\"];"
    );
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10];");
    let mut namespaces: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    let mut outside: Vec<&Node> = Vec::new();
    for n in &d.nodes {
        match &n.namespace {
            Some(ns) => namespaces.entry(ns).or_default().push(n),
            None => outside.push(n),
        }
    }
    for (ns, nodes) in namespaces {
        let _ = writeln!(out, "  subgraph {} {{", dot_str(&format!("cluster_{ns}")));
        let _ = writeln!(out, "    label={};", dot_str(&format!("namespace {ns}")));
        for n in nodes {
            let _ = writeln!(
                out,
                "    {} [label={}];",
                dot_str(&n.name),
                dot_str(&node_label(n))
            );
        }
        let _ = writeln!(out, "  }}");
    }
    for n in outside {
        let shape = match n.kind {
            NodeKind::Entity => "hexagon",
            _ => "ellipse",
        };
        let _ = writeln!(
            out,
            "  {} [label={}, shape={shape}, style=solid];",
            dot_str(&n.name),
            dot_str(&node_label(n))
        );
    }
    for e in &d.edges {
        let rules: Vec<String> = e.rules.iter().map(rule_text).collect();
        let mut attrs = vec![format!("label={}", dot_str(&e.label))];
        if e.color != "black" {
            attrs.push(format!("color={}, fontcolor={}", e.color, e.color));
        }
        if e.dashed {
            attrs.push("style=dashed".into());
        }
        attrs.push(format!("tooltip={}", dot_str(&rules.join("\n"))));
        let _ = writeln!(
            out,
            "  {} -> {} [{}];",
            dot_str(&d.nodes[e.from].name),
            dot_str(&d.nodes[e.to].name),
            attrs.join(", ")
        );
    }
    let _ = writeln!(out, "}}");
    out
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const NODE_W: f64 = 190.0;
const NODE_H: f64 = 44.0;
const COL_GAP: f64 = 330.0;
const ROW_GAP: f64 = 110.0;
const MARGIN: f64 = 60.0;
const TOP: f64 = 70.0;

/// Where a page's nodes go: their boxes' top left corners, column headers (centre, title), and
/// the picture's width and height.
struct Layout {
    pos: Vec<(f64, f64)>,
    headers: Vec<(f64, String)>,
    width: f64,
    height: f64,
}

/// Columns: entities, one per namespace, then world, CIDR and FQDN peers; sorted in each.
fn layout(nodes: &[&Node]) -> Layout {
    let column_of = |n: &Node| match (&n.namespace, n.kind) {
        (_, NodeKind::Entity) => (0, String::from("entities")),
        (Some(ns), _) => (1, format!("namespace {ns}")),
        (None, _) => (2, String::from("outside the cluster")),
    };
    let mut columns: BTreeMap<(u8, String), Vec<usize>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        columns.entry(column_of(n)).or_default().push(i);
    }
    let mut pos = vec![(0.0, 0.0); nodes.len()];
    let mut headers = Vec::new();
    let mut rows = 0usize;
    for (c, ((_, title), members)) in columns.iter().enumerate() {
        let x = MARGIN + c as f64 * COL_GAP;
        headers.push((x + NODE_W / 2.0, title.clone()));
        for (r, &i) in members.iter().enumerate() {
            // Alternate columns sit half a row lower, so edges between them slope.
            let stagger = if c % 2 == 1 { ROW_GAP / 2.0 } else { 0.0 };
            pos[i] = (x, TOP + stagger + r as f64 * ROW_GAP);
        }
        rows = rows.max(members.len());
    }
    let width = MARGIN * 2.0 + (columns.len().max(1) - 1) as f64 * COL_GAP + NODE_W + 120.0;
    let height = TOP + rows as f64 * ROW_GAP + ROW_GAP / 2.0 + MARGIN;
    Layout {
        pos,
        headers,
        width,
        height,
    }
}

fn html(d: &Drawn, title: &str, diff: bool) -> String {
    let Layout {
        pos,
        headers,
        width,
        height,
    } = layout(&d.nodes);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg id=\"graph\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ = writeln!(svg, "<defs>");
    for color in ["black", "red", "green", "orange", "gray"] {
        let _ = writeln!(
            svg,
            "<marker id=\"arrow-{color}\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{color}\"/></marker>"
        );
    }
    let _ = writeln!(svg, "</defs>");
    for (x, t) in &headers {
        let _ = writeln!(
            svg,
            "<text class=\"column\" x=\"{x:.1}\" y=\"30\" text-anchor=\"middle\">{}</text>",
            esc(t)
        );
    }
    // Edges first, so nodes sit on top of them. Parallel edges fan out.
    let mut seen: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut details = String::new();
    for (i, e) in d.edges.iter().enumerate() {
        let nth = {
            let key = (e.from.min(e.to), e.from.max(e.to));
            let n = seen.entry(key).or_insert(0);
            *n += 1;
            *n - 1
        };
        let (path, lx, ly) = edge_path(pos[e.from], pos[e.to], nth);
        let (from, to) = (&d.nodes[e.from].name, &d.nodes[e.to].name);
        let id = format!("e{i}");
        let _ = writeln!(
            svg,
            "<g class=\"edge {status}\" id=\"{id}\" data-edge=\"{id}\" data-from=\"{}\" data-to=\"{}\" data-status=\"{status}\" data-details=\"d-{id}\" tabindex=\"0\"><path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.6\"{dash} marker-end=\"url(#arrow-{color})\"/><path class=\"hit\" d=\"{path}\" fill=\"none\" stroke=\"transparent\" stroke-width=\"12\"/><text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"middle\" fill=\"{color}\">{}</text></g>",
            esc(from),
            esc(to),
            esc(&e.label),
            status = e.status,
            color = e.color,
            dash = if e.dashed { " stroke-dasharray=\"6 4\"" } else { "" },
        );
        let _ = writeln!(
            details,
            "<section class=\"details\" id=\"d-{id}\" hidden><h2>{} → {}</h2><p class=\"status\">{}</p><p class=\"label\">{}</p>{}</section>",
            esc(from),
            esc(to),
            e.status,
            esc(&e.label),
            rules_html(&e.rules)
        );
    }
    for (i, n) in d.nodes.iter().enumerate() {
        let (x, y) = pos[i];
        let id = format!("n{i}");
        let rx = if n.kind == NodeKind::Workload { 8 } else { 22 };
        let notes: String = n
            .notes
            .iter()
            .enumerate()
            .map(|(k, note)| {
                format!(
                    "<text class=\"note\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                    x + NODE_W / 2.0,
                    y + NODE_H + 14.0 + 13.0 * k as f64,
                    esc(note)
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            "<g class=\"node {kind}\" id=\"{id}\" data-node=\"{}\" data-kind=\"{kind}\" data-details=\"d-{id}\" tabindex=\"0\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=\"{rx}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>{notes}</g>",
            esc(&n.name),
            x + NODE_W / 2.0,
            y + NODE_H / 2.0 + 5.0,
            esc(&n.name),
            kind = n.kind.as_str(),
        );
        // A node's details: its notes, then every edge touching it with its rules.
        let mut body = String::new();
        if !n.notes.is_empty() {
            let _ = write!(body, "<ul class=\"notes\">");
            for note in &n.notes {
                let _ = write!(body, "<li>{}</li>", esc(note));
            }
            let _ = write!(body, "</ul>");
        }
        for e in d.edges.iter().filter(|e| e.from == i || e.to == i) {
            let other = if e.from == i {
                format!("→ {}", d.nodes[e.to].name)
            } else {
                format!("← {}", d.nodes[e.from].name)
            };
            let _ = write!(
                body,
                "<h3>{} <span class=\"status\">{}</span></h3><p class=\"label\">{}</p>{}",
                esc(&other),
                e.status,
                esc(&e.label),
                rules_html(&e.rules)
            );
        }
        let _ = writeln!(
            details,
            "<section class=\"details\" id=\"d-{id}\" hidden><h2>{}</h2><p class=\"status\">{}</p>{body}</section>",
            esc(&n.name),
            n.kind.as_str()
        );
    }
    let _ = writeln!(svg, "</svg>");
    let legend = if diff {
        "<span style=\"color:green\">added</span> · <span style=\"color:red\">removed (dashed)</span> · <span style=\"color:orange\">altered (before → after)</span> · <span style=\"color:gray\">unchanged</span>"
    } else {
        "black: allowed ports (L7 rules named) · <span style=\"color:red\">dashed red: denied by a deny rule</span> · default-denied flows are not drawn"
    };
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ margin: 0; font: 14px system-ui, sans-serif; display: flex; height: 100vh; }}
#canvas {{ flex: 1; overflow: auto; }}
#panel {{ width: 380px; border-left: 1px solid #ccc; padding: 0 16px; overflow: auto; background: #fafafa; }}
header {{ padding: 8px 16px; border-bottom: 1px solid #eee; }}
.node rect {{ fill: #eef3ff; stroke: #3b5bdb; stroke-width: 1.5; }}
.node.entity rect, .node.world rect, .node.cidr rect, .node.fqdn rect {{ fill: #fff4e6; stroke: #d9480f; }}
.node text {{ font-size: 13px; }}
.node .note {{ font-size: 10px; fill: #666; }}
.edge text {{ font-size: 11px; paint-order: stroke; stroke: #fff; stroke-width: 4px; }}
.node, .edge {{ cursor: pointer; }}
.selected rect {{ stroke-width: 3.5; }}
.selected path {{ stroke-width: 3.5; }}
.column {{ font-weight: bold; fill: #444; }}
.rules li {{ margin-bottom: 4px; }}
code {{ font-size: 12px; }}
</style>
</head>
<body>
<div id="canvas">
<header><strong>{title}</strong><br><small>{legend}. Click a node or an edge for its deciding rules.</small></header>
{svg}</div>
<aside id="panel"><div id="shown"><p>Click a node or an edge to see the rules that decide it (policy, file:line).</p></div>
{details}</aside>
<script>
(function () {{
  var shown = document.getElementById('shown');
  var items = document.querySelectorAll('[data-details]');
  function pick(el) {{
    for (var i = 0; i < items.length; i++) items[i].classList.remove('selected');
    el.classList.add('selected');
    var src = document.getElementById(el.getAttribute('data-details'));
    shown.innerHTML = src ? src.innerHTML : '';
  }}
  for (var i = 0; i < items.length; i++) {{
    items[i].addEventListener('click', function (ev) {{ ev.stopPropagation(); pick(this); }});
    items[i].addEventListener('keydown', function (ev) {{ if (ev.key === 'Enter') pick(this); }});
  }}
}})();
</script>
</body>
</html>
"#,
        title = esc(title),
    )
}

fn rules_html(rules: &[Origin]) -> String {
    if rules.is_empty() {
        return "<p class=\"rules\">No rule: no policy enforces here.</p>".into();
    }
    let mut out = String::from("<ul class=\"rules\">");
    for r in rules {
        let _ = write!(
            out,
            "<li class=\"rule\" data-policy=\"{}\" data-file=\"{}\" data-line=\"{}\"><b>{}</b><br><code>{}:{}</code></li>",
            esc(&r.policy),
            esc(&r.file),
            r.line,
            esc(&r.policy),
            esc(&r.file),
            r.line
        );
    }
    out.push_str("</ul>");
    out
}

/// A cubic curve from one node box to another (a loop for a node to itself) and where its
/// label goes. `nth` fans out parallel edges.
fn edge_path(a: (f64, f64), b: (f64, f64), nth: usize) -> (String, f64, f64) {
    let bend = 18.0 * nth as f64;
    if a == b {
        let (x, y) = (a.0 + NODE_W, a.1 + NODE_H / 2.0);
        let r = 34.0 + bend;
        let path = format!(
            "M{:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
            x,
            y - 8.0,
            x + r,
            y - r,
            x + r,
            y + r,
            x,
            y + 8.0
        );
        return (path, x + r * 0.8, y + 4.0);
    }
    let (ay, by) = (a.1 + NODE_H / 2.0, b.1 + NODE_H / 2.0);
    let (p0, p1, p2, p3) = if (a.0 - b.0).abs() < 1.0 {
        // Same column: out of the right side and back in, bulging right.
        let x = a.0 + NODE_W;
        let dx = 60.0 + 0.25 * (ay - by).abs() + bend;
        ((x, ay), (x + dx, ay), (x + dx, by), (x, by))
    } else if a.0 < b.0 {
        let (x0, x3) = (a.0 + NODE_W, b.0);
        let dx = (x3 - x0) / 2.0;
        (
            (x0, ay),
            (x0 + dx, ay + bend),
            (x3 - dx, by + bend),
            (x3, by),
        )
    } else {
        let (x0, x3) = (a.0, b.0 + NODE_W);
        let dx = (x0 - x3) / 2.0;
        (
            (x0, ay),
            (x0 - dx, ay - bend),
            (x3 + dx, by - bend),
            (x3, by),
        )
    };
    let path = format!(
        "M{:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
        p0.0, p0.1, p1.0, p1.1, p2.0, p2.1, p3.0, p3.1
    );
    // The curve's point at t = 1/2.
    let lx = (p0.0 + 3.0 * p1.0 + 3.0 * p2.0 + p3.0) / 8.0;
    // Parallel edges' labels stack.
    let ly = (p0.1 + 3.0 * p1.1 + 3.0 * p2.1 + p3.1) / 8.0 - 4.0 + 14.0 * nth as f64;
    (path, lx, ly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{check, load_str, lower, Cluster};
    use std::path::Path;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: a, labels: {app: web}}, status: {podIPs: [{ip: 10.0.0.1}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: a, labels: {app: client}}, status: {podIPs: [{ip: 10.0.0.3}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: b, labels: {app: db}}, status: {podIPs: [{ip: 10.0.1.4}]}}
"#;

    /// web: ingress from client on 80, 81-90 (two rules, one range), 53/ANY, HTTP on 8080;
    /// client: egress to web on everything, to 192.0.2.0/24 on 443, denied to db.
    const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "81", endPort: 90, protocol: TCP}, {port: "53", protocol: ANY}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/x"}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
  - toCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: b, app: db}}]
"#;

    fn program(policies: &str) -> Program {
        let mut set = load_str("p.yaml", policies);
        let mut cluster = Cluster::default();
        cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), CLUSTER);
        let r = check(set, Some(cluster));
        assert_eq!(r.errors(), 0, "{}", crate::report::human(&r, false));
        lower::build(
            &r.set.policies,
            &r.set.sources,
            r.cluster.as_ref().unwrap(),
            &Default::default(),
        )
    }

    fn edges(g: &Graph<Node, Edge>) -> Vec<(String, String, EdgeKind, String)> {
        g.edge_indices()
            .map(|i| {
                let (a, b) = g.edge_endpoints(i).unwrap();
                let e = &g[i];
                (
                    g[a].name.clone(),
                    g[b].name.clone(),
                    e.kind,
                    e.label.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn edges_merge_ports_group_protocols_and_mark_l7_and_deny() {
        let c = connectivity(&program(POLICIES));
        let e = edges(&c.graph);
        let find = |from: &str, to: &str, kind: EdgeKind| {
            e.iter()
                .find(|x| x.0 == from && x.1 == to && x.2 == kind)
                .map(|x| x.3.clone())
        };
        assert_eq!(
            find("a/client", "a/web", EdgeKind::Allowed).as_deref(),
            Some("53/ANY, 80-90/TCP, 8080/TCP (HTTP rules)"),
            "{e:#?}"
        );
        assert_eq!(
            find("a/client", "192.0.2.0/24", EdgeKind::Allowed).as_deref(),
            Some("443/TCP")
        );
        assert_eq!(
            find("a/client", "b/db", EdgeKind::Denied).as_deref(),
            Some("any denied by CiliumNetworkPolicy a/client-out")
        );
        // Default deny draws nothing: db may not reach web, client may not reach world.
        assert_eq!(find("b/db", "a/web", EdgeKind::Allowed), None);
        assert_eq!(find("a/client", "world", EdgeKind::Allowed), None);
        // Nothing enforced on either side: not drawn, the nodes say so.
        assert_eq!(find("b/db", "b/db", EdgeKind::Allowed), None);
        let db = c.graph.node_weights().find(|n| n.name == "b/db").unwrap();
        assert_eq!(db.notes, ["ingress not enforced", "egress not enforced"]);
        assert_eq!(db.namespace.as_deref(), Some("b"));
        // Every edge names its rules with file and line.
        for w in c.graph.edge_weights() {
            assert!(!w.rules.is_empty(), "{w:?}");
            assert!(w.rules.iter().all(|r| r.file == "p.yaml" && r.line > 0));
        }
        let dot = c.to_dot();
        assert!(dot.contains("subgraph \"cluster_a\""), "{dot}");
        assert!(dot.contains(
            "\"a/client\" -> \"b/db\" [label=\"any denied by CiliumNetworkPolicy a/client-out\", color=red, fontcolor=red, style=dashed"
        ));
        assert_eq!(
            dot,
            connectivity(&program(POLICIES)).to_dot(),
            "deterministic"
        );
    }

    #[test]
    fn html_is_one_offline_page_with_every_node_edge_and_rule() {
        let c = connectivity(&program(POLICIES));
        let page = c.to_html("test");
        let doc = scraper::Html::parse_document(&page);
        assert!(doc.errors.is_empty(), "{:?}", doc.errors);
        let sel = |s: &str| scraper::Selector::parse(s).unwrap();
        assert_eq!(doc.select(&sel("svg")).count(), 1);
        // One node element per node, each workload by name.
        let nodes: Vec<&str> = doc
            .select(&sel("svg g.node"))
            .filter_map(|n| n.value().attr("data-node"))
            .collect();
        assert_eq!(nodes.len(), c.graph.node_count());
        for w in ["a/web", "a/client", "b/db"] {
            assert_eq!(nodes.iter().filter(|n| **n == w).count(), 1, "{w}");
        }
        // One edge element per edge, with its ends.
        let drawn: Vec<(String, String)> = doc
            .select(&sel("svg g.edge"))
            .map(|e| {
                let v = e.value();
                (
                    v.attr("data-from").unwrap().to_string(),
                    v.attr("data-to").unwrap().to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = edges(&c.graph)
            .into_iter()
            .map(|(a, b, _, _)| (a, b))
            .collect();
        assert_eq!(drawn, want);
        // Each clickable element has its details, and each edge's details list its rules.
        for el in doc.select(&sel("[data-details]")) {
            let id = el.value().attr("data-details").unwrap();
            let details = doc
                .select(&sel(&format!("section#{id}")))
                .next()
                .unwrap_or_else(|| panic!("no details {id}"));
            if el.value().attr("data-edge").is_some() {
                let (from, to) = (el.value().attr("data-from"), el.value().attr("data-to"));
                let e = c
                    .graph
                    .edge_indices()
                    .find(|i| {
                        let (a, b) = c.graph.edge_endpoints(*i).unwrap();
                        Some(c.graph[a].name.as_str()) == from
                            && Some(c.graph[b].name.as_str()) == to
                            && el.value().attr("data-status")
                                == Some(match c.graph[*i].kind {
                                    EdgeKind::Allowed => "allowed",
                                    EdgeKind::Denied => "denied",
                                })
                    })
                    .unwrap();
                let listed: Vec<(String, String, String)> = details
                    .select(&sel("li.rule"))
                    .map(|li| {
                        let v = li.value();
                        let a = |k: &str| v.attr(k).unwrap().to_string();
                        (a("data-policy"), a("data-file"), a("data-line"))
                    })
                    .collect();
                let want: Vec<(String, String, String)> = c.graph[e]
                    .rules
                    .iter()
                    .map(|r| (r.policy.clone(), r.file.clone(), r.line.to_string()))
                    .collect();
                assert_eq!(listed, want);
            }
        }
        // Offline: no external references, the only script inline.
        assert!(!page.contains("http://") && !page.contains("https://"));
        let scripts: Vec<_> = doc.select(&sel("script")).collect();
        assert_eq!(scripts.len(), 1);
        assert!(scripts[0].value().attr("src").is_none());
        for attr in ["src", "href"] {
            assert_eq!(doc.select(&sel(&format!("[{attr}]"))).count(), 0, "{attr}");
        }
    }

    #[test]
    fn the_diff_picture_colours_added_removed_and_altered_edges() {
        let old = program(POLICIES);
        // The client may no longer reach the CIDR, gains 91 on web, and the deny goes.
        let edited = POLICIES
            .replace("    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n", "")
            .replace("toCIDR: [192.0.2.0/24]", "toCIDR: [198.51.100.0/24]")
            .replace("endPort: 90", "endPort: 91")
            .replace(
                "  egressDeny:\n  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: b, app: db}}]\n",
                "",
            );
        let new = program(&edited);
        let d = diff(&old, &new);
        let g = &d.graph;
        let got: Vec<(String, String, Change)> = g
            .edge_indices()
            .map(|i| {
                let (a, b) = g.edge_endpoints(i).unwrap();
                (g[a].name.clone(), g[b].name.clone(), g[i].change)
            })
            .collect();
        let has = |from: &str, to: &str, change: Change| {
            got.iter()
                .any(|x| x.0 == from && x.1 == to && x.2 == change)
        };
        assert!(has("a/client", "a/web", Change::Altered), "{got:#?}");
        assert!(has("a/client", "192.0.2.0/24", Change::Removed), "{got:#?}");
        assert!(
            has("a/client", "198.51.100.0/24", Change::Added),
            "{got:#?}"
        );
        assert!(has("a/client", "b/db", Change::Removed), "{got:#?}");
        let dot = d.to_dot();
        assert!(dot.contains(
            "label=\"53/ANY, 80-90/TCP, 8080/TCP (HTTP rules) → 53/ANY, 80-91/TCP, 8080/TCP (HTTP rules)\", color=orange"
        ), "{dot}");
        assert!(dot.contains("color=green"));
        assert!(dot.contains("color=red, fontcolor=red, style=dashed"));
        assert_eq!(diff(&old, &old).changed(), 0);
        let page = d.to_html("diff");
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(page.contains("data-status=\"added\""));
    }
}
