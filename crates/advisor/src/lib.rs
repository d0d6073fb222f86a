//! The replica advisor: how many replicas of this vLLM server the load needs under the latency
//! objectives, for external autoscalers (HPA, KEDA, AIBrix/KPA) to act on.
//!
//! Each decision cycle feeds it the vLLM window; it tracks the demand ([`demand`]), refits the
//! online performance model ([`online`]), combines it with the trial launcher's capacity
//! profiles ([`capacity`]) at the clock the governor runs, and turns this replica's demand in
//! replica units into a stable suggestion ([`suggest`]). Missing or stale data keeps the last
//! good values and says so; it never reads as 0.

pub mod capacity;
pub mod config;
pub mod demand;
pub mod metrics;
pub mod online;
pub mod suggest;

pub use config::{AdvisorConfig, InvalidSetting};

use std::path::Path;

use serde::Serialize;

use capacity::{Capacity, Load, Profiles};
use demand::{Demand, DemandTracker};
use online::{Objectives, OnlineModel};
use suggest::{Policy, Suggester, Suggestion};
use vllm_metrics::Window;

/// A queue is planned to drain within this many seconds: waiting requests add
/// `waiting / DRAIN_S` to the arrival rate the replicas must serve.
pub const DRAIN_S: f64 = 30.0;

/// What the advisor is told each cycle besides the window.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Seconds on a monotonic clock (virtual time in the replay).
    pub now_s: f64,
    /// vLLM's model name ("" when unknown).
    pub model: &'a str,
    /// GPU name as NVML reports it ("" when unknown).
    pub gpu: &'a str,
    /// The SM clock the governor runs now (the highest when the driver manages clocks): the
    /// capacity is for this clock.
    pub clock_mhz: f64,
    /// The SM clock the window ran at (the fit learns from it).
    pub window_clock_mhz: f64,
    pub max_clock_mhz: f64,
    pub objectives: Objectives,
    /// The Deployment's current replica count, when known.
    pub replicas: Option<u32>,
}

/// Everything the advisor concluded in its last cycle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    pub model: String,
    /// The SM clock the capacity is computed for.
    pub clock_mhz: f64,
    pub objectives: Objectives,
    /// The online model's step-time fit at that clock.
    pub fit: online::Coefficients,
    pub demand: Option<Demand>,
    pub capacity: Option<Capacity>,
    /// This replica's demand in replicas: arrivals (plus queue drain) over its capacity at the
    /// target utilisation. Summed over the pods, the replicas the load needs (an HPA
    /// AverageValue target of 1 acts on it as is).
    pub demand_replicas: Option<f64>,
    /// Capacity minus arrivals, requests per second.
    pub headroom_rate: Option<f64>,
    pub current_replicas: Option<u32>,
    /// None when the current replica count is unknown.
    pub suggestion: Option<Suggestion>,
    /// Seconds since the last usable window (since start when there was none).
    pub data_age_s: f64,
    pub stale: bool,
    /// Why, in a sentence.
    pub reason: String,
}

/// The advisor's state across cycles.
#[derive(Debug)]
pub struct Advisor {
    cfg: AdvisorConfig,
    demand: DemandTracker,
    model: OnlineModel,
    profiles: Profiles,
    suggester: Suggester,
    started_s: Option<f64>,
    last_good_s: Option<f64>,
    /// Last good demand and this replica's demand in replicas, kept while stale.
    last_good: Option<(Demand, f64)>,
    /// Last capacity estimate (absent while idle before any request finished).
    last_capacity: Option<Capacity>,
    /// Replica count of the last cycle: a change moves the per-replica demand at once.
    last_replicas: Option<u32>,
    cycles: u64,
}

/// Cycles between checks of the profile files for changes.
const PROFILE_REFRESH_CYCLES: u64 = 10;

impl Advisor {
    pub fn new(cfg: AdvisorConfig) -> Self {
        let profiles = Profiles::new(&cfg.profiles);
        Self {
            cfg,
            demand: DemandTracker::default(),
            model: OnlineModel::new(),
            profiles,
            suggester: Suggester::default(),
            started_s: None,
            last_good_s: None,
            last_good: None,
            last_capacity: None,
            last_replicas: None,
            cycles: 0,
        }
    }

