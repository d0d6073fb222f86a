//! Governor behaviour against a synthetic GPU whose EDP has a known best clock.

use rand::{Rng, SeedableRng};

use super::*;
use objectives::Objectives;
use vllm_metrics::{Latency, Window};

pub(crate) fn h100_clocks() -> Vec<u32> {
    (0..110).map(|i| 345 + 15 * i).collect()
}

/// A steady decode load: TPOT grows as u^-1.2 below the maximum clock, power is
/// 150 + 355 u^3 W, so EDP per token is lowest near u = 0.655 (~1300 MHz), 18% below the
/// maximum clock's, and rises again below (6% below the maximum at 900 MHz).
struct Synthetic {
    rng: rand::rngs::StdRng,
    tokens_per_s: f64,
    noise: f64,
}

impl Synthetic {
    fn new(seed: u64) -> Self {
        Self { rng: rand::rngs::StdRng::seed_from_u64(seed), tokens_per_s: 2000.0, noise: 0.03 }
    }

    fn tpot(mhz: u32) -> f64 {
        0.02 * (f64::from(mhz) / 1980.0).powf(-1.2)
    }

    fn edp(mhz: u32, tokens_per_s: f64) -> f64 {
        let u = f64::from(mhz) / 1980.0;
        (150.0 + 355.0 * u.powi(3)) / tokens_per_s * Self::tpot(mhz)
    }

    /// The window measured while `applied` was on the GPU, and its energy.
    fn window(&mut self, applied: ClockTarget) -> (Window, f64) {
        let mhz = match applied {
            ClockTarget::Default => 1980,
            ClockTarget::Locked(m) => m,
        };
        let u = f64::from(mhz) / 1980.0;
        let jitter = 1.0 + self.rng.random_range(-self.noise..=self.noise);
        let tpot = Self::tpot(mhz) * jitter;
        let energy = (150.0 + 355.0 * u.powi(3)) * (1.0 + self.rng.random_range(-self.noise..=self.noise));
        let lat = |m: f64| Some(Latency { count: 50.0, mean: Some(m), p50: Some(m), p90: Some(m), p99: Some(m) });
        let mut w = context::tests::window(0.0, 40.0, 400.0, self.tokens_per_s * jitter);
        w.itl = lat(tpot);
        w.ttft = lat(0.1);
        (w, energy)
    }
}

/// Equal up to the last bits of the floats (JSON text need not round-trip them exactly).
pub(crate) fn assert_states_close(a: &GovernorState, b: &GovernorState) {
    let close = |x: &[f64], y: &[f64]| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-12 * (1.0 + p.abs()))
    };
    assert_eq!(a.arms.len(), b.arms.len());
    for (x, y) in a.arms.iter().zip(&b.arms) {
        assert_eq!(
            (x.stats.mhz, x.stats.tries, x.stats.pruned, x.coarse),
            (y.stats.mhz, y.stats.tries, y.stats.pruned, y.coarse)
        );
        assert!(close(&x.model.a, &y.model.a) && close(&x.model.b, &y.model.b), "arm {}", x.stats.mhz);
    }
    assert!(close(&a.context.norm.mean, &b.context.norm.mean) && close(&a.context.norm.var, &b.context.norm.var));
    assert_eq!((a.decisions, a.converged_after, a.sweep_done), (b.decisions, b.converged_after, b.sweep_done));
}

fn run(g: &mut Governor, env: &mut Synthetic, n: usize) -> Vec<Decision> {
    let mut applied = ClockTarget::Default;
    let mut out = Vec::new();
    for _ in 0..n {
        let (w, e) = env.window(applied);
        let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
        applied = d.target;
        out.push(d);
    }
    out
}

fn locked(t: ClockTarget) -> u32 {
    match t {
        ClockTarget::Locked(m) => m,
        ClockTarget::Default => 0,
    }
}

