//! The DNS decision: may this pod ask this server this name? A pure function of one
//! generation, which must agree with the reference evaluator (`cnpc_compiler::eval`, the
//! `dns_query` branch) exactly; tests/dns_differential.rs checks that it does.
//!
//! As Cilium's DNS proxy decides (pkg/fqdn/dnsproxy/proxy.go `ServeDNS` → `CheckAllowed`):
//! the endpoint is found by the query's source address (none: refused, fail closed), the
//! server's identity by its address in the ipcache (a miss is the world), and the decision
//! table of (endpoint, egress) is asked for (server identity, protocol, port), exactly as the
//! datapath asked it when it handed the datagram over. `Deny` or no table: refused. `Allow`:
//! forwarded (a flow the table no longer proxies). `Proxy`: allowed when a DNS rule of the
//! row has a matcher for the name (pkg/fqdn/matchpattern: `*` within one label, a lone `*`
//! matches every name, no case, trailing dot ignored: `DnsMatcher::matches`). Rules of other
//! L7 kinds (HTTP, Kafka) allow no DNS query: what cnpc cannot enforce, it refuses.

use crate::matcher::CompiledPolicy;
use crate::ConnContext;
use cnpc_ir::proxy::ConnectionVerdict;
use cnpc_ir::{Direction, L7Rules, NumericIdentity, Origin, Protocol};
use std::net::{IpAddr, SocketAddr};

/// Why a query was allowed or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsBasis {
    /// No local endpoint at the source address.
    NoEndpoint,
    /// No decision table for the endpoint.
    NoTable,
    TableDenies,
    /// The table allows the flow without L7 rules.
    TableAllows,
    /// A DNS matcher of a rule matched the name.
    RuleMatches,
    /// The flow is proxied and no DNS matcher matched the name.
    NoRuleMatches,
}

/// The decision on one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsJudgement {
    pub allowed: bool,
    pub basis: DnsBasis,
    /// The first rule whose DNS matchers allowed the name (for events).
    pub rule: Option<Origin>,
    /// The identity the upstream query is marked with: the endpoint's, or the source's
    /// ipcache identity when no endpoint is there (the query is refused then anyway).
    pub source: NumericIdentity,
}

/// Judges a query for `name` from `source` to the server at `original_dst` over `protocol`.
pub fn judge_query(
    policy: &CompiledPolicy,
    source: IpAddr,
    original_dst: SocketAddr,
    protocol: Protocol,
    name: &str,
) -> DnsJudgement {
    let source = source.to_canonical();
    let (subject, peer, source_identity) = {
        let addresses = policy.addresses();
        let subject = addresses.endpoint(source);
        let peer = addresses.identity_of(original_dst.ip().to_canonical());
        let source_identity = subject.unwrap_or_else(|| addresses.identity_of(source));
        (subject, peer, source_identity)
    };
    let judgement = |allowed, basis, rule| DnsJudgement {
        allowed,
        basis,
        rule,
        source: source_identity,
    };
    let Some(subject) = subject else {
        return judgement(false, DnsBasis::NoEndpoint, None);
    };
    let verdict = policy.policy().connection(
        Direction::Egress,
        subject,
        peer,
        protocol,
        original_dst.port(),
    );
    match verdict {
        None => judgement(false, DnsBasis::NoTable, None),
        Some(ConnectionVerdict::Deny) => judgement(false, DnsBasis::TableDenies, None),
        Some(ConnectionVerdict::Allow) => judgement(true, DnsBasis::TableAllows, None),
        Some(ConnectionVerdict::L7(rules)) => {
            let hit = rules.iter().find(|(_, rule)| match &rule.l7 {
                L7Rules::Dns(matchers) => matchers.iter().any(|m| m.matches(name)),
                L7Rules::Http(_) | L7Rules::Other(_) => false,
            });
            match hit {
                Some((_, rule)) => {
                    judgement(true, DnsBasis::RuleMatches, Some(rule.origin.clone()))
                }
                None => judgement(false, DnsBasis::NoRuleMatches, None),
            }
        }
    }
}

