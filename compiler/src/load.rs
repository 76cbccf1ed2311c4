//! Reading policy files: paths, documents, object kinds.
//!
//! Accepted (DESIGN.md §2): files and directories (walked recursively in sorted order, `.yaml`,
//! `.yml` and `.json`), multi-document YAML, `kind: List`, CiliumNetworkPolicy with `spec` and/or
//! `specs`, CiliumClusterwideNetworkPolicy and networking.k8s.io/v1 NetworkPolicy. Objects of
//! other kinds are skipped with a note. A path holding no policy is an empty policy set.
//!
//! Files are read as Flux would apply them: post-build variables (`${NAME}`, `${NAME:=default}`)
//! are substituted in each policy object with the values given ([`PolicySet::load_with`], the
//! CLI's `--var` and `--vars-file`) and the defaults in the file, and a variable with neither is
//! one `cnpc::unsubstituted-variable` per file ([`crate::subst`] has the rules). A set made with
//! [`PolicySet::default`] takes objects as they are (objects read from the API server were
//! substituted before they got there).

use crate::ast::*;
use crate::decode::{Cx, Fields};
use crate::diag::{Code, Diagnostic};
use crate::source::{FileId, SourceFile, SourceMap, Span};
use crate::subst::{self, Unresolved, Vars};
use crate::yaml::{parse_documents, Node, NodeKind};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Failures that stop a run before any policy is looked at (exit code 2).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    #[diagnostic(code(cnpc::io), help("check that the path exists and is readable"))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an identity allocation: {message}")]
    #[diagnostic(code(cnpc::identities), help("pass a file written by `cnpc identities --cluster FILE` (a JSON object of labels to numbers)"))]
    BadAllocation { path: PathBuf, message: String },
    #[error("cannot read `{spec}` from git: {message}")]
    #[diagnostic(code(cnpc::git), help("write git:REV:PATH with a revision git knows (a branch, tag or commit) and a path inside the repository, run inside the repository"))]
    Git { spec: String, message: String },
}

/// Something worth telling the user that is not a problem (a skipped object, an empty path).
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub message: String,
    pub span: Option<Span>,
}

/// Everything read from the given paths.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub sources: SourceMap,
    pub policies: Vec<Policy>,
    pub diagnostics: Vec<Diagnostic>,
    pub notes: Vec<Note>,
    /// Objects of other kinds, reported as one note per file by [`PolicySet::finish_notes`].
    skipped: Vec<(FileId, String, Option<Span>)>,
    /// Flux post-build variables substituted in files that [`PolicySet::add_bytes`] reads;
    /// `None` takes objects as they are.
    substitution: Option<Vars>,
}

impl PolicySet {
    /// An empty set whose files get Flux's post-build substitution with these values (and the
    /// defaults the files give); see [`crate::subst`].
    pub fn with_vars(vars: Vars) -> PolicySet {
        PolicySet {
            substitution: Some(vars),
            ..PolicySet::default()
        }
    }

    /// The variables substituted in this set's files (`None`: objects are taken as they are).
    pub fn vars(&self) -> Option<&Vars> {
        self.substitution.as_ref()
    }

    /// Reads every policy under `paths`. Problems in the files become diagnostics; only a path
    /// that cannot be read at all is an error. Flux variables get their defaults; one without
    /// a default is reported (pass values with [`PolicySet::load_with`]).
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, LoadError> {
        PolicySet::load_with(paths, &Vars::new())
    }

