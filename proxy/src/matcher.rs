//! The L7 decision: one generation's [`ProxyPolicy`] compiled into a [`CompiledPolicy`], and the
//! judgement of one HTTP request on one proxied connection.
//!
//! Semantics (Cilium's `PortRuleHTTP`, pkg/policy/api/http.go, as the reference evaluator
//! `cnpc_compiler::eval` models them, and this module must agree with it exactly):
//! - `method`, `path` and `host` are extended (RE2) regular expressions matched against the
//!   *whole* value: Cilium hands them to Envoy as `safe_regex` matchers, which match in full, so
//!   `^(?:RE)$` here, exactly as eval.rs `anchored` does. `path` is the request-target as
//!   received (`/v1/status?x=1`, query included: Envoy's `:path`), `host` the `Host` header
//!   (`:authority`); a rule with a host does not match a request without one.
//! - `headers` (and `headerMatches` without `mismatch`): each named header must be present
//!   (names compare case-insensitively); when a value is given, some occurrence must equal it
//!   exactly.
//! - A rule whose regex does not compile matches nothing (the compiler rejects such policies;
//!   a hand-written `ProxyPolicy` must still fail closed).
//! - A request passes when any HTTP rule of any rule the connection's `Proxy` verdict names
//!   matches it. Rules that are not HTTP (DNS, Kafka, `l7proto`) allow no HTTP request: cnpc
//!   enforces no other L7 protocol on this proxy, and what it cannot enforce it denies
//!   (DESIGN.md §6a, fail closed).
//!
//! Which rules apply is the datapath's question asked again with the connection's addresses
//! ([`ProxyPolicy::connection`]): the subject is the local endpoint at the source address for
//! egress, at the original destination for ingress; the peer is the ipcache identity of the
//! other side. `Allow` forwards everything, `Deny` and a missing table deny everything.

use crate::ConnContext;
use cnpc_ir::proxy::{AddressIndex, ConnectionVerdict, ProxyPolicy};
use cnpc_ir::{Direction, HttpRule, L7Rules, NumericIdentity, Origin, Protocol, Reserved, RuleRef};
use http::{HeaderMap, HeaderName};
use regex::Regex;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

/// One regex field of an HTTP rule.
#[derive(Debug)]
enum Field {
    /// Not given: matches every value (and a missing host).
    Any,
    Re(Regex),
    /// Given but not a valid regex: matches nothing.
    Invalid,
}

impl Field {
    fn compile(re: Option<&str>) -> Field {
        match re {
            None => Field::Any,
            // The same anchoring as eval.rs `anchored`.
            Some(re) => match Regex::new(&format!("^(?:{re})$")) {
                Ok(r) => Field::Re(r),
                Err(_) => Field::Invalid,
            },
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        match self {
            Field::Any => true,
            Field::Re(r) => value.is_some_and(|v| r.is_match(v)),
            Field::Invalid => false,
        }
    }
}

/// A required header: its name (`None` when the name is not a valid header name, which no
/// request can carry) and, if given, the exact value.
#[derive(Debug)]
struct HeaderTerm {
    name: Option<HeaderName>,
    value: Option<Vec<u8>>,
}

#[derive(Debug)]
struct CompiledHttp {
    method: Field,
    path: Field,
    host: Field,
    headers: Vec<HeaderTerm>,
}

impl CompiledHttp {
    fn new(rule: &HttpRule) -> CompiledHttp {
        CompiledHttp {
            method: Field::compile(rule.method.as_deref()),
            path: Field::compile(rule.path.as_deref()),
            host: Field::compile(rule.host.as_deref()),
            headers: rule
                .headers
                .iter()
                .map(|(name, value)| HeaderTerm {
                    // HeaderName lower-cases, so lookups ignore case.
                    name: HeaderName::from_bytes(name.as_bytes()).ok(),
                    value: value.as_ref().map(|v| v.as_bytes().to_vec()),
                })
                .collect(),
        }
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        self.method.matches(Some(req.method))
            && self.path.matches(Some(req.path))
            && self.host.matches(req.host)
            && self.headers.iter().all(|h| {
                let Some(name) = &h.name else { return false };
                let mut values = req.headers.get_all(name).iter();
                match &h.value {
                    None => values.next().is_some(),
                    Some(want) => values.any(|v| v.as_bytes() == want.as_slice()),
                }
            })
    }
}

/// The compiled L7 rules of one lowered rule.
#[derive(Debug)]
enum CompiledRule {
    Http(Vec<CompiledHttp>),
    /// DNS, Kafka, generic l7proto: no HTTP request passes.
    NotHttp,
}

/// The request facts a rule looks at.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request-target as received (path and query).
    pub path: &'a str,
    /// The `Host` header (or the authority of an absolute-form target), if any.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Why a request was allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    /// The table allows the connection without L7 rules.
    TableAllows,
    /// The table denies the connection.
    TableDenies,
    /// No local endpoint at the subject's address, or no table for it: fail closed.
    NoTable,
    /// An HTTP rule matched the request.
    RuleMatches,
    /// The connection is proxied and no HTTP rule matched the request.
    NoRuleMatches,
}

