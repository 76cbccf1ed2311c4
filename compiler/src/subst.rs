//! Flux post-build variable substitution (issue 13).
//!
//! GitOps repositories keep variables in their policies (`cidr: ${LAN_SUBNET}`,
//! `port: "${DRAGONFLY_PORT:=6379}"`, `matchPattern: "*.${ROOT_DOMAIN}"`) and let Flux's
//! kustomize-controller fill them in before it applies the objects. cnpc does what Flux does, so
//! that it checks the policy the API server will receive, and reports a variable without a value
//! once, at its place, instead of the invalid port, name or label value its raw text would make.
//!
//! # What Flux does (and so what cnpc does)
//!
//! Reference: Flux, Kustomization API, "Post build variable substitution" and "Post build
//! substitution of numbers and booleans"
//! (<https://fluxcd.io/flux/components/kustomize/kustomizations/#post-build-variable-substitution>,
//! fluxcd/kustomize-controller `docs/spec/v1/kustomizations.md`), and the code behind it:
//! fluxcd/pkg `kustomize/kustomize_varsub.go` and `envsubst` (a fork of drone/envsubst).
//!
//! - **Where.** Flux serialises each object after `kustomize build` (kustomize's
//!   `Resource.AsYAML`: object → JSON → YAML through sigs.k8s.io/yaml), runs envsubst over that
//!   text and parses the result back. So comments never take part (they are gone), and the
//!   quotes a file puts around a value do not survive: the value is written out again the way
//!   go-yaml v2 writes a string, plain when it can. `port: "${PORT}"` with `PORT=6379` therefore
//!   reaches the API server as the integer 6379 (fluxcd/flux2#1839), which a string field
//!   rejects; Flux's documented ways out are a value that carries its own quotes (`'"6379"'`),
//!   `!!str 6379`, or `${quote}${PORT}${quote}` with `quote: '"'`. cnpc substitutes in the parsed
//!   document, one scalar at a time, and reads each substituted value back as Flux would: plain
//!   values are parsed as YAML again (numbers become numbers, `"..."` strings, `!!str` strings),
//!   quoted ones stay strings. Every node keeps its place in the original file, so diagnostics
//!   point at the text the user wrote; a node that is exactly one `${...}` points at it.
//!   (Substituting the file's text instead would count `${...}` in comments and keep the file's
//!   quotes, both unlike Flux; so there is no substituted text to map back: each substituted
//!   node carries its original span.)
//! - **Syntax.** Only the braced form is a reference: `${NAME}`; `$NAME` is left alone. `$$`
//!   writes one `$`, so `$${NAME}` is the literal text `${NAME}`. A name is a run of letters,
//!   digits and `_`; the names of supplied variables must match `^[_[:alpha:]][_[:alpha:][:digit:]]*$`
//!   (ASCII), or Flux refuses the whole Kustomization. Defaults: `${NAME:=default}`,
//!   `${NAME:-default}`, `${NAME=default}` (and `:?`, `:+`, which envsubst treats the same way)
//!   use the default when the variable is unset *or empty*; a default may hold `${...}` itself.
//!   cnpc also evaluates the other envsubst operators a policy might use: `${#NAME}`, case
//!   (`^`, `^^`, `,`, `,,`), substrings (`${NAME:1:3}`, a negative length counting back from the
//!   end), replacement (`/`, `//`, `/#`, `/%`, an empty pattern allowed: `${NAME/#/v}`
//!   prepends) and prefix/suffix trimming (`#`, `##`, `%`, `%%`) with a literal pattern, as
//!   current fluxcd/pkg envsubst does; a glob pattern in a trim (which it matches with its own
//!   `path.Match`) is reported as something cnpc does not evaluate.
//! - **Values.** Newlines are removed from every value (Flux does this to `substitute` and to
//!   ConfigMap and Secret data). A ConfigMap's `data`, a Secret's `data` (base64; the API server
//!   merges `stringData` into it, `stringData` winning) and a Flux Kustomization's
//!   `spec.postBuild.substitute` hold variables by key.
//! - **Opting out.** An object labelled or annotated `kustomize.toolkit.fluxcd.io/substitute:
//!   disabled` is taken as it is.
//! - **Strictness.** Flux substitutes an unset variable with the empty string unless the
//!   controller runs with strict substitution; by default it substitutes nothing at all when no
//!   variable is defined (`substituteStrategy: WithVariables`). cnpc always substitutes in files
//!   (not in objects read from the API server, see [`crate::load`]), with the values it was given
//!   and the defaults in the file, and reports a variable with neither as
//!   `cnpc::unsubstituted-variable`: it cannot check a value it does not know. The values that use
//!   such a variable are kept as written, marked with [`UNRESOLVED`], and not checked (so one
//!   missing variable is one error, not an invalid port, an invalid name and an invalid label
//!   value); the rest of the file is.
//!
//! # Sources of values
//!
//! [`Vars`] gathers values from `--vars-file` files (in the order given) and then from `--var
//! NAME=VALUE` pairs; a later source overrides an earlier one, so `--var` wins over every file.
//! Within files, later entries and documents override earlier ones, except that a Flux
//! Kustomization's inline `postBuild.substitute` wins over every ConfigMap and Secret, whatever
//! the order, as it does in Flux (kustomize-controller `kustomize_varsub.go`). A file named `*.yaml`, `*.yml` or `*.json` holds Kubernetes
//! objects (ConfigMap, Secret, Flux Kustomization; other kinds are ignored); any other file is
//! dotenv: `NAME=VALUE` lines, optionally `export`ed, `#` comments, values unquoted, `'single'`
//! (literal) or `"double"` quoted (with `\n`, `\t`, `\"`, `\\`, `\$` escapes), no expansion.

use crate::diag::{Code, Diagnostic};
use crate::source::{FileId, SourceFile, Span};
use crate::yaml::{parse_documents, Node, NodeKind, Scalar, ScalarType};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The label or annotation that turns substitution off for one object, and its value.
pub const DISABLE_KEY: &str = "kustomize.toolkit.fluxcd.io/substitute";
pub const DISABLED: &str = "disabled";

// ---------------------------------------------------------------------------------------------
// Variable values

/// Values of Flux post-build variables, by name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Vars {
    values: BTreeMap<String, String>,
    /// Names a Flux Kustomization's inline `postBuild.substitute` set: Flux lets those win over
    /// its `substituteFrom` ConfigMaps and Secrets whatever their order
    /// (kustomize-controller, `kustomize_varsub.go`), so a file's ConfigMap does not override
    /// them; `--var` still does.
    inline: std::collections::BTreeSet<String>,
}

/// Values may be secrets: debug output names the variables only.
impl fmt::Debug for Vars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

/// A problem with `--var` or `--vars-file` (exit code 2).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum VarsError {
    #[error("--var `{arg}` is not NAME=VALUE")]
    #[diagnostic(
        code(cnpc::vars),
        help("write --var NAME=VALUE, for example --var LAN_SUBNET=192.168.1.0/24")
    )]
    Assignment { arg: String },
    #[error("{at}: `{name}` is not a valid Flux variable name")]
    #[diagnostic(
        code(cnpc::vars),
        help("Flux accepts names of ASCII letters, digits and `_` that do not start with a digit (^[_[:alpha:]][_[:alpha:][:digit:]]*$), and refuses the whole Kustomization otherwise")
    )]
    Name { name: String, at: String },
    #[error("cannot read {path}: {source}")]
    #[diagnostic(code(cnpc::io), help("check that the path exists and is readable"))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    #[diagnostic(code(cnpc::vars))]
    File {
        path: PathBuf,
        line: u32,
        message: String,
        #[help]
        help: String,
    },
}