/// Whether a TCP connection the egress listener accepted carries DNS: its table row proxies
/// it for a rule with DNS matchers. Decided once per connection (a stream cannot change
/// protocol); every query on it is still judged against the generation current then.
pub fn is_dns_connection(policy: &CompiledPolicy, ctx: &ConnContext) -> bool {
    if ctx.direction != Direction::Egress {
        return false;
    }
    let (subject, peer) = {
        let addresses = policy.addresses();
        (
            addresses.endpoint(ctx.source.ip().to_canonical()),
            addresses.identity_of(ctx.original_dst.ip().to_canonical()),
        )
    };
    let Some(subject) = subject else {
        return false;
    };
    match policy.policy().connection(
        Direction::Egress,
        subject,
        peer,
        Protocol::Tcp,
        ctx.original_dst.port(),
    ) {
        Some(ConnectionVerdict::L7(rules)) => {
            rules.iter().any(|(_, r)| matches!(r.l7, L7Rules::Dns(_)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnpc_ir::proxy::{ProxyPolicy, ProxyRule};
    use cnpc_ir::{
        DecisionTable, DnsMatcher, EntityRef, HttpRule, IdentityClass, PortRange, RuleRef,
        TableRow, TableVerdict,
    };

    const POD: u32 = 300;
    const DNS: u32 = 500;
    const OTHER: u32 = 600;

    fn origin(line: u32) -> Origin {
        Origin {
            policy: "CiliumNetworkPolicy default/dns".into(),
            file: "dns.yaml".into(),
            line,
        }
    }

    /// POD (10.0.0.1) egress: to DNS (10.0.0.53) UDP/TCP 53 proxied by rule 0 (DNS
    /// matchers) and rule 1 (HTTP); UDP 54 allowed; to OTHER (10.0.0.99) UDP 53 proxied by
    /// rule 1 only; everything else denied.
    fn policy(matchers: Vec<DnsMatcher>) -> CompiledPolicy {
        let (r0, r1) = (RuleRef::new(0), RuleRef::new(1));
        let row = |class, protocol, port, verdict| TableRow {
            class,
            protocol,
            ports: PortRange::single(port),
            verdict,
        };
        let both = TableVerdict::Proxy(vec![r0, r1]);
        let table = DecisionTable {
            subject: NumericIdentity(POD),
            direction: Direction::Egress,
            default: TableVerdict::Deny,
            classes: vec![
                IdentityClass {
                    members: vec![NumericIdentity(DNS)],
                },
                IdentityClass {
                    members: vec![NumericIdentity(OTHER)],
                },
            ],
            rows: vec![
                row(0, Protocol::Udp, 53, both.clone()),
                row(0, Protocol::Tcp, 53, both),
                row(0, Protocol::Udp, 54, TableVerdict::Allow),
                row(1, Protocol::Udp, 53, TableVerdict::Proxy(vec![r1])),
            ],
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
        let net = |s: &str| s.parse().expect("literal");
        CompiledPolicy::new(ProxyPolicy {
            generation: 4,
            endpoints: vec![(ip("10.0.0.1"), NumericIdentity(POD))],
            ipcache: vec![
                (net("10.0.0.1/32"), NumericIdentity(POD)),
                (net("10.0.0.53/32"), NumericIdentity(DNS)),
                (net("10.0.0.99/32"), NumericIdentity(OTHER)),
            ],
            tables: vec![table],
            rules: [
                (
                    r0,
                    ProxyRule {
                        origin: origin(7),
                        l7: L7Rules::Dns(matchers),
                    },
                ),
                (
                    r1,
                    ProxyRule {
                        origin: origin(9),
                        l7: L7Rules::Http(vec![HttpRule {
                            method: None,
                            path: None,
                            host: None,
                            headers: Vec::new(),
                        }]),
                    },
                ),
            ]
            .into_iter()
            .collect(),
            ..ProxyPolicy::default()
        })
    }

    fn judge(
        p: &CompiledPolicy,
        src: &str,
        dst: &str,
        proto: Protocol,
        name: &str,
    ) -> DnsJudgement {
        judge_query(
            p,
            src.parse().expect("literal"),
            dst.parse().expect("literal"),
            proto,
            name,
        )
    }

    #[test]
    fn names_are_judged_by_the_dns_rules_of_the_row() {
        let p = policy(vec![
            DnsMatcher::name("api.cilium.io"),
            DnsMatcher::pattern("*.example.com"),
        ]);
        let ok = judge(
            &p,
            "10.0.0.1",
            "10.0.0.53:53",
            Protocol::Udp,
            "API.cilium.io.",
        );
        assert_eq!((ok.allowed, ok.basis), (true, DnsBasis::RuleMatches));
        assert_eq!(ok.rule, Some(origin(7)));
        assert_eq!(ok.source, NumericIdentity(POD));
        let ok = judge(
            &p,
            "10.0.0.1",
            "10.0.0.53:53",
            Protocol::Tcp,
            "a.example.com",
        );
        assert!(ok.allowed);
        for name in ["example.com", "a.b.example.com", "cilium.io", ""] {
            let no = judge(&p, "10.0.0.1", "10.0.0.53:53", Protocol::Udp, name);
            assert_eq!(
                (no.allowed, no.basis, no.rule),
                (false, DnsBasis::NoRuleMatches, None),
                "{name}"
            );
        }
    }

    #[test]
    fn the_table_decides_first_and_misses_fail_closed() {
        let p = policy(vec![DnsMatcher::pattern("*")]);
        let j = |src, dst| judge(&p, src, dst, Protocol::Udp, "x.io").basis;
        assert_eq!(j("10.0.0.1", "10.0.0.53:54"), DnsBasis::TableAllows);
        assert_eq!(j("10.0.0.1", "10.0.0.53:55"), DnsBasis::TableDenies);
        assert_eq!(j("10.0.0.2", "10.0.0.53:53"), DnsBasis::NoEndpoint);
        // A row whose only rule is HTTP allows no DNS query.
        assert_eq!(j("10.0.0.1", "10.0.0.99:53"), DnsBasis::NoRuleMatches);
        // A lone `*` matches every name, the root too.
        assert!(judge(&p, "10.0.0.1", "10.0.0.53:53", Protocol::Udp, "").allowed);
        let mut pp = p.policy().clone();
        pp.tables.clear();
        let none = CompiledPolicy::new(pp);
        assert_eq!(
            judge(&none, "10.0.0.1", "10.0.0.53:53", Protocol::Udp, "x").basis,
            DnsBasis::NoTable
        );
    }

    #[test]
    fn tcp_connections_are_dns_by_their_rules() {
        let p = policy(vec![DnsMatcher::pattern("*")]);
        let ctx = |src: &str, dst: &str, direction| ConnContext {
            direction,
            source: src.parse().expect("literal"),
            original_dst: dst.parse().expect("literal"),
            source_identity: None,
        };
        assert!(is_dns_connection(
            &p,
            &ctx("10.0.0.1:4000", "10.0.0.53:53", Direction::Egress)
        ));
        assert!(!is_dns_connection(
            &p,
            &ctx("10.0.0.1:4000", "10.0.0.53:80", Direction::Egress)
        ));
        assert!(!is_dns_connection(
            &p,
            &ctx("10.0.0.2:4000", "10.0.0.53:53", Direction::Egress)
        ));
        assert!(!is_dns_connection(
            &p,
            &ctx("10.0.0.1:4000", "10.0.0.53:53", Direction::Ingress)
        ));
    }

    #[test]
    fn a_learned_address_gets_its_identity() {
        let p = policy(vec![DnsMatcher::pattern("*")]);
        let ip: IpAddr = "192.0.2.7".parse().expect("literal");
        assert_eq!(
            p.addresses().identity_of(ip),
            cnpc_ir::Reserved::World.numeric()
        );
        p.learn(ip, NumericIdentity(16_777_300));
        assert_eq!(p.addresses().identity_of(ip), NumericIdentity(16_777_300));
    }
}
