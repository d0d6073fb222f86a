//! The latency objectives the governor keeps and the advisor sizes replicas for.

use serde::{Deserialize, Serialize};

/// Mean time to first token and mean time per output token over a decision window, in
/// seconds: what the daemon counts violations of, the governor keeps, and the advisor plans
/// capacity against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Objectives {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

impl Default for Objectives {
    /// The config's defaults: 0.5 s to the first token, 50 ms per token after it.
    fn default() -> Self {
        Objectives { ttft_s: 0.5, tpot_s: 0.05 }
    }
}
