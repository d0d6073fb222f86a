//! The clock governor: a contextual bandit (LinUCB, one model per clock) that picks the locked
//! SM clock for the next window from the vLLM window that just ended.
//!
//! One call to [`Governor::decide`] per cycle:
//! 1. the window just measured is scored (power x TPOT against a max-clock baseline, SLO
//!    penalties; see [`reward::Outcome::power_delay`] for why not energy per token) and learnt
//!    by a reward model shared by all clocks (the window's own load plus a curve in the clock,
//!    see [`pooled`]) and by the arm that was on the GPU, in the context it was chosen in
//!    (what the shared model gets wrong for that clock); busier windows weigh more in the
//!    shared model (their reward is less noisy), and a load far above or below the one the
//!    sweep ran at starts a sweep around the converged clock again;
//! 2. an SLO violation jumps to the maximum clock at once (`Fallback`) and bans the violating
//!    clock and those below it for a while;
//! 3. otherwise the next clock is chosen: a sweep of a coarse grid, down from the maximum and
//!    back up (see [`sweep_order`]; an SLO violation drops the untried clocks below it), then
//!    15 MHz arms around the best, then LinUCB with decaying exploration;
//!    once the recent choices stay within one coarse step the governor has converged and
//!    exploits, until the workload shifts or EDP stays above what the models expect.
//!
//! Hopeless clocks are pruned on what the models expect of them for a typical window, never on
//! raw means (those mix whatever loads each clock met).
//!
//! Why it beats AGFT's design (REFERENCE.md): SLO-aware reward with TTFT, a safe jump instead
//! of permanent pruning, a sensible coarse range instead of the whole 345..1980 span, clocks
//! compared with the load held fixed (pooled evidence, so a load ramp does not pass for a good
//! clock), and local re-sweeps instead of resets when the load moves.

pub mod context;
pub mod linucb;
pub mod pooled;
pub mod prune;
pub mod reward;
pub mod store;

use std::collections::VecDeque;
use std::str::FromStr;

use nalgebra::DVector;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use context::{ContextBuilder, DIM, RAW};
use linucb::{LinUcb, LinUcbState};
use prune::{ArmStats, PruneReason, PruneRules};
use reward::{Outcome, RewardShape, Slo};
use vllm_metrics::Window;

/// What the agent asks of the SM clock. Same shape as the daemon's clock target, so the
/// daemon can use this type directly (`pub use crate::ClockTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockTarget {
    /// Driver-managed clocks (nothing locked).
    Default,
    /// Locked at this many MHz.
    Locked(u32),
}

/// How the governor treats clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Minimise EDP per token while keeping both SLOs (default).
    Slo,
    /// Minimise EDP per token, ignoring the SLOs.
    Edp,
    /// Learn from windows but never change the clock.
    Observe,
    /// Hold this clock (snapped to a supported one, never below the minimum).
    Pinned(u32),
}

/// A mode string that is not `slo`, `edp`, `observe` or `pinned:MHZ`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown governor mode `{0}`: expected slo, edp, observe or pinned:MHZ")]
pub struct ModeError(pub String);

impl FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "slo" => Ok(Mode::Slo),
            "edp" => Ok(Mode::Edp),
            "observe" => Ok(Mode::Observe),
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
            Mode::Pinned(m) => write!(f, "pinned:{m}"),
        }
    }
}

/// What the governor is doing this cycle (exported as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Explore,
    Exploit,
    Fallback,
    Idle,
    Observe,
    Pinned,
}

