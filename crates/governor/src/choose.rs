//! Choosing the next clock (modes `slo` and `edp`): the safety jump, idle parking, the sweep,
//! fine arms first, then LinUCB (greedy with hysteresis once converged), and rate limiting.

use nalgebra::DVector;
use tracing::info;

use crate::arms::Arm;
use crate::context::RAW;
use crate::stage::{BusyWindow, Convergence};
use crate::{ClockTarget, Governor, Mode, Phase};

/// The coarse sweep's order: every other clock going down from the maximum, then the ones in
/// between going back up. The load on a cold server ramps up during the sweep; visiting both
/// ends of the range early and late lets the shared model tell the ramp from the clock. It
/// still starts at the safe maximum and moves in steps of two grid points.
pub fn sweep_order(coarse: &[u32]) -> Vec<u32> {
    let mut desc = coarse.to_vec();
    desc.sort_unstable_by(|a, b| b.cmp(a));
    desc.dedup();
    let down = desc.iter().copied().step_by(2);
    let up: Vec<u32> = desc.iter().copied().skip(1).step_by(2).collect();
    down.chain(up.into_iter().rev()).collect()
}

impl Governor {
    /// The clock for the next window and what choosing it was. `context` is None for an idle
    /// window; `raw` are the window's features.
    pub(crate) fn choose(
        &mut self,
        applied: ClockTarget,
        context: Option<DVector<f64>>,
        raw: &[f64; RAW],
        violated: bool,
    ) -> (ClockTarget, Phase) {
        let Some(max_arm) = self.max_arm() else { return (applied, Phase::Observe) };
        let max_target = ClockTarget::Locked(self.arms[max_arm].mhz());
        // Safety first: an SLO violation jumps to the maximum at once.
        if self.cfg.mode == Mode::Slo && violated {
            self.fall_back(applied, max_arm);
            self.pending = context.map(|chosen_in| (max_arm, chosen_in));
            return (max_target, Phase::Fallback);
        }
        let Some(context) = context else { return (self.park(applied, max_arm), Phase::Idle) };
        let leaving_park = match self.stage.busy() {
            BusyWindow::HoldMaximum => {
                self.pending = Some((max_arm, context));
                return (max_target, Phase::Fallback);
            }
            BusyWindow::LeaveParking => true,
            BusyWindow::Search => false,
        };
        if self.workload_shifted(raw) && self.stage.converged() {
            self.relearn("workload shifted");
        }
        self.round += 1;
        let candidates = self.candidates(max_arm);
        let (pick, phase) = self.pick(&candidates, &context, raw);
        // Read before convergence adds fine arms (which moves the indices).
        let mhz = self.arms[pick].mhz();
        self.note_choice(mhz);
        let want = ClockTarget::Locked(mhz);
        // Leaving the idle clock is never held back: it was not a measurement.
        let target = if leaving_park { want } else { self.rate_limited(applied, want) };
        if let Some(arm) = self.arm_of(target) {
            self.pending = Some((arm, context));
        }
        (target, phase)
    }

    /// After an SLO violation: the violating clock and those below it are banned for a while
    /// (a violation at the exploited clock relearns), and the stage falls back.
    fn fall_back(&mut self, applied: ClockTarget, max_arm: usize) {
        if let Some(violating) = self.arm_of(applied).filter(|arm| *arm != max_arm) {
            let until = self.round + self.cfg.ban_decisions;
            let violating_mhz = self.arms[violating].mhz();
            self.arms[violating].stats.violations += 1;
            for arm in self.arms.iter_mut().filter(|a| a.mhz() <= violating_mhz) {
                arm.banned_until = arm.banned_until.max(until);
            }
            if self.stage.converged() {
                self.relearn("SLO violated at the exploited clock");
            }
        }
        self.stage.fall_back(self.cfg.fallback_windows);
    }

    /// Idle: nothing to learn from; park at the lowest explored clock (never below the GPU's
    /// minimum), from where the first busy window moves up.
    fn park(&mut self, applied: ClockTarget, max_arm: usize) -> ClockTarget {
        let lowest = self.arms.iter().find(|a| a.stats.active()).map_or(self.arms[max_arm].mhz(), Arm::mhz);
        let park = ClockTarget::Locked(lowest);
        let target = self.rate_limited(applied, park);
        self.stage.idle(target == park);
        target
    }

    /// Arms that may be chosen this round: active and not banned, and always the maximum.
    fn candidates(&self, max_arm: usize) -> Vec<usize> {
        (0..self.arms.len())
            .filter(|&i| i == max_arm || (self.arms[i].stats.active() && self.arms[i].banned_until <= self.round))
            .collect()
    }

