//! One decision cycle: the window just measured is scored and learnt, then the mode says what
//! the next clock is (the governor's choice in modes `slo` and `edp`).

use nalgebra::DVector;
use serde::Serialize;
use tracing::info;
use vllm_metrics::Window;

use crate::context::{self, RAW};
use crate::learn::Measured;
use crate::reward::{self, Outcome};
use crate::{ClockTarget, Governor, Mode, Phase};

/// One cycle's input.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The vLLM window that just ended.
    pub window: &'a Window,
    /// GPU energy over the window (energy counter at the window's edges), summed over the group.
    pub energy_j: f64,
    /// Length of the window.
    pub seconds: f64,
    /// What is on the GPU now (and was during the window unless it just changed).
    pub applied: ClockTarget,
}

/// One cycle's output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub target: ClockTarget,
    pub phase: Phase,
    /// Reward learnt from the window (None when nothing was learnt).
    pub reward: Option<f64>,
    /// EDP per generated token of the window (J*s per token).
    pub edp_per_token: Option<f64>,
    pub slo_violated: bool,
    /// Exploration weight used for this choice.
    pub alpha: f64,
    /// Has the governor converged (since the last relearn)?
    pub converged: bool,
}

/// The reference every reward is relative to: the median power x TPOT of the first windows at
/// the maximum clock (a median, as a cold server's first windows are far costlier).
#[derive(Debug, Clone, Default)]
pub(crate) struct Baseline {
    pub(crate) edp: Option<f64>,
    samples: Vec<f64>,
}

impl Baseline {
    /// Adds a window measured at the maximum clock, until `windows` of them give the baseline.
    fn measure(&mut self, sample: Option<f64>, windows: u32) {
        let (None, Some(sample)) = (self.edp, sample) else { return };
        self.samples.push(sample);
        if u32::try_from(self.samples.len()).unwrap_or(u32::MAX) >= windows.max(1) {
            let median = reward::median(&self.samples);
            info!(baseline_edp = median, "EDP baseline at the maximum clock measured");
            self.edp = Some(median).filter(|b| b.is_finite() && *b > 0.0);
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Governor {
    /// One decision cycle. See the crate docs for the steps.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        self.decisions += 1;
        self.since_change_s += obs.seconds.max(0.0);
        let outcome = Outcome::from_window(obs.window, obs.energy_j, obs.seconds);
        let slo = outcome.slo_check(&self.cfg.slo);
        let raw = context::raw_features(obs.window);
        let context = self.busy_context(obs.window, &outcome, raw);
        let mut decision = Decision {
            target: obs.applied,
            phase: Phase::Observe,
            reward: None,
            edp_per_token: outcome.edp_per_token(),
            slo_violated: slo.violated(),
            alpha: self.alpha(),
            converged: self.stage.converged(),
        };
        let Some(max_arm) = self.max_arm() else { return decision };
        let applied_arm = self.arm_of(obs.applied);
        // Of what the governor learns from (see [`Outcome::power_delay`]).
        if applied_arm == Some(max_arm) {
            self.baseline.measure(outcome.power_delay(), self.cfg.baseline_windows);
        }
        let pending = self.pending.take();
        let measured =
            Measured { outcome: &outcome, slo: &slo, raw: &raw, context: context.as_ref(), seconds: obs.seconds };
        decision.reward = self.learn(&measured, pending, applied_arm);
        (decision.target, decision.phase) = self.next_target(obs.applied, context, &raw, decision.slo_violated);
        decision.alpha = self.alpha();
        decision.converged = self.stage.converged();
        self.note_target(obs.applied, decision.target);
        decision
    }

    /// The context of a busy window (one that served or holds requests), which the normaliser
    /// learns from; None for an idle one.
    fn busy_context(&mut self, window: &Window, outcome: &Outcome, raw: [f64; RAW]) -> Option<DVector<f64>> {
        let busy = outcome.tokens > 0.0
            || window.num_requests_running.is_some_and(|r| r > 0.0)
            || window.num_requests_waiting.is_some_and(|w| w > 0.0);
        if !busy {
            return None;
        }
        let context = self.ctx.build(window);
        self.last_raw = Some(raw);
        Some(context)
    }

    /// What the mode asks for: the applied clock when observing, the pinned one, or the
    /// governor's choice.
    fn next_target(
        &mut self,
        applied: ClockTarget,
        context: Option<DVector<f64>>,
        raw: &[f64; RAW],
        violated: bool,
    ) -> (ClockTarget, Phase) {
        match self.cfg.mode {
            Mode::Observe | Mode::Default => (applied, Phase::Observe),
            Mode::Pinned(mhz) => {
                let floor = self.clocks.first().copied().unwrap_or(mhz);
                (ClockTarget::Locked(self.snap(mhz.max(floor)).unwrap_or(mhz)), Phase::Pinned)
            }
            Mode::Slo | Mode::Edp => self.choose(applied, context, raw, violated),
        }
    }

    /// Restarts the rate limit's clock on a change of target.
    fn note_target(&mut self, applied: ClockTarget, target: ClockTarget) {
        if Some(target) != self.last_target && self.last_target.is_some() {
            self.since_change_s = 0.0;
        }
        if target != applied {
            self.since_change_s = 0.0;
        }
        self.last_target = Some(target);
    }
}
