//! Reward of one window: energy-delay product, normalised against a baseline measured at the
//! maximum clock, with penalties for breaking the TTFT or TPOT SLO.
//!
//! EDP per token = (window energy / generated tokens) x mean TPOT; the governor learns from
//! the window's power x TPOT, which ranks clocks alike under the same load with far less noise
//! (see [`Outcome::power_delay`]). The reward is `-ln(value / baseline)`: 0 at the baseline,
//! +0.2 for a value 18% lower, symmetric in ratios, so a linear model can add context effects
//! to it. Windows that served nothing or have no TPOT have no reward.

use serde::{Deserialize, Serialize};

use vllm_metrics::Window;

use objectives::Objectives;

/// What one window cost and delivered.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Outcome {
    /// Generated tokens in the window.
    pub tokens: f64,
    /// Prompt tokens prefilled in the window.
    pub prompt_tokens: f64,
    pub energy_j: f64,
    pub seconds: f64,
    pub ttft_s: Option<f64>,
    pub tpot_s: Option<f64>,
}

impl Outcome {
    pub fn from_window(w: &Window, energy_j: f64, seconds: f64) -> Self {
        let count = |r: Option<f64>| r.filter(|r| r.is_finite() && *r >= 0.0).map_or(0.0, |r| r * w.seconds);
        let tokens = count(w.generation_tokens_rate);
        let prompt_tokens = count(w.prompt_tokens_rate);
        let mean = |l: Option<&vllm_metrics::Latency>| l.and_then(|l| l.mean).filter(|v| v.is_finite() && *v >= 0.0);
        Self { tokens, prompt_tokens, energy_j, seconds, ttft_s: mean(w.ttft.as_ref()), tpot_s: mean(w.tpot_or_itl()) }
    }

    /// Joules per generated token x mean TPOT (J*s per token); None without tokens or TPOT.
    pub fn edp_per_token(&self) -> Option<f64> {
        edp_per_token(self.energy_j, self.tokens, self.tpot_s?)
    }

    /// Mean power x mean TPOT (W*s): what the governor learns from. EDP per token is
    /// `power / token rate x TPOT`, and on a server that keeps up the token rate is what the
    /// clients sent, whatever the clock: dividing by the window's own token count only adds
    /// its Poisson noise. The load enters the reward model as features instead, and a clock
    /// too slow to keep up shows in TTFT (the SLO checks). None for a window that served
    /// nothing.
    pub fn power_delay(&self) -> Option<f64> {
        let served = self.tokens + self.prompt_tokens > 0.0;
        let v = self.energy_j / self.seconds * self.tpot_s?;
        (served && self.seconds > 0.0 && v.is_finite() && v > 0.0).then_some(v)
    }

    pub fn slo_check(&self, slo: &Objectives) -> SloCheck {
        SloCheck { ttft_ratio: self.ttft_s.map(|t| t / slo.ttft_s), tpot_ratio: self.tpot_s.map(|t| t / slo.tpot_s) }
    }
}

/// Energy per token times TPOT; None when undefined (no tokens, non-finite input).
pub fn edp_per_token(energy_j: f64, tokens: f64, tpot_s: f64) -> Option<f64> {
    let v = energy_j / tokens * tpot_s;
    (tokens > 0.0 && energy_j >= 0.0 && v.is_finite() && v > 0.0).then_some(v)
}

/// Median of a non-empty sample (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Observed latency over the SLO (1.0 = exactly at the objective).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct SloCheck {
    pub ttft_ratio: Option<f64>,
    pub tpot_ratio: Option<f64>,
}

impl SloCheck {
    pub fn violated(&self) -> bool {
        self.worst() > 1.0
    }

    /// The larger of the two ratios (0 when neither was observed).
    pub fn worst(&self) -> f64 {
        self.ttft_ratio.unwrap_or(0.0).max(self.tpot_ratio.unwrap_or(0.0))
    }
}

/// How the SLOs enter the reward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardShape {
    /// Include SLO penalties (mode `slo`); without them the reward is pure EDP (mode `edp`).
    pub slo_aware: bool,
    /// Above this ratio of the SLO a soft penalty starts, so the bandit keeps a margin.
    pub margin: f64,
    /// Soft penalty reached at the SLO itself.
    pub margin_penalty: f64,
    /// Penalty for a violation, plus `violation_slope` per unit of ratio above 1.
    pub violation_penalty: f64,
    pub violation_slope: f64,
}

impl Default for RewardShape {
    fn default() -> Self {
        Self { slo_aware: true, margin: 0.8, margin_penalty: 0.15, violation_penalty: 1.0, violation_slope: 2.0 }
    }
}

