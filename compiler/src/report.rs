//! Rendering a check report for people (miette), for scripts (JSON, DESIGN.md §7) and for code
//! scanning (SARIF 2.1.0). Library code, because every caller that reports policy problems (the
//! CLI, the loader's status, golden tests) must say them the same way.

use crate::{CheckReport, Code, Diagnostic, Severity, SourceMap};
use miette::{GraphicalReportHandler, GraphicalTheme};
use serde_json::{json, Value};
use std::fmt::Write;

fn path_of(report: &CheckReport, d: &Diagnostic) -> String {
    report.set.sources.path(d.span.file).display().to_string()
}

/// 1-based line and column just past the diagnostic's span.
fn end_of(report: &CheckReport, d: &Diagnostic) -> (u32, u32) {
    report
        .set
        .sources
        .get(d.span.file)
        .line_col(d.span.end as usize)
}

/// One miette report per diagnostic, each followed by a blank line (policy and expectation
/// files alike).
pub fn render(diagnostics: &[Diagnostic], sources: &SourceMap, color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100);
    let mut out = String::new();
    for d in diagnostics {
        // Writing into a String cannot fail.
        let _ = handler.render_report(&mut out, &d.to_report(sources));
        out.push('\n');
    }
    out
}

/// The human form: one miette report per diagnostic, notes, and a summary line.
pub fn human(report: &CheckReport, color: bool) -> String {
    let mut out = render(&report.diagnostics, &report.set.sources, color);
    for n in &report.set.notes {
        match n.span {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "note: {} ({}:{})",
                    n.message,
                    report.set.sources.path(s.file).display(),
                    s.line
                );
            }
            None => {
                let _ = writeln!(out, "note: {}", n.message);
            }
        }
    }
    let files = report.set.sources.files().count();
    let _ = writeln!(
        out,
        "checked {} {} in {} {}: {} {}, {} {}",
        report.set.policies.len(),
        plural(report.set.policies.len(), "policy", "policies"),
        files,
        plural(files, "file", "files"),
        report.errors(),
        plural(report.errors(), "error", "errors"),
        report.warnings(),
        plural(report.warnings(), "warning", "warnings"),
    );
    out
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// The JSON form of DESIGN.md §7 (fields may be added, never removed).
pub fn json(report: &CheckReport) -> Value {
    let diagnostics: Vec<Value> = report
        .diagnostics
        .iter()
        .map(|d| {
            let end = end_of(report, d);
            json!({
                "severity": severity(d.severity()),
                "code": d.code.as_str(),
                "message": d.message,
                "file": path_of(report, d),
                "line": d.span.line,
                "column": d.span.column,
                "endLine": end.0,
                "endColumn": end.1,
                "label": d.label,
                "help": d.help,
            })
        })
        .collect();
    let notes: Vec<Value> = report
        .set
        .notes
        .iter()
        .map(|n| {
            let mut v = json!({"message": n.message});
            if let Some(s) = n.span {
                v["file"] = json!(report.set.sources.path(s.file).display().to_string());
                v["line"] = json!(s.line);
            }
            v
        })
        .collect();
    json!({
        "diagnostics": diagnostics,
        "errors": report.errors(),
        "warnings": report.warnings(),
        "notes": notes,
    })
}

