//! Diagnostics: every problem the front end finds, with a stable code, a place and a fix.
//!
//! Codes are part of cnpc's contract (JSON and SARIF consumers key on them): add new ones, never
//! rename. Each code has one severity; `--deny-warnings` is how a user makes warnings fatal.

use crate::source::{SourceMap, Span};
use miette::{LabeledSpan, NamedSource, SourceSpan};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

macro_rules! codes {
    ($( $variant:ident = $code:literal, $sev:ident, $summary:literal; )*) => {
        /// The kind of a diagnostic. The string form (`cnpc::…`) is stable.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code { $( $variant, )* }

        impl Code {
            pub const ALL: &'static [Code] = &[ $( Code::$variant, )* ];

            pub fn as_str(self) -> &'static str {
                match self { $( Code::$variant => concat!("cnpc::", $code), )* }
            }

            pub fn severity(self) -> Severity {
                match self { $( Code::$variant => Severity::$sev, )* }
            }

            /// One line saying what this kind of problem is (SARIF rule description).
            pub fn summary(self) -> &'static str {
                match self { $( Code::$variant => $summary, )* }
            }
        }
    };
}

codes! {
    YamlSyntax = "yaml-syntax", Error, "The file is not well-formed YAML or JSON.";
    NotAnObject = "not-an-object", Error, "A document is not a Kubernetes object.";
    UnknownField = "unknown-field", Error, "A field that the policy API does not have; the API server would silently drop it.";
    IgnoredField = "ignored-field", Warning, "A field outside the policy spec that the API server drops; it has no effect on enforcement.";
    DuplicateKey = "duplicate-key", Error, "The same key appears twice in one mapping; only one of them would take effect.";
    WrongType = "wrong-type", Error, "A value of the wrong type.";
    MissingField = "missing-field", Error, "A required field is missing.";
    KindTypo = "kind-typo", Error, "An object of a policy API group whose kind is a near miss of a policy kind; the API server rejects it and the policy never applies.";
    UnsupportedApiVersion = "api-version", Error, "A policy kind with an apiVersion cnpc does not know.";
    InvalidName = "invalid-name", Error, "An object name or namespace that Kubernetes would reject.";
    DuplicateName = "duplicate-name", Error, "Two policies of the same kind share a name in one namespace of one file; one would replace the other.";
    NameClash = "name-clash", Warning, "Policies in different files share kind, namespace and name; applying the files together keeps only the last.";
    SelectorConflict = "selector-conflict", Error, "A rule needs exactly one of endpointSelector and nodeSelector.";
    InvalidOperator = "invalid-operator", Error, "A matchExpressions operator other than In, NotIn, Exists, DoesNotExist.";
    InvalidValues = "invalid-values", Error, "matchExpressions values given where none are allowed, or missing where required.";
    InvalidLabelKey = "invalid-label-key", Error, "A label key Kubernetes would reject.";
    InvalidLabelValue = "invalid-label-value", Error, "A label value Kubernetes would reject.";
    InvalidPort = "invalid-port", Error, "A port that is not a number in 0..65535 or a valid port name.";
    InvalidPortRange = "invalid-port-range", Error, "An endPort below its port, or a range on a named port.";
    TooManyPorts = "too-many-ports", Error, "More ports or ICMP types in one rule than Cilium accepts (40).";
    UnknownProtocol = "unknown-protocol", Error, "A protocol other than TCP, UDP, SCTP or ANY.";
    InvalidCidr = "invalid-cidr", Error, "A CIDR or address that does not parse.";
    ExceptOutsideCidr = "except-outside-cidr", Error, "An except range that is not inside its CIDR.";
    UnknownEntity = "unknown-entity", Error, "An entity name Cilium does not define.";
    InvalidIcmp = "invalid-icmp", Error, "An ICMP type or family Cilium does not accept.";
    InvalidRegex = "invalid-regex", Error, "An HTTP method, path or host pattern that is not a valid regular expression.";
    InvalidHeader = "invalid-header", Error, "An HTTP header match that is malformed.";
    InvalidDnsName = "invalid-dns-name", Error, "A DNS name or pattern with characters DNS names cannot have.";
    L7Protocol = "l7-protocol", Error, "L7 rules on a protocol, port or direction that cannot carry them.";
    UnsupportedCombination = "unsupported-combination", Error, "Fields in one rule that Cilium refuses to combine.";
    NeverMatches = "never-matches", Warning, "A rule or selector that can never match anything.";
    EmptySection = "empty-section", Warning, "A rule section that is null or empty, which Cilium treats as absent.";
    FqdnWithoutDns = "fqdn-without-dns", Warning, "toFQDNs without a DNS rule that lets Cilium see the lookups, so no address is ever learned.";
    CidrMeansWorld = "cidr-means-world", Warning, "0.0.0.0/0 or ::/0 where the world entity is probably meant.";
    SelectsNothing = "selects-nothing", Warning, "A policy whose selector matches no workload in the cluster snapshot.";
    DenyShadowsAllow = "deny-shadows-allow", Warning, "A deny rule covers an allow rule completely, so the allow can never take effect.";
    ReleaseDependent = "release-dependent", Warning, "A rule current Cilium accepts that older Cilium releases rejected or enforced differently.";
    NotEnforced = "not-enforced", Warning, "L7 rules of a kind cnpc-loader cannot enforce (Kafka, l7proto): traffic they would allow is dropped on a node.";
    NamespaceOverridden = "namespace-overridden", Warning, "A namespaced policy's endpointSelector names another namespace; Cilium selects in the policy's own namespace instead.";
    SuspiciousLabelKey = "suspicious-label-key", Warning, "A label key that looks like a misspelt Cilium or Kubernetes key.";
    RemovedField = "removed-field", Error, "A field current Cilium no longer accepts (its CRD allows no items), though older releases did.";
    NoRules = "no-rules", Warning, "A rule without ingress, ingressDeny, egress or egressDeny rules: it does nothing, and Cilium 1.17 and later reject the whole policy.";
    CidrHostBits = "cidr-host-bits", Warning, "A CIDR with address bits set after its prefix length; it is accepted and means the whole prefix.";
    UnsubstitutedVariable = "unsubstituted-variable", Error, "A Flux post-build substitution variable (`${NAME}`) with no value: Flux would substitute it before applying, cnpc needs the value to check the policy.";
    InvalidExpectation = "invalid-expectation", Error, "An entry of a `cnpc test` expectations file that is malformed or names something the cluster snapshot does not have.";
    ExpectationFailed = "expectation-failed", Error, "A `cnpc test` case whose verdict is not the expected one.";
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem found in the input.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    /// Where it is. Every diagnostic has one: the checker never reports a problem without a place.
    pub span: Span,
    /// Short text shown beside the span.
    pub label: String,
    /// How to fix it.
    pub help: String,
    /// Other places that explain the problem (the first definition of a duplicate, say).
    pub related: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn new(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            message: message.into(),
            span,
            label: String::new(),
            help: String::new(),
            related: Vec::new(),
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = help.into();
        self
    }

    pub fn related(mut self, span: Span, text: impl Into<String>) -> Diagnostic {
        self.related.push((span, text.into()));
        self
    }

    pub fn severity(&self) -> Severity {
        self.code.severity()
    }

    /// This diagnostic as a miette report over its source text, for graphical rendering.
    pub fn to_report(&self, sources: &SourceMap) -> Report {
        let file = sources.get(self.span.file);
        let mut labels = vec![LabeledSpan::new_primary_with_span(
            Some(self.label.clone()).filter(|l| !l.is_empty()),
            source_span(self.span),
        )];
        for (span, text) in &self.related {
            if span.file == self.span.file {
                labels.push(LabeledSpan::new_with_span(
                    Some(text.clone()),
                    source_span(*span),
                ));
            }
        }
        Report {
            diagnostic: self.clone(),
            source: NamedSource::new(file.path.display().to_string(), file.text.to_string()),
            labels,
        }
    }
}