/// The decision on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub allowed: bool,
    pub basis: Basis,
    /// The first rule whose HTTP rules matched (for logs and events).
    pub rule: Option<Origin>,
}

/// Who is who on a connection, as the datapath would see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parties {
    /// The local endpoint whose table applies, if this node enforces on one at that address.
    pub subject: Option<NumericIdentity>,
    /// The identity of the other side.
    pub peer: NumericIdentity,
    /// The identity of the connection's original source (for the upstream socket mark).
    pub source: NumericIdentity,
}

/// One generation's policy, with every rule's regexes compiled once.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: ProxyPolicy,
    /// Behind a lock because the DNS proxy adds the addresses the loader learned while this
    /// generation is in force ([`CompiledPolicy::learn`]); every request only reads it, and a
    /// write is one hash insert, so readers hardly ever wait.
    addresses: RwLock<AddressIndex>,
    /// Compiled per rule, so every set of rules a `Proxy` verdict names shares them.
    rules: BTreeMap<RuleRef, CompiledRule>,
}

impl CompiledPolicy {
    pub fn new(policy: ProxyPolicy) -> CompiledPolicy {
        let rules = policy
            .rules
            .iter()
            .map(|(r, rule)| {
                let compiled = match &rule.l7 {
                    L7Rules::Http(http) => {
                        CompiledRule::Http(http.iter().map(CompiledHttp::new).collect())
                    }
                    L7Rules::Dns(_) | L7Rules::Other(_) => CompiledRule::NotHttp,
                };
                (*r, compiled)
            })
            .collect();
        CompiledPolicy {
            addresses: RwLock::new(AddressIndex::new(&policy)),
            policy,
            rules,
        }
    }

    pub fn generation(&self) -> u64 {
        self.policy.generation
    }

    pub fn policy(&self) -> &ProxyPolicy {
        &self.policy
    }

    /// The address lookups. A poisoned lock is used as is: a writer only ever inserts one
    /// entry, so the index is consistent whatever happened to it.
    pub fn addresses(&self) -> RwLockReadGuard<'_, AddressIndex> {
        self.addresses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an address the loader learned from a DNS answer (its [`cnpc_ir::proxy::LearnReply`]),
    /// so requests to it judged by this generation see its FQDN identity, as the datapath
    /// does once the loader wrote it. The loader puts it in the next generation's `learned`.
    pub fn learn(&self, ip: IpAddr, identity: NumericIdentity) {
        self.addresses
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .learn(ip, identity);
    }

    /// The subject, peer and source identities of a connection.
    pub fn parties(&self, ctx: &ConnContext) -> Parties {
        let addresses = self.addresses();
        let src = ctx.source.ip().to_canonical();
        let dst = ctx.original_dst.ip().to_canonical();
        let (local, remote): (IpAddr, IpAddr) = match ctx.direction {
            Direction::Egress => (src, dst),
            Direction::Ingress => (dst, src),
        };
        let subject = addresses.endpoint(local);
        let peer = match (ctx.direction, ctx.source_identity) {
            (Direction::Ingress, Some(id)) => id,
            _ => addresses.identity_of(remote),
        };
        let source = match ctx.direction {
            // The source of an egress connection is the local endpoint; one this node does not
            // enforce on still has its ipcache identity.
            Direction::Egress => subject.unwrap_or_else(|| addresses.identity_of(src)),
            Direction::Ingress => peer,
        };
        Parties {
            subject,
            peer,
            source,
        }
    }