#[test]
fn converges_near_the_best_edp_clock_within_60_decisions() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(1);
    let ds = run(&mut g, &mut env, 150);
    let after = g.converged_after().expect("converged");
    assert!(after < 60, "converged after {after}");
    let best = (900..=1980)
        .step_by(15)
        .min_by(|a, b| Synthetic::edp(*a, 1.0).total_cmp(&Synthetic::edp(*b, 1.0)))
        .expect("clocks");
    let last: Vec<u32> = ds[120..].iter().map(|d| locked(d.target)).collect();
    let mean = last.iter().map(|m| f64::from(*m)).sum::<f64>() / last.len() as f64;
    // The synthetic curve is flat at the bottom (1200 and 1380 MHz are within 0.7% of the
    // best EDP), so the clock is checked loosely and the EDP tightly.
    assert!((mean - f64::from(best)).abs() <= 120.0, "settled at {mean}, best {best}");
    let edp_best = Synthetic::edp(best, 1.0);
    let edp_settled = Synthetic::edp(locked(ds[149].target), 1.0);
    assert!(edp_settled < edp_best * 1.02, "{edp_settled} vs {edp_best}");
    assert!(ds[120..].iter().all(|d| d.phase == Phase::Exploit));
}

#[test]
fn slo_mode_stays_out_of_violating_clocks() {
    // TPOT SLO 30 ms: clocks below ~1410 MHz break it.
    let cfg = GovernorConfig { slo: Objectives { ttft_s: 1.0, tpot_s: 0.03 }, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(2);
    let ds = run(&mut g, &mut env, 200);
    let violations = ds.iter().filter(|d| d.slo_violated).count();
    assert!(violations <= 4, "{violations} violating windows");
    for d in &ds[100..] {
        assert!(Synthetic::tpot(locked(d.target)) < 0.03, "settled at {}", locked(d.target));
    }
    assert!(g.converged_after().is_some());
}

#[test]
fn a_violation_jumps_to_the_maximum_at_once() {
    let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
    let mut env = Synthetic::new(3);
    run(&mut g, &mut env, 30);
    let (mut w, e) = env.window(ClockTarget::Locked(1200));
    w.ttft = Some(Latency { count: 10.0, mean: Some(2.0), p50: None, p90: None, p99: None });
    let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied: ClockTarget::Locked(1200) });
    assert!(d.slo_violated);
    assert_eq!(d.phase, Phase::Fallback);
    assert_eq!(d.target, ClockTarget::Locked(1980));
}

