//! An online performance model of this vLLM server, re-fitted every window so it never goes
//! stale (the complaint about static alpha/beta in WVA), and the largest request rate it
//! sustains within the objectives.
//!
//! Step time (the inter-token latency a decoding request sees) is
//! `s = alpha + beta * B + delta * P`, with `B` the decoding batch and `P` the prefill tokens
//! per step, each coefficient split into a clock-independent part and a part that grows with
//! `f_max / f` (compute slows with the SM clock, memory traffic does not). From one window:
//! `s` = mean ITL, `B` = generation tokens/s x `s` (Little's law), `P` = prompt tokens/s x `s`.
//! TTFT is `c0 + c1 * s + c2 * I * f_max / f` (wait for the step in flight, then the prompt's
//! own prefill). Both are fitted by recursive least squares with exponential forgetting.
//!
//! At a request rate `lambda` with prompt `I` and output `O` tokens, `B = lambda O s` and
//! `P = lambda I s`, so `s = alpha / (1 - lambda (beta O + delta I))`: latencies grow smoothly
//! and diverge at saturation. Concurrency `lambda (O s + TTFT)` must also stay within
//! `max_num_seqs` and the KV cache, with a square-root staffing margin for the Poisson
//! fluctuations. The capacity is the largest `lambda` meeting every limit,
//! found by bisection (every limit grows with `lambda`).

use serde::Serialize;

use vllm_metrics::Window;

/// Recursive least squares with exponential forgetting, `N` parameters.
#[derive(Debug, Clone)]
pub struct Rls<const N: usize> {
    pub theta: [f64; N],
    p: [[f64; N]; N],
    forget: f64,
    /// Effective number of observations (decays with the forgetting factor).
    pub weight: f64,
}

impl<const N: usize> Rls<N> {
    /// Starts from `prior` with variances `spread`.
    pub fn new(prior: [f64; N], spread: [f64; N], forget: f64) -> Self {
        let mut p = [[0.0; N]; N];
        for (i, (row, s)) in p.iter_mut().zip(spread).enumerate() {
            row[i] = s;
        }
        Self { theta: prior, p, forget, weight: 0.0 }
    }

    pub fn predict(&self, x: &[f64; N]) -> f64 {
        self.theta.iter().zip(x).map(|(t, x)| t * x).sum()
    }

    /// One observation `y` of features `x`.
    pub fn update(&mut self, x: &[f64; N], y: f64) {
        if !(y.is_finite() && x.iter().all(|v| v.is_finite())) {
            return;
        }
        let mut px = [0.0; N];
        for (pxi, row) in px.iter_mut().zip(&self.p) {
            *pxi = row.iter().zip(x).map(|(p, x)| p * x).sum();
        }
        let denom = self.forget + x.iter().zip(&px).map(|(a, b)| a * b).sum::<f64>();
        if !(denom.is_finite() && denom > 0.0) {
            return;
        }
        let err = y - self.predict(x);
        for (t, pxi) in self.theta.iter_mut().zip(&px) {
            *t += pxi / denom * err;
        }
        for (row, pxi) in self.p.iter_mut().zip(&px) {
            for (p, pxj) in row.iter_mut().zip(&px) {
                *p = (*p - pxi * pxj / denom) / self.forget;
            }
        }
        // Covariance must not blow up in directions the data never excites.
        for (i, row) in self.p.iter_mut().enumerate() {
            row[i] = row[i].min(1e6);
        }
        self.weight = self.weight * self.forget + 1.0;
    }
}

/// The latency objectives (means over a window, as the governor keeps them).
pub use objectives::Objectives;

/// Which limit caps the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Tpot,
    Ttft,
    Concurrency,
    Saturation,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Tpot => "TPOT objective",
            Limit::Ttft => "TTFT objective",
            Limit::Concurrency => "max running requests (max_num_seqs or KV cache)",
            Limit::Saturation => "engine saturation",
        }
    }
}

/// The online model's capacity for one load mix and clock.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OnlineCapacity {
    /// Requests per second one replica sustains within the objectives.
    pub max_rate: f64,
    pub limit: Limit,
    /// Predicted TPOT and TTFT at that rate.
    pub tpot_s: f64,
    pub ttft_s: f64,
    /// Most requests running at once the model allows for.
    pub max_concurrency: f64,
}

/// Fitted coefficients at one clock, for display.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Coefficients {
    /// Step time with nothing to do, seconds.
    pub alpha_s: f64,
    /// Added step time per decoding request, seconds.
    pub beta_s: f64,
    /// Added step time per prefill token, seconds.
    pub delta_s: f64,
    /// Windows the fit rests on (decayed by the forgetting factor).
    pub observations: f64,
}