    /// Judges one request of a connection against this generation.
    pub fn judge(&self, ctx: &ConnContext, req: &Request<'_>) -> Judgement {
        let deny = |basis| Judgement {
            allowed: false,
            basis,
            rule: None,
        };
        let parties = self.parties(ctx);
        let Some(subject) = parties.subject else {
            return deny(Basis::NoTable);
        };
        let verdict = self.policy.connection(
            ctx.direction,
            subject,
            parties.peer,
            Protocol::Tcp,
            ctx.original_dst.port(),
        );
        match verdict {
            None => deny(Basis::NoTable),
            Some(ConnectionVerdict::Deny) => deny(Basis::TableDenies),
            Some(ConnectionVerdict::Allow) => Judgement {
                allowed: true,
                basis: Basis::TableAllows,
                rule: None,
            },
            Some(ConnectionVerdict::L7(rules)) => {
                let hit = rules.iter().find(|(r, _)| match self.rules.get(r) {
                    Some(CompiledRule::Http(http)) => http.iter().any(|h| h.matches(req)),
                    Some(CompiledRule::NotHttp) | None => false,
                });
                match hit {
                    Some((_, rule)) => Judgement {
                        allowed: true,
                        basis: Basis::RuleMatches,
                        rule: Some(rule.origin.clone()),
                    },
                    None => deny(Basis::NoRuleMatches),
                }
            }
        }
    }
}

