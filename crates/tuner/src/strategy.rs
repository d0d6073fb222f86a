//! Which flags to try next: `grid` (every combination), `random` (uniform, no repeats) and
//! `tpe`, a tree-structured Parzen estimator (Bergstra et al. 2011, as Optuna's default
//! sampler): split the finished trials into the best quarter and the rest, fit one density per
//! parameter to each group, and try the candidate most likely under "best" relative to "rest".
//!
//! Written here rather than taken from the `tpe` crate: that crate needs Rust 1.88 (this
//! workspace builds with 1.82), works on one parameter at a time with continuous ranges, and
//! knows nothing of failed or pending trials. Points here are indices into each parameter's
//! value list, so grid, random and TPE share one representation.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::Rng;

use super::space::Strategy;

/// Indices into each enabled parameter's values.
pub type Point = Vec<usize>;

/// One dimension: how many values, and whether they are ordered (numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim {
    pub len: usize,
    pub ordinal: bool,
}

/// A finished trial as the sampler sees it: its point and score (None: failed).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub point: Point,
    pub score: Option<f64>,
}

/// Random trials before TPE starts modelling.
pub const TPE_STARTUP: usize = 5;
/// Share of trials counted as "good".
pub const TPE_GAMMA: f64 = 0.25;
/// Candidates drawn from the "good" density per suggestion.
pub const TPE_CANDIDATES: usize = 32;

/// The `i`-th grid point (the first parameter changes slowest).
pub fn grid_point(dims: &[Dim], mut i: u64) -> Point {
    let mut p = vec![0; dims.len()];
    for (d, slot) in dims.iter().zip(p.iter_mut()).rev() {
        let n = d.len.max(1) as u64;
        // Below `d.len`, a usize.
        *slot = usize::try_from(i % n).unwrap_or(usize::MAX);
        i /= n;
    }
    p
}

pub fn grid_size(dims: &[Dim]) -> u64 {
    dims.iter().map(|d| d.len.max(1) as u64).product()
}

/// The next point to try, or None when every point was tried (or is running).
pub fn suggest(
    strategy: Strategy,
    dims: &[Dim],
    history: &[Observed],
    pending: &[Point],
    rng: &mut StdRng,
) -> Option<Point> {
    let taken: HashSet<&Point> = history.iter().map(|o| &o.point).chain(pending.iter()).collect();
    let total = grid_size(dims);
    if taken.len() as u64 >= total {
        return None;
    }
    match strategy {
        Strategy::Grid => (0..total).map(|i| grid_point(dims, i)).find(|p| !taken.contains(p)),
        Strategy::Random => random_free(dims, &taken, rng),
        Strategy::Tpe => {
            let done = history.iter().filter(|o| o.score.is_some()).count();
            if done < TPE_STARTUP {
                return random_free(dims, &taken, rng);
            }
            tpe(dims, history, &taken, rng).or_else(|| random_free(dims, &taken, rng))
        }
    }
}

/// A uniform point not yet taken (rejection, then enumeration for nearly full grids).
fn random_free(dims: &[Dim], taken: &HashSet<&Point>, rng: &mut StdRng) -> Option<Point> {
    for _ in 0..256 {
        let p: Point = dims.iter().map(|d| rng.random_range(0..d.len.max(1))).collect();
        if !taken.contains(&p) {
            return Some(p);
        }
    }
    let free: Vec<u64> =
        (0..grid_size(dims)).filter(|i| !taken.contains(&grid_point(dims, *i))).take(100_000).collect();
    if free.is_empty() {
        return None;
    }
    Some(grid_point(dims, free[rng.random_range(0..free.len())]))
}