/// Whether Flux accepts `name` as the name of a variable: `^[_[:alpha:]][_[:alpha:][:digit:]]*$`
/// (Go's POSIX classes are ASCII).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl Vars {
    pub fn new() -> Vars {
        Vars::default()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Sets a variable from a file of values (a ConfigMap, a Secret, dotenv), replacing an
    /// earlier value but not one a Kustomization's inline `substitute` set. `at` says where it
    /// came from, for the error about an invalid name.
    pub fn set(&mut self, name: &str, value: &str, at: &str) -> Result<(), VarsError> {
        if self.inline.contains(name) {
            return check_name(name, at);
        }
        self.set_over(name, value, at)
    }

    /// Sets a variable from a Kustomization's inline `postBuild.substitute`.
    fn set_inline(&mut self, name: &str, value: &str, at: &str) -> Result<(), VarsError> {
        self.set_over(name, value, at)?;
        self.inline.insert(name.to_string());
        Ok(())
    }

    /// Sets a variable whatever set it before (`--var`). Newlines are removed from the value,
    /// as Flux removes them.
    fn set_over(&mut self, name: &str, value: &str, at: &str) -> Result<(), VarsError> {
        check_name(name, at)?;
        self.values
            .insert(name.to_string(), value.replace('\n', ""));
        Ok(())
    }

    /// Sets a variable from `NAME=VALUE` (the value may be empty and may hold `=`).
    pub fn set_assignment(&mut self, arg: &str) -> Result<(), VarsError> {
        let Some((name, value)) = arg.split_once('=') else {
            return Err(VarsError::Assignment {
                arg: arg.to_string(),
            });
        };
        self.set_over(name, value, "--var")
    }

    /// Takes every value of `other`, overriding values of the same names.
    pub fn extend(&mut self, other: Vars) {
        self.values.extend(other.values);
        self.inline.extend(other.inline);
    }

    /// Reads a file of values: Kubernetes objects for `.yaml`, `.yml` and `.json`, dotenv for
    /// anything else.
    pub fn read_file(&mut self, path: &Path) -> Result<(), VarsError> {
        let bytes = std::fs::read(path).map_err(|source| VarsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| VarsError::File {
            path: path.to_path_buf(),
            line: line_of(&bytes, e.valid_up_to()),
            message: "the file is not valid UTF-8".into(),
            help: "save the file as UTF-8".into(),
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if yaml {
            self.add_yaml(path, text)
        } else {
            self.add_dotenv(path, text)
        }
    }

    /// Reads dotenv text: `NAME=VALUE` lines (see the module documentation).
    pub fn add_dotenv(&mut self, path: &Path, text: &str) -> Result<(), VarsError> {
        let err = |line: usize, message: String, help: &str| VarsError::File {
            path: path.to_path_buf(),
            line: u32::try_from(line).unwrap_or(u32::MAX),
            message,
            help: help.to_string(),
        };
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let t = raw.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let t = match t.strip_prefix("export") {
                Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
                _ => t,
            };
            let Some((name, rest)) = t.split_once('=') else {
                return Err(err(
                    line,
                    format!("expected NAME=VALUE, found `{}`", raw.trim()),
                    "each line of a dotenv file is NAME=VALUE, a `# comment` or empty; a YAML file of values needs the .yaml extension",
                ));
            };
            let value = dotenv_value(rest.trim_start()).map_err(|m| {
                err(
                    line,
                    m,
                    "quote a value with '...' (taken literally) or \"...\" (with \\n, \\t, \\\", \\\\ escapes) on one line",
                )
            })?;
            self.set(
                name.trim_end(),
                &value,
                &format!("{}:{line}", path.display()),
            )?;
        }
        Ok(())
    }

    /// Reads YAML (or JSON) text holding ConfigMaps, Secrets or Flux Kustomizations, as
    /// `kubectl get -o yaml` prints them or as a repository keeps them. Other kinds are ignored;
    /// a file with none of these kinds is an error (it is probably not the file meant).
    pub fn add_yaml(&mut self, path: &Path, text: &str) -> Result<(), VarsError> {
        let source = SourceFile::new(path, text);
        let docs = parse_documents(FileId(0), &source).map_err(|e| VarsError::File {
            path: path.to_path_buf(),
            line: e.span.line,
            message: format!("malformed YAML: {}", e.message),
            help: "fix the YAML syntax here (indentation, a missing `:` or closing bracket, tabs)"
                .into(),
        })?;
        let mut found = 0;
        for doc in &docs {
            found += self.yaml_object(path, doc)?;
        }
        if found == 0 {
            return Err(VarsError::File {
                path: path.to_path_buf(),
                line: 1,
                message: "no ConfigMap, Secret or Flux Kustomization in this file".into(),
                help: "pass the ConfigMap or Secret that a Kustomization's `postBuild.substituteFrom` names, the Kustomization itself (for `postBuild.substitute`), or a dotenv file of NAME=VALUE lines (any extension but .yaml, .yml, .json)".into(),
            });
        }
        Ok(())
    }

    /// Takes the variables of one object; returns how many objects of a known kind it held.
    fn yaml_object(&mut self, path: &Path, node: &Node) -> Result<usize, VarsError> {
        let err = |at: &Node, message: String, help: &str| VarsError::File {
            path: path.to_path_buf(),
            line: at.span.line,
            message,
            help: help.to_string(),
        };
        let kind = node.get("kind").and_then(Node::as_str).unwrap_or("");
        let api = node.get("apiVersion").and_then(Node::as_str).unwrap_or("");
        if let Some(NodeKind::Seq(items)) = node.get("items").map(|n| &n.kind) {
            if kind.ends_with("List") {
                let mut found = 0;
                for item in items {
                    found += self.yaml_object(path, item)?;
                }
                return Ok(found);
            }
        }
        let known = matches!(kind, "ConfigMap" | "Secret")
            || (kind == "Kustomization" && api.starts_with("kustomize.toolkit.fluxcd.io/"));
        if !known {
            return Ok(0);
        }
        if let Some(sops) = node.get("sops") {
            return Err(err(
                sops,
                format!("this {kind} is encrypted with SOPS"),
                "decrypt it first (for example `sops -d FILE > plain.yaml`) and pass the decrypted file; keep that file out of git",
            ));
        }
        let at = |line: u32| format!("{}:{line}", path.display());
        match kind {
            "ConfigMap" => {
                for e in string_map(path, node.get("data"), "ConfigMap data")? {
                    self.set(&e.key, &e.value, &at(e.line))?;
                }
            }
            "Secret" => {
                for e in string_map(path, node.get("data"), "Secret data")? {
                    let cleaned: String = e
                        .value
                        .chars()
                        .filter(|c| !matches!(c, '\r' | '\n'))
                        .collect();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(cleaned.as_bytes())
                        .map_err(|err| VarsError::File {
                            path: path.to_path_buf(),
                            line: e.line,
                            message: format!("the value of `{}` in the Secret's data is not base64: {err}", e.key),
                            help: "a Secret's `data` holds base64; put plain text under `stringData` instead".into(),
                        })?;
                    let value = String::from_utf8(bytes).map_err(|_| VarsError::File {
                        path: path.to_path_buf(),
                        line: e.line,
                        message: format!(
                            "the value of `{}` in the Secret's data is not UTF-8 text",
                            e.key
                        ),
                        help: "a variable's value is text that Flux writes into YAML".into(),
                    })?;
                    self.set(&e.key, &value, &at(e.line))?;
                }
                // The API server merges stringData into data on write, stringData winning.
                for e in string_map(path, node.get("stringData"), "Secret stringData")? {
                    self.set(&e.key, &e.value, &at(e.line))?;
                }
            }
            _ => {
                let substitute = node
                    .get("spec")
                    .and_then(|s| s.get("postBuild"))
                    .and_then(|p| p.get("substitute"));
                for e in string_map(path, substitute, "postBuild.substitute")? {
                    self.set_inline(&e.key, &e.value, &at(e.line))?;
                }
            }
        }
        Ok(1)
    }
}

/// An error unless `name` is a name Flux accepts for a variable.
fn check_name(name: &str, at: &str) -> Result<(), VarsError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(VarsError::Name {
            name: name.to_string(),
            at: at.to_string(),
        })
    }
}

