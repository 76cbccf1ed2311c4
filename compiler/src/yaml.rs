//! A YAML document tree in which every node knows where it came from.
//!
//! serde-based YAML crates hand back values without positions, and stop at the first error. The
//! front end needs both positions for every key and value and a complete picture of the file to
//! report every problem in one run, so we build our own small tree from the event stream of
//! `yaml-rust2` (a maintained YAML 1.2 parser whose events carry markers). JSON is YAML, so JSON
//! policy files go through the same path.

use crate::source::{FileId, SourceFile, Span};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Upper bound on nodes one file may add through aliases (guards against "billion laughs");
/// nodes written out in the file are bounded by its size and not counted.
const MAX_NODES: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `null`, `~`, or nothing at all.
    Null,
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub text: String,
    /// Quoted and block scalars are always strings; plain ones may be numbers or booleans.
    pub quoted: bool,
}

/// What a plain scalar means under the YAML 1.2 core schema, the way the Kubernetes API reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    String,
    Integer,
    Float,
    Boolean,
}

impl Scalar {
    pub fn scalar_type(&self) -> ScalarType {
        if self.quoted {
            return ScalarType::String;
        }
        let t = self.text.as_str();
        if matches!(t, "true" | "True" | "TRUE" | "false" | "False" | "FALSE") {
            return ScalarType::Boolean;
        }
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return ScalarType::Integer;
        }
        if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0o")) {
            if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return ScalarType::Integer;
            }
        }
        let looks_float = digits.bytes().any(|b| b.is_ascii_digit())
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
            && digits.parse::<f64>().is_ok();
        if looks_float || matches!(digits, ".inf" | ".Inf" | ".INF") || t == ".nan" {
            return ScalarType::Float;
        }
        ScalarType::String
    }
}

impl Node {
    /// A short word for error messages: what the user wrote here.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Null => "null",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
            NodeKind::Scalar(s) => match s.scalar_type() {
                ScalarType::String => "a string",
                ScalarType::Integer => "an integer",
                ScalarType::Float => "a number",
                ScalarType::Boolean => "a boolean",
            },
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar(s) => Some(&s.text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }
}

/// Malformed YAML: where the parser gave up, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct YamlError {
    pub message: String,
    pub span: Span,
    /// For an unterminated flow collection, the bracket that was never closed.
    pub unclosed: Option<Span>,
}

/// The last `[` or `{` before `end` that has no matching close, skipping comments and quoted
/// text. The parser notices an unclosed flow collection only where it gives up, often lines
/// later; the opening bracket is where the fix goes.
fn unclosed_bracket(text: &str, end: usize) -> Option<usize> {
    let mut stack = Vec::new();
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let b = text.as_bytes();
    for (i, &c) in b[..end.min(b.len())].iter().enumerate() {
        if comment {
            comment = c != b'\n';
            continue;
        }
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(c),
            (None, b'#') if i == 0 || b[i - 1].is_ascii_whitespace() => comment = true,
            (None, b'[' | b'{') => stack.push(i),
            (None, b']' | b'}') => {
                stack.pop();
            }
            _ => {}
        }
        if c == b'\n' {
            quote = None;
        }
    }
    stack.pop()
}

/// Parses every document of a YAML stream. Empty documents (a stray `---`) are dropped.
pub fn parse_documents(file: FileId, source: &SourceFile) -> Result<Vec<Node>, YamlError> {
    parse_documents_within(file, source, MAX_NODES)
}

