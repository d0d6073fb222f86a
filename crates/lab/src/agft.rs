//! A re-implementation of AGFT's clock bandit (SusCom-Lab/AGFT; docs/governor.md), the baseline the
//! bench compares our governor with. It is given the V1 metric names (through [`Window`]) so
//! it is not crippled by reading removed V0 names, and it decides every cycle instead of every
//! 3-4 s; everything else follows AGFT:
//!
//! - 7 features: has_queue, prompt-token delta, generation-token delta, tokens per iteration,
//!   running requests, KV usage %, prefix hit %; gauges EMA-smoothed; online z-score (Welford),
//!   clipped to [-3, 3]; no bias term;
//! - reward 2 (1 - min(2, EDP / baseline)) with EDP = window energy x mean TPOT and baseline
//!   0.9 x the mean EDP of 10 windows at default clocks; no SLO term;
//! - LinUCB per clock, A = 5 I, alpha = 10 exp(-0.02 t) floored at 0.1, each arm tried once first;
//! - pruning: extreme, historical, cascade ([`PruneRules::agft`]); an SLO violation removes
//!   every clock at or below the violating one;
//! - converged when the 3 most-chosen clocks cover 60% of the last 100 decisions; back to
//!   learning if EDP rises 30%; 90 MHz grid over the whole supported range, refined to 15 MHz
//!   around the best once converged;
//! - idles at 210 MHz, which the bench clamps to the GPU's minimum (345 MHz on an H100), as
//!   the driver would.

use std::collections::VecDeque;

use nalgebra::DVector;

use governor::linucb::LinUcb;
use governor::prune::{self, ArmStats, PruneRules};
use governor::reward::Outcome;
use governor::{ClockTarget, Decision, Observation, Phase};
use objectives::Objectives;
use vllm_metrics::Window;

const FEATURES: usize = 7;
const BASELINE_WINDOWS: usize = 10;
const IDLE_MHZ: u32 = 210;
const EMA: f64 = 0.3;

struct Arm {
    stats: ArmStats,
    model: LinUcb,
}

/// AGFT's bandit.
pub struct Agft {
    slo: Objectives,
    clocks: Vec<u32>,
    arms: Vec<Arm>,
    gauges: Option<[f64; 3]>,
    n: u64,
    mean: [f64; FEATURES],
    m2: [f64; FEATURES],
    baseline_samples: Vec<f64>,
    baseline: Option<f64>,
    t: u64,
    pending: Option<(usize, DVector<f64>)>,
    recent: VecDeque<u32>,
    converged: bool,
    converged_after: Option<u64>,
    converged_edp: Option<f64>,
    refined: bool,
    decisions: u64,
}

impl std::fmt::Debug for Agft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agft").field("arms", &self.arms.len()).field("t", &self.t).finish()
    }
}

impl Agft {
    pub fn new(clocks_mhz: &[u32], slo: Objectives) -> Self {
        let mut clocks: Vec<u32> = clocks_mhz.iter().copied().filter(|c| *c > 0).collect();
        clocks.sort_unstable();
        clocks.dedup();
        let mut arms = Vec::new();
        if let (Some(&min), Some(&max)) = (clocks.first(), clocks.last()) {
            for want in std::iter::successors(Some(max), |w| w.checked_sub(90)).take_while(|w| *w >= min) {
                if let Some(c) = nearest(&clocks, want) {
                    if !arms.iter().any(|a: &Arm| a.stats.mhz == c) {
                        arms.push(Arm { stats: ArmStats::new(c), model: LinUcb::new(FEATURES, 5.0) });
                    }
                }
            }
        }
        arms.sort_by_key(|a| a.stats.mhz);
        Self {
            slo,
            clocks,
            arms,
            gauges: None,
            n: 0,
            mean: [0.0; FEATURES],
            m2: [0.0; FEATURES],
            baseline_samples: Vec::new(),
            baseline: None,
            t: 0,
            pending: None,
            recent: VecDeque::new(),
            converged: false,
            converged_after: None,
            converged_edp: None,
            refined: false,
            decisions: 0,
        }
    }

