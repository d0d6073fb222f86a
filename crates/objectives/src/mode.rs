//! What the agent is asked to do with the GPU clocks ([`Mode`]) and what the governor did in a
//! cycle ([`Phase`]): one type each for the config file, the control protocol, the daemon, its
//! metrics and the governor.

use serde::{Deserialize, Serialize};

/// The clock mode. Written and sent as `slo`, `edp`, `observe`, `default` or `pinned:MHZ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Mode {
    /// The governor minimises energy x delay per token while both objectives hold.
    #[default]
    Slo,
    /// The governor minimises energy x delay per token, ignoring the objectives.
    Edp,
    /// The governor learns from every window but never changes the clock.
    Observe,
    /// Clocks are left to the driver; a governor asked anyway only observes.
    Default,
    /// Every GPU of the group is held at this clock (MHz) while vLLM answers.
    Pinned(u32),
}

/// A mode that is not `slo`, `edp`, `observe`, `default` or `pinned:MHZ` with MHZ above 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: expected slo, edp, observe, default or pinned:MHZ")]
pub struct ModeError(pub String);

impl std::str::FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "slo" => Ok(Mode::Slo),
            "edp" => Ok(Mode::Edp),
            "observe" => Ok(Mode::Observe),
            "default" => Ok(Mode::Default),
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
            Mode::Default => f.write_str("default"),
            Mode::Pinned(m) => write!(f, "pinned:{m}"),
        }
    }
}

impl From<Mode> for String {
    fn from(m: Mode) -> String {
        m.to_string()
    }
}

impl TryFrom<String> for Mode {
    type Error = ModeError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What the governor did in a cycle (the `phase` label of its metrics, `agentctl status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Explore,
    Exploit,
    Fallback,
    Idle,
    Observe,
    Pinned,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::Explore, Phase::Exploit, Phase::Fallback, Phase::Idle, Phase::Observe, Phase::Pinned];

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

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_reads_back_what_it_writes() {
        for m in [Mode::Slo, Mode::Edp, Mode::Observe, Mode::Default, Mode::Pinned(1200)] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
            assert_eq!(serde_json::to_string(&m).expect("json"), format!("\"{m}\""));
        }
        for bad in ["", "pinned", "pinned:0", "pinned:x", "fast"] {
            assert_eq!(bad.parse::<Mode>(), Err(ModeError(bad.to_string())), "{bad}");
        }
    }
}
