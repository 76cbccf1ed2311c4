//! cnpc's intermediate representation.
//!
//! The entity-indexed data model that sits between the policy front end (`cnpc-compiler`) and the
//! BPF back end (`cnpc-codegen-bpf`): label sets, identities, selectors, peers, port ranges, L7 rule
//! sets and the per-identity decision tables (see `DESIGN.md` §5 in the shared design card).
//!
//! This crate parses no YAML and touches no kernel. It is filled in by the semantics-core work;
//! until then it holds only this description.
