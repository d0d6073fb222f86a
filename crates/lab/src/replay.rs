//! Replay of a load trace through the simulated vLLM engine in virtual time, checking the
//! advisor against the truth.
//!
//! The fleet's load follows the trace; each request goes to a random replica, so the replica
//! the advisor runs on sees `1/R` of it, where `R` is the replica count, which follows the
//! advisor's own suggestion (closed loop, as an autoscaler would apply it). At the end of each
//! trace segment the suggestion is compared with the ground truth: the fewest replicas that
//! meet the objectives when the segment's load is split evenly over them, found by simulating
//! one replica at `rate / N` for `N = 1, 2, ...` (with random routing every replica sees the
//! same Poisson load, so one stands for all).
//!
//! "Meets the objectives" is the same definition the advisor plans for: the mean TTFT and the
//! mean TPOT over the segment (its first quarter left out as warm-up) stay within them.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::trace::Trace;
use advisor::AdvisorConfig;
use advisor::{Advisor, Context};
use loadgen::schedule::{Arrival, Pace, Schedule, Segment};
use objectives::Objectives;
use sim::drive::{Driver, Until};
use sim::engine::{Engine, EngineConfig};
use sim::gpu::SimGpu;
use vllm_metrics::{Snapshot, Window};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("simulated engine: {0}")]
    Engine(String),
    #[error("engine metrics do not parse: {0}")]
    Metrics(#[from] vllm_metrics::ParseError),
    #[error("trace segment {0} is not a Poisson segment (bursts have no rate to plan for)")]
    NotPoisson(usize),
}

/// How the replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub objectives: Objectives,
    pub seed: u64,
    /// Seconds between advisor cycles (the agent's decision period).
    pub period_s: f64,
    /// Replicas at the start.
    pub initial_replicas: u32,
    /// The advisor's settings (min/max replicas, target utilisation, delays...).
    pub advisor: AdvisorConfig,
    /// Engine flags of every replica.
    pub engine: EngineConfig,
}

/// One trace segment: what the advisor suggested at its end and the truth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayStep {
    pub segment: usize,
    pub end_s: f64,
    /// Fleet arrival rate, requests per second.
    pub rate: f64,
    pub prompt_tokens: f64,
    pub output_tokens: f64,
    /// The advisor's suggestion at the segment's end.
    pub suggested: u32,
    /// Fleet demand in replicas the advisor estimated (this replica's demand x replicas).
    pub fleet_demand: Option<f64>,
    /// Fewest replicas meeting the objectives (None: more than max_replicas).
    pub truth: Option<u32>,
    /// Capacity per replica the advisor estimated at the segment's end.
    pub capacity_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub steps: Vec<ReplayStep>,
    /// Mean of |suggested - truth| over steps with a truth.
    pub mean_abs_error: f64,
    /// Steps where suggested == truth, and where it was within one.
    pub exact: usize,
    pub within_one: usize,
    /// Steps with fewer replicas suggested than needed.
    pub under: usize,
    /// Mean time the advisor's cycle took (wall clock, microseconds).
    pub mean_advice_us: f64,
}

/// One simulated replica: the engine on the virtual-time driver, and the metrics at the last
/// window edge.
struct Replica {
    driver: Driver,
    prev: Snapshot,
    prev_t: f64,
}

impl Replica {
    fn new(cfg: &EngineConfig) -> Result<Self, ReplayError> {
        let gpu = Arc::new(SimGpu::h100(1));
        let engine = Engine::new(cfg.clone(), gpu).map_err(|e| ReplayError::Engine(e.to_string()))?;
        let prev = Snapshot::from_text(&engine.metrics_text())?;
        Ok(Self { prev_t: engine.now(), driver: Driver::new(engine), prev })
    }

    /// Runs until `edge`, submitting the queued arrivals when they are due; returns the window.
    fn run_until(&mut self, edge: f64) -> Result<Window, ReplayError> {
        self.driver.advance(Until::Edge(edge));
        let snap = Snapshot::from_text(&self.driver.engine().metrics_text())?;
        let now = self.driver.now();
        let w = Window::between(&self.prev, &snap, now - self.prev_t);
        self.prev = snap;
        self.prev_t = now;
        Ok(w)
    }
}

fn poisson_rate(seg: &Segment, i: usize) -> Result<f64, ReplayError> {
    match seg.pace {
        Pace::Poisson { requests_per_second } => Ok(requests_per_second),
        Pace::AllAtOnce { .. } | Pace::Counted { .. } => Err(ReplayError::NotPoisson(i)),
    }
}