/// One entry of a string map in a file of values.
struct Entry {
    key: String,
    /// 1-based line of the key.
    line: u32,
    value: String,
}

/// A string-to-string map of a Kubernetes object, each key with its line. Values must be strings
/// (the API server refuses a number there, fluxcd/flux2#1839); null reads as empty.
fn string_map(path: &Path, node: Option<&Node>, what: &str) -> Result<Vec<Entry>, VarsError> {
    let err = |at: &Node, message: String, help: String| VarsError::File {
        path: path.to_path_buf(),
        line: at.span.line,
        message,
        help,
    };
    let Some(node) = node else {
        return Ok(Vec::new());
    };
    let entries = match &node.kind {
        NodeKind::Null => return Ok(Vec::new()),
        NodeKind::Map(entries) => entries,
        _ => {
            return Err(err(
                node,
                format!("{what} is {}, not a mapping", node.describe()),
                format!("write {what} as `KEY: value` lines"),
            ))
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let key = match &k.kind {
            NodeKind::Scalar(s) => s.text.clone(),
            _ => {
                return Err(err(
                    k,
                    format!("a key of {what} is {}", k.describe()),
                    "keys are variable names".into(),
                ))
            }
        };
        let value = match &v.kind {
            NodeKind::Null => String::new(),
            NodeKind::Scalar(s) if s.scalar_type() == ScalarType::String => s.text.clone(),
            NodeKind::Scalar(s) => {
                return Err(err(
                    v,
                    format!("`{key}` is {} in {what}", v.describe()),
                    format!("{what} values are strings, and the API server refuses anything else: write `{key}: \"{}\"`", s.text),
                ))
            }
            _ => {
                return Err(err(
                    v,
                    format!("`{key}` is {} in {what}", v.describe()),
                    "a variable's value is a string".into(),
                ))
            }
        };
        out.push(Entry {
            key,
            line: k.span.line,
            value,
        });
    }
    Ok(out)
}

/// The value part of a dotenv line (after `=`).
fn dotenv_value(s: &str) -> Result<String, String> {
    let tail_ok = |tail: &str| {
        let tail = tail.trim();
        if tail.is_empty() || tail.starts_with('#') {
            Ok(())
        } else {
            Err(format!("unexpected `{tail}` after the closing quote"))
        }
    };
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next() {
                None => return Err("the double quote is not closed on this line".into()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(c @ ('"' | '\\' | '$')) => out.push(c),
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => return Err("the double quote is not closed on this line".into()),
                },
                Some(c) => out.push(c),
            }
        }
        tail_ok(chars.as_str())?;
        Ok(out)
    } else if let Some(rest) = s.strip_prefix('\'') {
        let Some((value, tail)) = rest.split_once('\'') else {
            return Err("the single quote is not closed on this line".into());
        };
        tail_ok(tail)?;
        Ok(value.to_string())
    } else {
        // An unquoted value ends at a `#` that follows whitespace (a comment).
        let mut end = s.len();
        let mut prev_blank = true;
        for (i, c) in s.char_indices() {
            if c == '#' && prev_blank {
                end = i;
                break;
            }
            prev_blank = c == ' ' || c == '\t';
        }
        Ok(s[..end].trim_end().to_string())
    }
}

/// 1-based line of a byte offset.
fn line_of(bytes: &[u8], offset: usize) -> u32 {
    let n = bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count();
    u32::try_from(n + 1).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Expressions (fluxcd/pkg envsubst/parse)

/// A piece of a value: literal text or an expression.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Expr(Expr),
}

/// One `${...}`.
#[derive(Debug, Clone, PartialEq)]
struct Expr {
    name: String,
    /// The operator as envsubst names it: "" (plain), ":=", ":-", "=", ":?", ":+", "#" (length
    /// when there are no arguments, else trim), "##", "%", "%%", ":", "/", "//", "/#", "/%",
    /// ",", ",,", "^", "^^".
    op: String,
    args: Vec<Piece>,
    /// Byte range of the whole `${...}` in the value.
    range: Range<usize>,
}

