//! cnpc's runtime loader.
//!
//! Loads compiled artifacts into the kernel with aya, pins them under bpffs, attaches them to
//! endpoints' interfaces and swaps generations atomically as the cluster changes (`DESIGN.md` §1,
//! §6). It compiles no policy itself. Filled in by the runtime-loader work; until then it holds
//! only this description.

pub mod sys;
pub mod testrun;
pub mod verify;
