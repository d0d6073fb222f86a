//! What operators ask of the agent and what it measured against that: capacity profiles
//! written by the trial launcher and read by the replica advisor ([`profile`]).

pub mod profile;