/// A reference envsubst cannot parse (Flux then fails the whole Kustomization).
#[derive(Debug, Clone, PartialEq)]
struct ParseError {
    /// Byte offset of the `${` that starts the bad reference.
    at: usize,
    message: &'static str,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

struct ExprParser<'a> {
    s: &'a str,
    pos: usize,
    /// Start of the outermost reference being parsed, for errors.
    start: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn at(&self, prefix: &str) -> bool {
        self.s[self.pos..].starts_with(prefix)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn fail<T>(&self, message: &'static str) -> Result<T, ParseError> {
        Err(ParseError {
            at: self.start,
            message,
        })
    }

    /// A whole value: text, `$$` (one `$`) and `${...}`.
    fn value(&mut self) -> Result<Vec<Piece>, ParseError> {
        let mut out = Vec::new();
        let mut text = String::new();
        while let Some(c) = self.peek() {
            if self.at("${") {
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                self.start = self.pos;
                out.push(Piece::Expr(self.expr()?));
            } else if self.at("$$") {
                text.push('$');
                self.pos += 2;
            } else {
                text.push(c);
                self.pos += c.len_utf8();
            }
        }
        if !text.is_empty() {
            out.push(Piece::Text(text));
        }
        Ok(out)
    }

    fn ident(&mut self) -> String {
        let begin = self.pos;
        while self.peek().is_some_and(is_ident) {
            self.bump();
        }
        self.s[begin..self.pos].to_string()
    }

    fn close(&mut self) -> Result<(), ParseError> {
        if self.peek() == Some('}') {
            self.pos += 1;
            Ok(())
        } else {
            self.fail("bad substitution (a `}` is missing or misplaced)")
        }
    }

    /// `${...}`, at its `$`.
    fn expr(&mut self) -> Result<Expr, ParseError> {
        let begin = self.pos;
        self.pos += 2;
        let mut e = Expr {
            name: String::new(),
            op: String::new(),
            args: Vec::new(),
            range: begin..begin,
        };
        if self.peek() == Some('#') {
            self.pos += 1;
            e.op = "#".into();
            e.name = self.ident();
            if e.name.is_empty() {
                return self.fail("bad substitution (`${#` needs a variable name)");
            }
            self.close()?;
            e.range = begin..self.pos;
            return Ok(e);
        }
        e.name = self.ident();
        if e.name.is_empty() {
            return self.fail("unable to parse variable name (names are letters, digits and `_`)");
        }
        match self.peek() {
            Some(':') => {
                let next = self.s[self.pos + 1..].chars().next();
                if let Some(c @ ('=' | '-' | '?' | '+')) = next {
                    e.op = format!(":{c}");
                    self.pos += 2;
                    self.default_args(&mut e)?;
                } else {
                    e.op = ":".into();
                    self.pos += 1;
                    e.args.push(self.param(&[':', '}'], false)?);
                    if self.peek() == Some(':') {
                        self.pos += 1;
                        e.args.push(self.param(&['}'], false)?);
                    }
                    self.close()?;
                }
            }
            Some('=') => {
                e.op = "=".into();
                self.pos += 1;
                self.default_args(&mut e)?;
            }
            Some(',' | '^') => {
                while e.op.len() < 2 && matches!(self.peek(), Some(',' | '^')) {
                    e.op.extend(self.bump());
                }
                self.close()?;
            }
            Some('/') => {
                self.pos += 1;
                e.op = "/".into();
                if let Some(c @ ('/' | '#' | '%')) = self.peek() {
                    e.op.push(c);
                    self.pos += 1;
                }
                // An empty pattern (`${X/#/v}`, prepending) is the next rune being the
                // delimiter: current fluxcd/pkg envsubst (parse.go `parseReplaceFunc`) keeps
                // it as an empty argument.
                if self.peek() == Some('/') {
                    e.args.push(Piece::Text(String::new()));
                } else {
                    e.args.push(self.param(&['/'], true)?);
                }
                if self.peek() != Some('/') {
                    return self.fail("bad substitution (a replacement needs `/pattern/string`)");
                }
                self.pos += 1;
                if self.peek() != Some('}') {
                    e.args.push(self.param(&['}'], true)?);
                }
                self.close()?;
            }
            Some(c @ ('#' | '%')) => {
                e.op.push(c);
                self.pos += 1;
                if self.peek() == Some(c) {
                    e.op.push(c);
                    self.pos += 1;
                }
                e.args.push(self.param(&['}'], false)?);
                self.close()?;
            }
            Some('}') => self.pos += 1,
            _ => return self.fail("missing closing brace"),
        }
        e.range = begin..self.pos;
        Ok(e)
    }

    /// The arguments of a default: text and references up to `}`.
    fn default_args(&mut self, e: &mut Expr) -> Result<(), ParseError> {
        loop {
            match self.peek() {
                Some('}') => {
                    self.pos += 1;
                    return Ok(());
                }
                None => return self.fail("missing closing brace"),
                Some(_) => e.args.push(self.param(&['}'], false)?),
            }
        }
    }

    /// One argument: a nested reference, or text up to one of `stop` or a `${`. In replacement
    /// arguments `\/`, `\\` and `$$` stand for `/`, `\` and `$`.
    fn param(&mut self, stop: &[char], escapes: bool) -> Result<Piece, ParseError> {
        if self.at("${") {
            return Ok(Piece::Expr(self.expr()?));
        }
        let mut text = String::new();
        while let Some(c) = self.peek() {
            if self.at("${") {
                break;
            }
            if escapes && (self.at("\\/") || self.at("\\\\") || self.at("$$")) {
                self.pos += 1;
                text.extend(self.bump());
                continue;
            }
            if stop.contains(&c) {
                break;
            }
            text.push(c);
            self.pos += c.len_utf8();
        }
        if text.is_empty() {
            return self.fail("unable to parse substitution within function");
        }
        Ok(Piece::Text(text))
    }
}

fn parse_value(s: &str) -> Result<Vec<Piece>, ParseError> {
    ExprParser {
        s,
        pos: 0,
        start: 0,
    }
    .value()
}

// ---------------------------------------------------------------------------------------------
// Evaluation (fluxcd/pkg envsubst/template.go, funcs.go)

/// What evaluating a value found besides its result.
#[derive(Default)]
struct Evaluation {
    /// Variables with neither a value nor a default: name and the range of its `${...}`.
    unresolved: Vec<(String, Range<usize>)>,
    /// Expressions cnpc does not evaluate: range and why.
    unsupported: Vec<(Range<usize>, &'static str)>,
}

fn is_default_op(op: &str) -> bool {
    matches!(op, "=" | ":=" | ":-" | ":?" | ":+")
}

/// Evaluates pieces; `escape` is applied to literal text (Flux substitutes into text it has
/// already quoted, so literal text is escaped and values are not).
fn eval_pieces(
    pieces: &[Piece],
    vars: &Vars,
    escape: &dyn Fn(&str) -> String,
    ev: &mut Evaluation,
) -> String {
    pieces
        .iter()
        .map(|p| eval_piece(p, vars, escape, ev))
        .collect()
}

fn eval_piece(
    p: &Piece,
    vars: &Vars,
    escape: &dyn Fn(&str) -> String,
    ev: &mut Evaluation,
) -> String {
    match p {
        Piece::Text(t) => escape(t),
        Piece::Expr(e) => eval_expr(e, vars, escape, ev),
    }
}

fn eval_expr(
    e: &Expr,
    vars: &Vars,
    escape: &dyn Fn(&str) -> String,
    ev: &mut Evaluation,
) -> String {
    // envsubst evaluates the arguments first (a nested reference without a value fails even
    // when the outer variable has one).
    let args: Vec<String> = e
        .args
        .iter()
        .map(|a| eval_piece(a, vars, escape, ev))
        .collect();
    let value = vars.get(&e.name);
    if value.is_none() && !is_default_op(&e.op) {
        ev.unresolved.push((e.name.clone(), e.range.clone()));
        return String::new();
    }
    let v = value.unwrap_or("");
    match apply(&e.op, v, &args) {
        Ok(s) => s,
        Err(why) => {
            ev.unsupported.push((e.range.clone(), why));
            String::new()
        }
    }
}

/// envsubst's functions (funcs.go), on `v` with evaluated arguments.
fn apply(op: &str, v: &str, args: &[String]) -> Result<String, &'static str> {
    let first = |f: fn(char) -> String| {
        let mut chars = v.chars();
        match chars.next() {
            Some(c) => f(c) + chars.as_str(),
            None => String::new(),
        }
    };
    Ok(match op {
        "," => first(|c| c.to_lowercase().collect()),
        ",," => v.to_lowercase(),
        "^" => first(|c| c.to_uppercase().collect()),
        "^^" => v.to_uppercase(),
        "#" if args.is_empty() => v.len().to_string(),
        "#" | "##" | "%" | "%%" => {
            let pattern = args.first().map_or("", String::as_str);
            if pattern.contains(['*', '?', '[', '\\']) {
                return Err("a glob pattern in a prefix or suffix trim");
            }
            // A literal pattern matches only itself, so shortest and longest trims agree; an
            // empty pattern trims nothing (envsubst never tries the empty prefix).
            let trimmed = if pattern.is_empty() {
                None
            } else if op.starts_with('#') {
                v.strip_prefix(pattern)
            } else {
                v.strip_suffix(pattern)
            };
            trimmed.unwrap_or(v).to_string()
        }
        ":" => substring(v, args)?,
        "/" | "//" => match args {
            [] => v.to_string(),
            [old] => replace(v, old, "", op == "//"),
            [old, new, ..] => replace(v, old, new, op == "//"),
        },
        "/#" => match args {
            [old, new] if v.starts_with(old.as_str()) => format!("{new}{}", &v[old.len()..]),
            _ => v.to_string(),
        },
        "/%" => match args {
            [old, new] if v.ends_with(old.as_str()) => {
                format!("{}{new}", &v[..v.len() - old.len()])
            }
            _ => v.to_string(),
        },
        // Defaults, the plain reference, and operators envsubst maps to its default function.
        _ => {
            if v.is_empty() && !args.is_empty() {
                args.concat()
            } else {
                v.to_string()
            }
        }
    })
}

fn replace(v: &str, old: &str, new: &str, all: bool) -> String {
    if all {
        v.replace(old, new)
    } else {
        v.replacen(old, new, 1)
    }
}

/// `${NAME:pos}`, `${NAME:pos:len}` in bytes, as Go slices strings.
fn substring(v: &str, args: &[String]) -> Result<String, &'static str> {
    let bytes = v.as_bytes();
    let len = bytes.len() as i64;
    let Some(Ok(mut pos)) = args.first().map(|a| a.parse::<i64>()) else {
        return Ok(v.to_string());
    };
    if pos < 0 {
        pos = (pos + len).max(0);
    }
    let rest = |pos: i64| {
        if pos < len {
            String::from_utf8_lossy(&bytes[pos as usize..]).into_owned()
        } else {
            String::new()
        }
    };
    let Some(length) = args.get(1) else {
        return Ok(rest(pos));
    };
    let Ok(length) = length.parse::<i64>() else {
        return Ok(v.to_string());
    };
    if length < 0 {
        // A negative length counts back from the end (`${X:1:-1}` drops the first and last
        // character); an end before the start is empty (current fluxcd/pkg envsubst
        // funcs.go `toSubstr`, as bash).
        let end = len + length;
        if end < pos {
            return Ok(String::new());
        }
        return Ok(String::from_utf8_lossy(&bytes[pos as usize..end as usize]).into_owned());
    }
    if pos.saturating_add(length) >= len {
        return Ok(rest(pos));
    }
    Ok(String::from_utf8_lossy(&bytes[pos as usize..(pos + length) as usize]).into_owned())
}