/// Feature scales keep the RLS well conditioned (batch ~100, prefill ~1000 tokens per step).
const B_SCALE: f64 = 100.0;
/// Times are fitted in milliseconds, so the noise is of order 1 as RLS assumes.
const MS: f64 = 1000.0;
const P_SCALE: f64 = 1000.0;
/// Forgetting factor per window: ~100 windows of memory.
const FORGET: f64 = 0.99;
/// Decoding tokens a window needs before it says anything about step times.
const MIN_ITL_COUNT: f64 = 20.0;
/// Latency and the concurrency limit stay this far from the engine's saturation.
const MAX_LOAD: f64 = 0.95;
/// Square-root staffing: requests in the system fluctuate by about the square root of their
/// mean (Poisson), so the mean must stay `beta * sqrt(mean)` below the most that can run at
/// once or arrivals start to queue (the Halfin-Whitt regime, as in call-centre staffing).
const STAFFING_BETA: f64 = 1.0;

/// The fitted model of this server.
#[derive(Debug, Clone)]
pub struct OnlineModel {
    step: Rls<6>,
    ttft: Rls<3>,
    /// Share of the KV cache one running request holds (smoothed).
    kv_per_request: Option<f64>,
    /// Tokens the server's KV cache holds (`vllm:cache_config_info`), when it says.
    kv_cache_tokens: Option<f64>,
    /// Highest arrival rate seen, decayed; how far the model has to extrapolate.
    peak_rate: f64,
}

impl Default for OnlineModel {
    fn default() -> Self {
        Self::new()
    }
}

impl OnlineModel {
    pub fn new() -> Self {
        // Weak priors (milliseconds) of an H100-class GPU serving an 8B model; the data
        // overrides them within a few windows.
        Self {
            step: Rls::new([6.0, 2.0, 20.0, 0.0, 0.0, 0.0], [100.0, 100.0, 100.0, 25.0, 25.0, 25.0], FORGET),
            ttft: Rls::new([0.0, 1.5, 20.0], [100.0, 1.0, 100.0], FORGET),
            kv_per_request: None,
            kv_cache_tokens: None,
            peak_rate: 0.0,
        }
    }

    /// `f_max / f - 1`: 0 at the highest clock.
    fn slowdown(clock_mhz: f64, max_mhz: f64) -> f64 {
        if clock_mhz > 0.0 && max_mhz >= clock_mhz {
            max_mhz / clock_mhz - 1.0
        } else {
            0.0
        }
    }

    fn step_features(b: f64, p: f64, r: f64) -> [f64; 6] {
        let (b, p) = (b / B_SCALE, p / P_SCALE);
        [1.0, b, p, r, r * b, r * p]
    }

    /// Learns from one window run at `clock_mhz` (of `max_mhz`); `arrival_rate` is what
    /// arrived in it. Windows without enough decoding, or after a restart, teach nothing.
    pub fn observe(&mut self, w: &Window, clock_mhz: f64, max_mhz: f64, arrival_rate: f64) {
        if w.counter_reset {
            return;
        }
        self.peak_rate = (self.peak_rate * FORGET).max(arrival_rate);
        if let Some(tokens) = w.cache.as_ref().and_then(|c| c.kv_cache_tokens).filter(|t| *t > 0.0) {
            self.kv_cache_tokens = Some(tokens);
        }
        if let (Some(kv), Some(running)) = (w.kv_cache_usage, w.num_requests_running) {
            if running >= 4.0 && kv > 0.0 {
                let share = kv / running;
                self.kv_per_request = Some(self.kv_per_request.map_or(share, |k| 0.9 * k + 0.1 * share));
            }
        }
        let Some(itl) = w.itl.as_ref().filter(|l| l.count >= MIN_ITL_COUNT) else { return };
        let (Some(s), Some(gen), Some(prompt)) = (itl.mean, w.generation_tokens_rate, w.prompt_tokens_rate) else {
            return;
        };
        if !(s > 0.0 && s.is_finite()) {
            return;
        }
        let r = Self::slowdown(clock_mhz, max_mhz);
        self.step.update(&Self::step_features(gen * s, prompt * s, r), s * MS);
        // TTFT with a queue in front says more about the queue than the engine: skip those.
        let queued = w.num_requests_waiting.unwrap_or(0.0) > 1.0 + 0.1 * w.num_requests_running.unwrap_or(0.0);
        let ttft = w.ttft.as_ref().filter(|l| l.count >= 5.0).and_then(|l| l.mean);
        if let (Some(t), Some(i), false) = (ttft, w.mean_prompt_tokens, queued) {
            self.ttft.update(&[1.0, s * MS, i / P_SCALE * (1.0 + r)], t * MS);
        }
    }

