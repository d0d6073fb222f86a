//! What operators ask of the agent and what it measured against that: the clock mode
//! ([`Mode`]) and the capacity profiles written by the trial launcher and read by the replica
//! advisor ([`profile`]).

mod mode;
pub mod profile;

pub use mode::{Mode, ModeError};