// ---------------------------------------------------------------------------------------------
// How go-yaml v2 writes a string (sigs.k8s.io/yaml goyaml.v2 encode.go `stringv` and emitterc.go
// `yaml_emitter_analyze_scalar` / `yaml_emitter_select_scalar_style`, block context)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

/// libyaml's `is_printable` (as go-yaml v2 has it: characters beyond the BMP count as special).
fn printable(c: char) -> bool {
    c == '\n'
        || (' '..='~').contains(&c)
        || ('\u{a0}'..='\u{d7ff}').contains(&c)
        || (('\u{e000}'..='\u{fffd}').contains(&c) && c != '\u{feff}')
}

fn is_break(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// The style go-yaml v2 writes the string `s` in. Only strings holding a `$` get here, and those
/// never resolve to another type, so `stringv` asks for plain (or literal, with a newline).
fn emission_style(s: &str) -> Style {
    if s.contains('\n') {
        return Style::Literal;
    }
    if s.is_empty() {
        return Style::Single;
    }
    let chars: Vec<char> = s.chars().collect();
    let blankz = |i: usize| {
        chars
            .get(i)
            .is_none_or(|c| matches!(c, ' ' | '\t') || is_break(*c))
    };
    let mut block_indicators = s.starts_with("---") || s.starts_with("...");
    let mut special = false;
    let mut breaks = false;
    let mut preceded_by_whitespace = true;
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_whitespace = blankz(i + 1);
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' | '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        if !printable(c) {
            special = true;
        }
        breaks |= is_break(c);
        preceded_by_whitespace = blankz(i);
    }
    let leading_space = chars.first() == Some(&' ');
    let trailing_space = chars.last() == Some(&' ');
    if special {
        Style::Double
    } else if block_indicators || leading_space || trailing_space || breaks {
        Style::Single
    } else {
        Style::Plain
    }
}

fn escape_single(s: &str) -> String {
    s.replace('\'', "''")
}

fn escape_double(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02X}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Substituting one object

/// Where a scalar sits, which decides how its written-out text reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Key,
    Value,
    Item,
}

/// A substituted value that Flux writes out plain and that reads back as a number, a boolean
/// or null: the explanation goes into the help of a wrong-type error there.
#[derive(Debug, Clone, PartialEq)]
pub struct Retyped {
    pub span: Span,
    /// The value as the file writes it, e.g. `${PORT}`.
    pub written: String,
    /// What Flux writes out after substituting, e.g. `6379`.
    pub substituted: String,
    /// What that reads back as ("an integer").
    pub reads_as: &'static str,
    /// The variables in it.
    pub names: Vec<String>,
    /// Whether every variable in it came from its default (no value was supplied).
    pub from_default: bool,
    /// Whether the file quotes the value.
    pub quoted: bool,
}

impl Retyped {
    /// The help of a wrong-type error at this value.
    pub fn help(&self) -> String {
        let (name, one) = match self.names.as_slice() {
            [n] => (n.as_str(), true),
            _ => ("NAME", false),
        };
        let v = &self.substituted;
        let fix = if self.from_default && one {
            format!("quote the default inside the braces, `${{{name}:=\"{v}\"}}`, and give values with their quotes")
        } else {
            format!("give the value with its quotes (`--var {name}='\"{v}\"'`, or `{name}: '\"{v}\"'` in a ConfigMap) or as `!!str {v}`")
        };
        let why = if self.quoted {
            "Flux writes this object out again before it substitutes, and the quotes this file puts around"
        } else {
            "Flux writes this object out again before it substitutes, so quoting it in the file would not help either: the quotes around"
        };
        format!(
            "{why} `{w}` do not survive; `{v}` reads back as {r}, which the API server rejects here; {fix}, or write `${{quote}}{w}${{quote}}` with a variable `quote` set to `\"` (Flux docs: post-build substitution of numbers and booleans)",
            w = self.written,
            r = self.reads_as,
        )
    }
}

/// What substituting one object gave.
#[derive(Debug, Default)]
pub struct ObjectSubst {
    /// The object with every value substituted, or `None` when nothing changed.
    pub node: Option<Node>,
    /// Malformed references, values that break the YAML, expressions cnpc does not evaluate.
    pub diagnostics: Vec<Diagnostic>,
    /// Each variable without a value, with the span of its `${...}`.
    pub unresolved: Vec<(String, Span)>,
    /// Values left as written because of the above: nothing inside them is checked.
    pub poisoned: Vec<Span>,
    pub retyped: Vec<Retyped>,
}

impl ObjectSubst {
    /// Whether a diagnostic lies inside a value that could not be substituted (and so is a
    /// consequence of that, not a problem of its own).
    pub fn suppresses(&self, d: &Diagnostic) -> bool {
        d.code != Code::UnsubstitutedVariable
            && self
                .poisoned
                .iter()
                .any(|p| p.file == d.span.file && p.start <= d.span.start && d.span.end <= p.end)
    }
}

/// The mark at the start of a value that could not be substituted (a variable without a value,
/// a malformed reference): the value is kept as written after it. U+FDD0 is a Unicode
/// noncharacter, reserved for uses like this one, so no policy text means it.
pub const UNRESOLVED: char = '\u{fdd0}';

/// Whether a value could not be substituted, so checks of its content would only repeat what
/// was reported when the file was read (a literal `${...}` in an object Flux leaves alone is
/// not such a value: it reaches the API server and is checked like any other).
pub fn is_unresolved(value: &str) -> bool {
    value.starts_with(UNRESOLVED)
}

/// A value as written, marked as not substituted.
fn unresolved_node(node: &Node) -> Node {
    let mut node = node.clone();
    if let NodeKind::Scalar(s) = &mut node.kind {
        s.text.insert(0, UNRESOLVED);
    }
    node
}

/// Whether an object opts out: `kustomize.toolkit.fluxcd.io/substitute: disabled` among its
/// labels or annotations.
pub fn disabled(object: &Node) -> bool {
    let meta = object.get("metadata");
    ["labels", "annotations"].iter().any(|k| {
        meta.and_then(|m| m.get(k))
            .and_then(|m| m.get(DISABLE_KEY))
            .and_then(Node::as_str)
            == Some(DISABLED)
    })
}

fn mentions_dollar(node: &Node) -> bool {
    match &node.kind {
        NodeKind::Scalar(s) => s.text.contains('$'),
        NodeKind::Seq(items) => items.iter().any(mentions_dollar),
        NodeKind::Map(entries) => entries
            .iter()
            .any(|(k, v)| mentions_dollar(k) || mentions_dollar(v)),
        NodeKind::Null => false,
    }
}

/// Substitutes the variables of one object (a document or an item of a List) as Flux would.
pub fn substitute_object(
    object: &Node,
    vars: &Vars,
    file: FileId,
    source: &SourceFile,
) -> ObjectSubst {
    let mut out = ObjectSubst::default();
    if !mentions_dollar(object) || disabled(object) {
        return out;
    }
    let mut node = object.clone();
    let mut walker = Walker {
        vars,
        file,
        source,
        out: &mut out,
        changed: false,
    };
    walker.walk(&mut node, Context::Value);
    if walker.changed {
        out.node = Some(node);
    }
    out
}

struct Walker<'a> {
    vars: &'a Vars,
    file: FileId,
    source: &'a SourceFile,
    out: &'a mut ObjectSubst,
    changed: bool,
}

