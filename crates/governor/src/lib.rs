//! The clock governor: a contextual bandit (LinUCB, one model per clock) that picks the locked
//! SM clock for the next window from the vLLM window that just ended.
//!
//! One call to [`Governor::decide`] per cycle:
//! 1. the window just measured is scored (power x TPOT against a max-clock baseline, SLO
//!    penalties; see [`reward`]) and learnt by a reward model shared by all clocks (the load
//!    plus a curve in the clock, see [`pooled`]) and by the arm that was on the GPU, in the
//!    context it was chosen in (what the shared model gets wrong for that clock);
//! 2. in mode `slo` an SLO violation jumps to the maximum clock at once and bans the violating
//!    clock and those below it for a while;
//! 3. otherwise the next clock is chosen as the stage (`stage.rs`) says: a sweep of a coarse
//!    grid, then LinUCB with decaying exploration, fine arms around the best first, until the
//!    choices settle and the governor exploits; a shifted workload, rising EDP or a load far
//!    from the sweep's sends it back to learning or sweeping.
//!
//! Hopeless clocks are pruned on what the models expect of them for a typical window, never on
//! raw means (those mix whatever loads each clock met). `docs/governor.md` tells how the design
//! came about.

pub mod context;
pub mod linucb;
pub mod pooled;
pub mod prune;
pub mod reward;
pub mod store;

mod arms;
mod choose;
mod config;
mod decide;
mod learn;
mod mode;
mod stage;
mod state;

pub use choose::sweep_order;
pub use config::GovernorConfig;
pub use decide::{Decision, Observation};
pub use learn::load_weight;
pub use mode::{ClockTarget, Mode, ModeError, Phase};
pub use state::{ArmState, GovernorState, RestoreError};

use tracing::info;

use arms::Arm;
use context::{ContextBuilder, RAW};
use decide::Baseline;
use learn::{Drift, Pending};
use linucb::LinUcb;
use pooled::SHARED_DIM;
use stage::Stage;

/// The governor. Not thread-safe; the daemon owns it.
pub struct Governor {
    cfg: GovernorConfig,
    /// Supported clocks, ascending.
    clocks: Vec<u32>,
    /// Ascending by clock; the last is the maximum.
    arms: Vec<Arm>,
    /// Reward model shared by all arms: the load plus a curve in the clock. It pools every
    /// window, so the load's effect and the broad shape of reward versus clock are learnt from
    /// all arms at once; each arm's own model learns only what this one gets wrong for it.
    shared: LinUcb,
    ctx: ContextBuilder,
    baseline: Baseline,
    /// Arm and context of the choice whose window is being measured.
    pending: Option<Pending>,
    /// Raw features of the last busy window: the context model-based judgements are made in.
    last_raw: Option<[f64; RAW]>,
    decisions: u64,
    /// Learning rounds since learning (re)started.
    round: u64,
    stage: Stage,
    /// Clocks fine arms were added around.
    refined_around: Vec<u32>,
    /// Decisions until the first convergence (since the model started).
    converged_after: Option<u64>,
    since_change_s: f64,
    last_target: Option<ClockTarget>,
    /// Drift of the workload features, to notice a shift.
    drift: Drift,
    /// Slow moving average of the load, compared with the sweep's.
    load_ema: Option<f64>,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("mode", &self.cfg.mode)
            .field("arms", &self.arms.iter().map(Arm::mhz).collect::<Vec<_>>())
            .field("decisions", &self.decisions)
            .field("converged", &self.stage.converged())
            .finish()
    }
}

impl Governor {
    /// A governor for a GPU with these supported SM clocks (any order). A restored state is
    /// used when its shape fits this GPU; otherwise the governor starts fresh.
    pub fn new(cfg: GovernorConfig, clocks_mhz: &[u32], restored: Option<GovernorState>) -> Self {
        let mut clocks: Vec<u32> = clocks_mhz.iter().copied().filter(|c| *c > 0).collect();
        clocks.sort_unstable();
        clocks.dedup();
        let mut governor = Self {
            ctx: ContextBuilder::new(cfg.normaliser_horizon),
            cfg,
            clocks,
            arms: Vec::new(),
            shared: LinUcb::new(SHARED_DIM, 1.0),
            baseline: Baseline::default(),
            pending: None,
            last_raw: None,
            decisions: 0,
            round: 0,
            stage: Stage::start(),
            refined_around: Vec::new(),
            converged_after: None,
            since_change_s: f64::INFINITY,
            last_target: None,
            drift: Drift::default(),
            load_ema: None,
        };
        governor.arms = governor.coarse_arms();
        if let Some(state) = restored {
            if let Err(why) = governor.restore(state) {
                let cause = std::error::Error::source(&why).map(ToString::to_string);
                info!(%why, cause, "stored governor state does not fit this GPU; starting fresh");
                governor.reset_model();
            }
        }
        governor
    }

    pub fn set_mode(&mut self, mode: Mode) {
        if mode != self.cfg.mode {
            info!(from = %self.cfg.mode, to = %mode, "governor mode changed");
            self.cfg.mode = mode;
            self.pending = None;
        }
    }

    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    pub fn set_slo(&mut self, ttft_s: f64, tpot_s: f64) {
        if ttft_s.is_finite() && ttft_s > 0.0 {
            self.cfg.slo.ttft_s = ttft_s;
        }
        if tpot_s.is_finite() && tpot_s > 0.0 {
            self.cfg.slo.tpot_s = tpot_s;
        }
    }

    /// Decisions since the governor (or its model) started; converged decision count.
    pub fn converged_after(&self) -> Option<u64> {
        self.converged_after
    }

    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The clocks the governor currently considers (MHz, ascending).
    pub fn arms_mhz(&self) -> Vec<u32> {
        self.arms.iter().filter(|a| a.stats.active()).map(Arm::mhz).collect()
    }

    /// Forgets everything learnt (models, baseline, normaliser); keeps mode and SLOs.
    pub fn reset_model(&mut self) {
        self.arms = self.coarse_arms();
        self.shared = LinUcb::new(SHARED_DIM, 1.0);
        self.ctx = ContextBuilder::new(self.cfg.normaliser_horizon);
        self.baseline.clear();
        self.pending = None;
        self.decisions = 0;
        self.round = 0;
        self.stage = Stage::start();
        self.refined_around.clear();
        self.converged_after = None;
        self.drift.clear();
        self.load_ema = None;
    }

    /// Exploration weight: decays with the learning rounds, the minimum once converged.
    fn alpha(&self) -> f64 {
        if self.stage.converged() {
            return self.cfg.alpha_min;
        }
        (self.cfg.alpha0 * (-self.cfg.alpha_decay * self.round as f64).exp()).max(self.cfg.alpha_min)
    }
}

#[cfg(test)]
mod tests;
