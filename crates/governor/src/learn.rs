//! Learning from a measured window: the reward goes to the shared model (weighted by the
//! window's load) and to the arm that was on the GPU; then pruning, and the triggers that
//! move the stage (see [`crate::stage`]) and make the models forget part of what they learnt.

use nalgebra::DVector;
use tracing::{debug, info};

use crate::context::RAW;
use crate::prune::{self, ArmStats};
use crate::reward::{self, Outcome, RewardShape, SloCheck};
use crate::{ClockTarget, Governor, Mode};

/// The choice whose window is being measured: arm and the normalised context it was made in.
pub(crate) type Pending = (usize, DVector<f64>);

/// The window being learnt from.
pub(crate) struct Measured<'a> {
    pub(crate) outcome: &'a Outcome,
    pub(crate) slo: &'a SloCheck,
    pub(crate) raw: &'a [f64; RAW],
    /// Its context, when it was busy.
    pub(crate) context: Option<&'a DVector<f64>>,
    pub(crate) seconds: f64,
}

/// Short- and long-term means of the workload features (z-scores), to notice a shift.
#[derive(Debug, Clone, Default)]
pub(crate) struct Drift {
    short: Option<Vec<f64>>,
    long: Option<Vec<f64>>,
}

impl Drift {
    /// Follows `z`; true when the two means are more than `threshold` apart.
    fn shifted(&mut self, z: &[f64], threshold: f64) -> bool {
        let follow = |mean: &mut Option<Vec<f64>>, rate: f64| match mean {
            Some(m) => m.iter_mut().zip(z).for_each(|(m, x)| *m += rate * (x - *m)),
            None => *mean = Some(z.to_vec()),
        };
        follow(&mut self.short, 0.3);
        follow(&mut self.long, 0.03);
        match (&self.short, &self.long) {
            (Some(short), Some(long)) => {
                short.iter().zip(long).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() > threshold
            }
            _ => false,
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Weight of a window in the shared model (its least-squares weight) from its load in
/// processed tokens per second: a window's EDP per token is a ratio of Poisson counts, so its
/// noise falls as its load rises and a quiet window must not outvote a busy one. The square
/// root of the load in thousands of tokens per second, within [0.14, 3.2], so the busiest
/// windows do not drown the sweep's either.
pub fn load_weight(tokens_per_s: f64) -> f64 {
    if !tokens_per_s.is_finite() {
        return 1.0;
    }
    (tokens_per_s / 1000.0).clamp(0.02, 10.0).sqrt()
}

impl Governor {
    /// Learns the window from the arm that was on the GPU, in the context that arm was chosen
    /// in (observing mode makes no choice, so it uses the window's own). Returns the reward
    /// learnt; nothing is learnt pinned, before the baseline, or from a window the pending
    /// choice does not describe.
    pub(crate) fn learn(&mut self, window: &Measured, pending: Option<Pending>, applied: Option<usize>) -> Option<f64> {
        if matches!(self.cfg.mode, Mode::Pinned(_)) {
            return None;
        }
        let baseline = self.baseline.edp?;
        let power_delay = window.outcome.power_delay()?;
        let (arm, chosen_in) = match (pending, applied) {
            (Some((chosen, context)), Some(arm)) if chosen == arm => (arm, context),
            (_, Some(arm)) if matches!(self.cfg.mode, Mode::Observe | Mode::Default) => (arm, window.context?.clone()),
            _ => return None,
        };
        let shape =
            RewardShape { slo_aware: self.cfg.mode != Mode::Edp && self.cfg.reward.slo_aware, ..self.cfg.reward };
        let reward = reward::reward(power_delay, baseline, window.slo, &shape);
        // The shared model explains the reward by the load the window actually had.
        let features = self.shared_features(window.raw, self.arms[arm].mhz());
        let shared_guess = self.shared.predict(&features);
        let surprise = reward - shared_guess - self.arms[arm].model.predict(&chosen_in);
        let load = (window.outcome.tokens + window.outcome.prompt_tokens) / window.seconds.max(1e-9);
        // A load far from the sweep's restarts the sweep before this window counts.
        self.track_load(load);
        // Least-squares weight: features and reward scaled by its square root.
        let scale = load_weight(load).sqrt();
        self.shared.update(&(&features * scale), reward * scale);
        self.arms[arm].model.update(&chosen_in, reward - shared_guess);
        self.arms[arm].stats.record(reward, Some(power_delay / baseline));
        self.after_learning(arm, surprise, window.slo.violated());
        Some(reward)
    }

    /// Sweep progress, pruning and the EDP-rise trigger after learning from `arm`;
    /// `surprise` is the reward minus what the models expected.
    fn after_learning(&mut self, arm: usize, surprise: f64, violated: bool) {
        // The sweep still measures the clocks above one that broke the SLO (a burst of long
        // prompts breaks it at any clock), not the untried ones below it.
        if !self.stage.sweep_done() && violated {
            self.drop_untried_below(self.arms[arm].mhz());
        }
        self.prune_arms();
        // EDP well above what the models expect for this load, window after window: the
        // workload changed in a way the features do not show.
        let rose = surprise < -self.cfg.relearn_edp_rise.ln_1p();
        if self.stage.note_edp_rise(rose) {
            self.relearn("EDP rose at the exploited clock");
        }
    }

    /// Both pruning rules, on one copy of the arms' statistics (an arm one rule drops is not
    /// judged again by the other); what they prune is copied back.
    fn prune_arms(&mut self) {
        let protect = self.protected();
        let mut stats: Vec<ArmStats> = self.arms.iter().map(|a| a.stats.clone()).collect();
        let mut pruned = prune::prune(&mut stats, &self.cfg.prune, self.round, &protect);
        // The historical rule judges what the models expect of a typical window (the
        // normaliser's mean): one burst's context would let one arm's extrapolation prune its
        // neighbours.
        let typical: Option<[f64; RAW]> =
            (self.ctx.norm.n >= 2).then(|| self.ctx.norm.mean.as_slice().try_into().ok()).flatten();
        if let Some(raw) = typical {
            let context = self.ctx.context_of(&raw);
            let expected: Vec<f64> = (0..self.arms.len()).map(|i| self.expected(i, &context, &raw)).collect();
            pruned.extend(prune::prune_by_expectation(
                &mut stats,
                &expected,
                self.cfg.prune_gap,
                self.cfg.prune.historical_min_tries,
                &protect,
            ));
        }
        for (mhz, why) in pruned {
            if let Some(arm) = self.arms.iter_mut().find(|a| a.mhz() == mhz) {
                debug!(mhz, ?why, "pruned clock");
                arm.stats.pruned = Some(why);
            }
        }
    }

    /// Follows the load (`rate`, processed tokens per second); once converged, a load far
    /// above or below the one the sweep ran at sweeps again.
    pub(crate) fn track_load(&mut self, rate: f64) {
        if !rate.is_finite() {
            return;
        }
        let slow = self.load_ema.map_or(rate, |mean| mean + 0.03 * (rate - mean));
        self.load_ema = Some(slow);
        let Some(swept) = self.stage.swept_load() else {
            self.stage.add_sweep_load(rate);
            return;
        };
        let factor = self.cfg.resweep_load_factor;
        let far = slow > factor * swept || slow * factor < swept;
        if self.stage.converged() && factor > 0.0 && swept > 0.0 && far {
            info!(swept, now = slow, "load far from the sweep's; sweeping again");
            self.resweep();
        }
    }

    /// Relearns and sweeps again around the clock it converged on (the models' best in a
    /// context they never saw is an extrapolation), with the statistics of the coarse clocks
    /// near it cleared: they were judged on the old load. The models keep what a relearn
    /// keeps, and the busier windows outweigh the old ones (see [`load_weight`]).
    fn resweep(&mut self) {
        self.relearn("load far from the sweep's");
        self.stage.resweep();
        let center = match self.last_target {
            Some(ClockTarget::Locked(mhz)) => Some(mhz),
            _ => self.best_tried(),
        };
        let span = self.cfg.resweep_span_mhz;
        for arm in self.arms.iter_mut().filter(|a| a.coarse) {
            if span == 0 || center.is_none_or(|c| arm.mhz().abs_diff(c) <= span) {
                arm.stats = ArmStats::new(arm.mhz());
            }
        }
    }

    /// Exploiting -> learning: the models keep `relearn_keep` of what they learnt, pruning and
    /// bans are lifted, exploration starts again.
    pub(crate) fn relearn(&mut self, why: &str) {
        info!(why, "relearning");
        self.shared.forget(self.cfg.relearn_keep);
        for arm in &mut self.arms {
            arm.model.forget(self.cfg.relearn_keep);
            arm.stats.pruned = None;
            arm.banned_until = 0;
        }
        self.round = 0;
        self.stage.relearn();
        self.drift.clear();
    }

    /// Follows the workload features; true when short- and long-term means drifted apart.
    pub(crate) fn workload_shifted(&mut self, raw: &[f64; RAW]) -> bool {
        let z = self.ctx.norm.z(raw);
        self.drift.shifted(&z, self.cfg.shift_threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busier_windows_weigh_more_within_bounds() {
        assert!(load_weight(4000.0) > load_weight(1000.0));
        assert!((load_weight(4000.0) / load_weight(1000.0) - 2.0).abs() < 1e-12, "square root of the load");
        assert_eq!(load_weight(0.0), load_weight(1.0), "a trickle keeps a floor weight");
        assert_eq!(load_weight(1e9), load_weight(1e7), "a flood is capped");
        assert_eq!(load_weight(f64::NAN), 1.0);
    }

    #[test]
    fn drift_needs_the_short_mean_far_from_the_long_one() {
        let mut drift = Drift::default();
        assert!(!drift.shifted(&[0.0, 0.0], 1.0), "both start at the first window");
        for _ in 0..3 {
            assert!(!drift.shifted(&[0.0, 0.0], 1.0));
        }
        let mut shifted = false;
        for _ in 0..10 {
            shifted |= drift.shifted(&[3.0, 0.0], 1.0);
        }
        assert!(shifted, "a jump of 3 z units shows within a few windows");
        drift.clear();
        assert!(!drift.shifted(&[3.0, 0.0], 1.0));
    }
}