/// A smoothed density over one dimension's values.
fn density(dim: Dim, xs: &[usize], n_all: usize) -> Vec<f64> {
    let k = dim.len.max(1);
    // Prior: uniform with the weight of one observation (Optuna's prior_weight = 1).
    let mut w = vec![1.0 / k as f64; k];
    if dim.ordinal {
        // Gaussian kernel on indices; the bandwidth shrinks as trials accumulate.
        let bw = (0.3 * k as f64 / (n_all.max(1) as f64).powf(0.2)).max(0.6);
        for &x in xs {
            let row: Vec<f64> = (0..k).map(|v| (-0.5 * ((v as f64 - x as f64) / bw).powi(2)).exp()).collect();
            let s: f64 = row.iter().sum();
            for (wv, r) in w.iter_mut().zip(row) {
                *wv += r / s;
            }
        }
    } else {
        for &x in xs {
            if x < k {
                w[x] += 1.0;
            }
        }
    }
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

fn draw(p: &[f64], rng: &mut StdRng) -> usize {
    let mut u: f64 = rng.random();
    for (i, pi) in p.iter().enumerate() {
        if u < *pi {
            return i;
        }
        u -= pi;
    }
    p.len().saturating_sub(1)
}

fn tpe(dims: &[Dim], history: &[Observed], taken: &HashSet<&Point>, rng: &mut StdRng) -> Option<Point> {
    // Failed trials rank below every success.
    let mut ranked: Vec<(&Point, f64)> =
        history.iter().map(|o| (&o.point, o.score.unwrap_or(f64::NEG_INFINITY))).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let n = ranked.len();
    // At most n (the share is below 1), so the cast is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n_good = ((TPE_GAMMA * n as f64).ceil() as usize).clamp(1, n.saturating_sub(1).max(1));
    let (good, bad) = ranked.split_at(n_good);
    let l: Vec<Vec<f64>> = dims
        .iter()
        .enumerate()
        .map(|(d, dim)| density(*dim, &good.iter().map(|g| g.0[d]).collect::<Vec<_>>(), n))
        .collect();
    let g: Vec<Vec<f64>> = dims
        .iter()
        .enumerate()
        .map(|(d, dim)| density(*dim, &bad.iter().map(|b| b.0[d]).collect::<Vec<_>>(), n))
        .collect();
    let mut best: Option<(f64, Point)> = None;
    for _ in 0..TPE_CANDIDATES {
        let p: Point = l.iter().map(|ld| draw(ld, rng)).collect();
        if taken.contains(&p) {
            continue;
        }
        let score: f64 = p.iter().enumerate().map(|(d, &v)| l[d][v].ln() - g[d][v].ln()).sum();
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, p));
        }
    }
    best.map(|b| b.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn dims() -> Vec<Dim> {
        vec![Dim { len: 12, ordinal: true }, Dim { len: 12, ordinal: true }, Dim { len: 3, ordinal: false }]
    }

    /// A bowl with its top at (8, 3, 1).
    fn f(p: &Point) -> f64 {
        let a = p[0] as f64 - 8.0;
        let b = p[1] as f64 - 3.0;
        100.0 - a * a - b * b - if p[2] == 1 { 0.0 } else { 10.0 }
    }

    fn run(strategy: Strategy, seed: u64, budget: usize) -> f64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut hist: Vec<Observed> = Vec::new();
        for _ in 0..budget {
            let Some(p) = suggest(strategy, &dims(), &hist, &[], &mut rng) else { break };
            let score = f(&p);
            hist.push(Observed { point: p, score: Some(score) });
        }
        hist.iter().filter_map(|o| o.score).fold(f64::MIN, f64::max)
    }

    #[test]
    fn grid_enumerates_every_point_once() {
        let d = vec![Dim { len: 2, ordinal: true }, Dim { len: 3, ordinal: true }];
        let mut rng = StdRng::seed_from_u64(0);
        let mut hist = Vec::new();
        while let Some(p) = suggest(Strategy::Grid, &d, &hist, &[], &mut rng) {
            hist.push(Observed { point: p, score: None });
        }
        let pts: Vec<Point> = hist.iter().map(|o| o.point.clone()).collect();
        assert_eq!(pts, vec![vec![0, 0], vec![0, 1], vec![0, 2], vec![1, 0], vec![1, 1], vec![1, 2]]);
    }

    #[test]
    fn random_never_repeats_and_skips_pending() {
        let d = vec![Dim { len: 3, ordinal: true }, Dim { len: 3, ordinal: false }];
        let mut rng = StdRng::seed_from_u64(7);
        let pending = vec![vec![1, 1]];
        let mut seen = HashSet::new();
        let hist: Vec<Observed> = Vec::new();
        let mut hist = hist;
        while let Some(p) = suggest(Strategy::Random, &d, &hist, &pending, &mut rng) {
            assert!(seen.insert(p.clone()), "repeat {p:?}");
            hist.push(Observed { point: p, score: Some(1.0) });
        }
        assert_eq!(seen.len(), 8);
        assert!(!seen.contains(&vec![1, 1]));
    }

    #[test]
    fn tpe_beats_random_on_a_bowl() {
        // 432 points; 40 trials. TPE reaches the top (100) on most seeds, random rarely.
        let seeds = 0..10u64;
        let tpe_hits = seeds.clone().filter(|s| run(Strategy::Tpe, *s, 40) >= 99.0).count();
        let rnd_hits = seeds.filter(|s| run(Strategy::Random, *s, 40) >= 99.0).count();
        assert!(tpe_hits >= 7, "tpe found the top on {tpe_hits}/10 seeds");
        assert!(tpe_hits > rnd_hits, "tpe {tpe_hits} vs random {rnd_hits}");
    }

    #[test]
    fn tpe_treats_failures_as_worst() {
        let d = vec![Dim { len: 10, ordinal: true }];
        let mut rng = StdRng::seed_from_u64(3);
        // Everything above index 4 failed; the best success is at 4.
        let hist: Vec<Observed> = (0..10)
            .map(|i| Observed { point: vec![i], score: if i <= 4 { Some(i as f64) } else { None } })
            .filter(|o| o.point[0] != 3)
            .collect();
        assert_eq!(suggest(Strategy::Tpe, &d, &hist, &[], &mut rng), Some(vec![3]));
    }
}
