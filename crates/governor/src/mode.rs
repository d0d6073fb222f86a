//! What the agent asks of the clock, how the governor treats clocks, and what it reports doing.

use std::str::FromStr;

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

/// How the governor treats clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Minimise EDP per token while keeping both SLOs (default).
    Slo,
    /// Minimise EDP per token, ignoring the SLOs.
    Edp,
    /// Learn from windows but never change the clock.
    Observe,
    /// Hold this clock (snapped to a supported one, never below the minimum).
    Pinned(u32),
}

/// A mode string that is not `slo`, `edp`, `observe` or `pinned:MHZ`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown governor mode `{0}`: expected slo, edp, observe or pinned:MHZ")]
pub struct ModeError(pub String);

impl FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "slo" => Ok(Mode::Slo),
            "edp" => Ok(Mode::Edp),
            "observe" => Ok(Mode::Observe),
            other => other
                .strip_prefix("pinned:")
                .and_then(|m| m.trim().parse::<u32>().ok())
                .filter(|m| *m > 0)
                .map(Mode::Pinned)
                .ok_or_else(|| ModeError(s.to_string())),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Slo => f.write_str("slo"),
            Mode::Edp => f.write_str("edp"),
            Mode::Observe => f.write_str("observe"),
            Mode::Pinned(m) => write!(f, "pinned:{m}"),
        }
    }
}

/// What the governor did this cycle (exported as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Explore,
    Exploit,
    Fallback,
    Idle,
    Observe,
    Pinned,
}

impl Phase {
    pub const fn as_str(&self) -> &'static str {
        match self {
            Phase::Explore => "explore",
            Phase::Exploit => "exploit",
            Phase::Fallback => "fallback",
            Phase::Idle => "idle",
            Phase::Observe => "observe",
            Phase::Pinned => "pinned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_strings() {
        assert_eq!("slo".parse::<Mode>(), Ok(Mode::Slo));
        assert_eq!("edp".parse::<Mode>(), Ok(Mode::Edp));
        assert_eq!("observe".parse::<Mode>(), Ok(Mode::Observe));
        assert_eq!("pinned:1200".parse::<Mode>(), Ok(Mode::Pinned(1200)));
        let e = "pinned:fast".parse::<Mode>().expect_err("bad");
        assert!(e.to_string().contains("pinned:fast"));
        assert_eq!(Mode::Pinned(990).to_string(), "pinned:990");
    }
}
