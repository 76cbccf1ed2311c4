//! cnpc's runtime loader.
//!
//! Puts compiled programs into the kernel and keeps them in step with the cluster
//! (`DESIGN.md` §1, §6): bpf(2) calls ([`sys`]), checking compiled directories against the
//! kernel verifier ([`verify`]), running packets through programs for tests and `cnpc trace`
//! ([`testrun`], [`trace`]), finding endpoints' interfaces on this node ([`node`]), compiling a generation
//! with the compiler ([`generation`]), attaching, swapping and pinning it ([`loader`]), and the
//! node side of the L7 stage: proxy routes, the proxy device and the supervised `cnpc-proxy`
//! ([`l7`]), addresses learned from DNS ([`fqdn`]), the event stream behind `cnpc observe`
//! ([`events`]), and the loader's metrics with their `/metrics` and `/healthz` server
//! ([`metrics`]).
//! The `cnpc-loader` binary runs it standalone.
//!
//! It calls bpf(2) directly rather than through aya: aya's loader is built around ELF objects
//! whose maps it creates itself, while cnpc binds generated programs to maps of each generation
//! it creates, and needs only a handful of commands (map and program creation, pinning, TCX
//! links and their in-place update).

pub mod events;
pub mod fqdn;
pub mod generation;
pub mod ipcache;
pub mod k8s;
pub mod l7;
pub mod loader;
pub mod metrics;
pub mod node;
pub mod settle;
pub mod sys;
pub mod tc;
pub mod testrun;
pub mod trace;
pub mod verify;
