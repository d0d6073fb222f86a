//! Faster-than-real-time benchmark of clock policies: the simulated H100 ([`SimGpu`]) and the
//! simulated vLLM engine run in virtual time on a workload trace, and every second of virtual
//! time a policy decides the clock from exactly what it would see live: the engine's own
//! `/metrics` text parsed into [`Snapshot`]s, a [`Window`] between two of them, and the GPU
//! energy counter read at the window's edges.
//!
//! Policies: `default` (driver-managed clocks), `static:MHZ`, `oracle` (the best static clock
//! per trace segment that meets the SLOs, found by running the trace at every clock of a
//! 30 MHz grid and picking per segment, then replaying that schedule), `agft` (the AGFT
//! re-implementation) and `governor` (ours, mode `slo`).
//!
//! The engine runs on the simulator's virtual-time driver ([`Driver`]), which submits an arrival
//! that falls inside an engine step when the step ends (steps last 5-60 ms), identically for
//! every policy.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::agft::Agft;
use crate::trace::Trace;
use governor::reward::edp_per_token;
use governor::{ClockTarget, Decision, Governor, GovernorConfig, Mode, Observation, Phase};
use gpu::{GpuBackend, GpuError};
use objectives::Objectives;
use sim::drive::{Driver, Until};
use sim::engine::{Engine, EngineConfig};
use sim::gpu::SimGpu;
use vllm_metrics::{ParseError, Snapshot, Window};

/// Spacing of the oracle's clock sweep.
pub const ORACLE_STEP_MHZ: u32 = 30;
/// A segment's static clock qualifies for the oracle when at most this share of its busy
/// windows broke an SLO.
pub const ORACLE_MAX_VIOLATIONS: f64 = 0.02;

/// Which policy to bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BenchPolicy {
    Default,
    Static(u32),
    Oracle,
    Agft,
    Governor,
}

/// A policy string that is not one of the above.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown policy `{0}`: expected default, static:MHZ, oracle, agft or governor")]
pub struct PolicyError(pub String);

impl FromStr for BenchPolicy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "default" => Ok(Self::Default),
            "oracle" => Ok(Self::Oracle),
            "agft" => Ok(Self::Agft),
            "governor" => Ok(Self::Governor),
            other => other
                .strip_prefix("static:")
                .and_then(|m| m.trim().parse::<u32>().ok())
                .filter(|m| *m > 0)
                .map(Self::Static)
                .ok_or_else(|| PolicyError(s.to_string())),
        }
    }
}