/// SARIF 2.1.0, as GitHub code scanning reads it: one run, a rule per diagnostic code, results
/// with a physical location relative to the repository root.
pub fn sarif(report: &CheckReport) -> Value {
    let rules: Vec<Value> = Code::ALL
        .iter()
        .map(|c| {
            json!({
                "id": c.as_str(),
                "name": c.as_str().trim_start_matches("cnpc::"),
                "shortDescription": {"text": c.summary()},
                "defaultConfiguration": {"level": severity(c.severity())},
            })
        })
        .collect();
    let results: Vec<Value> = report
        .diagnostics
        .iter()
        .map(|d| {
            let end = end_of(report, d);
            let uri = path_of(report, d).replace('\\', "/");
            let uri = uri.strip_prefix("./").unwrap_or(&uri).to_string();
            let text = if d.help.is_empty() {
                d.message.clone()
            } else {
                format!("{}\nhelp: {}", d.message, d.help)
            };
            json!({
                "ruleId": d.code.as_str(),
                "ruleIndex": Code::ALL.iter().position(|c| *c == d.code).unwrap_or(0),
                "level": severity(d.severity()),
                "message": {"text": text},
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": {"uri": uri},
                        "region": {
                            "startLine": d.span.line,
                            "startColumn": d.span.column,
                            "endLine": end.0,
                            "endColumn": end.1.max(d.span.column + u32::from(end.0 == d.span.line)),
                        }
                    }
                }],
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "cnpc",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/cnpc-dev/cnpc",
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// cnpc trace

use crate::eval::{Decision, Flow, Party, Reason, Verdict};

fn reason_json(r: &Reason) -> Value {
    json!({"policy": r.origin.policy, "file": r.origin.file, "line": r.origin.line, "reason": r.what})
}

fn decision_json(d: &Decision) -> Value {
    json!({"verdict": d.verdict.as_str(), "rules": d.rules.iter().map(reason_json).collect::<Vec<_>>()})
}

fn party_json(p: &Party) -> Value {
    json!({"name": p.name, "identity": p.identity.map(|i| i.0), "ip": p.ip.map(|i| i.to_string())})
}

/// `cnpc trace -o json` (DESIGN.md §7).
pub fn trace_json(flow: &Flow, v: &Verdict) -> Value {
    let l7 = v.l7().map(|l| {
        json!({"protocol": l.protocol, "allowed": l.allowed, "rules": l.rules.iter().map(reason_json).collect::<Vec<_>>()})
    });
    json!({
        "verdict": if v.allowed { "allowed" } else { "denied" },
        "from": party_json(&flow.src),
        "to": party_json(&flow.dst),
        "port": format!("{}/{}", flow.port, flow.protocol.as_str()),
        "egress": decision_json(&v.egress),
        "ingress": decision_json(&v.ingress),
        "l7": l7,
    })
}

fn party_text(p: &Party) -> String {
    match (p.identity, p.ip) {
        (Some(id), Some(ip)) => format!("{} (identity {}, {ip})", p.name, id.0),
        (Some(id), None) => format!("{} (identity {})", p.name, id.0),
        (None, Some(ip)) => format!("{} ({ip})", p.name),
        (None, None) => p.name.clone(),
    }
}

/// `cnpc trace` for people, in the spirit of `cilium policy trace`.
pub fn trace_text(flow: &Flow, v: &Verdict) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Tracing {} -> {}, {}/{}",
        party_text(&flow.src),
        party_text(&flow.dst),
        flow.port,
        flow.protocol.as_str()
    );
    for (title, d) in [
        (format!("Egress from {}", flow.src.name), &v.egress),
        (format!("Ingress to {}", flow.dst.name), &v.ingress),
    ] {
        let _ = writeln!(out, "\n{title}: {}", d.verdict.as_str());
        if d.rules.is_empty() && d.verdict == crate::eval::DirVerdict::NotEnforced {
            let _ = writeln!(out, "  no policy enforces this direction");
        }
        for r in &d.rules {
            let _ = writeln!(
                out,
                "  {}  {}:{}  {}",
                r.origin.policy, r.origin.file, r.origin.line, r.what
            );
        }
    }
    if let Some(l) = v.l7() {
        let state = match l.allowed {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "proxied (no request given)",
        };
        let req = match (&flow.http, &flow.dns_query) {
            (Some(h), _) => format!(" {} {}", h.method, h.path),
            (None, Some(q)) => format!(" query {q}"),
            _ => String::new(),
        };
        let _ = writeln!(out, "\nL7 ({}){req}: {state}", l.protocol);
        for r in &l.rules {
            let _ = writeln!(
                out,
                "  {}  {}:{}  {}",
                r.origin.policy, r.origin.file, r.origin.line, r.what
            );
        }
    }
    let _ = writeln!(
        out,
        "\nVerdict: {}",
        if v.allowed { "allowed" } else { "denied" }
    );
    out
}