/// [`parse_documents`] allowing aliases to add at most `max_alias_nodes` nodes.
fn parse_documents_within(
    file: FileId,
    source: &SourceFile,
    max_alias_nodes: usize,
) -> Result<Vec<Node>, YamlError> {
    let mut builder = Builder {
        file,
        source,
        stack: Vec::new(),
        docs: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        max_alias_nodes,
        error: None,
    };
    let mut parser = Parser::new_from_str(&source.text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        let start = source.offset_of(m.line(), m.col());
        // The scanner's own text ends with " at byte N line L column C"; we show the place as a
        // label instead, so keep only the reason.
        let info = e.info();
        let message = info.split(" at byte ").next().unwrap_or(info).to_string();
        let unclosed = message
            .contains("flow")
            .then(|| unclosed_bracket(&source.text, start))
            .flatten()
            .map(|at| source.span(file, at, at + 1));
        return Err(YamlError {
            message,
            span: source.span(file, start, start + 1),
            unclosed,
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.docs)
}

enum Frame {
    Seq {
        start: usize,
        /// The 1-based line of `start`, as the parser's marker gave it.
        line: usize,
        flow: bool,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        start: usize,
        /// The 1-based line of `start`, as the parser's marker gave it.
        line: usize,
        flow: bool,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

struct Builder<'a> {
    file: FileId,
    source: &'a SourceFile,
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    /// Nodes added through aliases so far, and how many may be.
    nodes: usize,
    max_alias_nodes: usize,
    error: Option<YamlError>,
}

impl Builder<'_> {
    fn offset(&self, m: Marker) -> usize {
        self.source.offset_of(m.line(), m.col())
    }

    fn scalar_end(&self, start: usize, text: &str, style: TScalarStyle) -> usize {
        let src = &self.source.text[start..];
        let end = match style {
            TScalarStyle::SingleQuoted => {
                let b = src.as_bytes();
                let mut i = 1;
                loop {
                    match b.get(i) {
                        None => break i,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break i + 1,
                        Some(_) => i += 1,
                    }
                }
            }
            TScalarStyle::DoubleQuoted => {
                let b = src.as_bytes();
                let mut i = 1;
                loop {
                    match b.get(i) {
                        None => break i,
                        Some(b'\\') => i += 2,
                        Some(b'"') => break i + 1,
                        Some(_) => i += 1,
                    }
                }
            }
            TScalarStyle::Plain if src.starts_with(text) => text.len(),
            _ => src.find('\n').unwrap_or(src.len()),
        };
        start + end.min(src.len())
    }

    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if !node.is_null() {
                    self.docs.push(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => {
                    // A block mapping or list under a key is reported from the key: a diagnostic
                    // about `egress:` should point at the line that says `egress:`.
                    let mut node = node;
                    let block = matches!(node.kind, NodeKind::Map(_) | NodeKind::Seq(_))
                        && !matches!(
                            self.source.text.as_bytes().get(node.span.start as usize),
                            Some(b'{' | b'[')
                        );
                    if block && k.span.start < node.span.start {
                        node.span = k.span.to(node.span);
                    }
                    entries.push((k, node))
                }
            },
        }
    }

    /// `line`: the line `start` is probably on (checked, see [`SourceFile::span_near`]).
    fn container_span(
        &self,
        start: usize,
        line: usize,
        end_marker: usize,
        flow: bool,
        last: Option<&Node>,
    ) -> Span {
        let end = if flow {
            end_marker + 1
        } else {
            last.map(|n| n.span.end as usize).unwrap_or(start)
        };
        self.source
            .span_near(self.file, start, end.max(start), Some(line))
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let at = self.offset(mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                // `!!str 80` (and the non-specific `! 80`) is a string whatever it looks like;
                // Flux users write it to keep a substituted number a string.
                let string_tag = tag.as_ref().is_some_and(|t| {
                    (t.handle == "tag:yaml.org,2002:" && t.suffix == "str")
                        || (t.handle.is_empty() && t.suffix == "!")
                });
                let plain = matches!(style, TScalarStyle::Plain) && !string_tag;
                let end = self.scalar_end(at, &text, style);
                let span = self.source.span_near(self.file, at, end, Some(mark.line()));
                let kind = if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL")
                {
                    NodeKind::Null
                } else {
                    NodeKind::Scalar(Scalar {
                        text,
                        quoted: !plain,
                    })
                };
                self.push_node(Node { kind, span }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                let flow = self.source.text[at..].starts_with('[');
                self.stack.push(Frame::Seq {
                    start: at,
                    line: mark.line(),
                    flow,
                    anchor,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(anchor, _) => {
                let flow = self.source.text[at..].starts_with('{');
                self.stack.push(Frame::Map {
                    start: at,
                    line: mark.line(),
                    flow,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq {
                    start,
                    line,
                    flow,
                    anchor,
                    items,
                }) = self.stack.pop()
                {
                    let (start, line) = match items.first() {
                        Some(n) if (n.span.start as usize) < start => {
                            (n.span.start as usize, n.span.line as usize)
                        }
                        _ => (start, line),
                    };
                    let span = self.container_span(start, line, at, flow, items.last());
                    self.push_node(
                        Node {
                            kind: NodeKind::Seq(items),
                            span,
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    start,
                    line,
                    flow,
                    anchor,
                    entries,
                    ..
                }) = self.stack.pop()
                {
                    // Block mappings report their start one character late; the first key is exact.
                    let (start, line) = match entries.first() {
                        Some((k, _)) if !flow => (k.span.start as usize, k.span.line as usize),
                        _ => (start, line),
                    };
                    let span =
                        self.container_span(start, line, at, flow, entries.last().map(|(_, v)| v));
                    self.push_node(
                        Node {
                            kind: NodeKind::Map(entries),
                            span,
                        },
                        anchor,
                    );
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => {
                    // Only aliases multiply nodes beyond the file's own size: nodes written out
                    // cost a byte of the file each, however many a large snapshot holds.
                    self.nodes += count_nodes(&node);
                    if self.nodes > self.max_alias_nodes && self.error.is_none() {
                        self.error = Some(YamlError {
                            message: format!(
                                "the document expands to more than {} nodes through aliases",
                                self.max_alias_nodes
                            ),
                            span: self.source.span(self.file, at, at + 1),
                            unclosed: None,
                        });
                    }
                    self.push_node(node, 0);
                }
                None => {
                    self.error = Some(YamlError {
                        message: "alias refers to an unknown anchor".into(),
                        span: self.source.span(self.file, at, at + 1),
                        unclosed: None,
                    })
                }
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn count_nodes(node: &Node) -> usize {
    1 + match &node.kind {
        NodeKind::Seq(items) => items.iter().map(count_nodes).sum(),
        NodeKind::Map(entries) => entries
            .iter()
            .map(|(k, v)| count_nodes(k) + count_nodes(v))
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (SourceFile, Result<Vec<Node>, YamlError>) {
        let f = SourceFile::new("t.yaml", text);
        let r = parse_documents(FileId(0), &f);
        (f, r)
    }

    #[test]
    fn keys_and_values_carry_their_positions() {
        let (f, docs) = parse("a: 1\nb:\n  c: 'x y'\n  d: [1, \"two\"]\n---\n- z\n");
        let docs = docs.unwrap();
        assert_eq!(docs.len(), 2);
        let c = docs[0].get("b").unwrap().get("c").unwrap();
        assert_eq!((c.span.line, c.span.column), (3, 6));
        assert_eq!(&f.text[c.span.start as usize..c.span.end as usize], "'x y'");
        let d = docs[0].get("b").unwrap().get("d").unwrap();
        assert_eq!(
            &f.text[d.span.start as usize..d.span.end as usize],
            "[1, \"two\"]"
        );
        // A block container under a key is spanned from its key.
        let b = docs[0].get("b").unwrap();
        assert_eq!((b.span.line, b.span.column), (2, 1));
    }

    #[test]
    fn plain_scalars_are_typed_like_the_kubernetes_api_reads_them() {
        let (_, docs) = parse("a: 80\nb: '80'\nc: true\nd: ~\ne: 1.5\nf: web\n");
        let d = &docs.unwrap()[0];
        let ty = |k: &str| d.get(k).unwrap().describe();
        assert_eq!(ty("a"), "an integer");
        assert_eq!(ty("b"), "a string");
        assert_eq!(ty("c"), "a boolean");
        assert_eq!(ty("d"), "null");
        assert_eq!(ty("e"), "a number");
        assert_eq!(ty("f"), "a string");
    }

    #[test]
    fn malformed_yaml_reports_its_line() {
        let (_, r) = parse("a: [1, 2\nb: 3\n");
        let e = r.unwrap_err();
        assert_eq!(e.span.line, 2);
        assert!(!e.message.contains("byte"), "{}", e.message);
    }

    #[test]
    fn unclosed_flow_list_points_at_its_bracket() {
        let (_, r) = parse("a: [1, 2\n# [not this]\nb: '[x'\nc: 3\n");
        let e = r.unwrap_err();
        let open = e.unclosed.expect("the open bracket");
        assert_eq!((open.line, open.column), (1, 4));
    }

    #[test]
    fn str_tags_make_strings() {
        let (_, docs) = parse("a: !!str 80\nb: !!str\nc: ! true\nd: !!int 5\n");
        let d = &docs.unwrap()[0];
        let ty = |k: &str| d.get(k).unwrap().describe();
        assert_eq!(ty("a"), "a string");
        assert_eq!(ty("b"), "a string");
        assert_eq!(ty("c"), "a string");
        assert_eq!(ty("d"), "an integer");
    }

    #[test]
    fn aliases_expand_and_unknown_aliases_fail() {
        let (_, r) = parse("a: &x {k: v}\nb: *x\n");
        let d = &r.unwrap()[0];
        assert_eq!(d.get("b").unwrap().get("k").unwrap().as_str(), Some("v"));
        let (_, r) = parse("a: *nope\n");
        assert!(r.is_err());
    }

    /// Aliases that multiply nodes ("billion laughs") are refused; a file that simply holds
    /// more nodes than aliases may add (a large cluster snapshot) is read. The bound is made
    /// small here so the test is quick; the real one is [`MAX_NODES`].
    #[test]
    fn alias_bombs_are_refused_but_large_files_are_read() {
        let within = |text: &str| {
            let f = SourceFile::new("t.yaml", text);
            parse_documents_within(FileId(0), &f, 1000)
        };
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..5 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let e = within(&bomb).expect_err("refused");
        assert!(e.message.contains("through aliases"), "{}", e.message);

        let big = format!("[{}]\n", vec!["0"; 5000].join(","));
        match &within(&big).expect("read")[0].kind {
            NodeKind::Seq(items) => assert_eq!(items.len(), 5000),
            other => panic!("{other:?}"),
        }
    }
}
