//! Names and formats the policy API defines: protocols, ports, ICMP message names, entities,
//! Kubernetes object names and label syntax. Shared by validation now and lowering later.

/// An L4 protocol as a policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Any,
}

impl Protocol {
    /// Cilium's CRD schema enumerates `TCP`, `UDP`, `SCTP`, `ANY` (upper case); an absent protocol
    /// means ANY (pkg/policy/api/l4.go).
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ANY" => Protocol::Any,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Any => "ANY",
        }
    }

    /// Whether a rule on `self` applies to packets of `other`.
    pub fn covers(self, other: Protocol) -> bool {
        self == Protocol::Any || self == other
    }
}

/// A port as written: a number, or an IANA service name to be resolved against the peer's
/// container ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortError {
    OutOfRange(u64),
    NotAPort,
}

/// Parses a port the way Cilium does (PortProtocol.sanitize): an IANA service name first (so
/// `0x10` is a name), otherwise a decimal number up to 65535.
pub fn parse_port(s: &str) -> Result<PortRef, PortError> {
    if is_iana_service_name(s) {
        return Ok(PortRef::Name(s.to_ascii_lowercase()));
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortError::NotAPort);
    }
    match s.parse::<u64>() {
        Ok(n) if n <= 65535 => Ok(PortRef::Number(n as u16)),
        Ok(n) => Err(PortError::OutOfRange(n)),
        Err(_) => Err(PortError::OutOfRange(u64::MAX)),
    }
}

/// RFC 6335 service names as Kubernetes checks them (IsValidPortName): 1 to 15 characters,
/// letters, digits and `-`, at least one letter, no `-` at either end and no `--`.
pub fn is_iana_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_alphabetic())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IcmpFamily {
    V4,
    V6,
}

impl IcmpFamily {
    /// pkg/policy/api/icmp.go: `IPv4` (the default when empty) or `IPv6`.
    pub fn parse(s: &str) -> Option<IcmpFamily> {
        match s {
            "" | "IPv4" => Some(IcmpFamily::V4),
            "IPv6" => Some(IcmpFamily::V6),
            _ => None,
        }
    }
}

/// ICMP message names Cilium accepts for `icmps.fields.type` (pkg/policy/api/icmp.go), by family.
const ICMP_V4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMP_V6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

pub fn icmp_names(family: IcmpFamily) -> &'static [(&'static str, u8)] {
    match family {
        IcmpFamily::V4 => ICMP_V4_NAMES,
        IcmpFamily::V6 => ICMP_V6_NAMES,
    }
}

/// An ICMP type by number (0..=255) or by its name in `family`.
pub fn icmp_type(family: IcmpFamily, s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return Some(n);
    }
    icmp_names(family)
        .iter()
        .find(|(name, _)| *name == s)
        .map(|&(_, n)| n)
}

/// Entities a rule may name (pkg/policy/api/entity.go, EntitySelectorMapping).
pub const ENTITIES: &[&str] = &[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "init",
    "health",
    "unmanaged",
    "ingress",
    "none",
];

/// RFC 1123 subdomain (Kubernetes object names): lower-case alphanumerics, `-` and `.`, starting
/// and ending alphanumeric, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && !s.is_empty() && s.split('.').all(is_dns1123_label_unbounded)
}

/// RFC 1123 label (namespace names): like a subdomain part, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_dns1123_label_unbounded(s)
}

fn is_dns1123_label_unbounded(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

pub use cnpc_ir::labels::LABEL_SOURCES;

/// Why a label key is invalid, for the diagnostic.
pub fn label_key_problem(key: &str) -> Option<String> {
    let rest = match key.split_once(':') {
        Some((source, rest)) => {
            if !LABEL_SOURCES.contains(&source) {
                return Some(format!(
                    "`{source}` is not a Cilium label source (known: {})",
                    LABEL_SOURCES.join(", ")
                ));
            }
            rest
        }
        None => key,
    };
    let (prefix, name) = match rest.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, rest),
    };
    if let Some(p) = prefix {
        if !is_dns1123_subdomain(p) {
            return Some(format!(
                "the prefix `{p}` must be a lower-case DNS subdomain (like example.com)"
            ));
        }
    }
    if !is_label_name(name) {
        return Some(format!(
            "the name `{name}` must be 1 to 63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        ));
    }
    None
}

/// Label values: empty, or a label name (at most 63 characters of letters, digits, `-_.`).
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_cilium_parsing() {
        assert_eq!(parse_port("80"), Ok(PortRef::Number(80)));
        assert_eq!(parse_port("0"), Ok(PortRef::Number(0)));
        assert_eq!(parse_port("http"), Ok(PortRef::Name("http".into())));
        // IANA names win over numeric forms, as in Cilium's PortProtocol.sanitize.
        assert_eq!(parse_port("0x10"), Ok(PortRef::Name("0x10".into())));
        assert_eq!(parse_port("65536"), Err(PortError::OutOfRange(65536)));
        assert_eq!(parse_port("-1"), Err(PortError::NotAPort));
        assert_eq!(parse_port("a--b"), Err(PortError::NotAPort));
    }

    #[test]
    fn icmp_types_by_number_and_family_name() {
        assert_eq!(icmp_type(IcmpFamily::V4, "EchoRequest"), Some(8));
        assert_eq!(icmp_type(IcmpFamily::V6, "EchoRequest"), Some(128));
        assert_eq!(icmp_type(IcmpFamily::V4, "PacketTooBig"), None);
        assert_eq!(icmp_type(IcmpFamily::V4, "256"), None);
    }

    #[test]
    fn label_keys() {
        assert_eq!(label_key_problem("app"), None);
        assert_eq!(label_key_problem("k8s:io.kubernetes.pod.namespace"), None);
        assert_eq!(label_key_problem("app.kubernetes.io/name"), None);
        assert!(label_key_problem("bogus:app").is_some());
        assert!(label_key_problem("-app").is_some());
        assert!(label_key_problem("Example.com/app").is_some());
        assert!(is_label_value("v1.2_x"));
        assert!(!is_label_value("has space"));
    }
}