impl Phase {
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

/// Tunables. The defaults are what the bench figures were measured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorConfig {
    pub mode: Mode,
    pub slo: Slo,
    /// Spacing of the coarse grid.
    pub coarse_step_mhz: u32,
    /// Spacing of the arms added around the best clock.
    pub fine_step_mhz: u32,
    /// Fine arms on each side of the best coarse clock.
    pub fine_arms_each_side: u32,
    /// Lowest coarse clock as a share of the maximum (never below the GPU's minimum): below
    /// ~45% of max the H100 sweep shows EDP only rising, for compute- and memory-bound work.
    pub min_share_of_max: f64,
    /// Ridge prior of each arm's model (`A = lambda I`). Each arm's model only corrects the
    /// shared one, from a few noisy windows in a 9-feature context: a strong prior keeps one
    /// lucky window from making a clock look better than the pooled evidence says.
    pub lambda: f64,
    /// Exploration: alpha = max(alpha_min, alpha0 exp(-alpha_decay t)).
    pub alpha0: f64,
    pub alpha_decay: f64,
    pub alpha_min: f64,
    /// Converged when one clock made `converge_share` of the last `converge_window` choices.
    pub converge_window: usize,
    pub converge_share: f64,
    /// While exploiting, switch only for a predicted gain above this (no flapping).
    pub hysteresis: f64,
    /// Windows held at the maximum clock after an SLO violation.
    pub fallback_windows: u32,
    /// Decisions the violating clock and those below it stay banned.
    pub ban_decisions: u64,
    /// Minimum seconds between two clock changes (safety jumps excepted). 1.9 holds each clock
    /// for two 1 s windows: one window's EDP is too noisy (Poisson load) to judge a clock by.
    pub min_change_interval_s: f64,
    /// Relearn when short- and long-term workload features drift this far apart (z units).
    pub shift_threshold: f64,
    /// Sweep again once converged when the load (slow average) rises above this many times
    /// the load the sweep ran at, or falls below it by the same factor (0 = never): clocks
    /// judged at night were judged on noise, and a model fitted at the peak extrapolates
    /// badly to a trickle.
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
    /// window of a cold server can cost 50 times a steady one).
    pub baseline_windows: u32,
    /// Horizon (windows) of the feature normaliser.
    pub normaliser_horizon: f64,
    pub prune: PruneRules,
    /// The governor's historical rule: a tried clock the models expect to be this much worse
    /// (log EDP) than the best for a typical window is dropped (see
    /// [`prune::prune_by_expectation`]).
    pub prune_gap: f64,
    pub reward: RewardShape,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Slo,
            slo: Slo { ttft_s: 0.5, tpot_s: 0.05 },
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
                // AGFT's rule on raw means is off (the floor below only served it); the
                // governor's own historical rule is `prune_gap`, with these minimum tries.
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

use pooled::SHARED_DIM;

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

/// One clock arm as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmState {
    pub stats: ArmStats,
    pub model: LinUcbState,
    pub coarse: bool,
}

/// Everything learnt, for persistence and export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorState {
    pub arms: Vec<ArmState>,
    pub shared: LinUcbState,
    pub context: ContextBuilder,
    pub baseline_edp: Option<f64>,
    pub decisions: u64,
    pub converged_after: Option<u64>,
    pub sweep_done: bool,
}

/// The choice whose window is being measured: arm and the normalised context it was made in.
type Pending = (usize, DVector<f64>);

#[derive(Debug, Clone)]
struct Arm {
    stats: ArmStats,
    model: LinUcb,
    coarse: bool,
    /// Banned (after an SLO violation) until this learning round.
    banned_until: u64,
}

impl Arm {
    fn new(mhz: u32, coarse: bool, lambda: f64) -> Self {
        Self { stats: ArmStats::new(mhz), model: LinUcb::new(DIM, lambda), coarse, banned_until: 0 }
    }
    fn mhz(&self) -> u32 {
        self.stats.mhz
    }
}