#[test]
fn observe_mode_never_changes_the_clock_but_learns() {
    let cfg = GovernorConfig { mode: Mode::Observe, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(4);
    for applied in [ClockTarget::Default, ClockTarget::Locked(1980), ClockTarget::Locked(1260)] {
        for _ in 0..5 {
            let (w, e) = env.window(applied);
            let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
            assert_eq!(d.target, applied);
            assert_eq!(d.phase, Phase::Observe);
        }
    }
    let s = g.state();
    let tries = |m: u32| s.arms.iter().find(|a| a.stats.mhz == m).map_or(0, |a| a.stats.tries);
    assert!(tries(1980) > 0 && tries(1260) == 5, "learnt from what ran");
}

#[test]
fn pinned_mode_snaps_and_respects_the_minimum() {
    let mut g =
        Governor::new(GovernorConfig { mode: Mode::Pinned(1203), ..GovernorConfig::default() }, &h100_clocks(), None);
    let mut env = Synthetic::new(5);
    let ds = run(&mut g, &mut env, 3);
    assert!(ds.iter().all(|d| d.target == ClockTarget::Locked(1200) && d.phase == Phase::Pinned));
    g.set_mode(Mode::Pinned(100));
    let ds = run(&mut g, &mut env, 2);
    assert_eq!(ds[1].target, ClockTarget::Locked(345));
}

#[test]
fn idle_never_asks_below_the_minimum_clock() {
    let mut g = Governor::new(GovernorConfig::default(), &[345, 360, 900, 1980], None);
    let w = context::tests::window(0.0, 0.0, 0.0, 0.0);
    let d = g.decide(&Observation { window: &w, energy_j: 70.0, seconds: 1.0, applied: ClockTarget::Default });
    assert_eq!(d.phase, Phase::Idle);
    assert!(locked(d.target) >= 345);
    assert_eq!(d.reward, None);
}

#[test]
fn clock_changes_are_rate_limited_except_toward_the_maximum() {
    let cfg = GovernorConfig { mode: Mode::Edp, min_change_interval_s: 5.0, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(6);
    let ds = run(&mut g, &mut env, 60);
    let mut last_change = -100i64;
    let mut prev = ClockTarget::Default;
    for (i, d) in (0i64..).zip(&ds) {
        if d.target != prev {
            if locked(d.target) != 1980 {
                assert!(i - last_change >= 5, "change at {i} after {last_change}");
            }
            last_change = i;
            prev = d.target;
        }
    }
}

#[test]
fn state_round_trips_and_a_restored_governor_keeps_its_knowledge() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg.clone(), &h100_clocks(), None);
    let mut env = Synthetic::new(7);
    run(&mut g, &mut env, 80);
    let s = g.state();
    let json = serde_json::to_string(&s).expect("serialises");
    let back: GovernorState = serde_json::from_str(&json).expect("deserialises");
    assert_states_close(&back, &s);
    let bytes = bincode::serde::encode_to_vec(&s, bincode::config::standard()).expect("encodes");
    let (back, _): (GovernorState, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decodes");
    assert_eq!(back, s, "bincode is exact");
    let mut h = Governor::new(cfg.clone(), &h100_clocks(), Some(back));
    assert_eq!(h.arms_mhz(), g.arms_mhz());
    // The restored governor skips the sweep and re-converges quickly.
    let ds = run(&mut h, &mut env, 40);
    assert!(ds.iter().all(|d| d.phase != Phase::Explore || locked(d.target) >= 900));
    assert!(h.converged_after().is_some());
    // A state from another GPU does not fit and is dropped.
    let other = Governor::new(cfg, &[300, 600, 1410], Some(s));
    assert_eq!(other.arms_mhz(), vec![1410]);
}

#[test]
fn reset_model_forgets_everything() {
    let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
    let mut env = Synthetic::new(8);
    run(&mut g, &mut env, 50);
    g.reset_model();
    let s = g.state();
    assert_eq!(s.decisions, 0);
    assert_eq!(s.baseline_edp, None);
    assert!(s.arms.iter().all(|a| a.stats.tries == 0 && a.model.n == 0));
}

#[test]
fn relearns_when_the_workload_shifts() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(9);
    run(&mut g, &mut env, 80);
    assert!(g.state().converged_after.is_some());
    env.tokens_per_s = 200.0;
    let ds = run(&mut g, &mut env, 10);
    assert!(ds.iter().any(|d| !d.converged), "a 10x drop in load restarts learning");
}

/// Time per decision (context, update, choice) on the synthetic load; run with
/// `cargo test --release -p gpu-agent --lib decide_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn decide_timing() {
    let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
    let mut env = Synthetic::new(11);
    let mut applied = ClockTarget::Default;
    let mut times = Vec::new();
    for _ in 0..2000 {
        let (w, e) = env.window(applied);
        let t = std::time::Instant::now();
        let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
        times.push(t.elapsed().as_secs_f64() * 1e6);
        applied = d.target;
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "decide(): mean {mean:.2} us, p50 {:.2} us, p99 {:.2} us, max {:.2} us",
        times[1000], times[1980], times[1999]
    );
    assert!(mean < 50.0);
}

/// Runs 120 windows at 500 tokens/s (a night), then 200 at 4000 (the day); returns the clocks
/// chosen during the day.
fn night_then_day(cfg: GovernorConfig) -> (Governor, Vec<Decision>) {
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(3);
    env.tokens_per_s = 500.0;
    run(&mut g, &mut env, 120);
    assert!(g.converged_after().is_some(), "converged at night");
    env.tokens_per_s = 4000.0;
    let day = run(&mut g, &mut env, 200);
    (g, day)
}