/// Whether `n` replicas sharing `seg`'s load evenly meet the objectives.
pub fn meets(seg: &Segment, rate: f64, n: u32, opts: &ReplayOptions, seed: u64) -> Result<bool, ReplayError> {
    let share = Segment::poisson(seg.duration_s, rate / f64::from(n), seg.prompt, seg.output);
    let schedule = Schedule { segments: vec![share] };
    let mut r = Replica::new(&opts.engine)?;
    r.driver.extend(schedule.arrivals(seed));
    // Warm-up: its window is not judged.
    r.run_until(seg.duration_s * 0.25)?;
    let w = r.run_until(seg.duration_s)?;
    let mean = |l: &Option<vllm_metrics::Latency>| l.as_ref().and_then(|l| l.mean);
    // A window without a finished first token or decoding step is idle: nothing to break.
    let ttft_ok = mean(&w.ttft).is_none_or(|t| t <= opts.objectives.ttft_s);
    let tpot_ok = w.tpot_or_itl().and_then(|l| l.mean).is_none_or(|t| t <= opts.objectives.tpot_s);
    // Requests still waiting at the end that arrived long ago would break TTFT later.
    let backlog = w.num_requests_waiting.unwrap_or(0.0) > rate / f64::from(n) * opts.objectives.ttft_s + 1.0;
    Ok(ttft_ok && tpot_ok && !backlog)
}

