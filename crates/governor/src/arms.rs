//! The clock arms: the coarse grid over the explored range, fine arms added around a good
//! clock, and what the models expect of each arm.

use nalgebra::DVector;
use tracing::debug;

use crate::context::{DIM, RAW};
use crate::linucb::LinUcb;
use crate::prune::{ArmStats, PruneReason};
use crate::{pooled, ClockTarget, Governor};

/// One clock: its statistics and its model of what the shared model gets wrong for it.
#[derive(Debug, Clone)]
pub(crate) struct Arm {
    pub(crate) stats: ArmStats,
    pub(crate) model: LinUcb,
    /// On the coarse grid (swept), not a fine arm.
    pub(crate) coarse: bool,
    /// Banned (after an SLO violation) until this learning round.
    pub(crate) banned_until: u64,
}

impl Arm {
    pub(crate) fn new(mhz: u32, coarse: bool, lambda: f64) -> Self {
        Self { stats: ArmStats::new(mhz), model: LinUcb::new(DIM, lambda), coarse, banned_until: 0 }
    }

    pub(crate) fn mhz(&self) -> u32 {
        self.stats.mhz
    }
}

impl Governor {
    /// The coarse grid: every `coarse_step_mhz` down from the maximum to the floor, snapped
    /// to supported clocks.
    pub(crate) fn coarse_arms(&self) -> Vec<Arm> {
        let Some(&max) = self.clocks.last() else { return Vec::new() };
        let floor = self.floor_mhz();
        let step = self.cfg.coarse_step_mhz.max(1);
        let mut grid: Vec<u32> = Vec::new();
        for want in std::iter::successors(Some(max), |w| w.checked_sub(step)).take_while(|w| *w >= floor) {
            if let Some(clock) = self.snap(want).filter(|c| *c >= floor && !grid.contains(c)) {
                grid.push(clock);
            }
        }
        grid.sort_unstable();
        grid.into_iter().map(|mhz| Arm::new(mhz, true, self.cfg.lambda)).collect()
    }

    /// Lowest clock the governor will explore: a share of the maximum, never below the GPU's
    /// minimum.
    pub(crate) fn floor_mhz(&self) -> u32 {
        let min = self.clocks.first().copied().unwrap_or(0);
        let max = self.clocks.last().copied().unwrap_or(0);
        // Rounded; `as` saturates, and `find` below copes with any value.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let want = (f64::from(max) * self.cfg.min_share_of_max).round() as u32;
        // The smallest supported clock at or above `want`.
        self.clocks.iter().copied().find(|c| *c >= want).unwrap_or(max).max(min)
    }

    /// The supported clock nearest to `mhz`.
    pub(crate) fn snap(&self, mhz: u32) -> Option<u32> {
        self.clocks.iter().copied().min_by_key(|c| c.abs_diff(mhz))
    }

    pub(crate) fn max_clock(&self) -> Option<u32> {
        self.clocks.last().copied()
    }

    /// Index of the arm the applied clock corresponds to. Driver-managed clocks run at the
    /// maximum under load, so they count as the maximum arm.
    pub(crate) fn arm_of(&self, target: ClockTarget) -> Option<usize> {
        let mhz = match target {
            ClockTarget::Default => self.max_clock()?,
            ClockTarget::Locked(mhz) => mhz,
        };
        self.arms.iter().position(|a| a.mhz() == mhz)
    }

    /// The highest arm: the safe clock.
    pub(crate) fn max_arm(&self) -> Option<usize> {
        (!self.arms.is_empty()).then(|| self.arms.len() - 1)
    }