#[test]
fn sweeps_again_when_the_load_far_exceeds_the_sweeps() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let g0 = Governor::new(cfg.clone(), &h100_clocks(), None);
    let coarse = g0.arms_mhz();
    let coarse_visited =
        |day: &[Decision]| coarse.iter().filter(|m| day.iter().any(|d| locked(d.target) == **m)).count();
    let (_, day) = night_then_day(cfg.clone());
    assert!(day.iter().any(|d| !d.converged), "the day's load restarted learning");
    // Swept again (the lowest clocks break the TPOT objective, which ends a sweep early).
    let on = coarse_visited(&day);
    assert!(on >= coarse.len() / 2, "swept again: {on} of {} coarse clocks", coarse.len());
    assert!(day[150..].iter().all(|d| d.converged), "and converges again");

    let off = GovernorConfig { resweep_load_factor: 0.0, ..cfg };
    let (_, day) = night_then_day(off);
    assert!(day[150..].iter().all(|d| d.converged));
    let off = coarse_visited(&day);
    assert!(off + 3 <= on, "no new sweep when turned off: {off} coarse clocks, {on} with it");
}

#[test]
fn sweeps_again_around_the_converged_clock_when_the_load_falls_far() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg.clone(), &h100_clocks(), None);
    let mut env = Synthetic::new(4);
    env.tokens_per_s = 4000.0;
    let day = run(&mut g, &mut env, 150);
    assert!(day[100..].iter().all(|d| d.converged), "converged by day");
    let center = locked(day[149].target);
    // The load falls to an eighth; its slow average crosses half the sweep's within ~40 windows.
    let before: Vec<u64> = g.arms.iter().map(|a| a.stats.tries).collect();
    let mut windows = 0;
    while g.stage.sweep_done() && windows < 200 {
        g.track_load(500.0);
        windows += 1;
    }
    assert!(!g.stage.sweep_done() && !g.stage.converged(), "sweeping again after {windows} quiet windows");
    // Coarse clocks near the converged one are measured afresh; the far ones keep theirs.
    for (a, tries) in g.arms.iter().zip(before).filter(|(a, _)| a.coarse) {
        let near = a.mhz().abs_diff(center) <= cfg.resweep_span_mhz;
        let want = if near { 0 } else { tries };
        assert_eq!(a.stats.tries, want, "{} MHz (converged at {center})", a.mhz());
    }
    assert!(g.arms.iter().any(|a| a.coarse && a.stats.tries > 0), "some far clocks kept their statistics");
    // And it converges again under the new load.
    env.tokens_per_s = 500.0;
    let night = run(&mut g, &mut env, 150);
    assert!(night[100..].iter().all(|d| d.converged));
}

#[test]
fn leaves_the_idle_clock_at_once_when_work_arrives() {
    let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
    let mut env = Synthetic::new(5);
    let busy = run(&mut g, &mut env, 8);
    let idle = context::tests::window(0.0, 0.0, 0.0, 0.0);
    let applied = busy[7].target;
    let park = g.decide(&Observation { window: &idle, energy_j: 70.0, seconds: 1.0, applied });
    assert_eq!(park.phase, Phase::Idle);
    // Rate limiting does not hold the parked clock: it was never a measurement.
    let (w, e) = env.window(park.target);
    let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied: park.target });
    assert_ne!(d.target, park.target, "busy again, still parked at {:?}", park.target);
}

/// The search stage as a word, to follow it through a run.
fn search_of(g: &Governor) -> &'static str {
    match g.stage.search() {
        stage::Search::Sweeping { .. } => "sweeping",
        stage::Search::Learning { .. } => "learning",
        stage::Search::Exploiting { .. } => "exploiting",
    }
}

#[test]
fn the_search_sweeps_then_learns_then_exploits() {
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(1);
    let mut applied = ClockTarget::Default;
    let mut seen: Vec<&str> = Vec::new();
    for _ in 0..120 {
        let (w, e) = env.window(applied);
        let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
        applied = d.target;
        assert_eq!(d.converged, g.stage.converged());
        if d.phase == Phase::Exploit {
            assert_eq!(search_of(&g), "exploiting", "exploits only once converged");
        }
        if seen.last() != Some(&search_of(&g)) {
            seen.push(search_of(&g));
        }
    }
    assert_eq!(seen, ["sweeping", "learning", "exploiting"]);
}

