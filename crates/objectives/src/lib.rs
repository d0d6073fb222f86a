//! What operators ask of the agent and what it measured against that: the clock mode
//! ([`Mode`]), the latency objectives and limits ([`Objectives`], [`LatencyLimits`]), and the
//! capacity profiles written by
//! the trial launcher and read by the replica advisor ([`profile`]).

mod latency;
mod mode;
pub mod profile;

pub use latency::{LatencyLimits, Objectives};
pub use mode::{Mode, ModeError, Phase};