/// The governor. Not thread-safe; the daemon owns it.
pub struct Governor {
    cfg: GovernorConfig,
    /// Supported clocks, ascending.
    clocks: Vec<u32>,
    arms: Vec<Arm>,
    /// Reward model shared by all arms: context plus a quadratic in the clock. It pools every
    /// window, so the load's effect and the broad shape of reward versus clock are learnt from
    /// all arms at once; each arm's own model learns only what this one gets wrong for it.
    shared: LinUcb,
    ctx: ContextBuilder,
    baseline_edp: Option<f64>,
    baseline_samples: Vec<f64>,
    /// Arm and context of the choice whose window is being measured.
    pending: Option<Pending>,
    /// Raw features of the last busy window: the context model-based judgements are made in.
    last_raw: Option<[f64; RAW]>,
    decisions: u64,
    /// Learning rounds since learning (re)started.
    round: u64,
    sweep_done: bool,
    refined_around: Vec<u32>,
    /// The clock the last refinement was centred on: its fine arms are tried first.
    refine_center: Option<u32>,
    recent: VecDeque<u32>,
    converged: bool,
    converged_after: Option<u64>,
    edp_rise_streak: u32,
    fallback_left: u32,
    since_change_s: f64,
    /// The clock was parked for an idle window.
    parked: bool,
    last_target: Option<ClockTarget>,
    short_ema: Option<Vec<f64>>,
    long_ema: Option<Vec<f64>>,
    /// Load (processed tokens per second) summed over the current sweep's windows, and their
    /// count.
    sweep_load: (f64, u32),
    /// Slow moving average of the load, compared with the sweep's.
    load_ema: Option<f64>,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("mode", &self.cfg.mode)
            .field("arms", &self.arms.iter().map(Arm::mhz).collect::<Vec<_>>())
            .field("decisions", &self.decisions)
            .field("converged", &self.converged)
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
        let mut g = Self {
            ctx: ContextBuilder::new(cfg.normaliser_horizon),
            cfg,
            clocks,
            arms: Vec::new(),
            shared: LinUcb::new(SHARED_DIM, 1.0),
            baseline_edp: None,
            baseline_samples: Vec::new(),
            pending: None,
            last_raw: None,
            decisions: 0,
            round: 0,
            sweep_done: false,
            refined_around: Vec::new(),
            refine_center: None,
            recent: VecDeque::new(),
            converged: false,
            converged_after: None,
            edp_rise_streak: 0,
            fallback_left: 0,
            since_change_s: f64::INFINITY,
            parked: false,
            last_target: None,
            short_ema: None,
            long_ema: None,
            sweep_load: (0.0, 0),
            load_ema: None,
        };
        g.arms = g.coarse_arms();
        if let Some(s) = restored {
            if let Err(why) = g.restore(s) {
                info!(%why, "stored governor state does not fit this GPU; starting fresh");
                g.reset_model();
            }
        }
        g
    }

    fn coarse_arms(&self) -> Vec<Arm> {
        let Some(&max) = self.clocks.last() else { return Vec::new() };
        let floor = self.floor_mhz();
        let step = self.cfg.coarse_step_mhz.max(1);
        let mut out: Vec<u32> = Vec::new();
        let mut want = i64::from(max);
        while want >= i64::from(floor) {
            if let Some(c) = self.snap(want as u32).filter(|c| *c >= floor && !out.contains(c)) {
                out.push(c);
            }
            want -= i64::from(step);
        }
        out.sort_unstable();
        out.into_iter().map(|m| Arm::new(m, true, self.cfg.lambda)).collect()
    }

    /// Lowest clock the governor will explore: a share of the maximum, never below the GPU's
    /// minimum.
    fn floor_mhz(&self) -> u32 {
        let min = self.clocks.first().copied().unwrap_or(0);
        let max = self.clocks.last().copied().unwrap_or(0);
        let want = (f64::from(max) * self.cfg.min_share_of_max).round() as u32;
        // The smallest supported clock at or above `want`.
        self.clocks.iter().copied().find(|c| *c >= want).unwrap_or(max).max(min)
    }

    /// The supported clock nearest to `mhz`.
    fn snap(&self, mhz: u32) -> Option<u32> {
        self.clocks.iter().copied().min_by_key(|c| c.abs_diff(mhz))
    }

    fn max_clock(&self) -> Option<u32> {
        self.clocks.last().copied()
    }

    fn restore(&mut self, s: GovernorState) -> Result<(), String> {
        if s.context.norm.dim() != RAW {
            return Err(format!("normaliser has {} features, expected {RAW}", s.context.norm.dim()));
        }
        let mut arms = Vec::with_capacity(s.arms.len());
        for a in &s.arms {
            if !self.clocks.contains(&a.stats.mhz) {
                return Err(format!("arm {} MHz is not a supported clock", a.stats.mhz));
            }
            let model = LinUcb::from_state(&a.model, DIM).map_err(|e| e.to_string())?;
            arms.push(Arm { stats: a.stats.clone(), model, coarse: a.coarse, banned_until: 0 });
        }
        if arms.is_empty() {
            return Err("no arms".into());
        }
        arms.sort_by_key(Arm::mhz);
        self.shared = LinUcb::from_state(&s.shared, SHARED_DIM).map_err(|e| e.to_string())?;
        self.arms = arms;
        self.ctx = s.context;
        self.baseline_edp = s.baseline_edp.filter(|b| b.is_finite() && *b > 0.0);
        self.decisions = s.decisions;
        self.sweep_done = s.sweep_done;
        // What was learnt is kept; convergence is re-established under the current load.
        self.converged = false;
        self.converged_after = s.converged_after;
        self.refined_around = self.arms.iter().filter(|a| !a.coarse).map(Arm::mhz).collect();
        Ok(())
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

    pub fn state(&self) -> GovernorState {
        GovernorState {
            arms: self
                .arms
                .iter()
                .map(|a| ArmState { stats: a.stats.clone(), model: a.model.state(), coarse: a.coarse })
                .collect(),
            shared: self.shared.state(),
            context: self.ctx.clone(),
            baseline_edp: self.baseline_edp,
            decisions: self.decisions,
            converged_after: self.converged_after,
            sweep_done: self.sweep_done,
        }
    }

    /// Forgets everything learnt (models, baseline, normaliser); keeps mode and SLOs.
    pub fn reset_model(&mut self) {
        self.arms = self.coarse_arms();
        self.shared = LinUcb::new(SHARED_DIM, 1.0);
        self.ctx = ContextBuilder::new(self.cfg.normaliser_horizon);
        self.baseline_edp = None;
        self.baseline_samples.clear();
        self.pending = None;
        self.decisions = 0;
        self.round = 0;
        self.sweep_done = false;
        self.refined_around.clear();
        self.refine_center = None;
        self.recent.clear();
        self.converged = false;
        self.converged_after = None;
        self.edp_rise_streak = 0;
        self.fallback_left = 0;
        self.parked = false;
        self.short_ema = None;
        self.long_ema = None;
        self.sweep_load = (0.0, 0);
        self.load_ema = None;
    }

    /// Index of the arm the applied clock corresponds to. Driver-managed clocks run at the
    /// maximum under load, so they count as the maximum arm.
    fn arm_of(&self, t: ClockTarget) -> Option<usize> {
        let mhz = match t {
            ClockTarget::Default => self.max_clock()?,
            ClockTarget::Locked(m) => m,
        };
        self.arms.iter().position(|a| a.mhz() == mhz)
    }

    fn max_arm(&self) -> Option<usize> {
        (!self.arms.is_empty()).then(|| self.arms.len() - 1)
    }

    fn alpha(&self) -> f64 {
        if self.converged {
            return self.cfg.alpha_min;
        }
        (self.cfg.alpha0 * (-self.cfg.alpha_decay * self.round as f64).exp()).max(self.cfg.alpha_min)
    }

    /// One decision cycle. See the module docs for the steps.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        self.decisions += 1;
        self.since_change_s += obs.seconds.max(0.0);
        let outcome = Outcome::from_window(obs.window, obs.energy_j, obs.seconds);
        let edp = outcome.edp_per_token();
        // Learnt from: see [`Outcome::power_delay`].
        let edp_learn = outcome.power_delay();
        let slo = outcome.slo_check(&self.cfg.slo);
        let slo_violated = slo.violated();
        let raw = context::raw_features(obs.window);
        let busy = outcome.tokens > 0.0
            || obs.window.num_requests_running.is_some_and(|r| r > 0.0)
            || obs.window.num_requests_waiting.is_some_and(|w| w > 0.0);
        let x = if busy { Some(self.ctx.build(obs.window)) } else { None };
        if busy {
            self.last_raw = Some(raw);
        }
        let mut d = Decision {
            target: obs.applied,
            phase: Phase::Observe,
            reward: None,
            edp_per_token: edp,
            slo_violated,
            alpha: self.alpha(),
            converged: self.converged,
        };
        if self.arms.is_empty() {
            return d;
        }

        // Baseline: EDP of the first windows at the maximum clock.
        let applied_arm = self.arm_of(obs.applied);
        if self.baseline_edp.is_none() && applied_arm == self.max_arm() {
            if let Some(e) = edp_learn {
                self.baseline_samples.push(e);
                if self.baseline_samples.len() as u32 >= self.cfg.baseline_windows.max(1) {
                    let b = reward::median(&self.baseline_samples);
                    info!(baseline_edp = b, "EDP baseline at the maximum clock measured");
                    self.baseline_edp = Some(b).filter(|b| b.is_finite() && *b > 0.0);
                }
            }
        }

        // Learn from the window just measured.
        let pending = self.pending.take();
        let learnable = !matches!(self.cfg.mode, Mode::Pinned(_));
        if let (true, Some(b), Some(e)) = (learnable, self.baseline_edp, edp_learn) {
            let shape =
                RewardShape { slo_aware: self.cfg.mode != Mode::Edp && self.cfg.reward.slo_aware, ..self.cfg.reward };
            let r = reward::reward(e, b, &slo, &shape);
            // The context the clock was chosen in; observing mode has no choice, so it uses
            // the window's own features.
            let learn = match (&pending, applied_arm) {
                (Some((i, cx)), Some(a)) if *i == a => Some((a, cx.clone())),
                (_, Some(a)) if self.cfg.mode == Mode::Observe => x.clone().map(|cx| (a, cx)),
                _ => None,
            };
            if let Some((a, cx)) = learn {
                // The shared model explains the reward by the load the window actually had.
                let phi = self.shared_features(&raw, self.arms[a].mhz());
                let base = self.shared.predict(&phi);
                let surprise = r - base - self.arms[a].model.predict(&cx);
                let rate = (outcome.tokens + outcome.prompt_tokens) / obs.seconds.max(1e-9);
                // A load far above the sweep's restarts the sweep before this window counts.
                self.track_load(rate);
                // Least-squares weight w: features and reward scaled by its square root.
                let w = load_weight(rate).sqrt();
                self.shared.update(&(&phi * w), r * w);
                self.arms[a].model.update(&cx, r - base);
                self.arms[a].stats.record(r, Some(e / b));
                d.reward = Some(r);
                self.after_learning(a, surprise, slo_violated);
            }
        }

        d.target = match self.cfg.mode {
            Mode::Observe => {
                d.phase = Phase::Observe;
                obs.applied
            }
            Mode::Pinned(m) => {
                d.phase = Phase::Pinned;
                let floor = self.clocks.first().copied().unwrap_or(m);
                ClockTarget::Locked(self.snap(m.max(floor)).unwrap_or(m))
            }
            Mode::Slo | Mode::Edp => self.choose(obs, x, &raw, slo_violated, &mut d),
        };
        d.alpha = self.alpha();
        d.converged = self.converged;
        if Some(d.target) != self.last_target && self.last_target.is_some() {
            self.since_change_s = 0.0;
        }
        if d.target != obs.applied {
            self.since_change_s = 0.0;
        }
        self.last_target = Some(d.target);
        d
    }

    /// Bookkeeping after learning from arm `a`: sweep progress, pruning, relearn triggers.
    /// `surprise` is the reward minus what the models expected.
    fn after_learning(&mut self, a: usize, surprise: f64, violated: bool) {
        // The sweep covers the whole coarse grid but the untried clocks below one that broke
        // the SLO: stopping where clocks start to look worse judges them before the shared
        // model can tell the load's effect from the clock's (on the bench's traces that cost
        // more than the few windows at low clocks it saves), and the clocks above the violating
        // one are still to be measured (a burst of long prompts breaks the TPOT objective at
        // any clock).
        if !self.sweep_done && violated {
            self.drop_untried_below(self.arms[a].mhz());
        }
        let protect = self.protected();
        // Both rules work on one copy of the arms' statistics (an arm one rule drops is not
        // judged again by the other); what they prune is copied back.
        let mut stats: Vec<ArmStats> = self.arms.iter().map(|x| x.stats.clone()).collect();
        let mut pruned = prune::prune(&mut stats, &self.cfg.prune, self.round, &protect);
        // The historical rule on what the models expect of a typical window (the normaliser's
        // mean): one burst's context would let one arm's extrapolation prune its neighbours.
        let typical: Option<[f64; RAW]> =
            (self.ctx.norm.n >= 2).then(|| self.ctx.norm.mean.as_slice().try_into().ok()).flatten();
        if let Some(raw) = typical {
            let cx = self.ctx.context_of(&raw);
            let expected: Vec<f64> = (0..self.arms.len()).map(|i| self.expected(i, &cx, &raw)).collect();
            pruned.extend(prune::prune_by_expectation(
                &mut stats,
                &expected,
                self.cfg.prune_gap,
                self.cfg.prune.historical_min_tries,
                &protect,
            ));
        }
        for (mhz, why) in pruned {
            if let Some(arm) = self.arms.iter_mut().find(|x| x.mhz() == mhz) {
                debug!(mhz, ?why, "pruned clock");
                arm.stats.pruned = Some(why);
            }
        }
        if self.converged {
            // EDP well above what the models expect for this load, window after window: the
            // workload changed in a way the features do not show.
            let rise = surprise < -self.cfg.relearn_edp_rise.ln_1p();
            self.edp_rise_streak = if rise { self.edp_rise_streak + 1 } else { 0 };
            if self.edp_rise_streak >= 5 {
                self.relearn("EDP rose at the exploited clock");
            }
        }
    }

    /// Expected reward of arm `i` in a context: shared model plus the arm's own correction.
    fn expected(&self, i: usize, cx: &DVector<f64>, craw: &[f64; RAW]) -> f64 {
        self.shared.predict(&self.shared_features(craw, self.arms[i].mhz())) + self.arms[i].model.predict(cx)
    }

    /// Untried coarse clocks below `mhz` are dropped from the sweep (slower still than one
    /// that broke the SLO).
    fn drop_untried_below(&mut self, mhz: u32) {
        for arm in self.arms.iter_mut().filter(|x| x.stats.tries == 0 && x.mhz() < mhz) {
            arm.stats.pruned = Some(PruneReason::Cascade);
        }
    }

    /// Ends the coarse sweep and adds fine arms around the best clock.
    fn finish_sweep(&mut self) {
        self.sweep_done = true;
        if let Some(best) = self.best_tried() {
            self.refine_around(best);
        }
    }

    /// The tried, active clock the models rate best in the last busy window's context.
    fn best_tried(&self) -> Option<u32> {
        let raw = self.last_raw?;
        let cx = self.ctx.context_of(&raw);
        (0..self.arms.len())
            .filter(|&i| self.arms[i].stats.active() && self.arms[i].stats.tries > 0)
            .map(|i| (self.arms[i].mhz(), self.expected(i, &cx, &raw)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(m, _)| m)
    }

    /// Adds 15 MHz arms around `mhz`, each starting from a weakened copy of its nearest
    /// existing model so it needs only a few windows to confirm or refute.
    fn refine_around(&mut self, mhz: u32) {
        self.refine_center = Some(mhz);
        if self.refined_around.contains(&mhz) {
            return;
        }
        self.refined_around.push(mhz);
        let floor = self.floor_mhz();
        let max = self.max_clock().unwrap_or(mhz);
        let step = self.cfg.fine_step_mhz.max(1);
        for k in 1..=self.cfg.fine_arms_each_side {
            for want in [mhz.saturating_sub(k * step), mhz.saturating_add(k * step)] {
                let Some(c) = self.snap(want).filter(|c| *c >= floor && *c <= max) else { continue };
                if self.arms.iter().any(|a| a.mhz() == c) {
                    continue;
                }
                let mut arm = Arm::new(c, false, self.cfg.lambda);
                if let Some(near) = self.arms.iter().min_by_key(|a| a.mhz().abs_diff(c)) {
                    arm.model = near.model.clone();
                    arm.model.forget(0.2);
                }
                self.arms.push(arm);
            }
        }
        self.arms.sort_by_key(Arm::mhz);
        debug!(around = mhz, arms = ?self.arms_mhz(), "refined the clock grid");
    }

    /// Never prune the maximum (the safe clock) or the current best.
    fn protected(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.max_clock().into_iter().collect();
        p.extend(self.best_tried());
        p
    }

    fn relearn(&mut self, why: &str) {
        info!(why, "relearning");
        self.shared.forget(self.cfg.relearn_keep);
        for a in &mut self.arms {
            a.model.forget(self.cfg.relearn_keep);
            a.stats.pruned = None;
            a.banned_until = 0;
        }
        self.round = 0;
        self.converged = false;
        self.edp_rise_streak = 0;
        self.recent.clear();
        self.short_ema = None;
        self.long_ema = None;
    }

    /// Follows the load; once converged, a load far above or below the one the sweep ran at
    /// starts the sweep again around the best clock (with those coarse clocks' statistics
    /// cleared, as they were judged on the sweep's load; the models keep what a relearn keeps,
    /// and the busier windows outweigh the old ones, see [`load_weight`]).
    fn track_load(&mut self, rate: f64) {
        if !rate.is_finite() {
            return;
        }
        let ema = self.load_ema.map_or(rate, |m| m + 0.03 * (rate - m));
        self.load_ema = Some(ema);
        if !self.sweep_done {
            self.sweep_load.0 += rate;
            self.sweep_load.1 += 1;
            return;
        }
        let swept = self.sweep_load.0 / f64::from(self.sweep_load.1.max(1));
        let factor = self.cfg.resweep_load_factor;
        if self.converged && factor > 0.0 && swept > 0.0 && (ema > factor * swept || ema * factor < swept) {
            info!(swept, now = ema, "load far from the sweep's; sweeping again");
            self.relearn("load far from the sweep's");
            self.sweep_done = false;
            self.sweep_load = (0.0, 0);
            // Around the clock it converged on (the models' best in a context they never saw
            // is an extrapolation).
            let center = match self.last_target {
                Some(ClockTarget::Locked(m)) => Some(m),
                _ => self.best_tried(),
            };
            let span = self.cfg.resweep_span_mhz;
            for a in self.arms.iter_mut().filter(|a| a.coarse) {
                if span == 0 || center.is_none_or(|c| a.mhz().abs_diff(c) <= span) {
                    a.stats = ArmStats::new(a.mhz());
                }
            }
        }
    }

    /// Short- versus long-term mean of the workload features, in z units of the normaliser.
    fn workload_shifted(&mut self, raw: &[f64; RAW]) -> bool {
        let z = self.ctx.norm.z(raw);
        let ema = |e: &mut Option<Vec<f64>>, k: f64| match e {
            Some(v) => v.iter_mut().zip(&z).for_each(|(m, x)| *m += k * (x - *m)),
            None => *e = Some(z.clone()),
        };
        ema(&mut self.short_ema, 0.3);
        ema(&mut self.long_ema, 0.03);
        match (&self.short_ema, &self.long_ema) {
            (Some(s), Some(l)) => {
                s.iter().zip(l).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() > self.cfg.shift_threshold
            }
            _ => false,
        }
    }

    fn choose(
        &mut self,
        obs: &Observation,
        x: Option<DVector<f64>>,
        raw: &[f64; RAW],
        violated: bool,
        d: &mut Decision,
    ) -> ClockTarget {
        let Some(max_i) = self.max_arm() else { return obs.applied };
        let max_target = ClockTarget::Locked(self.arms[max_i].mhz());
        let slo_mode = self.cfg.mode == Mode::Slo;

        // Safety first: an SLO violation jumps to the maximum at once.
        if slo_mode && violated {
            if let Some(a) = self.arm_of(obs.applied).filter(|a| *a != max_i) {
                let until = self.round + self.cfg.ban_decisions;
                let bad = self.arms[a].mhz();
                self.arms[a].stats.violations += 1;
                for arm in self.arms.iter_mut().filter(|x| x.mhz() <= bad) {
                    arm.banned_until = arm.banned_until.max(until);
                }
                if self.converged {
                    self.relearn("SLO violated at the exploited clock");
                }
            }
            self.fallback_left = self.cfg.fallback_windows;
            d.phase = Phase::Fallback;
            self.pending = x.map(|cx| (max_i, cx));
            return max_target;
        }
        let Some(x) = x else {
            // Idle: nothing to learn from; park at the lowest explored clock (never below the
            // GPU's minimum), from where the first busy window moves up.
            d.phase = Phase::Idle;
            let park = ClockTarget::Locked(
                self.arms.iter().find(|a| a.stats.active()).map_or(self.arms[max_i].mhz(), Arm::mhz),
            );
            let target = self.rate_limited(obs.applied, park);
            self.parked = target == park;
            return target;
        };
        // Leaving the idle clock is never held back: it was not a measurement.
        let parked = std::mem::take(&mut self.parked);
        if self.fallback_left > 0 {
            self.fallback_left -= 1;
            d.phase = Phase::Fallback;
            self.pending = Some((max_i, x));
            return max_target;
        }
        if self.converged && self.workload_shifted(raw) {
            self.relearn("workload shifted");
        } else if !self.converged {
            let _ = self.workload_shifted(raw);
        }
        self.round += 1;
        let round = self.round;
        let candidates: Vec<usize> = (0..self.arms.len())
            .filter(|&i| i == max_i || (self.arms[i].stats.active() && self.arms[i].banned_until <= round))
            .collect();

        let (pick, phase) = if !self.sweep_done {
            // Sweep: the first untried coarse clock in down-then-up order.
            let coarse: Vec<u32> = self.arms.iter().filter(|a| a.coarse).map(Arm::mhz).collect();
            let next = sweep_order(&coarse).into_iter().find_map(|m| {
                candidates.iter().copied().find(|&i| self.arms[i].mhz() == m && self.arms[i].stats.tries == 0)
            });
            match next {
                Some(i) => (i, Phase::Explore),
                None => {
                    self.finish_sweep();
                    self.ucb_pick(&candidates, &x, raw)
                }
            }
        } else {
            self.ucb_pick(&candidates, &x, raw)
        };
        d.phase = phase;
        let mhz = self.arms[pick].mhz();

        // Convergence: the recent choices stay within one coarse step of their median after the
        // sweep (clocks 90 MHz apart near the best differ by about 1% in EDP, less than a few
        // 1 s windows can tell apart).
        if self.sweep_done {
            self.recent.push_back(mhz);
            while self.recent.len() > self.cfg.converge_window.max(1) {
                self.recent.pop_front();
            }
            if !self.converged && self.recent.len() >= self.cfg.converge_window.max(1) {
                let mut sorted: Vec<u32> = self.recent.iter().copied().collect();
                sorted.sort_unstable();
                let median = sorted[sorted.len() / 2];
                let band = self.cfg.coarse_step_mhz;
                let inside = sorted.iter().filter(|m| m.abs_diff(median) <= band).count();
                if inside as f64 >= self.cfg.converge_share * sorted.len() as f64 {
                    self.converged = true;
                    self.converged_after.get_or_insert(self.decisions);
                    info!(mhz = median, decisions = self.decisions, "governor converged");
                    // A converged coarse clock gets its fine neighbours once.
                    self.refine_around(median);
                }
            }
        }
        let target =
            if parked { ClockTarget::Locked(mhz) } else { self.rate_limited(obs.applied, ClockTarget::Locked(mhz)) };
        if let Some(i) = self.arm_of(target) {
            self.pending = Some((i, x));
        }
        target
    }

    /// Tried-once-first for fine arms, then UCB (greedy with hysteresis once converged).
    fn ucb_pick(&self, candidates: &[usize], x: &DVector<f64>, raw: &[f64; RAW]) -> (usize, Phase) {
        let reach = self.cfg.fine_arms_each_side * self.cfg.fine_step_mhz;
        let untried = self.refine_center.and_then(|c| {
            candidates
                .iter()
                .copied()
                .filter(|&i| self.arms[i].stats.tries == 0 && self.arms[i].mhz().abs_diff(c) <= reach)
                .min_by_key(|&i| self.arms[i].mhz().abs_diff(c))
        });
        if let Some(i) = untried {
            return (i, Phase::Explore);
        }
        let alpha = self.alpha();
        // Optimism from both models: the shared curve's uncertainty at this clock and the
        // arm's own.
        let score = |i: usize| {
            self.shared.ucb(&self.shared_features(raw, self.arms[i].mhz()), alpha) + self.arms[i].model.ucb(x, alpha)
        };
        let mut pick =
            candidates.iter().copied().max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap_or(self.arms.len() - 1);
        if self.converged {
            if let Some(cur) = self.last_target.and_then(|t| self.arm_of(t)).filter(|c| candidates.contains(c)) {
                if score(pick) - score(cur) < self.cfg.hysteresis {
                    pick = cur;
                }
            }
            (pick, Phase::Exploit)
        } else {
            (pick, Phase::Explore)
        }
    }

    /// Features of the shared model (see [`pooled`]): raw load features and a curve in the
    /// clock's offset within the explored range.
    fn shared_features(&self, raw: &[f64; RAW], mhz: u32) -> DVector<f64> {
        let max = self.max_clock().unwrap_or(1);
        pooled::features(raw, pooled::clock_offset(mhz, self.floor_mhz(), max))
    }

    /// Holds the applied clock if the last change was too recent (raising to the maximum, the
    /// safe direction, is never held back).
    fn rate_limited(&self, applied: ClockTarget, want: ClockTarget) -> ClockTarget {
        if want == applied || self.since_change_s >= self.cfg.min_change_interval_s {
            return want;
        }
        match (want, self.max_clock()) {
            (ClockTarget::Locked(w), Some(m)) if w >= m => want,
            _ => applied,
        }
    }
}

