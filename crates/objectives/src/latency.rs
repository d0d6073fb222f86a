//! Latency targets: the mean objectives the governor keeps and the advisor sizes replicas for
//! ([`Objectives`]), and the limits on single requests that a tuned rate must keep and a load
//! report counts goodput by ([`LatencyLimits`]).

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

/// Limits on single requests' latencies, in milliseconds (None: no limit on that measure).
/// The tuner keeps them at P99 over a run, a load report counts a request that meets all of
/// them as goodput (`vllm bench serve --goodput`), and a capacity profile records those it was
/// measured under. The search space (`limits.p99_*_ms`) and the profile (`limits.*_p99_s`) are
/// its file forms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyLimits {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
}

impl LatencyLimits {
    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2e_ms.is_some()
    }

    /// Whether one request with these latencies (seconds) meets every limit.
    pub fn met_by(&self, ttft_s: f64, tpot_s: f64, e2e_s: f64) -> bool {
        let ok = |limit: Option<f64>, secs: f64| !matches!(limit, Some(l) if secs * 1000.0 > l);
        ok(self.ttft_ms, ttft_s) && ok(self.tpot_ms, tpot_s) && ok(self.e2e_ms, e2e_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_meets_the_limits_set_and_ignores_the_others() {
        let l = LatencyLimits { ttft_ms: Some(200.0), tpot_ms: None, e2e_ms: Some(1000.0) };
        assert!(l.is_set() && !LatencyLimits::default().is_set());
        assert!(l.met_by(0.2, 9.0, 1.0), "at the limits, any TPOT");
        assert!(!l.met_by(0.2001, 0.0, 0.5) && !l.met_by(0.1, 0.0, 1.001));
        assert!(LatencyLimits::default().met_by(1e9, 1e9, 1e9));
    }
}
