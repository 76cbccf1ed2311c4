//! DNS messages as the DNS proxy reads and writes them (hickory-proto): which queries it
//! accepts, the answers it makes itself, and what it learns from an upstream's answer.
//!
//! Semantics follow Cilium's DNS proxy (pkg/fqdn/dnsproxy/proxy.go):
//! - a query is judged on its one question's name, lower case (`ExtractMsgDetails` lowercases
//!   `Question[0].Name`); the trailing dot is dropped here, as `DnsMatcher` ignores it;
//! - a refused query gets `REFUSED` (Cilium's default `rejectReply`) with the query's id and
//!   question; a query the proxy could not forward gets `SERVFAIL` (`sendErrorResponse`);
//! - the upstream sees the query with a fresh id, and the pod gets the answer with its own id
//!   back ("Ensure the ID matches the initial request");
//! - the addresses learned are the A/AAAA records reached from the question's name through
//!   the answer section's CNAME chain (`ExtractMsgDetails` follows the chain the same way);
//!   records for other names are ignored here rather than failing the answer.
//!
//! Where Cilium's server library (miekg/dns, `DefaultMsgAcceptFunc`) answers a message that is
//! not one standard query with `FORMERR` or `NOTIMP`, this proxy drops it unanswered and
//! counts it ([`Malformed`]): no input it cannot judge makes it talk to anyone.

use cnpc_ir::proxy::LearnedAddress;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData};
use std::fmt::Write as _;

/// Why a message is not a query the proxy handles.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("not a DNS message: {0}")]
    Unparseable(String),
    #[error("a response, not a query")]
    Response,
    #[error("{0} questions; a query must have exactly one")]
    Questions(usize),
    #[error("opcode {0} is not QUERY")]
    Opcode(String),
}

/// A query the proxy accepted.
#[derive(Clone, Debug)]
pub struct ParsedQuery {
    pub id: u16,
    /// The question's name as the rules see it: lower case, no trailing dot.
    pub name: String,
    pub question: Query,
    pub recursion_desired: bool,
}

impl ParsedQuery {
    /// The question's type as DNS tools print it (`A`, `AAAA`, `TXT`).
    pub fn qtype(&self) -> String {
        self.question.query_type().to_string()
    }
}

/// Parses a query: one question, opcode QUERY, not a response.
pub fn parse_query(bytes: &[u8]) -> Result<ParsedQuery, Malformed> {
    let msg = Message::from_vec(bytes).map_err(|e| Malformed::Unparseable(e.to_string()))?;
    if msg.metadata.message_type != MessageType::Query {
        return Err(Malformed::Response);
    }
    if msg.metadata.op_code != OpCode::Query {
        return Err(Malformed::Opcode(format!("{:?}", msg.metadata.op_code)));
    }
    let [question] =
        <[Query; 1]>::try_from(msg.queries).map_err(|q| Malformed::Questions(q.len()))?;
    Ok(ParsedQuery {
        id: msg.metadata.id,
        name: rule_name(question.name()),
        question,
        recursion_desired: msg.metadata.recursion_desired,
    })
}

/// A name in presentation form for the rules: labels lower-cased and joined by dots, no
/// trailing dot. Bytes outside letters, digits, `-`, `_` and `*` are written `\DDD` (RFC 1035
/// §5.1), so a label holding a dot can never pass for two labels.
pub fn rule_name(name: &Name) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            let c = b.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'*') {
                out.push(char::from(c));
            } else {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out
}

/// An answer the proxy makes itself: `rcode`, the query's id, flags and question, no records.
pub fn error_answer(query: &ParsedQuery, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut msg = Message::error_msg(query.id, OpCode::Query, rcode);
    msg.metadata.recursion_desired = query.recursion_desired;
    msg.add_query(query.question.clone());
    msg.to_vec().ok()
}