impl Walker<'_> {
    fn walk(&mut self, node: &mut Node, ctx: Context) {
        match &mut node.kind {
            NodeKind::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    self.walk(k, Context::Key);
                    self.walk(v, Context::Value);
                }
            }
            NodeKind::Seq(items) => {
                for item in items.iter_mut() {
                    self.walk(item, Context::Item);
                }
            }
            NodeKind::Scalar(s) if s.text.contains('$') => {
                let text = s.text.clone();
                if let Some(new) = self.scalar(node, &text, ctx) {
                    *node = new;
                    self.changed = true;
                }
            }
            _ => {}
        }
    }

    /// The source span of a byte range of a scalar's value: where that text appears verbatim
    /// in the scalar's source, searching from `from`; the whole scalar when it does not (an
    /// escape or a line fold inside it).
    fn locate(&self, node: &Node, value: &str, range: Range<usize>, from: usize) -> Option<Span> {
        let needle = value.get(range)?;
        let (start, end) = (node.span.start as usize, node.span.end as usize);
        let hay = self.source.text.get(start..end)?;
        let at = hay.get(from..)?.find(needle)? + from;
        Some(
            self.source
                .span(self.file, start + at, start + at + needle.len()),
        )
    }

    /// Source spans of the outermost expressions of a value, in order (`None`: not found).
    fn expr_spans(&self, node: &Node, value: &str, pieces: &[Piece]) -> Vec<Option<Span>> {
        let mut from = 0;
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Expr(e) => Some(e),
                Piece::Text(_) => None,
            })
            .map(|e| {
                let span = self.locate(node, value, e.range.clone(), from);
                if let Some(s) = span {
                    from = (s.end - node.span.start) as usize;
                }
                span
            })
            .collect()
    }

    /// The source span of a (possibly nested) expression's range.
    fn span_of(
        &self,
        node: &Node,
        pieces: &[Piece],
        spans: &[Option<Span>],
        range: &Range<usize>,
    ) -> Span {
        let outer = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Expr(e) => Some(e),
                Piece::Text(_) => None,
            })
            .zip(spans)
            .find(|(e, _)| e.range.start <= range.start && range.end <= e.range.end);
        match outer {
            // Found verbatim, so offsets inside it carry over.
            Some((e, Some(s))) => {
                let start = s.start as usize + (range.start - e.range.start);
                self.source
                    .span(self.file, start, start + (range.end - range.start))
            }
            _ => node.span,
        }
    }

    /// Substitutes one scalar; `None` when it stays as it is. A value that cannot be
    /// substituted is kept as written, marked [`UNRESOLVED`].
    fn scalar(&mut self, node: &Node, value: &str, ctx: Context) -> Option<Node> {
        let pieces = match parse_value(value) {
            Ok(p) => p,
            Err(e) => {
                let span = self
                    .locate(node, value, e.at..value.len(), 0)
                    .unwrap_or(node.span);
                self.out.diagnostics.push(
                    Diagnostic::new(
                        Code::UnsubstitutedVariable,
                        span,
                        format!("malformed Flux variable reference: {}", e.message),
                    )
                    .label("Flux cannot substitute this")
                    .help("write `${NAME}` or `${NAME:=default}` with a name of letters, digits and `_`, or `$${` for a literal `${`; Flux's envsubst fails on this and applies nothing of the whole Kustomization"),
                );
                self.out.poisoned.push(node.span);
                return Some(unresolved_node(node));
            }
        };
        let has_expr = pieces.iter().any(|p| matches!(p, Piece::Expr(_)));
        if !has_expr && !value.contains("$$") {
            return None;
        }
        let spans = self.expr_spans(node, value, &pieces);
        let style = match ctx {
            // A key is written like any string (in a simple-key position, where a literal
            // block cannot go: go-yaml quotes it).
            Context::Key if emission_style(value) == Style::Literal => Style::Double,
            _ => emission_style(value),
        };
        let escape: &dyn Fn(&str) -> String = match style {
            Style::Plain | Style::Literal => &|t: &str| t.to_string(),
            Style::Single => &escape_single,
            Style::Double => &escape_double,
        };
        let mut ev = Evaluation::default();
        let inner = eval_pieces(&pieces, self.vars, escape, &mut ev);
        if !ev.unresolved.is_empty() || !ev.unsupported.is_empty() {
            for (name, range) in &ev.unresolved {
                let span = self.span_of(node, &pieces, &spans, range);
                self.out.unresolved.push((name.clone(), span));
            }
            for (range, why) in &ev.unsupported {
                let span = self.span_of(node, &pieces, &spans, range);
                let text = value.get(range.clone()).unwrap_or(value);
                self.out.diagnostics.push(
                    Diagnostic::new(
                        Code::UnsubstitutedVariable,
                        span,
                        format!("cnpc cannot evaluate `{text}`: {why}"),
                    )
                    .label("not evaluated")
                    .help("cnpc evaluates ${NAME}, defaults (:=, :-, =), ${#NAME}, case (^ ^^ , ,,), substrings, replacements and trims with a literal pattern; simplify the expression, or check the output of `flux envsubst`"),
                );
            }
            self.out.poisoned.push(node.span);
            return Some(unresolved_node(node));
        }
        // The node's new place: the `${...}` itself when the value is exactly one reference.
        let target = match (pieces.as_slice(), spans.as_slice()) {
            ([Piece::Expr(_)], [Some(s)]) => *s,
            _ => node.span,
        };
        let read_back = match style {
            Style::Literal => Ok(Node {
                kind: NodeKind::Scalar(Scalar {
                    text: inner.clone(),
                    quoted: true,
                }),
                span: target,
            }),
            Style::Plain => read_back(&inner, ctx),
            Style::Single => read_back(&format!("'{inner}'"), ctx),
            Style::Double => read_back(&format!("\"{inner}\""), ctx),
        };
        let mut new = match read_back {
            Ok(n) => n,
            Err(message) => {
                self.out.diagnostics.push(
                    Diagnostic::new(
                        Code::YamlSyntax,
                        target,
                        format!("after substitution Flux cannot read this value back: {message}"),
                    )
                    .label(format!("becomes `{inner}`"))
                    .help("Flux writes the substituted value into YAML and parses it again, so a value with `: `, ` #`, quotes or brackets changes the document; give the value with quotes around it (`'\"...\"'`)"),
                );
                self.out.poisoned.push(node.span);
                return Some(unresolved_node(node));
            }
        };
        respan(&mut new, target);
        if ctx == Context::Key {
            // sigs.k8s.io/yaml turns every key into a JSON string.
            new.kind = match new.kind {
                NodeKind::Scalar(s) => NodeKind::Scalar(Scalar {
                    text: s.text,
                    quoted: true,
                }),
                NodeKind::Null => NodeKind::Scalar(Scalar {
                    text: "null".into(),
                    quoted: true,
                }),
                other => other,
            };
        }
        let is_string =
            matches!(&new.kind, NodeKind::Scalar(s) if s.scalar_type() == ScalarType::String);
        if style == Style::Plain && !is_string && matches!(new.kind, NodeKind::Scalar(_)) {
            let names: Vec<String> = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Expr(e) => Some(e.name.clone()),
                    Piece::Text(_) => None,
                })
                .collect();
            self.out.retyped.push(Retyped {
                span: target,
                written: value.to_string(),
                substituted: inner,
                reads_as: new.describe(),
                from_default: names.iter().all(|n| self.vars.get(n).is_none()),
                names,
                quoted: matches!(&node.kind, NodeKind::Scalar(s) if s.quoted),
            });
        }
        Some(new)
    }
}

/// Parses the text Flux writes for a value in its position and returns the value's node.
fn read_back(written: &str, ctx: Context) -> Result<Node, String> {
    let text = match ctx {
        Context::Key => format!("{written}: x\n"),
        Context::Value => format!("k: {written}\n"),
        Context::Item => format!("- {written}\n"),
    };
    let source = SourceFile::new("substituted", text);
    let docs = parse_documents(FileId(0), &source).map_err(|e| e.message)?;
    let [doc] = docs.as_slice() else {
        return Err("it splits the document".into());
    };
    let node = match (ctx, &doc.kind) {
        (Context::Key, NodeKind::Map(entries)) if entries.len() == 1 => entries[0].0.clone(),
        (Context::Value, NodeKind::Map(entries))
            if entries.len() == 1 && entries[0].0.as_str() == Some("k") =>
        {
            entries[0].1.clone()
        }
        (Context::Item, NodeKind::Seq(items)) if items.len() == 1 => items[0].clone(),
        _ => return Err("it changes the structure around it".into()),
    };
    Ok(node)
}