/// Weight of a window in the shared model (its least-squares weight) from its load in
/// processed tokens per second: a window's EDP per token is a ratio of Poisson counts, so its
/// noise falls as its load rises, and a night-time window at 0.5 requests per second must
/// not outvote a busy one. The square root of the load in thousands of tokens per second,
/// within [0.14, 3.2]: the full load would let the busiest windows drown the sweep's.
pub fn load_weight(tokens_per_s: f64) -> f64 {
    if !tokens_per_s.is_finite() {
        return 1.0;
    }
    (tokens_per_s / 1000.0).clamp(0.02, 10.0).sqrt()
}

/// The coarse sweep's order: every other clock going down from the maximum, then the ones in
/// between going back up. The load on a cold server ramps up during the sweep; going one way
/// only would make the last clocks look better for the load alone, while down-then-up visits
/// both ends of the range early and late, so the shared model can tell the ramp from the
/// clock. It still starts at the safe maximum and moves in steps of two grid points.
pub fn sweep_order(coarse: &[u32]) -> Vec<u32> {
    let mut desc = coarse.to_vec();
    desc.sort_unstable_by(|a, b| b.cmp(a));
    desc.dedup();
    let down = desc.iter().copied().step_by(2);
    let up: Vec<u32> = desc.iter().copied().skip(1).step_by(2).collect();
    down.chain(up.into_iter().rev()).collect()
}

#[cfg(test)]
mod tests;