    /// [`PolicySet::load`] with values for Flux post-build variables.
    pub fn load_with(paths: &[PathBuf], vars: &Vars) -> Result<PolicySet, LoadError> {
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files)?;
        }
        let mut set = PolicySet::with_vars(vars.clone());
        let mut contents = Vec::with_capacity(files.len());
        for path in files {
            let bytes = std::fs::read(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            contents.push((path, bytes));
        }
        set.add_files(contents);
        set.finish_notes();
        if set.policies.is_empty() {
            set.notes.push(Note {
                message: format!(
                    "no policy found in {}; checking an empty policy set",
                    paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                span: None,
            });
        }
        Ok(set)
    }

    /// Reads policies from files and directories, or from `git:REV:PATH` (the files under PATH at
    /// revision REV of the repository around the current directory).
    pub fn load_spec(spec: &str) -> Result<PolicySet, LoadError> {
        PolicySet::load_spec_with(spec, &Vars::new())
    }

    /// [`PolicySet::load_spec`] with values for Flux post-build variables.
    pub fn load_spec_with(spec: &str, vars: &Vars) -> Result<PolicySet, LoadError> {
        let Some(rest) = spec.strip_prefix("git:") else {
            return PolicySet::load_with(&[PathBuf::from(spec)], vars);
        };
        let err = |message: String| LoadError::Git {
            spec: spec.to_string(),
            message,
        };
        let (rev, path) = rest
            .split_once(':')
            .ok_or_else(|| err("expected git:REV:PATH".into()))?;
        let git = |args: &[&str]| -> Result<Vec<u8>, LoadError> {
            let out = std::process::Command::new("git")
                .args(args)
                .output()
                .map_err(|e| err(format!("cannot run git: {e}")))?;
            if !out.status.success() {
                return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
            Ok(out.stdout)
        };
        let listing = git(&[
            "ls-tree",
            "-r",
            "--name-only",
            rev,
            "--",
            if path.is_empty() { "." } else { path },
        ])?;
        let mut files: Vec<String> = String::from_utf8_lossy(&listing)
            .lines()
            .map(str::to_string)
            .filter(|f| is_policy_file(Path::new(f)))
            .collect();
        files.sort();
        let mut set = PolicySet::with_vars(vars.clone());
        for f in files {
            let bytes = git(&["show", &format!("{rev}:{f}")])?;
            set.add_bytes(PathBuf::from(format!("git:{rev}:{f}")), &bytes);
        }
        set.finish_notes();
        if set.policies.is_empty() {
            set.notes.push(Note {
                message: format!("no policy found in {spec}; using an empty policy set"),
                span: None,
            });
        }
        Ok(set)
    }

    /// Turns skipped objects into one note per file: "skipped 3 objects that are not policies".
    pub fn finish_notes(&mut self) {
        let mut skipped = std::mem::take(&mut self.skipped);
        skipped.sort_by_key(|(f, _, _)| *f);
        for group in skipped.chunk_by(|a, b| a.0 == b.0) {
            let mut kinds: Vec<&str> = group.iter().map(|(_, k, _)| k.as_str()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            let n = group.len();
            self.notes.push(Note {
                message: format!(
                    "skipped {n} {} that {} not a policy kind ({})",
                    if n == 1 { "object" } else { "objects" },
                    if n == 1 { "is" } else { "are" },
                    kinds.join(", ")
                ),
                span: group[0].2,
            });
        }
    }

    /// Adds one file's contents (used by `load` and by tests that have text, not files). Flux
    /// variables are substituted when the set was made for files ([`PolicySet::with_vars`],
    /// `load`, `load_spec`, [`load_str`]), not in a [`PolicySet::default`].
    pub fn add_bytes(&mut self, path: PathBuf, bytes: &[u8]) {
        let (file, bad_utf8) = add_source(&mut self.sources, path, Cow::Borrowed(bytes));
        match bad_utf8 {
            Some(d) => self.diagnostics.push(d),
            None => {
                let read = FileRead::read(file, self.sources.get(file), self.substitution.as_ref());
                self.merge(read);
            }
        }
    }

    /// Adds files' contents, in order: the same set as [`PolicySet::add_bytes`] of each in
    /// turn, with the files parsed and decoded on as many threads as the machine has cores.
    /// Each file is read on one thread, its YAML tree built and dropped there, and what it
    /// adds is merged in file order, so the result does not depend on which thread read what.
    pub fn add_files(&mut self, files: Vec<(PathBuf, Vec<u8>)>) {
        // Sources first, in order: each file gets the id `add_bytes` would give it.
        let added: Vec<(FileId, Option<Diagnostic>)> = files
            .into_iter()
            .map(|(path, bytes)| add_source(&mut self.sources, path, Cow::Owned(bytes)))
            .collect();
        let (sources, substitution) = (&self.sources, self.substitution.as_ref());
        let reads = crate::parallel::map_in_order(&added, |(file, bad_utf8)| {
            bad_utf8
                .is_none()
                .then(|| FileRead::read(*file, sources.get(*file), substitution))
        });
        for ((_, bad_utf8), read) in added.into_iter().zip(reads) {
            if let Some(d) = bad_utf8 {
                self.diagnostics.push(d);
            }
            if let Some(read) = read {
                self.merge(read);
            }
        }
    }

    fn merge(&mut self, read: FileRead) {
        self.policies.extend(read.policies);
        self.diagnostics.extend(read.diagnostics);
        self.skipped.extend(read.skipped);
    }
}

/// What one file adds to a set: worked out on whichever thread reads the file, then merged
/// into the set in file order ([`PolicySet::add_files`]).
#[derive(Default)]
struct FileRead {
    policies: Vec<Policy>,
    diagnostics: Vec<Diagnostic>,
    /// Objects of other kinds, as [`PolicySet`] keeps them.
    skipped: Vec<(FileId, String, Option<Span>)>,
}

impl FileRead {
    /// Parses and decodes one file, already in the source map as `file`; `substitution`: the
    /// set's Flux variables.
    fn read(file: FileId, source: &SourceFile, substitution: Option<&Vars>) -> FileRead {
        let mut out = FileRead::default();
        match parse_documents(file, source) {
            Err(e) => out
                .diagnostics
                .push(syntax_diagnostic(e, "nothing in this file was checked")),
            Ok(docs) => {
                let mut unresolved = Unresolved::default();
                for doc in &docs {
                    out.add_object(file, source, doc, substitution, &mut unresolved);
                }
                out.diagnostics.extend(unresolved.into_diagnostics());
            }
        }
        out
    }

    fn add_object(
        &mut self,
        file: FileId,
        source: &SourceFile,
        node: &Node,
        substitution: Option<&Vars>,
        unresolved: &mut Unresolved,
    ) {
        let mut cx = Cx {
            diags: &mut self.diagnostics,
        };
        if node.as_map().is_none() {
            cx.push(
                Diagnostic::new(
                    Code::NotAnObject,
                    node.span,
                    format!("expected a Kubernetes object, found {}", node.describe()),
                )
                .label("not an object")
                .help("each YAML document should be a mapping with apiVersion, kind, metadata and spec"),
            );
            return;
        }
        if node
            .get("kind")
            .and_then(Node::as_str)
            .is_some_and(|k| k == "List" || k.ends_with("List") && node.get("items").is_some())
        {
            match node.get("items").map(|n| &n.kind) {
                Some(NodeKind::Seq(items)) => {
                    for item in items {
                        self.add_object(file, source, item, substitution, unresolved);
                    }
                }
                Some(NodeKind::Null) | None => {}
                Some(_) => cx.push(
                    Diagnostic::new(
                        Code::WrongType,
                        node.get("items").map_or(node.span, |n| n.span),
                        "`items` of a List must be a list",
                    )
                    .label("not a list")
                    .help("write the objects as a YAML list under `items:`"),
                ),
            }
            return;
        }
        // Flux substitutes each object (a List's items one by one) before anything reads it.
        let substituted = match substitution {
            Some(vars) => subst::substitute_object(node, vars, file, source),
            None => subst::ObjectSubst::default(),
        };
        let node = substituted.node.as_ref().unwrap_or(node);
        let kind_node = node.get("kind");
        let Some(kind) = kind_node.and_then(Node::as_str) else {
            cx.push(
                Diagnostic::new(Code::MissingField, node.span, "this object has no `kind`")
                    .label("`kind` missing")
                    .help("add `kind: CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` or `NetworkPolicy`"),
            );
            return;
        };
        let Some(kind) = PolicyKind::from_kind(kind) else {
            let api = node.get("apiVersion").and_then(Node::as_str).unwrap_or("");
            if let Some(meant) = kind_typo(api, kind) {
                cx.push(
                    Diagnostic::new(
                        Code::KindTypo,
                        kind_node.map_or(node.span, |n| n.span),
                        format!("`{kind}` is not a kind of {api}"),
                    )
                    .label("unknown kind")
                    .help(format!("did you mean `{meant}`? Kinds are case-sensitive; the API server rejects this object, so the policy never applies")),
                );
                return;
            }
            self.skipped
                .push((file, kind.to_string(), kind_node.map(|n| n.span)));
            return;
        };
        // Only policies are checked, so only their variables are reported.
        let before = cx.diags.len();
        let policy = decode_policy(node, kind, &mut cx);
        let decoded = self.diagnostics.split_off(before);
        self.diagnostics
            .extend(substituted.diagnostics.iter().cloned());
        for mut d in decoded {
            if substituted.suppresses(&d) {
                continue;
            }
            if d.code == Code::WrongType {
                let inside = |s: &Span| s.start <= d.span.start && d.span.end <= s.end;
                if let Some(r) = substituted.retyped.iter().find(|r| inside(&r.span)) {
                    d.help = r.help();
                }
            }
            self.diagnostics.push(d);
        }
        for (name, span) in &substituted.unresolved {
            unresolved.add(name, *span);
        }
        if let Some(policy) = policy {
            self.policies.push(policy);
        }
    }
}

/// The policy kind `kind` was probably meant to be, for an object of a policy API group
/// (`cilium.io/*`, `networking.k8s.io/*`): the same name in another case
/// (`CiliumClusterWideNetworkPolicy`, seen in a real repository) or within two edits of it.
/// The groups' other kinds (CiliumEgressGatewayPolicy, Ingress, ...) are further from every
/// policy kind than that, so they stay skipped objects.
fn kind_typo(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.split('/').next().unwrap_or("");
    if group != "cilium.io" && group != "networking.k8s.io" {
        return None;
    }
    let kind = kind.to_ascii_lowercase();
    [
        PolicyKind::CiliumNetworkPolicy,
        PolicyKind::CiliumClusterwideNetworkPolicy,
        PolicyKind::NetworkPolicy,
    ]
    .into_iter()
    .map(PolicyKind::as_str)
    .find(|k| strsim::levenshtein(&kind, &k.to_ascii_lowercase()) <= 2)
}

fn decode_policy(node: &Node, kind: PolicyKind, cx: &mut Cx) -> Option<Policy> {
    let mut f: Fields = cx.fields(node, "object")?;
    let kind_span = f.raw("kind").map_or(node.span, |n| n.span);
    let api_version: Option<SString> = f.opt(cx, "apiVersion");
    match &api_version {
        Some(v) if v.value != kind.api_version() => cx.push(
            Diagnostic::new(
                Code::UnsupportedApiVersion,
                v.span,
                format!("{} has apiVersion `{}`", kind.as_str(), v.value),
            )
            .label("unexpected apiVersion")
            .help(format!(
                "{} is served as `apiVersion: {}`",
                kind.as_str(),
                kind.api_version()
            )),
        ),
        Some(_) => {}
        None => cx.push(
            Diagnostic::new(
                Code::MissingField,
                kind_span,
                format!("this {} has no `apiVersion`", kind.as_str()),
            )
            .label("`apiVersion` missing")
            .help(format!("add `apiVersion: {}`", kind.api_version())),
        ),
    }
    let metadata = decode_metadata(&mut f, cx, kind_span);
    // `status` is written by controllers, not by users; reading it is harmless.
    let _ = f.raw("status");
    let body = match kind {
        PolicyKind::NetworkPolicy => {
            let spec: Option<Box<Spanned<NetworkPolicySpec>>> = f.req(
                cx,
                "spec",
                "a NetworkPolicy needs `spec` with at least `podSelector: {}`",
            );
            if let Some(s) = &spec {
                require_pod_selector(s, cx);
            }
            PolicyBody::Kubernetes { spec }
        }
        _ => {
            let spec_present = f.raw("spec").is_some_and(|n| !n.is_null());
            let specs_present = f.raw("specs").is_some_and(|n| !n.is_null());
            if !spec_present && !specs_present {
                // pkg/k8s/apis/cilium.io/v2 (CiliumNetworkPolicy.Parse): a CNP with neither is
                // rejected as empty.
                cx.push(
                    Diagnostic::new(Code::MissingField, node.span, format!("this {} has neither `spec` nor `specs`", kind.as_str()))
                        .label("no rules")
                        .help("add `spec:` with an endpointSelector and rules (or `specs:`, a list of them)"),
                );
            }
            PolicyBody::Cilium {
                spec: f.opt(cx, "spec"),
                specs: f.opt(cx, "specs"),
            }
        }
    };
    f.finish_with(cx, Code::IgnoredField);
    Some(Policy {
        kind,
        api_version,
        metadata,
        body,
        span: node.span,
        kind_span,
    })
}

/// ObjectMeta fields that the API server sets or that carry no policy; read and ignored.
const SERVER_SET_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "generateName",
    "selfLink",
];

fn decode_metadata(f: &mut Fields, cx: &mut Cx, kind_span: Span) -> ObjectMeta {
    let Some(node) = f.raw("metadata").filter(|n| !n.is_null()) else {
        cx.push(
            Diagnostic::new(
                Code::MissingField,
                kind_span,
                "this object has no `metadata`",
            )
            .label("`metadata` missing")
            .help("add `metadata:` with a `name:`"),
        );
        return ObjectMeta::default();
    };
    let Some(mut m) = cx.fields(node, "metadata") else {
        return ObjectMeta::default();
    };
    for key in SERVER_SET_METADATA {
        let _ = m.raw(key);
    }
    let meta = ObjectMeta {
        name: m.req(cx, "name", "every policy needs `metadata.name`"),
        namespace: m.opt(cx, "namespace"),
        labels: m.opt(cx, "labels"),
        annotations: m.opt(cx, "annotations"),
    };
    m.finish_with(cx, Code::IgnoredField);
    meta
}

fn require_pod_selector(spec: &Spanned<NetworkPolicySpec>, cx: &mut Cx) {
    if spec.pod_selector.is_none() {
        cx.push(
            Diagnostic::new(Code::MissingField, spec.span, "this NetworkPolicy spec has no `podSelector`")
                .label("`podSelector` missing")
                .help("add `podSelector: {}` to select every pod in the namespace, or a selector for some of them"),
        );
    }
}

fn is_policy_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The name of the ignore file a policy directory may hold (gitignore syntax), for files that
/// live beside policies but are not meant to be applied (fixtures, drafts, known-broken tests).
pub const IGNORE_FILE: &str = ".cnpcignore";

/// Appends the policy files under `path` (itself when it is a file), in the order `load` reads them.
pub fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        // A file named explicitly is read whatever its extension, and whatever ignore files say.
        out.push(path.to_path_buf());
        return Ok(());
    }
    // Only our own ignore file counts: a policy kept out of git (generated, say) is still policy.
    let walker = ignore::WalkBuilder::new(path)
        .standard_filters(false)
        .hidden(true)
        .add_custom_ignore_filename(IGNORE_FILE)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walker {
        let entry = entry.map_err(|e| LoadError::Io {
            path: path.to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("unreadable directory entry")),
        })?;
        if entry.file_type().is_some_and(|t| t.is_file()) && is_policy_file(entry.path()) {
            out.push(entry.into_path());
        }
    }
    Ok(())
}

