//! The evaluation lab: workload traces ([`trace`]), the governor bench against default clocks,
//! a static oracle and an AGFT baseline ([`bench`], [`agft`]), and the advisor's closed-loop
//! replay ([`replay`]). Everything runs on the simulator in virtual time, so a figure is
//! exact and repeatable for a seed.
//!
//! Nothing in production depends on this crate: the daemon links it only with its `lab`
//! feature, for `gpu-agent bench` (`tests/tests/dependencies.rs`).

pub mod agft;
pub mod bench;
pub mod replay;
pub mod trace;