/// Gives a node and everything in it one place.
fn respan(node: &mut Node, span: Span) {
    node.span = span;
    match &mut node.kind {
        NodeKind::Seq(items) => items.iter_mut().for_each(|n| respan(n, span)),
        NodeKind::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            respan(k, span);
            respan(v, span);
        }),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting variables without a value

/// The variables without a value in one file, each with every place it is used, reported as
/// one diagnostic per variable at its first use.
#[derive(Debug, Default)]
pub struct Unresolved {
    names: Vec<(String, Vec<Span>)>,
}

impl Unresolved {
    pub fn add(&mut self, name: &str, span: Span) {
        match self.names.iter_mut().find(|(n, _)| n == name) {
            Some((_, spans)) => {
                if !spans.contains(&span) {
                    spans.push(span);
                }
            }
            None => self.names.push((name.to_string(), vec![span])),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.names
            .into_iter()
            .filter_map(|(name, mut spans)| {
                spans.sort_by_key(|s| s.start);
                let (first, rest) = spans.split_first()?;
                let more = match rest.len() {
                    0 => String::new(),
                    1 => " (used twice in this file)".to_string(),
                    n => format!(" (used {} times in this file)", n + 1),
                };
                let mut d = Diagnostic::new(
                    Code::UnsubstitutedVariable,
                    *first,
                    format!("Flux variable `{name}` has no value{more}"),
                )
                .label(format!("no value for `{name}`"))
                .help(format!(
                    "pass a value: `--var {name}=VALUE`, or `--vars-file FILE` with a dotenv file or the ConfigMap, Secret or Flux Kustomization (postBuild.substitute) that sets it; or give it a default here, `${{{name}:=VALUE}}`. Until then the values that use it are not checked"
                ));
                for s in rest {
                    d = d.related(*s, "also used here");
                }
                Some(d)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        let mut v = Vars::new();
        for (n, x) in pairs {
            v.set(n, x, "test").unwrap();
        }
        v
    }

    /// Evaluates a value as plain text: (result, unresolved names, unsupported count).
    fn eval(value: &str, v: &Vars) -> (String, Vec<String>, usize) {
        let pieces = parse_value(value).unwrap();
        let mut ev = Evaluation::default();
        let s = eval_pieces(&pieces, v, &|t: &str| t.to_string(), &mut ev);
        (
            s,
            ev.unresolved.into_iter().map(|(n, _)| n).collect(),
            ev.unsupported.len(),
        )
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let none = Vars::new();
        assert_eq!(eval("${A:=x}", &none).0, "x");
        assert_eq!(eval("${A:-x}", &none).0, "x");
        assert_eq!(eval("${A=x}", &none).0, "x");
        assert_eq!(eval("p-${A:=x}-s", &none).0, "p-x-s");
        assert_eq!(eval("${A:-}", &none), (String::new(), vec![], 0));
        let set = vars(&[("A", "v"), ("E", "")]);
        assert_eq!(eval("${A:=x}", &set).0, "v");
        // envsubst's `=` and `:=` both treat an empty value as unset.
        assert_eq!(eval("${E:=x}", &set).0, "x");
        assert_eq!(eval("${E=x}", &set).0, "x");
        assert_eq!(eval("${E}", &set), (String::new(), vec![], 0));
        // A default may itself hold a reference.
        assert_eq!(eval("${A:=${B:=y}z}", &none).0, "yz");
        assert_eq!(eval("${Q:=${A}}", &set).0, "v");
        assert_eq!(eval("${Q:=${B}}", &none).1, vec!["B".to_string()]);
    }

    #[test]
    fn a_variable_without_value_or_default_is_unresolved() {
        let (_, missing, _) = eval("${A}/${B:=1}/${C}", &Vars::new());
        assert_eq!(missing, vec!["A".to_string(), "C".to_string()]);
        assert!(eval("${#A}", &Vars::new()).1 == vec!["A".to_string()]);
    }

    #[test]
    fn escapes_and_unbraced_dollars() {
        let v = vars(&[("A", "v")]);
        assert_eq!(eval("$${A}", &v).0, "${A}");
        assert_eq!(eval("a$$b", &v).0, "a$b");
        assert_eq!(eval("$$${A}", &v).0, "$v");
        assert_eq!(eval("$A and $", &v).0, "$A and $");
        assert_eq!(eval("/$", &v).0, "/$");
    }

    #[test]
    fn other_envsubst_functions() {
        let v = vars(&[("A", "Hello.World"), ("N", "3")]);
        assert_eq!(eval("${A^^}", &v).0, "HELLO.WORLD");
        assert_eq!(eval("${A,}", &v).0, "hello.World");
        assert_eq!(eval("${#A}", &v).0, "11");
        assert_eq!(eval("${A:6}", &v).0, "World");
        assert_eq!(eval("${A:0:5}", &v).0, "Hello");
        assert_eq!(eval("${A:-5}", &v).0, "Hello.World");
        assert_eq!(eval("${A: -5}", &v).0, "Hello.World");
        assert_eq!(eval("${A:${N}}", &v).0, "lo.World");
        assert_eq!(eval("${A/o/0}", &v).0, "Hell0.World");
        assert_eq!(eval("${A//o/0}", &v).0, "Hell0.W0rld");
        assert_eq!(eval("${A/#Hello/Bye}", &v).0, "Bye.World");
        assert_eq!(eval("${A/%World/All}", &v).0, "Hello.All");
        assert_eq!(eval("${A/\\//x}", &v).0, "Hello.World");
        assert_eq!(eval("${A#Hello.}", &v).0, "World");
        assert_eq!(eval("${A%%.World}", &v).0, "Hello");
        assert_eq!(eval("${A#*.}", &v).2, 1, "glob trims are not evaluated");
        // Current fluxcd/pkg envsubst: an empty replace pattern, and negative lengths.
        assert_eq!(eval("${A/#/v}", &v).0, "vHello.World");
        assert_eq!(eval("${A/%/!}", &v).0, "Hello.World!");
        assert_eq!(eval("${A:1:-1}", &v).0, "ello.Worl");
        assert_eq!(eval("${A:6:-6}", &v).0, "");
    }

    #[test]
    fn malformed_references_are_errors() {
        for bad in [
            "${A", "${}", "${-}", "${A-b}", "${A:=x", "${A:}", "x ${A/b}",
        ] {
            assert!(parse_value(bad).is_err(), "{bad}");
        }
        let e = parse_value("ok ${A").unwrap_err();
        assert_eq!(e.at, 3);
    }

    #[test]
    fn go_yaml_writes_strings_plain_when_it_can() {
        assert_eq!(emission_style("${PORT}"), Style::Plain);
        assert_eq!(emission_style("${A:=6379}"), Style::Plain);
        assert_eq!(emission_style("${IP}/32"), Style::Plain);
        assert_eq!(emission_style("git.${D}"), Style::Plain);
        assert_eq!(emission_style("*.${D}"), Style::Single);
        assert_eq!(emission_style("${A}: b"), Style::Single);
        assert_eq!(emission_style("a #${B}"), Style::Single);
        assert_eq!(emission_style(" ${A}"), Style::Single);
        assert_eq!(emission_style("${A}\tb"), Style::Double);
        assert_eq!(emission_style("${A}\nb"), Style::Literal);
    }

    #[test]
    fn values_read_back_as_flux_reads_them() {
        let scalar = |n: Node| match n.kind {
            NodeKind::Scalar(s) => {
                let ty = s.scalar_type();
                (s.text, ty)
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            scalar(read_back("6379", Context::Value).unwrap()),
            ("6379".into(), ScalarType::Integer)
        );
        assert_eq!(
            scalar(read_back("\"6379\"", Context::Value).unwrap()),
            ("6379".into(), ScalarType::String)
        );
        assert_eq!(
            scalar(read_back("!!str 6379", Context::Item).unwrap()),
            ("6379".into(), ScalarType::String)
        );
        assert_eq!(
            scalar(read_back("a #comment", Context::Value).unwrap()),
            ("a".into(), ScalarType::String)
        );
        assert!(read_back("a: b", Context::Value).is_err());
        assert!(read_back("", Context::Value).unwrap().is_null());
        assert!(matches!(
            read_back("a: b", Context::Item).unwrap().kind,
            NodeKind::Map(_)
        ));
    }

    #[test]
    fn assignments_and_names() {
        let mut v = Vars::new();
        v.set_assignment("A=b=c").unwrap();
        v.set_assignment("EMPTY=").unwrap();
        assert_eq!(v.get("A"), Some("b=c"));
        assert_eq!(v.get("EMPTY"), Some(""));
        assert!(matches!(
            v.set_assignment("nothing"),
            Err(VarsError::Assignment { .. })
        ));
        assert!(matches!(
            v.set_assignment("1A=x"),
            Err(VarsError::Name { .. })
        ));
        assert!(matches!(
            v.set_assignment("my-var=x"),
            Err(VarsError::Name { .. })
        ));
        assert!(is_valid_name("_a1") && !is_valid_name("Ä") && !is_valid_name(""));
        v.set_assignment("ML=a\nb").unwrap();
        assert_eq!(
            v.get("ML"),
            Some("ab"),
            "newlines are removed, as Flux does"
        );
        assert_eq!(format!("{v:?}"), "{\"A\", \"EMPTY\", \"ML\"}");
    }

    #[test]
    fn dotenv_files() {
        let mut v = Vars::new();
        let text = "# settings\r\nexport LAN=192.168.1.0/24\r\n\nA = spaced # comment\nB=\"q \\\"x\\\" # kept\" # gone\nC='lit $X \\n'\nD=a#b\nE=\n";
        v.add_dotenv(Path::new("x.env"), text).unwrap();
        assert_eq!(v.get("LAN"), Some("192.168.1.0/24"));
        assert_eq!(v.get("A"), Some("spaced"));
        assert_eq!(v.get("B"), Some("q \"x\" # kept"));
        assert_eq!(v.get("C"), Some("lit $X \\n"));
        assert_eq!(v.get("D"), Some("a#b"));
        assert_eq!(v.get("E"), Some(""));
        let err = |text: &str| {
            Vars::new()
                .add_dotenv(Path::new("x.env"), text)
                .unwrap_err()
        };
        match err("A=1\nnot a line\n") {
            VarsError::File { line, path, .. } => {
                assert_eq!((line, path), (2, PathBuf::from("x.env")))
            }
            e => panic!("{e:?}"),
        }
        match err("A=1\n\nB=\"open\n") {
            VarsError::File { line, .. } => assert_eq!(line, 3),
            e => panic!("{e:?}"),
        }
        match err("A=1\nbad-name=2\n") {
            VarsError::Name { at, .. } => assert_eq!(at, "x.env:2"),
            e => panic!("{e:?}"),
        }
        assert!(matches!(err("A='x' y\n"), VarsError::File { line: 1, .. }));
    }

    #[test]
    fn configmaps_secrets_and_kustomizations() {
        let text = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cluster-settings, namespace: flux-system}
data:
  LAN_SUBNET: 192.168.1.0/24
  PORT: "6379"
  EMPTY:
---
apiVersion: v1
kind: Secret
metadata: {name: cluster-secrets}
data:
  TOKEN: c2VjcmV0
  PORT: NjM4MA==
stringData:
  TOKEN: plain
---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata: {name: apps}
spec:
  postBuild:
    substitute:
      ROOT_DOMAIN: example.com
---
apiVersion: v1
kind: Namespace
metadata: {name: ignored}
"#;
        let mut v = Vars::new();
        v.add_yaml(Path::new("vars.yaml"), text).unwrap();
        assert_eq!(v.get("LAN_SUBNET"), Some("192.168.1.0/24"));
        assert_eq!(v.get("EMPTY"), Some(""));
        // The Secret comes later in the file, so its PORT wins; stringData wins over data.
        assert_eq!(v.get("PORT"), Some("6380"));
        assert_eq!(v.get("TOKEN"), Some("plain"));
        assert_eq!(v.get("ROOT_DOMAIN"), Some("example.com"));
        assert_eq!(v.len(), 5);

        let line = |text: &str| match Vars::new().add_yaml(Path::new("v.yaml"), text) {
            Err(VarsError::File { line, .. }) => line,
            Err(VarsError::Name { at, .. }) => at
                .rsplit(':')
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0),
            other => panic!("{other:?}"),
        };
        assert_eq!(line("kind: ConfigMap\ndata:\n  PORT: 6379\n"), 3);
        assert_eq!(line("kind: ConfigMap\ndata:\n  my-key: x\n"), 3);
        assert_eq!(line("kind: Secret\ndata:\n  A: eA==\n  B: '%%%'\n"), 4);
        assert_eq!(
            line("kind: Secret\ndata: {A: eA==}\nsops:\n  version: 3\n"),
            3
        );
        assert_eq!(line("kind: Deployment\n"), 1);
        assert_eq!(line("kind: ConfigMap\ndata: [1\n"), 3);
        // A List of ConfigMaps, as kubectl prints several.
        let mut v = Vars::new();
        v.add_yaml(
            Path::new("l.yaml"),
            "kind: List\nitems:\n- kind: ConfigMap\n  data: {A: '1'}\n",
        )
        .unwrap();
        assert_eq!(v.get("A"), Some("1"));
    }

    #[test]
    fn objects_can_opt_out() {
        let f = SourceFile::new("t.yaml", "metadata:\n  annotations:\n    kustomize.toolkit.fluxcd.io/substitute: disabled\nspec: ${X}\n");
        let docs = parse_documents(FileId(0), &f).unwrap();
        assert!(disabled(&docs[0]));
        let out = substitute_object(&docs[0], &Vars::new(), FileId(0), &f);
        assert!(out.unresolved.is_empty() && out.node.is_none());
    }

    #[test]
    fn unresolved_variables_are_one_diagnostic_per_name() {
        let f = SourceFile::new("t.yaml", "a: ${X}\nb: ['${X}', \"${Y}\"]\nc: ${X:=d}\n");
        let docs = parse_documents(FileId(0), &f).unwrap();
        let out = substitute_object(&docs[0], &Vars::new(), FileId(0), &f);
        let mut u = Unresolved::default();
        for (n, s) in &out.unresolved {
            u.add(n, *s);
        }
        let diags = u.into_diagnostics();
        assert_eq!(diags.len(), 2);
        let x = &diags[0];
        assert_eq!(x.code, Code::UnsubstitutedVariable);
        assert_eq!(&f.text[x.span.start as usize..x.span.end as usize], "${X}");
        assert_eq!((x.span.line, x.span.column), (1, 4));
        assert_eq!(x.related.len(), 1);
        assert_eq!(x.related[0].0.line, 2);
        assert!(x.message.contains("used twice"), "{}", x.message);
        let y = &diags[1];
        assert_eq!(&f.text[y.span.start as usize..y.span.end as usize], "${Y}");
        assert_eq!(out.poisoned.len(), 3);
    }

    /// Flux lets a Kustomization's inline `substitute` win over its `substituteFrom` objects
    /// whatever the order (kustomize-controller `kustomize_varsub.go`); `--var` wins over all.
    #[test]
    fn inline_substitute_wins_over_configmaps_and_var_over_both() {
        let text = "apiVersion: kustomize.toolkit.fluxcd.io/v1\nkind: Kustomization\nmetadata: {name: apps}\nspec:\n  postBuild:\n    substitute: {X: inline}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {X: from-configmap, Y: from-configmap}\n";
        let mut v = Vars::new();
        v.add_yaml(Path::new("flux.yaml"), text).unwrap();
        assert_eq!(v.get("X"), Some("inline"));
        assert_eq!(v.get("Y"), Some("from-configmap"));
        v.set_assignment("X=given").unwrap();
        assert_eq!(v.get("X"), Some("given"));
    }
}