// ---------------------------------------------------------------------------------------------
// cnpc tables

use crate::tables::PeerIdentity;
use cnpc_ir::{DecisionTable, NumericIdentity, Program, TableVerdict};
use std::collections::HashMap;

/// Short names of peer identities: their endpoints' workloads, a reserved name, a CIDR or a DNS
/// matcher. Endpoints and the universe are indexed by numeric identity once, and each name is
/// made once: a listing of every table names each peer once per table that mentions it, and
/// scanning every endpoint for each mention was quadratic in identities.
struct PeerNames<'a> {
    /// Workloads of pod endpoints per identity, sorted and deduplicated.
    workloads: HashMap<NumericIdentity, Vec<&'a str>>,
    /// The first universe entry of each identity.
    universe: HashMap<NumericIdentity, &'a PeerIdentity>,
    /// Per identity, `"<number> <name>"` as class lines list it, and where the name starts.
    names: HashMap<NumericIdentity, (String, usize)>,
}

impl<'a> PeerNames<'a> {
    fn new(program: &'a Program, universe: &'a [PeerIdentity]) -> PeerNames<'a> {
        let mut workloads: HashMap<NumericIdentity, Vec<&str>> = HashMap::new();
        for e in program.endpoints.values().filter(|e| e.is_pod) {
            workloads
                .entry(program.identities[e.identity].numeric)
                .or_default()
                .push(e.workload.as_str());
        }
        for list in workloads.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        let mut index = HashMap::with_capacity(universe.len());
        for p in universe {
            index.entry(p.numeric).or_insert(p);
        }
        PeerNames {
            workloads,
            universe: index,
            names: HashMap::new(),
        }
    }

    /// `"<number> <name>"` of `n` and where the name starts in it, made on first use.
    fn entry(&mut self, n: NumericIdentity) -> &(String, usize) {
        let (workloads, universe) = (&self.workloads, &self.universe);
        self.names.entry(n).or_insert_with(|| {
            let number = n.0.to_string();
            let start = number.len() + 1;
            (
                format!("{number} {}", Self::make(workloads, universe, n)),
                start,
            )
        })
    }

    /// `"<number> <name>"`, as class lines list members.
    fn numbered(&mut self, n: NumericIdentity) -> &str {
        &self.entry(n).0
    }

    fn name(&mut self, n: NumericIdentity) -> &str {
        let (s, start) = self.entry(n);
        &s[*start..]
    }

    fn make(
        workloads: &HashMap<NumericIdentity, Vec<&str>>,
        universe: &HashMap<NumericIdentity, &PeerIdentity>,
        n: NumericIdentity,
    ) -> String {
        if let Some(w) = workloads.get(&n).filter(|w| !w.is_empty()) {
            return w.join(" ");
        }
        let Some(p) = universe.get(&n) else {
            return "?".into();
        };
        if !p.fqdn.is_empty() {
            let names: Vec<String> = p
                .fqdn
                .iter()
                .map(|m| match m {
                    cnpc_ir::DnsMatcher::Name(s) | cnpc_ir::DnsMatcher::Pattern(s) => {
                        format!("fqdn:{s}")
                    }
                })
                .chain(p.cidr.map(|c| format!("cidr:{c}")))
                .collect();
            return names.join(",");
        }
        if let Some(c) = p.cidr {
            return format!("cidr:{c}");
        }
        p.labels.to_strings().join(",")
    }
}

fn verdict_text(program: &Program, v: &TableVerdict) -> String {
    match v {
        TableVerdict::Allow => "allow".into(),
        TableVerdict::Deny => "deny".into(),
        TableVerdict::Proxy(rules) => {
            let origins: Vec<String> = rules
                .iter()
                .map(|r| {
                    format!(
                        "{}:{}",
                        program.rules[*r].origin.file, program.rules[*r].origin.line
                    )
                })
                .collect();
            format!("proxy (L7 rules at {})", origins.join(", "))
        }
    }
}

