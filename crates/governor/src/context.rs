//! The context a clock decision is made in: features of the last vLLM window, normalised
//! online, plus a bias term.
//!
//! GPU power and utilisation are not features: both follow from the clock chosen, so they
//! would describe the previous arm rather than the workload. Power enters through the reward.

use nalgebra::DVector;
use serde::{Deserialize, Serialize};

use vllm_metrics::Window;

/// Names of the workload features, in vector order (the bias comes last).
pub const FEATURE_NAMES: [&str; 8] = [
    "queue",
    "running",
    "kv_usage",
    "prompt_tokens_rate",
    "generation_tokens_rate",
    "tokens_per_iteration",
    "prefix_hit_ratio",
    "prefill_share",
];

/// Workload features.
pub const RAW: usize = FEATURE_NAMES.len();
/// Context dimension: the features plus the bias term.
pub const DIM: usize = RAW + 1;

/// Raw workload features of a window. Counts and rates are log-compressed (a queue of 200 is
/// not 100 times a queue of 2 for the clock choice); missing values read 0.
pub fn raw_features(w: &Window) -> [f64; RAW] {
    let l = |v: Option<f64>| v.filter(|v| v.is_finite() && *v > 0.0).map_or(0.0, f64::ln_1p);
    let p = |v: Option<f64>| v.filter(|v| v.is_finite()).map_or(0.0, |v| v.clamp(0.0, 1.0));
    let prompt = w.prompt_tokens_rate.filter(|v| v.is_finite() && *v > 0.0).unwrap_or(0.0);
    let gen = w.generation_tokens_rate.filter(|v| v.is_finite() && *v > 0.0).unwrap_or(0.0);
    let prefill_share = if prompt + gen > 0.0 { prompt / (prompt + gen) } else { 0.0 };
    [
        l(w.num_requests_waiting),
        l(w.num_requests_running),
        p(w.kv_cache_usage),
        l(w.prompt_tokens_rate),
        l(w.generation_tokens_rate),
        l(w.tokens_per_iteration),
        p(w.prefix_hit_ratio),
        prefill_share,
    ]
}

/// Running mean and variance per feature with exponential forgetting once more than
/// `horizon` samples were seen, so the scale follows a drifting workload. z-scores are clipped
/// to [-3, 3] so one wild window cannot dominate a linear model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normaliser {
    pub n: u64,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub horizon: f64,
}

/// z-score clip.
pub const CLIP: f64 = 3.0;
/// Floor of the standard deviation in z-scores. Features are logs, ratios or shares, so 0.1
/// is a 10% change: jitter below that is noise, and z-scoring it to unit variance would make
/// every arm's linear model fit noise.
pub const MIN_SD: f64 = 0.1;

impl Normaliser {
    pub fn new(dim: usize, horizon: f64) -> Self {
        Self { n: 0, mean: vec![0.0; dim], var: vec![0.0; dim], horizon: horizon.max(2.0) }
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Adds one observation (non-finite values are skipped for their feature).
    pub fn observe(&mut self, x: &[f64]) {
        self.n += 1;
        let w = (1.0 / self.n as f64).max(1.0 / self.horizon);
        for ((m, v), &xi) in self.mean.iter_mut().zip(self.var.iter_mut()).zip(x) {
            if !xi.is_finite() {
                continue;
            }
            let d = xi - *m;
            *m += w * d;
            *v = (1.0 - w) * (*v + w * d * d);
        }
    }

    /// z-scores of `x` (standard deviation floored at [`MIN_SD`]), clipped; 0 before two
    /// observations.
    pub fn z(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(self.mean.iter().zip(&self.var))
            .map(|(&xi, (&m, &v))| {
                let sd = v.sqrt().max(MIN_SD);
                if self.n < 2 || !xi.is_finite() {
                    0.0
                } else {
                    ((xi - m) / sd).clamp(-CLIP, CLIP)
                }
            })
            .collect()
    }
}

/// Turns windows into context vectors for the bandit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextBuilder {
    pub norm: Normaliser,
}

impl ContextBuilder {
    pub fn new(horizon: f64) -> Self {
        Self { norm: Normaliser::new(RAW, horizon) }
    }

    /// Updates the normaliser with this window and returns its context (z-scores + bias 1).
    pub fn build(&mut self, w: &Window) -> DVector<f64> {
        let raw = raw_features(w);
        self.norm.observe(&raw);
        self.context_of(&raw)
    }

    /// The context of raw features under the current normaliser, without learning from them.
    pub fn context_of(&self, raw: &[f64; RAW]) -> DVector<f64> {
        let mut z = self.norm.z(raw);
        z.push(1.0);
        DVector::from_vec(z)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A window with the given load, everything else empty.
    pub(crate) fn window(waiting: f64, running: f64, prompt_rate: f64, gen_rate: f64) -> Window {
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
            ..Window::default()
        }
    }

    #[test]
    fn raw_features_compress_and_default_missing_values() {
        let w = window(0.0, 20.0, 300.0, 900.0);
        let f = raw_features(&w);
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 21f64.ln()).abs() < 1e-12);
        assert!((f[7] - 0.25).abs() < 1e-12, "prefill share");
        assert_eq!(f[6], 0.0, "no prefix queries reads 0");
        let mut empty = window(0.0, 0.0, 0.0, 0.0);
        empty.kv_cache_usage = None;
        empty.tokens_per_iteration = Some(f64::NAN);
        assert_eq!(raw_features(&empty), [0.0; RAW]);
    }

    #[test]
    fn normaliser_matches_mean_and_variance_and_clips() {
        let mut n = Normaliser::new(1, 1000.0);
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            n.observe(&[v]);
        }
        assert!((n.mean[0] - 3.0).abs() < 1e-12);
        // Population variance of 1..5 is 2.
        assert!((n.var[0] - 2.0).abs() < 1e-12, "{}", n.var[0]);
        assert!((n.z(&[3.0 + 2f64.sqrt()])[0] - 1.0).abs() < 1e-12);
        // Jitter below the floor stays small.
        let mut flat = Normaliser::new(1, 1000.0);
        for v in [5.0, 5.01, 4.99, 5.0] {
            flat.observe(&[v]);
        }
        assert!(flat.z(&[5.01])[0].abs() < 0.11);
        assert_eq!(n.z(&[1e9])[0], CLIP);
        assert_eq!(n.z(&[-1e9])[0], -CLIP);
    }

    #[test]
    fn normaliser_forgets_beyond_its_horizon() {
        let mut n = Normaliser::new(1, 10.0);
        for _ in 0..100 {
            n.observe(&[0.0]);
        }
        for _ in 0..50 {
            n.observe(&[10.0]);
        }
        assert!(n.mean[0] > 9.9, "mean follows the new level: {}", n.mean[0]);
    }

    #[test]
    fn context_has_bias_and_zero_before_spread() {
        let mut c = ContextBuilder::new(100.0);
        let x = c.build(&window(1.0, 2.0, 3.0, 4.0));
        assert_eq!(x.len(), DIM);
        assert_eq!(x[DIM - 1], 1.0);
        assert!(x.iter().take(RAW).all(|v| *v == 0.0));
        c.build(&window(5.0, 50.0, 300.0, 400.0));
        let x = c.build(&window(5.0, 50.0, 300.0, 400.0));
        assert!(x[1] > 0.0);
    }
}
