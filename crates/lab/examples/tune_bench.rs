//! Benchmark of the tuner's strategies on the simulator (virtual time, `--launch sim`): how
//! many trials TPE and random search need to come within 5% of the grid optimum.
//!
//! `cargo run --release --example tune_bench -- SPACE.toml... [--seeds N]`
//! For each space: one full grid study gives the optimum; then TPE and random studies with a
//! budget of a third of the grid, over N seeds, report the trial (baseline counted) at which
//! their best first reached 95% (and 99%) of it: median and worst (`>budget` when never).

use std::path::PathBuf;
use std::sync::Arc;
use tuner::study::SharedProgress;

use sim::tune::VirtualServers;
use tuner::{run_study, SearchSpace, Strategy, StudyConfig};

/// Runs one study on the simulator and returns each trial's score in trial order (baseline
/// first; None: failed).
fn study(
    space: &SearchSpace,
    strategy: Strategy,
    seed: u64,
    trials: u32,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Option<f64>>> {
    let mut s = space.clone();
    s.study.strategy = strategy;
    s.study.seed = seed;
    s.study.trials = trials;
    s.study.gpu_sets = vec!["0".into()];
    let cfg = StudyConfig {
        space: s,
        launch: "sim".into(),
        servers: Arc::new(VirtualServers),
        dir: dir.to_path_buf(),
        fresh: true,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    rt.block_on(run_study(cfg, SharedProgress::default(), rx))?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json"))?)?;
    let mut scores: Vec<(u64, Option<f64>)> = v["all_trials"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["kind"] != "profile")
        .map(|t| (t["id"].as_u64().unwrap_or(0), t["score"].as_f64()))
        .collect();
    scores.sort_by_key(|s| s.0);
    Ok(scores.into_iter().map(|s| s.1).collect())
}

/// 1-based trial count at which the best score first reached `target`.
fn reached(scores: &[Option<f64>], target: f64) -> Option<usize> {
    let mut best = f64::NEG_INFINITY;
    for (i, s) in scores.iter().enumerate() {
        best = best.max(s.unwrap_or(f64::NEG_INFINITY));
        if best >= target {
            return Some(i + 1);
        }
    }
    None
}

/// "median | worst | reached/seeds" of the trials needed to reach `share` of the optimum.
fn cell(runs: &[Vec<Option<f64>>], opt: f64, share: f64, budget: u32) -> String {
    let mut counts: Vec<usize> = runs.iter().map(|r| reached(r, share * opt).unwrap_or(usize::MAX)).collect();
    counts.sort_unstable();
    let hits = counts.iter().filter(|c| **c != usize::MAX).count();
    let show = |v: usize| if v == usize::MAX { format!(">{budget}") } else { v.to_string() };
    format!("{} | {} | {hits}/{}", show(counts[(counts.len() - 1) / 2]), show(counts[counts.len() - 1]), runs.len())
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 10u64;
    if let Some(i) = args.iter().position(|a| a == "--seeds") {
        seeds = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(10);
        args.drain(i..(i + 2).min(args.len()));
    }
    let tmp = tempfile::tempdir()?;
    println!("| space | grid trials | grid optimum (req/s) | strategy | budget | within 5%: median | worst | seeds | within 1%: median | worst | seeds |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for path in args {
        let space = SearchSpace::load(&PathBuf::from(&path))?;
        let grid = u32::try_from(space.grid_size() + 1).unwrap_or(u32::MAX);
        let scores = study(&space, Strategy::Grid, 1, grid, &tmp.path().join("grid"))?;
        let opt = scores.iter().flatten().fold(0.0, |a: f64, b| a.max(*b));
        let budget = grid / 3;
        for strategy in [Strategy::Tpe, Strategy::Random] {
            let runs: Vec<Vec<Option<f64>>> = (1..=seeds)
                .map(|seed| study(&space, strategy, seed, budget, &tmp.path().join(format!("{strategy}-{seed}"))))
                .collect::<anyhow::Result<_>>()?;
            println!(
                "| {} | {grid} | {opt:.2} | {strategy} | {budget} | {} | {} |",
                space.study.name,
                cell(&runs, opt, 0.95, budget),
                cell(&runs, opt, 0.99, budget)
            );
        }
    }
    Ok(())
}