/// `bytes` with its message id replaced (the first two bytes of the header).
pub fn set_id(bytes: &mut [u8], id: u16) {
    if let Some(head) = bytes.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// An upstream answer that belongs to the query sent.
#[derive(Clone, Debug)]
pub struct UpstreamAnswer {
    pub rcode: ResponseCode,
    pub message: Message,
}

/// Parses `bytes` as the answer to `question` sent with `id`: a response with that id and the
/// same question (name compared without case). `None` for anything else: a stray or spoofed
/// datagram, which the proxy ignores while it waits for the real answer.
pub fn match_answer(bytes: &[u8], id: u16, question: &Query) -> Option<UpstreamAnswer> {
    let message = Message::from_vec(bytes).ok()?;
    let m = &message.metadata;
    if m.message_type != MessageType::Response || m.id != id {
        return None;
    }
    match message.queries.as_slice() {
        [q] if q.name() == question.name()
            && q.query_type() == question.query_type()
            && q.query_class() == question.query_class() => {}
        _ => return None,
    }
    Some(UpstreamAnswer {
        rcode: message.metadata.response_code,
        message,
    })
}

/// At most this many CNAME steps are followed from the question's name; a longer chain (or a
/// loop) stops there. Resolvers give up far earlier (BIND: 16 restarts).
pub const MAX_CNAME_CHAIN: usize = 16;

/// The A/AAAA addresses (with TTLs) of the answer section that belong to `qname` or a name its
/// CNAME chain reaches; records for other names are ignored. An address lives no longer than
/// the chain that leads to it: its TTL is capped by the lowest CNAME TTL on the way, as Cilium
/// takes the lowest TTL of the answer's records (pkg/fqdn/dnsproxy, `ExtractMsgDetails`).
pub fn chain_addresses(message: &Message, qname: &Name) -> Vec<LearnedAddress> {
    let mut names: Vec<&Name> = vec![qname];
    let mut chain_ttl = u32::MAX;
    for _ in 0..MAX_CNAME_CHAIN {
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if names.contains(&&r.name) && !names.contains(&&target.0) => {
                Some((&target.0, r.ttl))
            }
            _ => None,
        });
        match next {
            Some((n, ttl)) => {
                names.push(n);
                chain_ttl = chain_ttl.min(ttl);
            }
            None => break,
        }
    }
    let mut out: Vec<LearnedAddress> = Vec::new();
    for r in &message.answers {
        if !names.contains(&&r.name) {
            continue;
        }
        let ip = match &r.data {
            RData::A(a) => std::net::IpAddr::V4(a.0),
            RData::AAAA(a) => std::net::IpAddr::V6(a.0),
            _ => continue,
        };
        let ttl = r.ttl.min(chain_ttl);
        match out.iter_mut().find(|l| l.ip == ip) {
            // The same address twice: keep the longer TTL.
            Some(l) => l.ttl = l.ttl.max(ttl),
            None => out.push(LearnedAddress { ip, ttl }),
        }
    }
    out
}