/// Reads one file's bytes into `sources` and parses its YAML documents. A file that is not
/// UTF-8 or not well-formed YAML is one `yaml-syntax` diagnostic, whose help ends saying what
/// was not read (`unread`). Policy files and `cnpc test` expectation files are read this way.
pub fn read_yaml(
    sources: &mut SourceMap,
    path: PathBuf,
    bytes: &[u8],
    unread: &str,
) -> (FileId, Result<Vec<Node>, Diagnostic>) {
    let (file, bad_utf8) = add_source(sources, path, Cow::Borrowed(bytes));
    if let Some(d) = bad_utf8 {
        return (file, Err(d));
    }
    let docs = parse_documents(file, sources.get(file)).map_err(|e| syntax_diagnostic(e, unread));
    (file, docs)
}

/// Adds one file's bytes to `sources` (taking them without a copy when they are owned and
/// UTF-8); for bytes that are not UTF-8 (kept lossily), the `yaml-syntax` diagnostic at the
/// first bad byte.
fn add_source(
    sources: &mut SourceMap,
    path: PathBuf,
    bytes: Cow<[u8]>,
) -> (FileId, Option<Diagnostic>) {
    let (text, bad_utf8) = match bytes {
        Cow::Owned(bytes) => match String::from_utf8(bytes) {
            Ok(t) => (t, None),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                (String::from_utf8_lossy(e.as_bytes()).into_owned(), Some(at))
            }
        },
        Cow::Borrowed(bytes) => match std::str::from_utf8(bytes) {
            Ok(t) => (t.to_string(), None),
            Err(e) => (
                String::from_utf8_lossy(bytes).into_owned(),
                Some(e.valid_up_to()),
            ),
        },
    };
    let file = sources.add(path, text);
    let source = sources.get(file);
    let bad = bad_utf8.map(|at| {
        Diagnostic::new(
            Code::YamlSyntax,
            source.span(file, at, at + 1),
            "the file is not valid UTF-8",
        )
        .label("invalid byte sequence")
        .help("save the file as UTF-8")
    });
    (file, bad)
}

