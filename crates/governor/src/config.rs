//! The governor's tunables. The defaults are what the bench figures were measured with (see
//! `docs/governor.md` for how some of them were chosen).

use serde::{Deserialize, Serialize};

use crate::prune::PruneRules;
use crate::reward::RewardShape;
use crate::Mode;
use objectives::Objectives;

/// Tunables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorConfig {
    pub mode: Mode,
    pub slo: Objectives,
    /// Spacing of the coarse grid.
    pub coarse_step_mhz: u32,
    /// Spacing of the arms added around the best clock.
    pub fine_step_mhz: u32,
    /// Fine arms on each side of the best coarse clock.
    pub fine_arms_each_side: u32,
    /// Lowest coarse clock as a share of the maximum (never below the GPU's minimum): below
    /// it EDP only rises.
    pub min_share_of_max: f64,
    /// Ridge prior of each arm's model (`A = lambda I`). Each arm's model only corrects the
    /// shared one from a few noisy windows: a strong prior keeps one lucky window from making
    /// a clock look better than the pooled evidence says.
    pub lambda: f64,
    /// Exploration: alpha = max(alpha_min, alpha0 exp(-alpha_decay t)).
    pub alpha0: f64,
    pub alpha_decay: f64,
    pub alpha_min: f64,
    /// Converged when `converge_share` of the last `converge_window` choices lie within one
    /// coarse step of their median.
    pub converge_window: usize,
    pub converge_share: f64,
    /// While exploiting, switch only for a predicted gain above this (no flapping).
    pub hysteresis: f64,
    /// Windows held at the maximum clock after an SLO violation.
    pub fallback_windows: u32,
    /// Decisions the violating clock and those below it stay banned.
    pub ban_decisions: u64,
    /// Minimum seconds between two clock changes (safety jumps excepted). 1.9 holds each clock
    /// for two 1 s windows: one window's EDP is too noisy to judge a clock by.
    pub min_change_interval_s: f64,
    /// Relearn when short- and long-term workload features drift this far apart (z units).
    pub shift_threshold: f64,
    /// Sweep again once converged when the load (slow average) rises above this many times
    /// the load the sweep ran at, or falls below it by the same factor (0 = never): clocks
    /// judged at one load are misjudged at a very different one.
    pub resweep_load_factor: f64,
    /// A later sweep covers the coarse clocks within this many MHz of the best one (0 = all):
    /// the best clock moves by a step or two with the load, and the far ends of the range
    /// were measured once already.
    pub resweep_span_mhz: u32,
    /// Relearn when the exploited clock's EDP stays this much above what the models expect.
    pub relearn_edp_rise: f64,
    /// Share of each model kept when relearning.
    pub relearn_keep: f64,
    /// Windows at the maximum clock whose median EDP is the baseline (a median: the first
    /// windows of a cold server are far costlier than steady ones).
    pub baseline_windows: u32,
    /// Horizon (windows) of the feature normaliser.
    pub normaliser_horizon: f64,
    pub prune: PruneRules,
    /// The governor's historical rule: a tried clock the models expect to be this much worse
    /// (log EDP) than the best for a typical window is dropped (see
    /// [`crate::prune::prune_by_expectation`]).
    pub prune_gap: f64,
    pub reward: RewardShape,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Slo,
            slo: Objectives { ttft_s: 0.5, tpot_s: 0.05 },
            coarse_step_mhz: 90,
            fine_step_mhz: 15,
            fine_arms_each_side: 3,
            min_share_of_max: 0.45,
            lambda: 50.0,
            alpha0: 0.3,
            alpha_decay: 0.05,
            alpha_min: 0.02,
            converge_window: 10,
            converge_share: 0.8,
            hysteresis: 0.03,
            fallback_windows: 2,
            ban_decisions: 30,
            min_change_interval_s: 1.9,
            shift_threshold: 3.0,
            resweep_load_factor: 2.0,
            resweep_span_mhz: 300,
            relearn_edp_rise: 0.3,
            relearn_keep: 0.5,
            baseline_windows: 5,
            normaliser_horizon: 300.0,
            prune: PruneRules {
                extreme_rounds: 60,
                extreme_min_tries: 2,
                extreme_reward: -1.0,
                // The rule on raw means is off; the governor's historical rule is
                // `prune_gap`, with these minimum tries.
                historical_sd: None,
                historical_min_tries: 3,
                historical_sd_floor: 0.0,
                cascade_below: 0.5,
            },
            prune_gap: 0.15,
            reward: RewardShape::default(),
        }
    }
}