/// `cnpc tables`: every decision table, for people and for snapshots.
pub fn tables_text(
    program: &Program,
    universe: &[PeerIdentity],
    tables: &[DecisionTable],
) -> String {
    let mut names = PeerNames::new(program, universe);
    let mut out = String::new();
    for t in tables {
        table_text(&mut out, &mut names, program, t);
    }
    out
}

/// [`tables_text`] written to `w` a table at a time, for output too large to hold: at 20,000
/// identities the text names 24 million class members (over 600 MB).
pub fn write_tables(
    w: &mut dyn std::io::Write,
    program: &Program,
    universe: &[PeerIdentity],
    tables: &[DecisionTable],
) -> std::io::Result<()> {
    let mut names = PeerNames::new(program, universe);
    let mut out = String::new();
    for t in tables {
        out.clear();
        table_text(&mut out, &mut names, program, t);
        w.write_all(out.as_bytes())?;
    }
    w.flush()
}

/// Appends the text of one table to `out`.
fn table_text(out: &mut String, names: &mut PeerNames, program: &Program, t: &DecisionTable) {
    // Writing into a String cannot fail: the results of `write!` are ignored below.
    let default = match t.default {
        TableVerdict::Deny => "default deny",
        _ => "default allow",
    };
    let _ = writeln!(
        out,
        "identity {} ({}) {}: {default}, {} classes, {} rows",
        t.subject.0,
        names.name(t.subject),
        t.direction.as_str(),
        t.classes.len(),
        t.rows.len()
    );
    // Rows by class, in table order, without a scan of the rows per class.
    let mut rows_of: Vec<Vec<&cnpc_ir::TableRow>> = vec![Vec::new(); t.classes.len()];
    for row in &t.rows {
        if let Some(list) = rows_of.get_mut(row.class as usize) {
            list.push(row);
        }
    }
    for (i, class) in t.classes.iter().enumerate() {
        let _ = write!(out, "  class {i}: ");
        for (k, m) in class.members.iter().enumerate() {
            if k > 0 {
                out.push_str("; ");
            }
            out.push_str(names.numbered(*m));
        }
        out.push('\n');
        for row in &rows_of[i] {
            let ports = if row.ports.lo == row.ports.hi {
                row.ports.lo.to_string()
            } else {
                format!("{}-{}", row.ports.lo, row.ports.hi)
            };
            let _ = writeln!(
                out,
                "    {:<6} {:<11} {}",
                row.protocol.as_str(),
                ports,
                verdict_text(program, &row.verdict)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cnpc diff

use crate::diff::Change;

fn port_text(c: &Change) -> String {
    if c.ports.lo == c.ports.hi {
        format!("{}/{}", c.ports.lo, c.protocol.as_str())
    } else {
        format!("{}-{}/{}", c.ports.lo, c.ports.hi, c.protocol.as_str())
    }
}

fn outcome_json(o: crate::diff::Outcome) -> &'static str {
    match o {
        crate::diff::Outcome::Denied => "denied",
        _ => "allowed",
    }
}

/// `cnpc diff -o json` (DESIGN.md §7). `before`/`after` are "allowed" or "denied"; `l7` says
/// whether the allowed flow goes through L7 rules.
pub fn diff_json(changes: &[Change]) -> Value {
    let changes: Vec<Value> = changes
        .iter()
        .map(|c| {
            json!({
                "from": c.from,
                "to": c.to,
                "port": port_text(c),
                "before": outcome_json(c.before),
                "after": outcome_json(c.after),
                "l7": {"before": c.before == crate::diff::Outcome::Proxied, "after": c.after == crate::diff::Outcome::Proxied},
                "policies": c.policies,
            })
        })
        .collect();
    json!({"changes": changes})
}

/// `cnpc diff` for people: the flipped flows per workload pair, then a unified view of the
/// tables that changed.
pub fn diff_text(changes: &[Change], old_tables: &str, new_tables: &str) -> String {
    let mut out = String::new();
    if changes.is_empty() {
        return out;
    }
    for ((from, to), list) in crate::diff::by_pair(changes) {
        let _ = writeln!(out, "{from} -> {to}");
        // A pair whose every protocol and port flipped the same way reads as one line.
        let full = |c: &&Change| c.ports.lo == 0 && c.ports.hi == c.protocol.max_port();
        let everything = list.len() == 5
            && list.iter().all(full)
            && list
                .windows(2)
                .all(|w| (w[0].before, w[0].after) == (w[1].before, w[1].after));
        if everything {
            let mut policies: Vec<&String> = list.iter().flat_map(|c| &c.policies).collect();
            policies.sort();
            policies.dedup();
            let names: Vec<&str> = policies.iter().map(|s| s.as_str()).collect();
            let _ = writeln!(
                out,
                "  {:<16} {} -> {}   ({})",
                "all traffic",
                list[0].before.as_str(),
                list[0].after.as_str(),
                names.join(", ")
            );
            continue;
        }
        for c in list {
            let _ = writeln!(
                out,
                "  {:<16} {} -> {}   ({})",
                port_text(c),
                c.before.as_str(),
                c.after.as_str(),
                c.policies.join(", ")
            );
        }
    }
    let diff = similar::TextDiff::from_lines(old_tables, new_tables);
    let unified = diff
        .unified_diff()
        .context_radius(2)
        .header("old tables", "new tables")
        .to_string();
    if !unified.is_empty() {
        let _ = writeln!(out, "\n{unified}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers are named by their workloads (sorted, once each, however many pods), by CIDR, or
    /// `?` when nothing knows the identity; each mention of a peer uses the same name.
    #[test]
    fn tables_name_peers_by_workloads_and_prefixes() {
        let policies = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns0}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]\n  - toCIDR: [192.0.2.0/24]\n";
        let cluster = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: ns0}}\n- {apiVersion: v1, kind: Pod, metadata: {name: web2, namespace: ns0, labels: {app: web}}, status: {podIPs: [{ip: 10.0.0.2}]}}\n- {apiVersion: v1, kind: Pod, metadata: {name: web1, namespace: ns0, labels: {app: web}}, status: {podIPs: [{ip: 10.0.0.1}]}}\n- {apiVersion: v1, kind: Pod, metadata: {name: db1, namespace: ns0, labels: {app: db}}, status: {podIPs: [{ip: 10.0.0.3}]}}\n";
        let mut set = crate::load_str("p.yaml", policies);
        let mut c = crate::Cluster::default();
        c.add_str(&mut set.sources, std::path::Path::new("c.yaml"), cluster);
        let r = crate::check(set, Some(c));
        assert_eq!(r.errors(), 0);
        let program = crate::lower::build(
            &r.set.policies,
            &r.set.sources,
            r.cluster.as_ref().expect("a cluster"),
            &Default::default(),
        );
        let universe = crate::tables::peer_universe(&program);
        let tables = crate::tables::all_tables(&program);
        let text = tables_text(&program, &universe, &tables);
        let numeric = |w: &str| {
            program
                .endpoints
                .values()
                .find(|e| e.name.ends_with(w))
                .map(|e| program.identities[e.identity].numeric.0)
                .expect("the pod")
        };
        let (web, db) = (numeric("web1"), numeric("db1"));
        assert_eq!(web, numeric("web2"), "one identity for both web pods");
        assert!(
            text.contains(&format!("identity {web} (ns0/web1 ns0/web2) egress")),
            "{text}"
        );
        assert!(text.contains(&format!("{db} ns0/db1")), "{text}");
        assert!(text.contains(" cidr:192.0.2.0/24"), "{text}");
        let mut names = PeerNames::new(&program, &universe);
        assert_eq!(names.name(NumericIdentity(web)), "ns0/web1 ns0/web2");
        assert_eq!(names.numbered(NumericIdentity(db)), format!("{db} ns0/db1"));
        assert_eq!(names.name(NumericIdentity(99_999)), "?");
    }
}
