//! Property test: relabelling one workload incrementally gives exactly the tables of a full
//! rebuild of the changed cluster (with the previous identity allocation, as the loader keeps it).

mod common;

use cnpc_compiler::tables::{all_tables, TableSet};
use cnpc_ir::{EndpointRef, EntityRef};
use common::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn relabel_equals_full_rebuild(
        pods in prop::collection::vec(pod(), 1..7),
        policies in prop::collection::vec(policy_gen(), 0..4),
        which in any::<prop::sample::Index>(),
        changes in prop::collection::vec((0..3usize, prop::option::of(any::<bool>())), 1..4),
    ) {
        let (program, _, yaml) = build(&pods, &policies);
        let mut set = TableSet::build(program);
        let mut pods = pods;
        let i = which.index(pods.len());
        // Several relabels in a row, each checked against a rebuild.
        for (app, tier) in changes {
            let previous = set.allocation();
            pods[i].app = app;
            pods[i].tier = tier;
            let (rebuilt, _, _) = build_with(&pods, &policies, &previous);
            let e = &rebuilt.endpoints[EndpointRef::new(i)];
            set.update_endpoint(EndpointRef::new(i), e.labels.clone(), e.named_ports.clone());
            prop_assert_eq!(&set.tables, &all_tables(&rebuilt), "pod {} -> app {} tier {:?}\n{}", i, app, tier, yaml);
        }
    }
}