/// Reward bounds: the bandit's linear models behave better with bounded targets.
pub const REWARD_MIN: f64 = -4.0;
/// Loose enough that a load several times the baseline's does not saturate (a saturated
/// reward says nothing about the clock).
pub const REWARD_MAX: f64 = 3.0;

/// `-ln(edp / baseline)` minus the SLO penalty of each objective, clipped.
pub fn reward(edp: f64, baseline: f64, slo: &SloCheck, shape: &RewardShape) -> f64 {
    let mut r = -(edp / baseline).ln();
    if !r.is_finite() {
        r = REWARD_MIN;
    }
    if shape.slo_aware {
        for q in [slo.ttft_ratio, slo.tpot_ratio].into_iter().flatten() {
            r -= slo_penalty(q, shape);
        }
    }
    r.clamp(REWARD_MIN, REWARD_MAX)
}

/// Penalty for one objective at `q` = observed / SLO.
pub fn slo_penalty(q: f64, shape: &RewardShape) -> f64 {
    if !q.is_finite() {
        return shape.violation_penalty + 2.0 * shape.violation_slope;
    }
    if q > 1.0 {
        shape.violation_penalty + shape.violation_slope * (q - 1.0).min(2.0)
    } else if q > shape.margin && shape.margin < 1.0 {
        shape.margin_penalty * (q - shape.margin) / (1.0 - shape.margin)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edp_per_token_is_energy_per_token_times_tpot() {
        let o = Outcome {
            tokens: 1000.0,
            prompt_tokens: 2000.0,
            energy_j: 300.0,
            seconds: 1.0,
            ttft_s: Some(0.1),
            tpot_s: Some(0.02),
        };
        assert!((o.edp_per_token().expect("defined") - 0.3 * 0.02).abs() < 1e-15);
        assert!((o.power_delay().expect("defined") - 300.0 * 0.02).abs() < 1e-12);
        assert_eq!(Outcome { tokens: 0.0, prompt_tokens: 0.0, ..o }.power_delay(), None, "nothing served");
        assert_eq!(Outcome { seconds: 0.0, ..o }.power_delay(), None);
        assert_eq!(edp_per_token(300.0, 0.0, 0.02), None);
        assert_eq!(Outcome { tpot_s: None, ..o }.edp_per_token(), None);
    }

    #[test]
    fn outcome_reads_the_window_means() {
        let mut w = crate::context::tests::window(0.0, 4.0, 10.0, 250.0);
        w.seconds = 2.0;
        w.itl = Some(vllm_metrics::Latency { count: 10.0, mean: Some(0.015), p50: None, p90: None, p99: None });
        let o = Outcome::from_window(&w, 400.0, 2.0);
        assert_eq!(o.tokens, 500.0);
        assert_eq!(o.prompt_tokens, 20.0);
        assert_eq!(o.tpot_s, Some(0.015));
        assert_eq!(o.ttft_s, None);
    }

    #[test]
    fn reward_is_log_ratio_without_slo_pressure() {
        let shape = RewardShape::default();
        let ok = SloCheck { ttft_ratio: Some(0.5), tpot_ratio: Some(0.5) };
        assert!(reward(1.0, 1.0, &ok, &shape).abs() < 1e-12);
        assert!((reward(0.8, 1.0, &ok, &shape) - 0.8f64.recip().ln()).abs() < 1e-12);
        assert!(reward(1.2, 1.0, &ok, &shape) < 0.0);
        assert_eq!(reward(1e-30, 1.0, &ok, &shape), REWARD_MAX);
    }

    #[test]
    fn violations_cost_more_than_any_edp_gain_in_slo_mode_only() {
        let shape = RewardShape::default();
        let bad = SloCheck { ttft_ratio: Some(1.3), tpot_ratio: Some(0.5) };
        assert!(bad.violated());
        let r = reward(0.6, 1.0, &bad, &shape);
        assert!(r < reward(1.0, 1.0, &SloCheck::default(), &shape), "{r}");
        let edp_only = RewardShape { slo_aware: false, ..shape };
        assert!((reward(0.6, 1.0, &bad, &edp_only) - 0.6f64.recip().ln()).abs() < 1e-12);
    }

    #[test]
    fn median_ignores_one_wild_window() {
        assert_eq!(median(&[1558.0, 10.5, 20.1, 18.8, 36.3]), 20.1);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn soft_margin_grows_toward_the_slo() {
        let s = RewardShape::default();
        assert_eq!(slo_penalty(0.7, &s), 0.0);
        assert!(slo_penalty(0.9, &s) > 0.0 && slo_penalty(0.9, &s) < slo_penalty(1.0, &s));
        assert!((slo_penalty(1.0, &s) - s.margin_penalty).abs() < 1e-12);
        assert!(slo_penalty(1.01, &s) > s.violation_penalty);
        assert!(!SloCheck { ttft_ratio: Some(1.0), tpot_ratio: None }.violated());
    }
}