    pub fn converged_after(&self) -> Option<u64> {
        self.converged_after
    }

    fn features(&mut self, w: &Window) -> DVector<f64> {
        let raw_gauges = [
            f64::from(u8::from(w.num_requests_waiting.unwrap_or(0.0) > 0.0)),
            w.num_requests_running.unwrap_or(0.0),
            w.kv_cache_usage.unwrap_or(0.0) * 100.0,
        ];
        let g = match self.gauges {
            Some(prev) => [0, 1, 2].map(|i| prev[i] + EMA * (raw_gauges[i] - prev[i])),
            None => raw_gauges,
        };
        self.gauges = Some(g);
        let x = [
            g[0],
            w.prompt_tokens_rate.unwrap_or(0.0) * w.seconds,
            w.generation_tokens_rate.unwrap_or(0.0) * w.seconds,
            w.tokens_per_iteration.unwrap_or(0.0),
            g[1],
            g[2],
            w.prefix_hit_ratio.unwrap_or(0.0) * 100.0,
        ];
        self.n += 1;
        for ((xi, m), m2) in x.iter().zip(self.mean.iter_mut()).zip(self.m2.iter_mut()) {
            let d = xi - *m;
            *m += d / self.n as f64;
            *m2 += d * (xi - *m);
        }
        DVector::from_fn(FEATURES, |i, _| {
            let sd = if self.n > 1 { (self.m2[i] / (self.n - 1) as f64).sqrt() } else { 0.0 };
            if sd > 1e-9 {
                ((x[i] - self.mean[i]) / sd).clamp(-3.0, 3.0)
            } else {
                0.0
            }
        })
    }

    fn arm_of(&self, t: ClockTarget) -> Option<usize> {
        let mhz = match t {
            ClockTarget::Default => *self.clocks.last()?,
            ClockTarget::Locked(m) => m,
        };
        self.arms.iter().position(|a| a.stats.mhz == mhz)
    }

    fn alpha(&self) -> f64 {
        (10.0 * (-0.02 * self.t as f64).exp()).max(0.1)
    }