    /// The next untried coarse clock of the sweep, else (the sweep done) the models' choice.
    /// `candidates` index the arms as they were before the sweep ended.
    fn pick(&mut self, candidates: &[usize], context: &DVector<f64>, raw: &[f64; RAW]) -> (usize, Phase) {
        if !self.stage.sweep_done() {
            if let Some(next) = self.next_in_sweep(candidates) {
                return (next, Phase::Explore);
            }
            self.finish_sweep();
        }
        self.ucb_pick(candidates, context, raw)
    }

    /// The first untried coarse clock in sweep order.
    fn next_in_sweep(&self, candidates: &[usize]) -> Option<usize> {
        let coarse: Vec<u32> = self.arms.iter().filter(|a| a.coarse).map(Arm::mhz).collect();
        sweep_order(&coarse).into_iter().find_map(|mhz| {
            candidates.iter().copied().find(|&i| self.arms[i].mhz() == mhz && self.arms[i].stats.tries == 0)
        })
    }

    /// Ends the sweep, with fine arms around the best clock.
    fn finish_sweep(&mut self) {
        let best = self.best_tried();
        self.stage.finish_sweep(best);
        if let Some(best) = best {
            self.add_fine_arms(best);
        }
    }

    /// Untried fine arms near the refinement centre first, then UCB (greedy with hysteresis
    /// once converged).
    fn ucb_pick(&self, candidates: &[usize], context: &DVector<f64>, raw: &[f64; RAW]) -> (usize, Phase) {
        if let Some(untried) = self.untried_near_center(candidates) {
            return (untried, Phase::Explore);
        }
        let alpha = self.alpha();
        // Optimism from both models: the shared curve's uncertainty at this clock and the
        // arm's own.
        let score = |i: usize| {
            self.shared.ucb(&self.shared_features(raw, self.arms[i].mhz()), alpha)
                + self.arms[i].model.ucb(context, alpha)
        };
        let best =
            candidates.iter().copied().max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap_or(self.arms.len() - 1);
        if !self.stage.converged() {
            return (best, Phase::Explore);
        }
        let current = self.last_target.and_then(|t| self.arm_of(t)).filter(|arm| candidates.contains(arm));
        match current {
            Some(current) if score(best) - score(current) < self.cfg.hysteresis => (current, Phase::Exploit),
            _ => (best, Phase::Exploit),
        }
    }

    /// The untried candidate nearest the refinement centre, within its fine arms' reach.
    fn untried_near_center(&self, candidates: &[usize]) -> Option<usize> {
        let center = self.stage.refine_center()?;
        let reach = self.cfg.fine_arms_each_side * self.cfg.fine_step_mhz;
        candidates
            .iter()
            .copied()
            .filter(|&i| self.arms[i].stats.tries == 0 && self.arms[i].mhz().abs_diff(center) <= reach)
            .min_by_key(|&i| self.arms[i].mhz().abs_diff(center))
    }

    /// Convergence: once the sweep is done, the recent choices staying within one coarse step
    /// of their median (near the best, one step changes EDP less than a few windows can tell
    /// apart). A converged clock gets its fine neighbours once.
    fn note_choice(&mut self, mhz: u32) {
        let rule = Convergence {
            window: self.cfg.converge_window.max(1),
            share: self.cfg.converge_share,
            band_mhz: self.cfg.coarse_step_mhz,
        };
        if let Some(median) = self.stage.note_choice(mhz, rule) {
            self.converged_after.get_or_insert(self.decisions);
            info!(mhz = median, decisions = self.decisions, "governor converged");
            self.add_fine_arms(median);
        }
    }

    /// Holds the applied clock if the last change was too recent (raising to the maximum, the
    /// safe direction, is never held back).
    pub(crate) fn rate_limited(&self, applied: ClockTarget, want: ClockTarget) -> ClockTarget {
        if want == applied || self.since_change_s >= self.cfg.min_change_interval_s {
            return want;
        }
        match (want, self.max_clock()) {
            (ClockTarget::Locked(wanted), Some(max)) if wanted >= max => want,
            _ => applied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::h100_clocks;
    use crate::GovernorConfig;

    #[test]
    fn sweep_goes_down_every_other_clock_then_back_up() {
        let coarse = [900, 990, 1080, 1170, 1260, 1350, 1440];
        assert_eq!(sweep_order(&coarse), vec![1440, 1260, 1080, 900, 990, 1170, 1350]);
        assert_eq!(sweep_order(&[1980]), vec![1980]);
        let g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
        let order = sweep_order(&g.arms_mhz());
        assert_eq!(order[0], 1980, "starts at the safe maximum");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, g.arms_mhz(), "every coarse clock once");
    }
}