/// The fewest replicas (up to max_replicas) meeting the objectives for one segment.
pub fn truth(seg: &Segment, rate: f64, opts: &ReplayOptions, seed: u64, hint: u32) -> Result<Option<u32>, ReplayError> {
    if rate <= 0.0 {
        return Ok(Some(opts.advisor.min_replicas));
    }
    let max = opts.advisor.max_replicas;
    let mut n = hint.clamp(1, max);
    // Walk down while it holds, up while it does not: two or three runs near the hint.
    if meets(seg, rate, n, opts, seed)? {
        while n > 1 && meets(seg, rate, n - 1, opts, seed)? {
            n -= 1;
        }
        return Ok(Some(n.max(opts.advisor.min_replicas)));
    }
    while n < max {
        n += 1;
        if meets(seg, rate, n, opts, seed)? {
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// Replays `trace` with the advisor in the loop; see the module docs.
pub fn replay(trace: &Trace, opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let segments = &trace.schedule.segments;
    for (i, s) in segments.iter().enumerate() {
        poisson_rate(s, i)?;
    }
    let mut route = StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let mut replicas = opts.initial_replicas.max(1);
    // The fleet's arrivals, thinned to this replica by random routing (the count changes as
    // the advisor's suggestion is applied, so the thinning is decided per arrival).
    let fleet: Vec<Arrival> = trace.schedule.arrivals(opts.seed).collect();
    let mut r = Replica::new(&opts.engine)?;
    let mut advisor = Advisor::new(opts.advisor.clone());
    let max_mhz = f64::from(SimGpu::clocks().last().copied().unwrap_or(1980));
    let bounds = trace.segment_bounds();
    let mut steps = Vec::new();
    let (mut advice_us, mut cycles) = (0.0, 0u64);
    let mut next = 0usize;
    let mut edge = opts.period_s;
    let mut last = None;
    for (i, (seg, (_, end))) in segments.iter().zip(&bounds).enumerate() {
        while edge <= end + 1e-9 {
            // Route the arrivals of this period with the replica count in force now.
            while next < fleet.len() && fleet[next].at_s <= edge {
                if route.random::<f64>() * f64::from(replicas) < 1.0 {
                    r.driver.push(fleet[next]);
                }
                next += 1;
            }
            let w = r.run_until(edge)?;
            let ctx = Context {
                now_s: edge,
                model: &opts.engine.model_name,
                gpu: "",
                clock_mhz: max_mhz,
                window_clock_mhz: max_mhz,
                max_clock_mhz: max_mhz,
                objectives: opts.objectives,
                replicas: Some(replicas),
            };
            let t = std::time::Instant::now();
            let adv = advisor.observe(Some(&w), &ctx);
            advice_us += t.elapsed().as_secs_f64() * 1e6;
            cycles += 1;
            if let Some(s) = adv.suggestion {
                replicas = s.replicas;
            }
            last = Some(adv);
            edge += opts.period_s;
        }
        let rate = poisson_rate(seg, i)?;
        let adv = last.as_ref();
        let suggested = adv.and_then(|a| a.suggestion).map_or(replicas, |s| s.replicas);
        let fleet_demand = adv.and_then(|a| Some(a.demand_replicas? * f64::from(a.current_replicas?)));
        let truth = truth(seg, rate, opts, opts.seed.wrapping_add(i as u64 + 1), suggested)?;
        steps.push(ReplayStep {
            segment: i,
            end_s: *end,
            rate,
            prompt_tokens: seg.prompt.mean(),
            output_tokens: seg.output.mean(),
            suggested,
            fleet_demand,
            truth,
            capacity_rate: adv.and_then(|a| a.capacity.as_ref()).map(|c| c.max_rate),
        });
    }
    let judged: Vec<(u32, u32)> = steps.iter().filter_map(|s| Some((s.suggested, s.truth?))).collect();
    let n = judged.len().max(1) as f64;
    Ok(ReplayReport {
        mean_abs_error: judged.iter().map(|(s, t)| f64::from(s.abs_diff(*t))).sum::<f64>() / n,
        exact: judged.iter().filter(|(s, t)| s == t).count(),
        within_one: judged.iter().filter(|(s, t)| s.abs_diff(*t) <= 1).count(),
        under: judged.iter().filter(|(s, t)| s < t).count(),
        mean_advice_us: if cycles > 0 { advice_us / cycles as f64 } else { 0.0 },
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minute per step: quiet, ramp to four replicas' worth, mix changes, back down.
    pub(crate) fn steps_trace() -> Trace {
        Trace::from_csv(
            "advisor-steps",
            "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n\
             60,10,512,128\n60,70,512,128\n60,160,512,128\n60,60,1500,64\n60,40,256,256\n60,110,512,128\n60,20,512,128\n",
        )
        .expect("trace")
    }

    pub(crate) fn options() -> ReplayOptions {
        ReplayOptions {
            objectives: Objectives { ttft_s: 0.5, tpot_s: 0.05 },
            seed: 7,
            period_s: 1.0,
            initial_replicas: 1,
            advisor: AdvisorConfig {
                target_utilization: 1.0,
                scale_down_delay_seconds: 20.0,
                smoothing_seconds: 10.0,
                max_replicas: 16,
                ..AdvisorConfig::default()
            },
            engine: EngineConfig::default(),
        }
    }

    /// The judged property: at every step the suggestion is the number of replicas that meet
    /// the objectives, or one off, and it is never short by more than one.
    #[test]
    fn suggestions_track_the_replicas_that_meet_the_slo() {
        let trace = steps_trace();
        let r = replay(&trace, &options()).expect("replay");
        let truths: Vec<Option<u32>> = r.steps.iter().map(|s| s.truth).collect();
        let suggested: Vec<u32> = r.steps.iter().map(|s| s.suggested).collect();
        // The trace spans one to three replicas' worth, so the test can tell a wrong answer.
        assert!(truths.iter().flatten().max() >= Some(&3), "{truths:?}");
        assert!(truths.contains(&Some(1)), "{truths:?}");
        assert_eq!(r.within_one, r.steps.len(), "suggested {suggested:?} vs truth {truths:?}");
        assert!(r.mean_abs_error <= 0.5, "suggested {suggested:?} vs truth {truths:?}");
    }

    /// Prints the replay table; run with
    /// `cargo test --release -p gpu-agent --lib advisor_replay_table -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn advisor_replay_table() {
        for target in [1.0, 0.9] {
            let mut opts = options();
            opts.advisor.target_utilization = target;
            let t = std::time::Instant::now();
            let r = replay(&steps_trace(), &opts).expect("replay");
            println!("\ntarget_utilization {target}");
            println!("| step | fleet req/s | prompt/output tokens | capacity/replica (req/s) | fleet demand | suggested | truth |");
            println!("|---|---|---|---|---|---|---|");
            for s in &r.steps {
                println!(
                    "| {} | {:.0} | {:.0}/{:.0} | {} | {} | {} | {} |",
                    s.segment,
                    s.rate,
                    s.prompt_tokens,
                    s.output_tokens,
                    s.capacity_rate.map_or("-".into(), |c| format!("{c:.1}")),
                    s.fleet_demand.map_or("-".into(), |d| format!("{d:.2}")),
                    s.suggested,
                    s.truth.map_or("-".into(), |t| t.to_string())
                );
            }
            if target == 1.0 {
                // The true capacity of one replica per mix, by bisection on the rate.
                for s in &r.steps {
                    let seg = &steps_trace().schedule.segments[s.segment];
                    let (mut lo, mut hi) = (0.0, 2.0 * s.capacity_rate.unwrap_or(50.0));
                    for _ in 0..10 {
                        let mid = 0.5 * (lo + hi);
                        if meets(seg, mid, 1, &opts, 99).expect("sim") {
                            lo = mid
                        } else {
                            hi = mid
                        }
                    }
                    let est = s.capacity_rate.unwrap_or(f64::NAN);
                    println!(
                        "step {} mix {:.0}/{:.0}: estimated {est:.1} req/s, true {lo:.1} req/s, error {:+.1}%",
                        s.segment,
                        s.prompt_tokens,
                        s.output_tokens,
                        (est / lo - 1.0) * 100.0
                    );
                }
            }
            println!(
                "mean |error| {:.2}, exact {}/{}, within one {}, under {}, advice {:.1} us, wall {:.1} s",
                r.mean_abs_error,
                r.exact,
                r.steps.len(),
                r.within_one,
                r.under,
                r.mean_advice_us,
                t.elapsed().as_secs_f64()
            );
        }
    }
}
