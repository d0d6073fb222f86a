//! The simulator: a simulated H100 ([`gpu`]) whose speed and power follow real measurements,
//! a simulated vLLM engine on it ([`engine`]), an OpenAI-compatible HTTP server for that engine
//! ([`server`], the `vllm-sim` binary), the whole demo world of `gpu-agent --simulate`
//! ([`world`]), and the tuner's virtual-time trial server ([`tune`]). Both servers read vLLM's
//! flags through one mapping ([`flags`]). Everything that runs the engine in virtual time (the
//! tuner here, the bench and the replay in `lab`) does it through one driver ([`drive`]).
//!
//! Nothing in production depends on this crate: the daemon links it only with its `simulate`
//! feature (`tests/tests/dependencies.rs`).

pub mod drive;
pub mod engine;
pub mod flags;
pub mod gpu;
pub mod server;
pub mod tune;
pub mod world;

/// `x` as a u32 exactly as `as` converts it: toward zero, saturating at 0 and `u32::MAX`, NaN
/// to 0. Callers round first where they mean to round.
// The crate's f64 -> u32 casts all come here: `as` saturates, which is what every caller wants.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn saturating_u32(x: f64) -> u32 {
    x as u32
}
