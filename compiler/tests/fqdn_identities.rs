//! FQDN identities (issue 10): an address learned from DNS gets the identity of the toFQDNs
//! selectors matching its names together with the longest CIDR prefix of the policies holding
//! it, as Cilium labels such an address with every matching `fqdn:` selector and its `cidr:`
//! labels (pkg/ipcache metadata, pkg/policy/api/fqdn.go), so every rule that selects it
//! applies: a name matched by a matchName and a matchPattern is allowed by both rules, and an
//! address inside a toCIDR prefix keeps that rule too.

use cnpc_compiler::eval::{self, Flow};
use cnpc_compiler::tables::{
    cidr_prefixes, fqdn_key, fqdn_selectors, ipcache_entries, peer_of, peer_universe_with,
    TableCompiler,
};
use cnpc_compiler::{check, load_str, lower, Cluster};
use cnpc_ir::{
    Direction, DnsMatcher, FqdnIdentity, IpNet, NumericIdentity, Program, Protocol,
    FIRST_FQDN_IDENTITY,
};
use std::net::IpAddr;
use std::path::Path;

const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: x}}
- {apiVersion: v1, kind: Pod, metadata: {name: bot, namespace: x, labels: {app: bot}}, status: {podIPs: [{ip: 10.10.0.1}]}}
"#;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: bot}}
  egress:
  - toFQDNs: [{matchName: api.github.com}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toFQDNs: [{matchPattern: "*.github.com"}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toCIDR: [140.82.0.0/16]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"#;

fn program() -> (Program, Cluster) {
    let mut set = load_str("p.yaml", POLICY);
    let mut cluster = Cluster::default();
    cluster.add_str(&mut set.sources, Path::new("cluster.yaml"), CLUSTER);
    let r = check(set, Some(cluster));
    assert_eq!(r.errors(), 0, "{}", cnpc_compiler::report::human(&r, false));
    let cluster = r.cluster.unwrap();
    let program = lower::build(
        &r.set.policies,
        &r.set.sources,
        &cluster,
        &Default::default(),
    );
    (program, cluster)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Every FQDN identity a node would need for these learned (name, address) pairs, numbered
/// from the FQDN range as a loader does.
fn learned(program: &Program, pairs: &[(&str, &str)]) -> Vec<FqdnIdentity> {
    let selectors = fqdn_selectors(&[program]);
    let prefixes = cidr_prefixes(&[program]);
    let mut keys: Vec<(Vec<DnsMatcher>, Option<IpNet>)> = pairs
        .iter()
        .filter_map(|(n, a)| fqdn_key(&selectors, &prefixes, [*n], ip(a)))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .zip(FIRST_FQDN_IDENTITY + 100..)
        .map(|((selectors, cidr), n)| FqdnIdentity {
            numeric: NumericIdentity(n),
            selectors,
            cidr,
        })
        .collect()
}

#[test]
fn a_learned_address_is_decided_by_every_rule_that_selects_it_as_the_evaluator_does() {
    let (program, cluster) = program();
    let pairs = [
        ("api.github.com", "140.82.1.1"), // both selectors, inside the CIDR
        ("api.github.com", "192.0.2.7"),  // both selectors
        ("www.github.com", "192.0.2.8"),  // the pattern only
        ("example.com", "192.0.2.9"),     // no selector: stays the world
    ];
    let fqdn = learned(&program, &pairs);
    assert_eq!(fqdn.len(), 3, "{fqdn:?}");
    let compiler = TableCompiler::with_fqdn(&program, &fqdn);
    let universe = peer_universe_with(&program, &[&program], &fqdn);
    assert_eq!(compiler.universe.len(), universe.len());
    let tables = compiler.all(&program);
    let table = tables
        .iter()
        .find(|t| t.direction == Direction::Egress)
        .expect("the bot has an egress table");
    // Learned addresses never enter the static ipcache: the loader's fqdn map holds them.
    let entries = ipcache_entries(&program, &universe);
    assert!(entries.iter().all(|(_, id)| id.0 < FIRST_FQDN_IDENTITY));
    let bot = eval::parse_peer(&program, &cluster, "pod:x/bot").unwrap();
    for (name, addr) in pairs {
        let dst = eval::parse_peer(&program, &cluster, &format!("fqdn:{name}={addr}")).unwrap();
        let peer = peer_of(&universe, &dst).expect("every learned key has an identity");
        for port in [22, 80, 443, 8080] {
            let flow = Flow {
                src: bot.clone(),
                dst: dst.clone(),
                protocol: Protocol::Tcp,
                port,
                http: None,
                dns_query: None,
            };
            let reference = eval::evaluate(&program, &flow).allowed;
            let table_says =
                table.lookup(peer, Protocol::Tcp, port) != &cnpc_ir::TableVerdict::Deny;
            assert_eq!(
                reference, table_says,
                "{name}={addr} port {port}: evaluator {reference}, table {table_says}"
            );
        }
    }
    // The facts the comparison rests on: both rules allow api.github.com, the CIDR rule its
    // address in 140.82/16, and an unselected name is the world.
    let api = eval::parse_peer(&program, &cluster, "fqdn:api.github.com=140.82.1.1").unwrap();
    let id = peer_of(&universe, &api).unwrap();
    for port in [22, 80, 443] {
        assert_ne!(
            table.lookup(id, Protocol::Tcp, port),
            &cnpc_ir::TableVerdict::Deny
        );
    }
    let other = eval::parse_peer(&program, &cluster, "fqdn:example.com=192.0.2.9").unwrap();
    assert_eq!(
        peer_of(&universe, &other),
        Some(cnpc_ir::Reserved::World.numeric())
    );
}