    pub fn decide(&mut self, obs: &Observation) -> Decision {
        self.decisions += 1;
        let w = obs.window;
        let outcome = Outcome::from_window(w, obs.energy_j, obs.seconds);
        let check = outcome.slo_check(&self.slo);
        // AGFT's EDP: window energy x mean TPOT (not per token).
        let edp = outcome.tpot_s.map(|tpot| obs.energy_j * tpot).filter(|e| e.is_finite() && *e > 0.0);
        let busy = w.num_requests_running.unwrap_or(0.0) > 0.0
            || w.num_requests_waiting.unwrap_or(0.0) > 0.0
            || outcome.tokens > 0.0;
        let mut d = Decision {
            target: obs.applied,
            phase: Phase::Explore,
            reward: None,
            edp_per_token: outcome.edp_per_token(),
            slo_violated: check.violated(),
            alpha: self.alpha(),
            converged: self.converged,
        };
        if self.arms.is_empty() {
            return d;
        }
        let idle_target = ClockTarget::Locked(IDLE_MHZ.max(self.clocks[0]));
        if !busy {
            d.phase = Phase::Idle;
            d.target = idle_target;
            self.pending = None;
            return d;
        }
        let x = self.features(w);

        // Baseline: 10 windows at default clocks.
        let Some(baseline) = self.baseline else {
            if obs.applied == ClockTarget::Default {
                if let Some(e) = edp {
                    self.baseline_samples.push(e);
                }
            }
            if self.baseline_samples.len() >= BASELINE_WINDOWS {
                self.baseline =
                    Some(0.9 * self.baseline_samples.iter().sum::<f64>() / self.baseline_samples.len() as f64);
            }
            d.target = ClockTarget::Default;
            d.phase = Phase::Observe;
            return d;
        };

        // Learn.
        if let (Some((i, cx)), Some(e)) = (self.pending.take(), edp) {
            if Some(i) == self.arm_of(obs.applied) {
                let r = 2.0 * (1.0 - (e / baseline).min(2.0));
                self.arms[i].model.update(&cx, r);
                self.arms[i].stats.record(r, Some(e / baseline));
                d.reward = Some(r);
                if check.violated() {
                    let mhz = self.arms[i].stats.mhz;
                    let top = self.clocks.last().copied().into_iter().collect::<Vec<_>>();
                    let mut stats = self.stats_mut();
                    prune::prune_at_or_below(&mut stats, mhz, &top);
                    self.write_stats(stats);
                }
                if self.converged && self.converged_edp.is_some_and(|c| e / baseline > 1.3 * c) {
                    self.converged = false;
                    self.recent.clear();
                }
            }
        }
        let top: Vec<u32> = self.clocks.last().copied().into_iter().collect();
        let mut stats = self.stats_mut();
        prune::prune(&mut stats, &PruneRules::agft(), self.t, &top);
        self.write_stats(stats);

        // Choose.
        self.t += 1;
        let active: Vec<usize> = (0..self.arms.len()).filter(|&i| self.arms[i].stats.active()).collect();
        let pick = if let Some(&i) = active.iter().find(|&&i| self.arms[i].stats.tries == 0) {
            i
        } else {
            let alpha = if self.converged { 0.0 } else { self.alpha() };
            active
                .iter()
                .copied()
                .max_by(|&a, &b| self.arms[a].model.ucb(&x, alpha).total_cmp(&self.arms[b].model.ucb(&x, alpha)))
                .unwrap_or(self.arms.len() - 1)
        };
        let mhz = self.arms[pick].stats.mhz;
        self.recent.push_back(mhz);
        while self.recent.len() > 100 {
            self.recent.pop_front();
        }
        if !self.converged && self.recent.len() == 100 {
            let mut counts: Vec<(u32, usize)> = Vec::new();
            for m in &self.recent {
                match counts.iter_mut().find(|(c, _)| c == m) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((*m, 1)),
                }
            }
            counts.sort_by_key(|c| std::cmp::Reverse(c.1));
            let top3: usize = counts.iter().take(3).map(|c| c.1).sum();
            if top3 >= 60 {
                self.converged = true;
                self.converged_after.get_or_insert(self.decisions);
                let best = counts[0].0;
                self.converged_edp = self.arms.iter().find(|a| a.stats.mhz == best).map(|a| a.stats.edp_mean);
                if !self.refined {
                    self.refine(best);
                }
            }
        }
        d.phase = if self.converged { Phase::Exploit } else { Phase::Explore };
        d.target = ClockTarget::Locked(mhz);
        d.alpha = self.alpha();
        d.converged = self.converged;
        self.pending = self.arm_of(d.target).map(|i| (i, x));
        d
    }

    fn stats_mut(&self) -> Vec<ArmStats> {
        self.arms.iter().map(|a| a.stats.clone()).collect()
    }

    fn write_stats(&mut self, stats: Vec<ArmStats>) {
        for (a, s) in self.arms.iter_mut().zip(stats) {
            a.stats = s;
        }
    }

    /// 15 MHz arms between the best clock and its 90 MHz neighbours.
    fn refine(&mut self, best: u32) {
        self.refined = true;
        for k in 1..6u32 {
            for want in [best.saturating_sub(15 * k), best + 15 * k] {
                if let Some(c) = nearest(&self.clocks, want) {
                    if !self.arms.iter().any(|a| a.stats.mhz == c) {
                        self.arms.push(Arm { stats: ArmStats::new(c), model: LinUcb::new(FEATURES, 5.0) });
                    }
                }
            }
        }
        self.arms.sort_by_key(|a| a.stats.mhz);
    }
}