    /// Takes a reloaded `[advisor]`; what was learnt is kept, profiles are re-read.
    pub fn reconfigure(&mut self, cfg: AdvisorConfig) {
        if cfg.profiles != self.cfg.profiles {
            self.profiles = Profiles::new(&cfg.profiles);
        }
        self.cfg = cfg;
    }

    pub fn config(&self) -> &AdvisorConfig {
        &self.cfg
    }

    fn policy(&self) -> Policy {
        Policy {
            min_replicas: self.cfg.min_replicas,
            max_replicas: self.cfg.max_replicas,
            tolerance: self.cfg.tolerance,
            scale_down_delay_s: self.cfg.scale_down_delay_seconds,
        }
    }

    /// One cycle: `window` is None when vLLM did not answer (or on the first scrape).
    pub fn observe(&mut self, window: Option<&Window>, ctx: &Context<'_>) -> Advice {
        self.cycles += 1;
        if self.cycles % PROFILE_REFRESH_CYCLES == 0 {
            self.profiles.refresh();
        }
        let started = *self.started_s.get_or_insert(ctx.now_s);
        let model_name = if self.cfg.model_name.is_empty() { ctx.model } else { &self.cfg.model_name };

        // (demand, this replica's demand in replicas) from this cycle's window.
        let mut fresh = None;
        if let (Some(from), Some(to)) = (self.last_replicas, ctx.replicas) {
            self.demand.replicas_changed(from, to);
        }
        self.last_replicas = ctx.replicas.or(self.last_replicas);
        if let Some(w) = window {
            if let Some(d) = self.demand.observe(w, self.cfg.smoothing_seconds) {
                let raw_rate = demand::arrivals_per_second(w, None).unwrap_or(d.arrival_rate);
                self.model.observe(w, ctx.window_clock_mhz, ctx.max_clock_mhz, raw_rate.max(d.arrival_rate));
                let known_mix = d.mean_prompt_tokens > 0.0 && d.mean_output_tokens > 0.0;
                let load = Load {
                    prompt_tokens: d.mean_prompt_tokens,
                    output_tokens: d.mean_output_tokens,
                    clock_mhz: ctx.clock_mhz,
                    max_clock_mhz: ctx.max_clock_mhz,
                };
                let profile = self.profiles.best(ctx.gpu, model_name);
                let max_seqs = f64::from(self.cfg.max_num_seqs);
                let cap = known_mix
                    .then(|| capacity::combine(&self.model, profile, load, ctx.objectives, max_seqs))
                    .flatten();
                let needed = d.arrival_rate + d.waiting / DRAIN_S;
                let replicas = match &cap {
                    Some(c) => Some(needed / (c.max_rate * self.cfg.target_utilization)),
                    // Verified idle (vLLM's own counters say nothing arrived): no demand, fresh.
                    None if needed <= 0.0 && d.running <= 0.0 => Some(0.0),
                    None => None,
                };
                if cap.is_some() {
                    self.last_capacity = cap;
                }
                if let Some(r) = replicas {
                    fresh = Some((d, r));
                    self.last_good = Some((d, r));
                    self.last_good_s = Some(ctx.now_s);
                }
            }
        }
        let data_age_s = ctx.now_s - self.last_good_s.unwrap_or(started);
        let stale = data_age_s > self.cfg.stale_after_seconds;
        // Fresh values, or the last good ones (flagged stale once they are old).
        let (demand, demand_replicas) = match self.last_good {
            Some((d, r)) => (Some(d), Some(r)),
            None => (None, None),
        };
        let capacity = self.last_capacity.clone();
        let policy = self.policy();
        let suggester = &mut self.suggester;
        let suggestion = ctx.replicas.map(|current| match (&fresh, suggester.last()) {
            (Some(f), _) => suggester.suggest(ctx.now_s, Some(f.1 * f64::from(current)), current, &policy),
            // A missed scrape or two: hold the last suggestion without calling it stale.
            (None, Some(last)) if !stale => last,
            (None, _) => suggester.suggest(ctx.now_s, None, current, &policy),
        });
        let headroom_rate = match (&demand, &capacity) {
            (Some(d), Some(c)) => Some(c.max_rate - d.arrival_rate),
            _ => None,
        };
        let reason = explain(&demand, &capacity, demand_replicas, ctx.replicas, suggestion, stale, data_age_s);
        Advice {
            model: model_name.to_string(),
            clock_mhz: ctx.clock_mhz,
            objectives: ctx.objectives,
            fit: self.model.coefficients(ctx.clock_mhz, ctx.max_clock_mhz),
            demand,
            capacity,
            demand_replicas,
            headroom_rate,
            current_replicas: ctx.replicas,
            suggestion,
            data_age_s,
            stale,
            reason,
        }
    }
}