/// The mnemonic of a response code (`NOERROR`, `NXDOMAIN`, ...), as dig prints it.
pub fn rcode_name(rcode: ResponseCode) -> String {
    let n = u16::from(rcode);
    let name = match n {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        _ => return format!("RCODE{n}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Record, RecordType};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("valid name")
    }

    fn query(n: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(n), t));
        m.to_vec().expect("encodable")
    }

    #[test]
    fn a_query_is_read_with_its_rule_name() {
        let q = parse_query(&query("API.Cilium.IO.", RecordType::AAAA)).expect("a query");
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype()),
            (0x1234, "api.cilium.io", "AAAA".into())
        );
        assert!(q.recursion_desired);
    }

    #[test]
    fn odd_bytes_are_escaped_so_no_label_passes_for_two() {
        let n = Name::from_labels(vec![b"a.b".to_vec(), b"com".to_vec()]).expect("valid");
        assert_eq!(rule_name(&n), "a\\046b.com");
        assert_eq!(rule_name(&Name::root()), "");
        assert_eq!(rule_name(&name("_srv._tcp.x-y.*.io")), "_srv._tcp.x-y.*.io");
    }

    #[test]
    fn malformed_messages_are_told_apart() {
        assert_eq!(
            parse_query(&[1, 2, 3])
                .err()
                .map(|e| matches!(e, Malformed::Unparseable(_))),
            Some(true)
        );
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name("a."), RecordType::A));
        assert_eq!(
            parse_query(&m.to_vec().expect("encodable")).err(),
            Some(Malformed::Response)
        );
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        assert_eq!(
            parse_query(&m.to_vec().expect("encodable")).err(),
            Some(Malformed::Questions(0))
        );
        m.add_query(Query::query(name("a."), RecordType::A));
        m.add_query(Query::query(name("b."), RecordType::A));
        assert_eq!(
            parse_query(&m.to_vec().expect("encodable")).err(),
            Some(Malformed::Questions(2))
        );
        let mut m = Message::new(1, MessageType::Query, OpCode::Update);
        m.add_query(Query::query(name("a."), RecordType::A));
        assert!(matches!(
            parse_query(&m.to_vec().expect("encodable")),
            Err(Malformed::Opcode(_))
        ));
    }

    #[test]
    fn a_refusal_keeps_id_and_question() {
        let q = parse_query(&query("x.io.", RecordType::A)).expect("a query");
        let r = Message::from_vec(&error_answer(&q, ResponseCode::Refused).expect("encodable"))
            .expect("parseable");
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.metadata.recursion_desired);
        assert_eq!(r.queries, vec![q.question]);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn the_cname_chain_is_followed_and_other_names_ignored() {
        let q = name("www.example.com.");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(q.clone(), RecordType::A));
        let rec = |n: &str, ttl, d| Record::from_rdata(name(n), ttl, d);
        m.add_answer(rec(
            "www.example.com.",
            300,
            RData::CNAME(CNAME(name("Edge.CDN.net."))),
        ));
        m.add_answer(rec(
            "edge.cdn.net.",
            60,
            RData::CNAME(CNAME(name("e1.cdn.net."))),
        ));
        m.add_answer(rec(
            "e1.cdn.net.",
            30,
            RData::A(A("192.0.2.1".parse().expect("literal"))),
        ));
        m.add_answer(rec(
            "e1.cdn.net.",
            40,
            RData::AAAA(AAAA("2001:db8::1".parse().expect("literal"))),
        ));
        m.add_answer(rec(
            "evil.net.",
            30,
            RData::A(A("198.51.100.1".parse().expect("literal"))),
        ));
        // A loop back to the start must not run forever.
        m.add_answer(rec(
            "e1.cdn.net.",
            30,
            RData::CNAME(CNAME(name("www.example.com."))),
        ));
        let got = chain_addresses(&m, &q);
        let ips: Vec<String> = got.iter().map(|l| format!("{}/{}", l.ip, l.ttl)).collect();
        assert_eq!(ips, ["192.0.2.1/30", "2001:db8::1/40"]);
        // Bytes of the answer parse back to the same addresses.
        let bytes = m.to_vec().expect("encodable");
        let a = match_answer(&bytes, 7, &Query::query(q.clone(), RecordType::A)).expect("matches");
        assert_eq!(chain_addresses(&a.message, &q).len(), 2);
        assert!(match_answer(&bytes, 8, &Query::query(q.clone(), RecordType::A)).is_none());
        assert!(match_answer(&bytes, 7, &Query::query(q, RecordType::AAAA)).is_none());
    }

    #[test]
    fn an_address_lives_no_longer_than_its_cname_chain() {
        let q = name("www.example.com.");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(q.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name("www.example.com."),
            5,
            RData::CNAME(CNAME(name("edge.cdn.net."))),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.cdn.net."),
            3600,
            RData::A(A("192.0.2.1".parse().expect("literal"))),
        ));
        let got = chain_addresses(&m, &q);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].ttl, 5, "the CNAME's 5 s, not the address's hour");
    }

    #[test]
    fn an_overlong_chain_stops() {
        let q = name("c0.example.");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        for i in 0..40 {
            let from = name(&format!("c{i}.example."));
            let to = name(&format!("c{}.example.", i + 1));
            m.add_answer(Record::from_rdata(from, 10, RData::CNAME(CNAME(to))));
        }
        m.add_answer(Record::from_rdata(
            name("c40.example."),
            10,
            RData::A(A("192.0.2.9".parse().expect("literal"))),
        ));
        m.add_answer(Record::from_rdata(
            name("c3.example."),
            10,
            RData::A(A("192.0.2.3".parse().expect("literal"))),
        ));
        let got = chain_addresses(&m, &q);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].ip.to_string(), "192.0.2.3");
    }

    #[test]
    fn ids_are_replaced_in_place() {
        let mut b = query("x.io.", RecordType::A);
        set_id(&mut b, 0xbeef);
        assert_eq!(parse_query(&b).expect("a query").id, 0xbeef);
        set_id(&mut [0u8; 1], 1);
    }

    #[test]
    fn rcode_names_are_digs() {
        assert_eq!(rcode_name(ResponseCode::NoError), "NOERROR");
        assert_eq!(rcode_name(ResponseCode::Refused), "REFUSED");
        assert_eq!(rcode_name(ResponseCode::NXDomain), "NXDOMAIN");
        assert_eq!(rcode_name(ResponseCode::Unknown(3000)), "RCODE3000");
    }
}