fn nearest(clocks: &[u32], mhz: u32) -> Option<u32> {
    clocks.iter().copied().min_by_key(|c| c.abs_diff(mhz))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_metrics::Latency;

    /// A window with 10 running requests and `waiting` queued at this TPOT.
    fn window(waiting: f64, tpot: f64) -> Window {
        loaded(waiting, 10.0, 100.0, 1000.0, Some(tpot))
    }

    fn loaded(waiting: f64, running: f64, prompt_rate: f64, gen_rate: f64, tpot: Option<f64>) -> Window {
        Window {
            seconds: 1.0,
            num_requests_running: Some(running),
            num_requests_waiting: Some(waiting),
            kv_cache_usage: Some(0.1),
            request_rate: Some(1.0),
            prompt_tokens_rate: Some(prompt_rate),
            generation_tokens_rate: Some(gen_rate),
            preemptions: Some(0.0),
            tokens_per_iteration: Some(running.max(1.0)),
            itl: tpot.map(|t| Latency { count: 10.0, mean: Some(t), ..Latency::default() }),
            ..Window::default()
        }
    }

    fn clocks() -> Vec<u32> {
        (0..110).map(|i| 345 + 15 * i).collect()
    }

    #[test]
    fn grid_covers_the_whole_range_in_90_mhz_steps() {
        let a = Agft::new(&clocks(), Objectives { ttft_s: 1.0, tpot_s: 0.1 });
        let m: Vec<u32> = a.arms.iter().map(|a| a.stats.mhz).collect();
        assert_eq!(m.first(), Some(&360));
        assert_eq!(m.last(), Some(&1980));
        assert_eq!(m.len(), 19);
    }

    #[test]
    fn measures_a_baseline_at_default_then_tries_each_arm_once() {
        let mut a = Agft::new(&clocks(), Objectives { ttft_s: 1.0, tpot_s: 0.1 });
        let w = window(1.0, 0.02);
        let mut applied = ClockTarget::Default;
        for _ in 0..10 {
            let d = a.decide(&Observation { window: &w, energy_j: 400.0, seconds: 1.0, applied });
            assert_eq!(d.target, ClockTarget::Default);
            applied = d.target;
        }
        assert!(a.baseline.is_some_and(|b| (b - 0.9 * 8.0).abs() < 1e-9));
        let mut seen = Vec::new();
        for _ in 0..19 {
            let d = a.decide(&Observation { window: &w, energy_j: 400.0, seconds: 1.0, applied });
            applied = d.target;
            seen.push(applied);
        }
        seen.sort_by_key(|t| match t {
            ClockTarget::Locked(m) => *m,
            ClockTarget::Default => 0,
        });
        seen.dedup();
        assert_eq!(seen.len(), 19, "every arm once");
        // EDP / baseline = 8 / 7.2: reward 2 (1 - 1.111).
        let d = a.decide(&Observation { window: &w, energy_j: 400.0, seconds: 1.0, applied });
        assert!((d.reward.expect("learnt") - 2.0 * (1.0 - 8.0 / 7.2)).abs() < 1e-9);
    }

    #[test]
    fn slo_violation_prunes_at_and_below_and_idle_is_clamped_to_the_minimum() {
        let mut a = Agft::new(&clocks(), Objectives { ttft_s: 1.0, tpot_s: 0.05 });
        let ok = window(1.0, 0.02);
        let mut applied = ClockTarget::Default;
        for _ in 0..12 {
            applied = a.decide(&Observation { window: &ok, energy_j: 400.0, seconds: 1.0, applied }).target;
        }
        let ClockTarget::Locked(bad) = applied else { panic!("locked after the baseline") };
        a.decide(&Observation { window: &window(1.0, 0.09), energy_j: 400.0, seconds: 1.0, applied });
        assert!(a.arms.iter().filter(|x| x.stats.mhz <= bad).all(|x| !x.stats.active()));
        let idle = loaded(0.0, 0.0, 0.0, 0.0, None);
        let d = a.decide(&Observation { window: &idle, energy_j: 70.0, seconds: 1.0, applied });
        assert_eq!(d.target, ClockTarget::Locked(345));
    }
}