/// The identity a `FROM_*_PROXY` mark carries for `id`: it has 16 bits, which hold every
/// cluster identity; a larger one (a local CIDR identity, only ever a remote source) would be
/// truncated into some unrelated number, so it is sent as the world instead.
pub fn mark_identity(id: NumericIdentity) -> u32 {
    use cnpc_ir::proxy::contract::MARK_IDENTITY_MASK;
    if id.0 & !MARK_IDENTITY_MASK == 0 {
        id.0
    } else {
        Reserved::World.numeric().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::proxy::ProxyRule;
    use cnpc_ir::{DecisionTable, EntityRef, IdentityClass, PortRange, TableRow, TableVerdict};
    use http::HeaderValue;
    use std::net::SocketAddr;

    const SERVER: u32 = 300;
    const CLIENT: u32 = 400;

    fn origin(line: u32) -> Origin {
        Origin {
            policy: "CiliumNetworkPolicy default/p".into(),
            file: "p.yaml".into(),
            line,
        }
    }

    fn http(method: Option<&str>, path: Option<&str>, host: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            host: host.map(str::to_string),
            headers: Vec::new(),
        }
    }

    /// Ingress to SERVER (10.0.0.1) from CLIENT (10.0.0.2): port 80 proxied with `rules`,
    /// port 81 allowed, port 82 denied (the default). 10.0.0.3 has no table.
    fn policy(rules: Vec<L7Rules>) -> CompiledPolicy {
        let refs: Vec<RuleRef> = (0..rules.len()).map(RuleRef::new).collect();
        let table = DecisionTable {
            subject: NumericIdentity(SERVER),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(CLIENT)],
            }],
            rows: vec![
                TableRow {
                    class: 0,
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(80),
                    verdict: TableVerdict::Proxy(refs.clone()),
                },
                TableRow {
                    class: 0,
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(81),
                    verdict: TableVerdict::Allow,
                },
            ],
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
        CompiledPolicy::new(ProxyPolicy {
            generation: 7,
            endpoints: vec![
                (ip("10.0.0.1"), NumericIdentity(SERVER)),
                (ip("10.0.0.3"), NumericIdentity(500)),
            ],
            ipcache: vec![
                (
                    "10.0.0.1/32".parse().expect("literal"),
                    NumericIdentity(SERVER),
                ),
                (
                    "10.0.0.2/32".parse().expect("literal"),
                    NumericIdentity(CLIENT),
                ),
            ],
            tables: vec![table],
            rules: refs
                .iter()
                .zip(rules)
                .enumerate()
                .map(|(i, (r, l7))| {
                    (
                        *r,
                        ProxyRule {
                            origin: origin(i as u32 + 1),
                            l7,
                        },
                    )
                })
                .collect(),
            ..ProxyPolicy::default()
        })
    }

    fn ctx(dst: &str) -> ConnContext {
        ConnContext {
            direction: Direction::Ingress,
            source: "10.0.0.2:40000".parse().expect("literal"),
            original_dst: dst.parse::<SocketAddr>().expect("literal"),
            source_identity: None,
        }
    }

    struct Req {
        method: &'static str,
        path: &'static str,
        host: Option<&'static str>,
        headers: HeaderMap,
    }

    fn req(method: &'static str, path: &'static str) -> Req {
        Req {
            method,
            path,
            host: None,
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn host(mut self, h: &'static str) -> Req {
            self.host = Some(h);
            self
        }
        fn header(mut self, n: &'static str, v: &'static str) -> Req {
            self.headers.append(n, HeaderValue::from_static(v));
            self
        }
    }

    fn judge(p: &CompiledPolicy, dst: &str, r: &Req) -> Judgement {
        p.judge(
            &ctx(dst),
            &Request {
                method: r.method,
                path: r.path,
                host: r.host,
                headers: &r.headers,
            },
        )
    }

    fn allowed(p: &CompiledPolicy, r: &Req) -> bool {
        judge(p, "10.0.0.1:80", r).allowed
    }

    #[test]
    fn method_and_path_are_anchored_regexes() {
        let p = policy(vec![L7Rules::Http(vec![http(
            Some("GET|HEAD"),
            Some("/v1/.*"),
            None,
        )])]);
        assert!(allowed(&p, &req("GET", "/v1/status")));
        assert!(allowed(&p, &req("HEAD", "/v1/")));
        assert!(!allowed(&p, &req("POST", "/v1/status")));
        // Anchored: no partial match at either end.
        assert!(!allowed(&p, &req("GETX", "/v1/status")));
        assert!(!allowed(&p, &req("GET", "/x/v1/status")));
        // The query is part of the path.
        assert!(allowed(&p, &req("GET", "/v1/status?x=1")));
        let exact = policy(vec![L7Rules::Http(vec![http(
            None,
            Some("/v1/status"),
            None,
        )])]);
        assert!(allowed(&exact, &req("GET", "/v1/status")));
        assert!(!allowed(&exact, &req("GET", "/v1/status?x=1")));
        assert!(!allowed(&exact, &req("GET", "/v1/statu")));
        // Case matters in methods, as in Envoy's header matcher.
        assert!(!allowed(&p, &req("get", "/v1/status")));
    }

    #[test]
    fn first_matching_rule_is_reported() {
        let p = policy(vec![
            L7Rules::Http(vec![http(Some("POST"), None, None)]),
            L7Rules::Http(vec![http(None, Some("/a"), None)]),
            L7Rules::Http(vec![http(Some("GET"), None, None)]),
        ]);
        let j = judge(&p, "10.0.0.1:80", &req("GET", "/a"));
        assert_eq!(j.basis, Basis::RuleMatches);
        assert_eq!(j.rule, Some(origin(2)));
        let j = judge(&p, "10.0.0.1:80", &req("GET", "/b"));
        assert_eq!(j.rule, Some(origin(3)));
        let j = judge(&p, "10.0.0.1:80", &req("PUT", "/b"));
        assert_eq!(
            (j.allowed, j.basis, j.rule),
            (false, Basis::NoRuleMatches, None)
        );
    }

    #[test]
    fn host_must_be_present_when_a_rule_names_one() {
        let p = policy(vec![L7Rules::Http(vec![http(
            None,
            None,
            Some(r"deathstar(\.default)?(:80)?"),
        )])]);
        assert!(allowed(&p, &req("GET", "/").host("deathstar")));
        assert!(allowed(&p, &req("GET", "/").host("deathstar.default:80")));
        assert!(!allowed(&p, &req("GET", "/").host("deathstar.evil")));
        assert!(!allowed(&p, &req("GET", "/")));
        // Without a host term, a missing Host is fine.
        let any = policy(vec![L7Rules::Http(vec![http(Some("GET"), None, None)])]);
        assert!(allowed(&any, &req("GET", "/")));
    }

    #[test]
    fn headers_need_presence_or_the_exact_value() {
        let mut rule = http(None, None, None);
        rule.headers = vec![
            ("X-Token".into(), Some("secret".into())),
            ("x-present".into(), None),
        ];
        let p = policy(vec![L7Rules::Http(vec![rule])]);
        let r = || req("GET", "/");
        assert!(allowed(
            &p,
            &r().header("x-token", "secret").header("x-present", "")
        ));
        assert!(allowed(
            &p,
            &r().header("x-token", "other")
                .header("x-token", "secret")
                .header("x-present", "1")
        ));
        assert!(!allowed(&p, &r().header("x-token", "secret")));
        assert!(!allowed(&p, &r().header("x-present", "1")));
        assert!(!allowed(
            &p,
            &r().header("x-token", "Secret").header("x-present", "1")
        ));
        assert!(!allowed(
            &p,
            &r().header("x-token", "secret2").header("x-present", "1")
        ));
        // A header name no request can carry matches nothing.
        let mut bad = http(None, None, None);
        bad.headers = vec![("bad name".into(), None)];
        let p = policy(vec![L7Rules::Http(vec![bad])]);
        assert!(!allowed(&p, &r().header("x-present", "1")));
    }

    #[test]
    fn any_http_rule_of_any_rule_allows() {
        let p = policy(vec![
            L7Rules::Http(vec![
                http(Some("POST"), Some("/land"), None),
                http(Some("GET"), Some("/status"), None),
            ]),
            L7Rules::Http(vec![http(Some("PUT"), None, None)]),
        ]);
        assert!(allowed(&p, &req("POST", "/land")));
        assert!(allowed(&p, &req("GET", "/status")));
        assert!(allowed(&p, &req("PUT", "/anything")));
        assert!(!allowed(&p, &req("POST", "/status")));
        // An empty rule matches everything; an empty list nothing.
        let all = policy(vec![L7Rules::Http(vec![http(None, None, None)])]);
        assert!(allowed(&all, &req("DELETE", "/x")));
        let none = policy(vec![L7Rules::Http(vec![])]);
        assert!(!allowed(&none, &req("GET", "/")));
    }

    #[test]
    fn an_invalid_regex_matches_nothing() {
        let p = policy(vec![
            L7Rules::Http(vec![http(Some("GET"), Some("/v1/(unclosed"), None)]),
            L7Rules::Http(vec![http(Some("(POST"), None, None)]),
        ]);
        assert!(!allowed(&p, &req("GET", "/v1/(unclosed")));
        assert!(!allowed(&p, &req("POST", "/")));
        let host = policy(vec![L7Rules::Http(vec![http(None, None, Some("[a-"))])]);
        assert!(!allowed(&host, &req("GET", "/").host("[a-")));
    }

    #[test]
    fn dns_and_other_rules_allow_no_http_request() {
        let p = policy(vec![
            L7Rules::Dns(vec![cnpc_ir::DnsMatcher::pattern("*")]),
            L7Rules::Other("kafka".into()),
        ]);
        let j = judge(&p, "10.0.0.1:80", &req("GET", "/"));
        assert_eq!((j.allowed, j.basis), (false, Basis::NoRuleMatches));
        // Alongside an HTTP rule, the HTTP rule still decides.
        let p = policy(vec![
            L7Rules::Other("kafka".into()),
            L7Rules::Http(vec![http(Some("GET"), None, None)]),
        ]);
        assert_eq!(
            judge(&p, "10.0.0.1:80", &req("GET", "/")).rule,
            Some(origin(2))
        );
    }

    #[test]
    fn allow_deny_and_missing_tables() {
        let p = policy(vec![L7Rules::Http(vec![])]);
        let r = req("GET", "/");
        let j = judge(&p, "10.0.0.1:81", &r);
        assert_eq!((j.allowed, j.basis), (true, Basis::TableAllows));
        let j = judge(&p, "10.0.0.1:82", &r);
        assert_eq!((j.allowed, j.basis), (false, Basis::TableDenies));
        // A local endpoint without a table, and an address that is no local endpoint.
        let j = judge(&p, "10.0.0.3:80", &r);
        assert_eq!((j.allowed, j.basis), (false, Basis::NoTable));
        let j = judge(&p, "10.9.9.9:80", &r);
        assert_eq!((j.allowed, j.basis), (false, Basis::NoTable));
        // The egress side of SERVER has no table either.
        let egress = ConnContext {
            direction: Direction::Egress,
            source: "10.0.0.1:40000".parse().expect("literal"),
            original_dst: "10.0.0.2:81".parse().expect("literal"),
            source_identity: None,
        };
        let j = p.judge(
            &egress,
            &Request {
                method: "GET",
                path: "/",
                host: None,
                headers: &HeaderMap::new(),
            },
        );
        assert_eq!((j.allowed, j.basis), (false, Basis::NoTable));
    }

    #[test]
    fn parties_follow_the_direction_and_mapped_addresses() {
        let p = policy(vec![]);
        let c = ctx("[::ffff:10.0.0.1]:80");
        let parties = p.parties(&c);
        assert_eq!(parties.subject, Some(NumericIdentity(SERVER)));
        assert_eq!(parties.peer, NumericIdentity(CLIENT));
        assert_eq!(parties.source, NumericIdentity(CLIENT));
        assert_eq!(p.generation(), 7);
        // An unknown address is the world.
        let c = ConnContext {
            source: "192.0.2.1:1".parse().expect("literal"),
            ..ctx("10.0.0.1:80")
        };
        assert_eq!(p.parties(&c).peer, Reserved::World.numeric());
        // On the ingress path the identity from the socket's mark wins over the address (a
        // connection an egress proxy opened comes from the node).
        let c = ConnContext {
            source_identity: Some(NumericIdentity(CLIENT)),
            ..c
        };
        assert_eq!(p.parties(&c).peer, NumericIdentity(CLIENT));
    }

    #[test]
    fn marks_carry_16_bit_identities_only() {
        assert_eq!(mark_identity(NumericIdentity(300)), 300);
        assert_eq!(mark_identity(NumericIdentity(65535)), 65535);
        assert_eq!(mark_identity(NumericIdentity(16_777_217)), 2);
    }
}