fn source_span(span: Span) -> SourceSpan {
    SourceSpan::new((span.start as usize).into(), span.len())
}

/// A [`Diagnostic`] joined with its source, implementing [`miette::Diagnostic`].
#[derive(Debug)]
pub struct Report {
    diagnostic: Diagnostic,
    source: NamedSource<String>,
    labels: Vec<LabeledSpan>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostic.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.diagnostic.code))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diagnostic.severity() {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        (!self.diagnostic.help.is_empty())
            .then(|| Box::new(&self.diagnostic.help) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            let score = if c.eq_ignore_ascii_case(word) {
                1.0
            } else {
                strsim::jaro_winkler(&lower, &c.to_ascii_lowercase())
            };
            (score, c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(c.as_str().starts_with("cnpc::"));
            assert!(seen.insert(c.as_str()), "duplicate code {c}");
        }
    }

    #[test]
    fn did_you_mean_finds_case_and_typo_neighbours() {
        let fields = ["http", "kafka", "dns", "l7proto", "l7"];
        assert_eq!(did_you_mean("HTTP", fields), Some("http"));
        assert_eq!(did_you_mean("kafak", fields), Some("kafka"));
        assert_eq!(did_you_mean("zzzzzz", fields), None);
        let rule = ["toEndpoints", "toPorts", "authentication"];
        assert_eq!(did_you_mean("auth", rule), Some("authentication"));
        assert_eq!(did_you_mean("toEndpoint", rule), Some("toEndpoints"));
    }
}