/// Malformed YAML as the one `yaml-syntax` diagnostic of its file; its help ends saying what
/// was not read (`unread`).
fn syntax_diagnostic(e: crate::yaml::YamlError, unread: &str) -> Diagnostic {
    match e.unclosed {
        Some(open) => Diagnostic::new(Code::YamlSyntax, open, format!("malformed YAML: {}", e.message))
            .label("this bracket is never closed")
            .related(e.span, "the parser gave up here")
            .help(format!("close the bracket on the same logical item (or switch to a block list with `- ` items); {unread}")),
        None => Diagnostic::new(Code::YamlSyntax, e.span, format!("malformed YAML: {}", e.message))
            .label("the parser stopped here")
            .help(format!("fix the YAML syntax here (indentation, a missing `:` or closing bracket, tabs); {unread}")),
    }
}

/// Convenience for tests and tools: reads text as if it were the file `name`.
pub fn load_str(name: &str, text: &str) -> PolicySet {
    load_str_with(name, text, &Vars::new())
}

/// [`load_str`] with values for Flux post-build variables.
pub fn load_str_with(name: &str, text: &str, vars: &Vars) -> PolicySet {
    let mut set = PolicySet::with_vars(vars.clone());
    set.add_bytes(PathBuf::from(name), text.as_bytes());
    set.finish_notes();
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example and corpus file, a file that is not UTF-8 and a malformed one.
    fn files() -> Vec<(PathBuf, Vec<u8>)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut paths = Vec::new();
        for dir in [root.join("policies"), root.join("../shared/corpus")] {
            if dir.is_dir() {
                collect_files(&dir, &mut paths).expect("a readable directory");
            }
        }
        let mut files: Vec<(PathBuf, Vec<u8>)> = paths
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).expect("a readable file");
                (p, bytes)
            })
            .collect();
        files.insert(1, ("latin1.yaml".into(), b"kind: Caf\xe9\n".to_vec()));
        files.push(("broken.yaml".into(), b"a: [1,\nb: 2\n".to_vec()));
        files
    }

    /// Files read on several threads make the set that reading them in turn makes, whatever
    /// thread read which: sources, policies, diagnostics and notes, in the same order.
    #[test]
    fn files_read_on_threads_make_the_set_reading_them_in_turn_makes() {
        let files = files();
        assert!(files.len() > 20);
        let mut vars = Vars::new();
        vars.set_assignment("CLUSTER_NAME=c1")
            .expect("a well-formed assignment");
        for with_vars in [false, true] {
            let new = || {
                if with_vars {
                    PolicySet::with_vars(vars.clone())
                } else {
                    PolicySet::default()
                }
            };
            let mut in_turn = new();
            for (path, bytes) in &files {
                in_turn.add_bytes(path.clone(), bytes);
            }
            in_turn.finish_notes();
            let mut threads = new();
            threads.add_files(files.clone());
            threads.finish_notes();
            let sources = |s: &PolicySet| -> Vec<(PathBuf, String)> {
                s.sources
                    .files()
                    .map(|(_, f)| (f.path.clone(), f.text.to_string()))
                    .collect()
            };
            assert_eq!(sources(&threads), sources(&in_turn));
            assert_eq!(threads.policies, in_turn.policies);
            assert_eq!(threads.diagnostics, in_turn.diagnostics);
            assert_eq!(threads.notes, in_turn.notes);
            assert!(in_turn
                .diagnostics
                .iter()
                .any(|d| d.code == Code::YamlSyntax));
        }
    }
}
