//! What the agent asks of the clock, how the governor treats clocks, and what it reports doing.

use serde::{Deserialize, Serialize};

/// What the agent asks of the SM clock. Same shape as the daemon's clock target, so the
/// daemon can use this type directly (`pub use crate::ClockTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockTarget {
    /// Driver-managed clocks (nothing locked).
    Default,
    /// Locked at this many MHz.
    Locked(u32),
}

/// How the governor treats clocks: the agent's one mode type (`Default` is treated as
/// `Observe`: a governor consulted then only learns).
pub use objectives::{Mode, ModeError};

/// What the governor did this cycle: the agent's one phase type (metric label, status, wire).
pub use objectives::Phase;