    /// The coefficients at a clock, clamped to physical values.
    pub fn coefficients(&self, clock_mhz: f64, max_mhz: f64) -> Coefficients {
        let r = Self::slowdown(clock_mhz, max_mhz);
        let t = &self.step.theta;
        Coefficients {
            alpha_s: ((t[0] + t[3] * r) / MS).max(1e-4),
            beta_s: ((t[1] + t[4] * r) / B_SCALE / MS).max(0.0),
            delta_s: ((t[2] + t[5] * r) / P_SCALE / MS).max(0.0),
            observations: self.step.weight,
        }
    }

    /// Windows the step-time fit rests on (decayed).
    pub fn observations(&self) -> f64 {
        self.step.weight
    }

    /// Highest recent arrival rate (decayed).
    pub fn peak_rate(&self) -> f64 {
        self.peak_rate
    }

    fn ttft_at(&self, s: f64, prompt: f64, r: f64) -> f64 {
        let c = &self.ttft.theta;
        (c[0].max(0.0) + c[1].max(0.0) * s * MS + c[2].max(0.0) * prompt / P_SCALE * (1.0 + r)) / MS
    }

    /// Most requests of this mix one replica runs at once: `max_num_seqs`, or what fits the KV
    /// cache. The KV share a running request was seen to hold wins; before there is one, the
    /// server's KV capacity over a request's mean footprint (its prompt and half its output).
    pub fn max_concurrency(&self, max_num_seqs: f64, prompt: f64, output: f64) -> f64 {
        let footprint = prompt + output / 2.0;
        let kv = match (self.kv_per_request, self.kv_cache_tokens) {
            (Some(k), _) => 0.95 / k,
            (None, Some(tokens)) if footprint > 0.0 => 0.95 * tokens / footprint,
            _ => f64::INFINITY,
        };
        max_num_seqs.min(kv)
    }