#[test]
fn a_violation_enters_fallback_for_its_windows_and_leaves_it() {
    let cfg = GovernorConfig::default();
    let hold = cfg.fallback_windows;
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(3);
    run(&mut g, &mut env, 30);
    let before = search_of(&g);
    let (mut w, e) = env.window(ClockTarget::Locked(1200));
    w.ttft = Some(Latency { count: 10.0, mean: Some(2.0), p50: None, p90: None, p99: None });
    let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied: ClockTarget::Locked(1200) });
    assert_eq!((d.phase, d.target), (Phase::Fallback, ClockTarget::Locked(1980)));
    assert!(matches!(g.stage, Stage::Fallback { windows_left, .. } if windows_left == hold));
    // An idle window does not count towards the fallback.
    let idle = context::tests::window(0.0, 0.0, 0.0, 0.0);
    let d = g.decide(&Observation { window: &idle, energy_j: 70.0, seconds: 1.0, applied: ClockTarget::Locked(1980) });
    assert_eq!(d.phase, Phase::Idle);
    assert!(matches!(g.stage, Stage::Fallback { windows_left, .. } if windows_left == hold));
    let mut applied = ClockTarget::Locked(1980);
    for _ in 0..hold {
        let (w, e) = env.window(applied);
        let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
        assert_eq!((d.phase, d.target), (Phase::Fallback, ClockTarget::Locked(1980)), "held at the maximum");
        applied = d.target;
    }
    assert!(matches!(g.stage, Stage::Searching(_)), "left after {hold} busy windows");
    assert_eq!(search_of(&g), before, "the search resumes where it was");
    let (w, e) = env.window(applied);
    let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
    assert_ne!(d.phase, Phase::Fallback);
    // Banned: the violating clock and those below it are not chosen for a while.
    assert!(locked(d.target) > 1200, "chose {:?}", d.target);
}

#[test]
fn a_converged_governor_leaves_exploitation_when_the_workload_shifts() {
    // No re-sweep on load: the workload features' drift (or the EDP rise) must do it.
    let cfg = GovernorConfig { mode: Mode::Edp, resweep_load_factor: 0.0, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(9);
    run(&mut g, &mut env, 80);
    assert_eq!(search_of(&g), "exploiting");
    env.tokens_per_s = 200.0;
    let mut applied = ClockTarget::Locked(g.stage.refine_center().expect("converged on a clock"));
    let mut left = None;
    for i in 0..20 {
        let (w, e) = env.window(applied);
        let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied });
        applied = d.target;
        if search_of(&g) != "exploiting" {
            assert!(!d.converged && d.phase == Phase::Explore, "{d:?}");
            left = Some(i);
            break;
        }
    }
    assert!(left.is_some(), "still exploiting after the shift");
    assert_eq!(search_of(&g), "learning", "relearns without sweeping again");
    // And settles again under the new workload.
    let ds = run(&mut g, &mut env, 100);
    assert!(ds[80..].iter().all(|d| d.converged && search_of(&g) == "exploiting"));
}

#[test]
fn an_idle_window_parks_and_the_next_busy_one_leaves_at_once() {
    // Mode edp: at the idle clock the synthetic TPOT breaks the default SLO, which would fall back.
    let cfg = GovernorConfig { mode: Mode::Edp, ..GovernorConfig::default() };
    let mut g = Governor::new(cfg, &h100_clocks(), None);
    let mut env = Synthetic::new(5);
    let busy = run(&mut g, &mut env, 8);
    let idle = context::tests::window(0.0, 0.0, 0.0, 0.0);
    let park = g.decide(&Observation { window: &idle, energy_j: 70.0, seconds: 1.0, applied: busy[7].target });
    assert!(matches!(g.stage, Stage::Parked { .. }), "{:?}", g.stage);
    let (w, e) = env.window(park.target);
    let d = g.decide(&Observation { window: &w, energy_j: e, seconds: 1.0, applied: park.target });
    assert!(matches!(g.stage, Stage::Searching(_)), "{:?}", g.stage);
    assert_ne!(d.target, park.target, "not held by the rate limit");
}