    /// Adds fine arms around `mhz` (once per clock), each starting from a weakened copy of
    /// its nearest existing model so it needs only a few windows to confirm or refute.
    pub(crate) fn add_fine_arms(&mut self, mhz: u32) {
        if self.refined_around.contains(&mhz) {
            return;
        }
        self.refined_around.push(mhz);
        let floor = self.floor_mhz();
        let max = self.max_clock().unwrap_or(mhz);
        let step = self.cfg.fine_step_mhz.max(1);
        for k in 1..=self.cfg.fine_arms_each_side {
            for want in [mhz.saturating_sub(k * step), mhz.saturating_add(k * step)] {
                let Some(clock) = self.snap(want).filter(|c| *c >= floor && *c <= max) else { continue };
                if self.arms.iter().any(|a| a.mhz() == clock) {
                    continue;
                }
                let mut arm = Arm::new(clock, false, self.cfg.lambda);
                if let Some(nearest) = self.arms.iter().min_by_key(|a| a.mhz().abs_diff(clock)) {
                    arm.model = nearest.model.clone();
                    arm.model.forget(0.2);
                }
                self.arms.push(arm);
            }
        }
        self.arms.sort_by_key(Arm::mhz);
        debug!(around = mhz, arms = ?self.arms_mhz(), "refined the clock grid");
    }

    /// Untried coarse clocks below `mhz` are dropped from the sweep (slower still than one
    /// that broke the SLO).
    pub(crate) fn drop_untried_below(&mut self, mhz: u32) {
        for arm in self.arms.iter_mut().filter(|a| a.stats.tries == 0 && a.mhz() < mhz) {
            arm.stats.pruned = Some(PruneReason::Cascade);
        }
    }

    /// Features of the shared model (see [`pooled`]): raw load features and a curve in the
    /// clock's offset within the explored range.
    pub(crate) fn shared_features(&self, raw: &[f64; RAW], mhz: u32) -> DVector<f64> {
        let max = self.max_clock().unwrap_or(1);
        pooled::features(raw, pooled::clock_offset(mhz, self.floor_mhz(), max))
    }

    /// Expected reward of arm `arm` in a context: shared model plus the arm's own correction.
    pub(crate) fn expected(&self, arm: usize, context: &DVector<f64>, raw: &[f64; RAW]) -> f64 {
        self.shared.predict(&self.shared_features(raw, self.arms[arm].mhz())) + self.arms[arm].model.predict(context)
    }

    /// The tried, active clock the models rate best in the last busy window's context.
    pub(crate) fn best_tried(&self) -> Option<u32> {
        let raw = self.last_raw?;
        let context = self.ctx.context_of(&raw);
        (0..self.arms.len())
            .filter(|&i| self.arms[i].stats.active() && self.arms[i].stats.tries > 0)
            .map(|i| (self.arms[i].mhz(), self.expected(i, &context, &raw)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(mhz, _)| mhz)
    }

    /// Clocks never pruned: the maximum (the safe clock) and the current best.
    pub(crate) fn protected(&self) -> Vec<u32> {
        let mut keep: Vec<u32> = self.max_clock().into_iter().collect();
        keep.extend(self.best_tried());
        keep
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::h100_clocks;
    use crate::{Governor, GovernorConfig};

    #[test]
    fn coarse_grid_spans_a_sensible_range_of_supported_clocks() {
        let g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
        let arms = g.arms_mhz();
        assert_eq!(arms.last(), Some(&1980));
        assert_eq!(arms.first(), Some(&900), "45% of 1980 = 891, snapped up to a supported clock");
        assert!(arms.windows(2).all(|w| w[1] - w[0] == 90));
        let clocks = h100_clocks();
        assert!(arms.iter().all(|a| clocks.contains(a)));
    }

    #[test]
    fn fine_arms_are_added_once_around_a_clock_within_the_range() {
        let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
        g.add_fine_arms(1980);
        assert_eq!(&g.arms_mhz()[g.arms.len() - 4..], &[1935, 1950, 1965, 1980], "none above the maximum");
        let before = g.arms.len();
        g.add_fine_arms(1260);
        assert_eq!(g.arms.len(), before + 6);
        g.add_fine_arms(1260);
        assert_eq!(g.arms.len(), before + 6, "once per clock");
        assert!(g.arms.iter().filter(|a| !a.coarse).all(|a| a.mhz() % 15 == 0 && a.stats.tries == 0));
    }
}