    /// The largest request rate meeting the objectives for this mix at this clock.
    pub fn capacity(
        &self,
        prompt: f64,
        output: f64,
        obj: Objectives,
        clock_mhz: f64,
        max_mhz: f64,
        max_num_seqs: f64,
    ) -> OnlineCapacity {
        let r = Self::slowdown(clock_mhz, max_mhz);
        let c = self.coefficients(clock_mhz, max_mhz);
        let per_request = c.beta_s * output + c.delta_s * prompt;
        let n_max = self.max_concurrency(max_num_seqs, prompt, output);
        let at = |rate: f64| {
            let load = rate * per_request;
            let s = c.alpha_s / (1.0 - load).max(1e-9);
            let ttft = self.ttft_at(s, prompt, r);
            (load, s, ttft, rate * (output * s + ttft))
        };
        let fails = |rate: f64| -> Option<Limit> {
            let (load, s, ttft, conc) = at(rate);
            if load > MAX_LOAD {
                Some(Limit::Saturation)
            } else if s > obj.tpot_s {
                Some(Limit::Tpot)
            } else if ttft > obj.ttft_s {
                Some(Limit::Ttft)
            } else if conc + STAFFING_BETA * conc.sqrt() > n_max {
                Some(Limit::Concurrency)
            } else {
                None
            }
        };
        let mut hi = if per_request > 0.0 { MAX_LOAD / per_request } else { 1e6 };
        let mut limit = fails(hi).unwrap_or(Limit::Saturation);
        let mut lo = 0.0;
        if fails(hi).is_some() {
            for _ in 0..60 {
                let mid = 0.5 * (lo + hi);
                match fails(mid) {
                    Some(l) => {
                        hi = mid;
                        limit = l;
                    }
                    None => lo = mid,
                }
            }
        } else {
            lo = hi;
        }
        let (_, s, ttft, _) = at(lo);
        OnlineCapacity { max_rate: lo, limit, tpot_s: s, ttft_s: ttft, max_concurrency: n_max }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{lat, modelled as window};

    #[test]
    fn rls_recovers_a_line() {
        let mut r = Rls::new([0.0, 0.0], [1e4, 1e4], 1.0);
        for i in 0..50 {
            let x = f64::from(i);
            r.update(&[1.0, x], 3.0 + 0.5 * x);
        }
        assert!((r.theta[0] - 3.0).abs() < 1e-3 && (r.theta[1] - 0.5).abs() < 1e-4, "{:?}", r.theta);
    }

    #[test]
    fn fits_the_step_model_and_predicts_capacity() {
        let (alpha, beta, delta) = (0.008, 0.00005, 0.00002);
        let mut m = OnlineModel::new();
        // Loads that vary in rate and mix, as a live server sees them.
        for k in 0..300 {
            let rate = 2.0 + f64::from(k % 17);
            let (prompt, output) = if k % 3 == 0 { (2000.0, 100.0) } else { (300.0, 400.0) };
            m.observe(&window(rate, prompt, output, alpha, beta, delta), 1980.0, 1980.0, rate);
        }
        let c = m.coefficients(1980.0, 1980.0);
        assert!((c.alpha_s - alpha).abs() / alpha < 0.05, "{c:?}");
        assert!((c.beta_s - beta).abs() / beta < 0.1, "{c:?}");
        assert!((c.delta_s - delta).abs() / delta < 0.1, "{c:?}");
        // Closed form for the TPOT limit: alpha / (1 - rate k) = tpot.
        let obj = Objectives { ttft_s: 100.0, tpot_s: 0.02 };
        let cap = m.capacity(300.0, 400.0, obj, 1980.0, 1980.0, 1e9);
        let k = beta * 400.0 + delta * 300.0;
        let want = (1.0 - alpha / 0.02) / k;
        assert_eq!(cap.limit, Limit::Tpot);
        assert!((cap.max_rate - want).abs() / want < 0.05, "{} vs {want}", cap.max_rate);
        // A tighter TTFT objective binds instead, and a small max_num_seqs caps concurrency.
        let cap = m.capacity(300.0, 400.0, Objectives { ttft_s: 0.03, tpot_s: 0.02 }, 1980.0, 1980.0, 1e9);
        assert_eq!(cap.limit, Limit::Ttft);
        assert!(cap.ttft_s <= 0.03 + 1e-6 && cap.max_rate < want);
        let cap = m.capacity(300.0, 400.0, obj, 1980.0, 1980.0, 8.0);
        assert_eq!(cap.limit, Limit::Concurrency);
    }

    #[test]
    fn a_lower_clock_learnt_from_data_gives_less_capacity() {
        let mut m = OnlineModel::new();
        for k in 0..400 {
            let rate = 2.0 + f64::from(k % 13);
            let (clock, slow) = if k % 2 == 0 { (1980.0, 1.0) } else { (990.0, 1.6) };
            let (prompt, output) = if k % 3 == 0 { (1500.0, 100.0) } else { (300.0, 300.0) };
            let w = window(rate, prompt, output, 0.008 * slow, 0.00004 * slow, 0.00002 * slow);
            m.observe(&w, clock, 1980.0, rate);
        }
        let obj = Objectives { ttft_s: 1.0, tpot_s: 0.03 };
        let fast = m.capacity(500.0, 300.0, obj, 1980.0, 1980.0, 1e9).max_rate;
        let slow = m.capacity(500.0, 300.0, obj, 990.0, 1980.0, 1e9).max_rate;
        assert!(slow < 0.8 * fast, "{slow} vs {fast}");
    }

    #[test]
    fn the_kv_capacity_vllm_reports_bounds_concurrency_until_usage_is_seen() {
        let mut m = OnlineModel::new();
        assert_eq!(m.max_concurrency(256.0, 1000.0, 200.0), 256.0, "nothing known: max_num_seqs");
        let mut w = window(1.0, 1000.0, 200.0, 0.01, 0.0, 0.0);
        w.cache = Some(vllm_metrics::CacheConfig {
            block_size: Some(16.0),
            num_blocks: Some(3000.0),
            kv_cache_tokens: Some(48_000.0),
            max_concurrency_at_max_len: Some(5.9),
            prefix_caching: Some(true),
        });
        w.num_requests_running = Some(1.0);
        m.observe(&w, 1980.0, 1980.0, 1.0);
        // 48000 tokens / (1000 + 200 / 2) per request, less the 5% margin.
        assert!((m.max_concurrency(256.0, 1000.0, 200.0) - 0.95 * 48_000.0 / 1100.0).abs() < 1e-9);
        // Seen usage wins: 4 running requests holding 20% of the cache.
        w.num_requests_running = Some(4.0);
        w.kv_cache_usage = Some(0.2);
        m.observe(&w, 1980.0, 1980.0, 1.0);
        assert!((m.max_concurrency(256.0, 1000.0, 200.0) - 0.95 / 0.05).abs() < 1e-9);
    }

    #[test]
    fn windows_without_decoding_teach_nothing() {
        let mut m = OnlineModel::new();
        let mut w = window(1.0, 100.0, 100.0, 0.01, 0.0, 0.0);
        w.itl = Some(lat(3.0, 0.01));
        m.observe(&w, 1980.0, 1980.0, 1.0);
        w.itl = Some(lat(300.0, 0.01));
        w.counter_reset = true;
        m.observe(&w, 1980.0, 1980.0, 1.0);
        assert_eq!(m.observations(), 0.0);
    }
}