/// The reason line `agentctl advice` shows.
fn explain(
    demand: &Option<Demand>,
    capacity: &Option<Capacity>,
    demand_replicas: Option<f64>,
    replicas: Option<u32>,
    suggestion: Option<Suggestion>,
    stale: bool,
    age: f64,
) -> String {
    let mut out = Vec::new();
    if stale {
        out.push(format!("no usable vLLM window for {age:.0} s: values are the last good ones"));
    }
    match (demand, capacity, demand_replicas) {
        (Some(d), Some(c), Some(r)) => {
            let source = match (&c.online, &c.profile) {
                (Some(o), Some(_)) => format!(
                    "online model ({:.0}%, limited by the {}) and capacity profile",
                    c.online_weight * 100.0,
                    o.limit.as_str()
                ),
                (Some(o), None) => {
                    let seen = c.observed_share.unwrap_or(0.0);
                    let note = if seen < 0.5 {
                        format!(", extrapolated from a load of {:.0}% of it", seen * 100.0)
                    } else {
                        String::new()
                    };
                    format!("online model, limited by the {}{note}", o.limit.as_str())
                }
                (None, _) => "capacity profile (online model not fitted yet)".to_string(),
            };
            out.push(format!(
                "{:.2} req/s arriving ({:.0} prompt / {:.0} output tokens, {:.0} waiting) against {:.2} req/s per replica from the {source}: {:.2} replicas of demand here at the target utilisation",
                d.arrival_rate, d.mean_prompt_tokens, d.mean_output_tokens, d.waiting, c.max_rate, r
            ));
        }
        (Some(_), None, Some(r)) if r <= 0.0 => {
            out.push("vLLM is idle (no request has arrived or finished): no demand".into())
        }
        _ => out.push("no capacity estimate yet: waiting for windows with decoding or a capacity profile".into()),
    }
    match (replicas, suggestion) {
        (Some(n), Some(s)) => out.push(format!("{n} replicas running; suggest {}: {}", s.replicas, s.why.as_str())),
        _ => out.push(
            "current replica count unknown (set advisor.replicas or advisor.replicas_file): no suggestion".into(),
        ),
    }
    out.join("; ")
}

/// Why the replica count cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplicasError {
    #[error("advisor.replicas_file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("advisor.replicas_file {path}: no replica count (want a number or a line gpu-agent/replicas=\"N\")")]
    NoCount { path: std::path::PathBuf },
}

/// The current replica count: `replicas_file` (re-read each call) wins over `replicas`.
pub fn current_replicas(cfg: &AdvisorConfig) -> Result<Option<u32>, ReplicasError> {
    match &cfg.replicas_file {
        Some(path) => read_replicas_file(path).map(Some),
        None => Ok(cfg.replicas),
    }
}

/// A number alone, or a downward-API annotations file with `gpu-agent/replicas="N"`.
pub fn read_replicas_file(path: &Path) -> Result<u32, ReplicasError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplicasError::Read { path: path.to_owned(), source })?;
    let value = match text.trim().parse::<u32>() {
        Ok(n) => Some(n),
        Err(_) => text.lines().find_map(|l| {
            let v = l.trim().strip_prefix("gpu-agent/replicas=")?;
            v.trim_matches('"').parse::<u32>().ok()
        }),
    };
    match value {
        Some(n) if n > 0 => Ok(n),
        _ => Err(ReplicasError::NoCount { path: path.to_owned() }),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