impl std::fmt::Display for BenchPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Static(m) => write!(f, "static:{m}"),
            Self::Oracle => f.write_str("oracle"),
            Self::Agft => f.write_str("agft"),
            Self::Governor => f.write_str("governor"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchOptions {
    /// Mean TTFT objective per window, seconds.
    pub ttft_slo_s: f64,
    /// Mean TPOT (inter-token latency) objective per window, seconds.
    pub tpot_slo_s: f64,
    /// Seed of the arrivals and lengths.
    pub seed: u64,
    /// Seconds of virtual time between decisions.
    pub period_s: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { ttft_slo_s: 0.5, tpot_slo_s: 0.05, seed: 1, period_s: 1.0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("simulated engine: {0}")]
    Engine(String),
    #[error("simulated GPU: {0}")]
    Gpu(#[from] GpuError),
    #[error("simulated GPU has no device")]
    NoDevice,
    #[error("engine metrics do not parse: {0}")]
    Metrics(#[from] ParseError),
    #[error("invalid bench option `{field}`: {msg}")]
    Option { field: &'static str, msg: String },
    #[error("static:{mhz}: not a supported clock ({min}..{max} MHz)")]
    Clock { mhz: u32, min: u32, max: u32 },
}

/// One bench run's figures (printed as JSON by `gpu-agent bench --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub trace: String,
    pub policy: String,
    pub seed: u64,
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    /// Virtual seconds simulated.
    pub duration_s: f64,
    pub energy_joules: f64,
    /// Generated tokens.
    pub tokens: f64,
    pub requests_finished: f64,
    /// Means over all requests of the run.
    pub mean_ttft_s: Option<f64>,
    pub mean_tpot_s: Option<f64>,
    /// energy / tokens x mean TPOT (J*s per token).
    pub edp_per_token: Option<f64>,
    /// Share of busy windows whose mean TTFT or mean TPOT broke its SLO.
    pub slo_violation_ratio: f64,
    pub busy_windows: u64,
    pub violating_windows: u64,
    pub decisions: u64,
    pub converged_after: Option<u64>,
    pub clock_changes: u64,
    /// Time-weighted mean locked clock over busy windows (driver-managed counts as the maximum).
    pub mean_busy_clock_mhz: f64,
    pub mean_decision_us: f64,
    pub max_decision_us: f64,
    /// The oracle's clock per segment.
    pub segment_clocks_mhz: Option<Vec<u32>>,
}

/// What one policy needs to provide to the bench loop.
trait Controller {
    fn decide(&mut self, obs: &Observation, now: f64) -> Decision;
    fn converged_after(&self) -> Option<u64> {
        None
    }
}

fn fixed_decision(target: ClockTarget) -> Decision {
    Decision {
        target,
        phase: Phase::Pinned,
        reward: None,
        edp_per_token: None,
        slo_violated: false,
        alpha: 0.0,
        converged: false,
    }
}

struct Fixed(ClockTarget);
impl Controller for Fixed {
    fn decide(&mut self, _: &Observation, _: f64) -> Decision {
        fixed_decision(self.0)
    }
}

/// A clock per time span: the oracle's replay.
struct Schedule {
    /// (segment end, clock), in order.
    spans: Vec<(f64, u32)>,
    period: f64,
}
impl Controller for Schedule {
    fn decide(&mut self, _: &Observation, now: f64) -> Decision {
        // The next window is (now, now + period]: take the segment its middle falls in.
        let mid = now + self.period / 2.0;
        let mhz = self.spans.iter().find(|(end, _)| mid < *end).or(self.spans.last()).map_or(0, |s| s.1);
        fixed_decision(ClockTarget::Locked(mhz))
    }
}

impl Controller for Governor {
    fn decide(&mut self, obs: &Observation, _: f64) -> Decision {
        Governor::decide(self, obs)
    }
    fn converged_after(&self) -> Option<u64> {
        Governor::converged_after(self)
    }
}

impl Controller for Agft {
    fn decide(&mut self, obs: &Observation, _: f64) -> Decision {
        Agft::decide(self, obs)
    }
    fn converged_after(&self) -> Option<u64> {
        Agft::converged_after(self)
    }
}

/// One window as the bench saw it.
#[derive(Debug, Clone, Copy)]
struct WindowRecord {
    end: f64,
    energy: f64,
    tokens: f64,
    itl_sum: f64,
    itl_count: f64,
    busy: bool,
    violated: bool,
}

struct Run {
    windows: Vec<WindowRecord>,
    report: BenchReport,
}

fn check_options(opts: &BenchOptions) -> Result<(), BenchError> {
    let positive = |field: &'static str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(BenchError::Option { field, msg: format!("{v} must be a positive number of seconds") })
        }
    };
    positive("ttft_slo", opts.ttft_slo_s)?;
    positive("tpot_slo", opts.tpot_slo_s)?;
    positive("period", opts.period_s)
}

fn h100() -> Result<(Arc<SimGpu>, Vec<u32>), BenchError> {
    let gpu = Arc::new(SimGpu::h100(1));
    let clocks = gpu.devices().first().map(|d| d.sm_clocks_mhz.clone()).ok_or(BenchError::NoDevice)?;
    if clocks.is_empty() {
        return Err(BenchError::NoDevice);
    }
    Ok((gpu, clocks))
}

/// Runs `trace` under one policy. Deterministic for a given seed.
pub fn run_bench(trace: &Trace, policy: BenchPolicy, opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    check_options(opts)?;
    let (_, clocks) = h100()?;
    let (min, max) = (clocks[0], clocks[clocks.len() - 1]);
    let slo = Objectives { ttft_s: opts.ttft_slo_s, tpot_s: opts.tpot_slo_s };
    let mut run = match policy {
        BenchPolicy::Default => simulate(trace, opts, &mut Fixed(ClockTarget::Default))?,
        BenchPolicy::Static(mhz) => {
            if !clocks.contains(&mhz) {
                return Err(BenchError::Clock { mhz, min, max });
            }
            simulate(trace, opts, &mut Fixed(ClockTarget::Locked(mhz)))?
        }
        BenchPolicy::Agft => simulate(trace, opts, &mut Agft::new(&clocks, slo))?,
        BenchPolicy::Governor => {
            let cfg = GovernorConfig { mode: Mode::Slo, slo, ..GovernorConfig::default() };
            simulate(trace, opts, &mut Governor::new(cfg, &clocks, None))?
        }
        BenchPolicy::Oracle => oracle(trace, opts, &clocks)?,
    };
    run.report.policy = policy.to_string();
    Ok(run.report)
}

/// Sweeps static clocks, picks the best qualifying one per segment and replays that schedule.
fn oracle(trace: &Trace, opts: &BenchOptions, clocks: &[u32]) -> Result<Run, BenchError> {
    let max = clocks[clocks.len() - 1];
    // Rounded, as the governor's floor is; `as` saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let floor = (f64::from(max) * GovernorConfig::default().min_share_of_max).round() as u32;
    let mut sweep: Vec<u32> = Vec::new();
    let lowest = floor.max(clocks[0]);
    for want in std::iter::successors(Some(max), |w| w.checked_sub(ORACLE_STEP_MHZ)).take_while(|w| *w >= lowest) {
        if let Some(c) = clocks.iter().copied().min_by_key(|c| c.abs_diff(want)) {
            if !sweep.contains(&c) {
                sweep.push(c);
            }
        }
    }
    let bounds = trace.segment_bounds();
    // best[segment] = (qualifies, edp, clock)
    let mut best: Vec<Option<(bool, f64, u32)>> = vec![None; bounds.len()];
    for &mhz in &sweep {
        let run = simulate(trace, opts, &mut Fixed(ClockTarget::Locked(mhz)))?;
        for (s, (start, end)) in bounds.iter().enumerate() {
            let ws: Vec<&WindowRecord> =
                run.windows.iter().filter(|w| w.end > *start && w.end <= *end + 1e-9).collect();
            let busy = ws.iter().filter(|w| w.busy).count();
            let bad = ws.iter().filter(|w| w.violated).count();
            let ok = busy == 0 || (bad as f64) <= ORACLE_MAX_VIOLATIONS * busy as f64;
            let energy: f64 = ws.iter().map(|w| w.energy).sum();
            let tokens: f64 = ws.iter().map(|w| w.tokens).sum();
            let (isum, icount) = ws.iter().fold((0.0, 0.0), |a, w| (a.0 + w.itl_sum, a.1 + w.itl_count));
            // A segment without tokens is judged on energy alone.
            let score = if icount > 0.0 {
                edp_per_token(energy, tokens, isum / icount).unwrap_or(f64::INFINITY)
            } else {
                energy
            };
            let better = match best[s] {
                None => true,
                Some((q, e, _)) => (ok && !q) || (ok == q && score < e),
            };
            if better {
                best[s] = Some((ok, score, mhz));
            }
        }
    }
    let spans: Vec<(f64, u32)> =
        bounds.iter().zip(&best).map(|((_, end), b)| (*end, b.map_or(max, |b| if b.0 { b.2 } else { max }))).collect();
    let clocks_used: Vec<u32> = spans.iter().map(|s| s.1).collect();
    let mut run = simulate(trace, opts, &mut Schedule { spans, period: opts.period_s })?;
    run.report.segment_clocks_mhz = Some(clocks_used);
    Ok(run)
}

/// The bench loop: engine steps in virtual time, a decision at every window edge.
fn simulate(trace: &Trace, opts: &BenchOptions, ctl: &mut dyn Controller) -> Result<Run, BenchError> {
    let (gpu, clocks) = h100()?;
    let max = clocks[clocks.len() - 1];
    let engine =
        Engine::new(EngineConfig::default(), Arc::clone(&gpu)).map_err(|e| BenchError::Engine(e.to_string()))?;
    let mut driver = Driver::new(engine);
    driver.extend(trace.schedule.arrivals(opts.seed));
    let slo = Objectives { ttft_s: opts.ttft_slo_s, tpot_s: opts.tpot_slo_s };
    let end = trace.duration_s();
    let first = Snapshot::from_text(&driver.engine().metrics_text())?;
    let mut prev = first.clone();
    let mut prev_energy = gpu.sample(0)?.energy_j;
    let first_energy = prev_energy;
    let mut prev_t = driver.now();
    let mut applied = ClockTarget::Default;
    let mut windows = Vec::new();
    let (mut decisions, mut changes) = (0u64, 0u64);
    let (mut decide_us_sum, mut decide_us_max) = (0.0f64, 0.0f64);
    let (mut clock_time, mut busy_time) = (0.0, 0.0);
    let mut edge = opts.period_s;
    while edge <= end + 1e-9 {
        driver.advance(Until::Edge(edge));
        let now = driver.now();
        let snap = Snapshot::from_text(&driver.engine().metrics_text())?;
        let energy_now = gpu.sample(0)?.energy_j;
        let seconds = now - prev_t;
        let window = Window::between(&prev, &snap, seconds);
        let energy = (energy_now - prev_energy).max(0.0);
        let obs = Observation { window: &window, energy_j: energy, seconds, applied };
        let started = Instant::now();
        let d = ctl.decide(&obs, now);
        let us = started.elapsed().as_secs_f64() * 1e6;
        decisions += 1;
        decide_us_sum += us;
        decide_us_max = decide_us_max.max(us);

        let outcome = governor::reward::Outcome::from_window(&window, energy, seconds);
        let lat = |l: &Option<vllm_metrics::Latency>| {
            l.as_ref().map_or((0.0, 0.0), |l| (l.mean.unwrap_or(0.0) * l.count, l.count))
        };
        let (itl_sum, itl_count) = lat(&window.itl);
        let busy = outcome.tokens > 0.0 || window.ttft.as_ref().is_some_and(|l| l.count > 0.0);
        let clock = match applied {
            ClockTarget::Default => max,
            ClockTarget::Locked(m) => m,
        };
        if busy {
            clock_time += f64::from(clock) * seconds;
            busy_time += seconds;
        }
        windows.push(WindowRecord {
            end: now,
            energy,
            tokens: outcome.tokens,
            itl_sum,
            itl_count,
            busy,
            violated: outcome.slo_check(&slo).violated(),
        });

        if d.target != applied {
            match d.target {
                ClockTarget::Default => gpu.reset_sm_clock(0)?,
                ClockTarget::Locked(m) => {
                    gpu.lock_sm_clock(0, m)?;
                }
            }
            applied = d.target;
            changes += 1;
        }
        prev = snap;
        prev_energy = energy_now;
        prev_t = now;
        edge += opts.period_s;
    }

    let total = Window::between(&first, &prev, prev_t);
    let energy = prev_energy - first_energy;
    let tokens = total.generation_tokens_rate.map_or(0.0, |r| r * prev_t);
    let mean_tpot = total.itl.as_ref().and_then(|l| l.mean);
    let busy_windows = windows.iter().filter(|w| w.busy).count() as u64;
    let violating = windows.iter().filter(|w| w.violated).count() as u64;
    let report = BenchReport {
        trace: trace.name.clone(),
        policy: String::new(),
        seed: opts.seed,
        ttft_slo_s: opts.ttft_slo_s,
        tpot_slo_s: opts.tpot_slo_s,
        duration_s: prev_t,
        energy_joules: energy,
        tokens,
        requests_finished: total.request_rate.map_or(0.0, |r| r * prev_t),
        mean_ttft_s: total.ttft.as_ref().and_then(|l| l.mean),
        mean_tpot_s: mean_tpot,
        edp_per_token: mean_tpot.and_then(|t| edp_per_token(energy, tokens, t)),
        slo_violation_ratio: if busy_windows > 0 { violating as f64 / busy_windows as f64 } else { 0.0 },
        busy_windows,
        violating_windows: violating,
        decisions,
        converged_after: ctl.converged_after(),
        clock_changes: changes,
        mean_busy_clock_mhz: if busy_time > 0.0 { clock_time / busy_time } else { 0.0 },
        mean_decision_us: if decisions > 0 { decide_us_sum / decisions as f64 } else { 0.0 },
        max_decision_us: decide_us_max,
        segment_clocks_mhz: None,
    };
    Ok(Run { windows, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Trace {
        Trace::from_csv(
            "tiny",
            "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n20,4,200,300\n10,0,200,300\n",
        )
        .expect("valid")
    }

    #[test]
    fn policies_parse_with_a_clear_error() {
        assert_eq!("default".parse(), Ok(BenchPolicy::Default));
        assert_eq!("static:1410".parse(), Ok(BenchPolicy::Static(1410)));
        assert_eq!("oracle".parse(), Ok(BenchPolicy::Oracle));
        assert_eq!("agft".parse(), Ok(BenchPolicy::Agft));
        assert_eq!("governor".parse(), Ok(BenchPolicy::Governor));
        let e = "static:fast".parse::<BenchPolicy>().expect_err("bad");
        assert!(e.to_string().contains("static:fast") && e.to_string().contains("static:MHZ"));
        assert_eq!(BenchPolicy::Static(990).to_string(), "static:990");
    }

    #[test]
    fn a_run_accounts_energy_tokens_and_windows() {
        let r = run_bench(&tiny(), BenchPolicy::Default, &BenchOptions::default()).expect("runs");
        assert_eq!(r.decisions, 30);
        assert!(r.energy_joules > 0.0 && r.tokens > 1000.0, "{r:?}");
        assert!(r.edp_per_token.is_some() && r.mean_ttft_s.is_some());
        assert!(r.busy_windows >= 20 && r.busy_windows <= 30);
        assert_eq!(r.converged_after, None);
        assert_eq!(r.policy, "default");
    }

    #[test]
    fn a_lower_static_clock_saves_energy_on_decode() {
        let opts = BenchOptions::default();
        let hi = run_bench(&tiny(), BenchPolicy::Static(1980), &opts).expect("runs");
        let lo = run_bench(&tiny(), BenchPolicy::Static(1200), &opts).expect("runs");
        assert!(lo.energy_joules < hi.energy_joules, "{} vs {}", lo.energy_joules, hi.energy_joules);
        assert!(lo.mean_tpot_s > hi.mean_tpot_s);
        assert!(matches!(run_bench(&tiny(), BenchPolicy::Static(1), &opts), Err(BenchError::Clock { .. })));
    }

    #[test]
    fn same_seed_same_report() {
        let opts = BenchOptions::default();
        let a = run_bench(&tiny(), BenchPolicy::Governor, &opts).expect("runs");
        let b = run_bench(&tiny(), BenchPolicy::Governor, &opts).expect("runs");
        assert_eq!((a.energy_joules, a.tokens, a.decisions), (b.energy_joules, b.tokens, b.decisions));
    }

    /// The bench table over the shipped traces; run with
    /// `cargo test --release -p gpu-agent --lib bench_table -- --ignored --nocapture`
    /// (BENCH_TRACES=a,b and BENCH_POLICIES=x,y narrow it down).
    #[test]
    #[ignore]
    fn bench_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/traces");
        let want = |var: &str, name: &str| std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == name));
        let opts = BenchOptions::default();
        println!("| trace | policy | EDP/token (mJ*s) | vs default | energy (kJ) | tokens | SLO viol. | converged | TTFT (s) | TPOT (ms) | clock | decide (us) | wall (s) |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for name in ["decode-heavy", "prefill-heavy", "bursty", "diurnal"] {
            if !want("BENCH_TRACES", name) {
                continue;
            }
            let trace = Trace::load(&dir.join(format!("{name}.csv"))).expect("trace");
            let mut base = None;
            for policy in ["default", "oracle", "agft", "governor"] {
                if !want("BENCH_POLICIES", policy) {
                    continue;
                }
                let t = Instant::now();
                let r = run_bench(&trace, policy.parse().expect("policy"), &opts).expect("runs");
                let edp = r.edp_per_token.unwrap_or(f64::NAN);
                if policy == "default" {
                    base = Some(edp);
                }
                println!(
                    "| {name} | {policy} | {:.4} | {} | {:.1} | {:.0} | {:.2}% | {} | {:.3} | {:.1} | {:.0} | {:.1} | {:.1} |",
                    edp * 1e3,
                    base.map_or("-".into(), |b| format!("{:+.1}%", (edp / b - 1.0) * 100.0)),
                    r.energy_joules / 1e3,
                    r.tokens,
                    r.slo_violation_ratio * 100.0,
                    r.converged_after.map_or("-".into(), |c| c.to_string()),
                    r.mean_ttft_s.unwrap_or(f64::NAN),
                    r.mean_tpot_s.unwrap_or(f64::NAN) * 1e3,
                    r.mean_busy_clock_mhz,
                    r.mean_decision_us,
                    t.elapsed().as_secs_f64(),
                );
                if let Some(c) = &r.segment_clocks_mhz {
                    println!("|  | oracle clocks | {c:?} |");
                }
            }
        }
    }

    #[test]
    fn bad_options_are_rejected() {
        let opts = BenchOptions { ttft_slo_s: 0.0, ..BenchOptions::default() };
        assert!(matches!(
            run_bench(&tiny(), BenchPolicy::Default, &opts),
            Err(BenchError::Option { field: "ttft_slo", .. })
        ));
    }
}
