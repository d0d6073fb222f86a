//! The highest request rate a server keeps within the limits: one unlimited-rate run (all
//! requests at once, as `vllm bench serve --request-rate inf`) gives the saturation throughput;
//! if the limits fail there, the rate is bracketed between the best passing and the lowest
//! failing rate and bisected until they are within a tolerance, instead of auto_tune.sh's 1 req/s
//! steps down.

use std::future::Future;

use serde::{Deserialize, Serialize};

use super::space::Limits;
use loadgen::{LoadReport, RequestRate};

/// One load run's figures, with `vllm bench serve`'s key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// Offered rate, requests/s; None: unlimited ("inf").
    pub request_rate: Option<f64>,
    pub completed: u64,
    pub failed: u64,
    pub duration: f64,
    pub request_throughput: f64,
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub mean_e2el_ms: f64,
    pub median_e2el_ms: f64,
    pub p99_e2el_ms: f64,
    /// Prefix-cache hits over queries during the run, from the server's /metrics.
    pub prefix_cache_hit_rate: Option<f64>,
    /// Whether every limit held.
    pub passed: bool,
    /// The first limit broken, e.g. `p99_e2el_ms 2310.5 > 2000`.
    pub violation: Option<String>,
}

impl RunFigures {
    pub fn new(r: &LoadReport, prefix_cache_hit_rate: Option<f64>, limits: &Limits) -> RunFigures {
        let mut f = RunFigures {
            request_rate: match r.request_rate {
                RequestRate::Infinite => None,
                RequestRate::PerSecond(x) => Some(x),
            },
            completed: r.completed,
            failed: r.failed,
            duration: r.duration,
            request_throughput: r.request_throughput,
            request_goodput: r.request_goodput,
            output_throughput: r.output_throughput,
            total_token_throughput: r.total_token_throughput,
            mean_ttft_ms: r.mean_ttft_ms,
            median_ttft_ms: r.median_ttft_ms,
            p99_ttft_ms: r.p99_ttft_ms,
            mean_tpot_ms: r.mean_tpot_ms,
            median_tpot_ms: r.median_tpot_ms,
            p99_tpot_ms: r.p99_tpot_ms,
            mean_itl_ms: r.mean_itl_ms,
            median_itl_ms: r.median_itl_ms,
            p99_itl_ms: r.p99_itl_ms,
            mean_e2el_ms: r.mean_e2el_ms,
            median_e2el_ms: r.median_e2el_ms,
            p99_e2el_ms: r.p99_e2el_ms,
            prefix_cache_hit_rate,
            passed: false,
            violation: None,
        };
        f.violation = f.check(limits, r.errors.first().map(String::as_str));
        f.passed = f.violation.is_none();
        f
    }

    /// The first broken limit, or None when all hold. Failed requests break the run.
    fn check(&self, l: &Limits, first_error: Option<&str>) -> Option<String> {
        if self.failed > 0 || self.completed == 0 {
            return Some(format!(
                "{} of {} requests failed ({})",
                self.failed,
                self.failed + self.completed,
                first_error.unwrap_or("no response")
            ));
        }
        for (name, limit, got) in [
            ("p99_e2el_ms", l.p99_e2el_ms, self.p99_e2el_ms),
            ("p99_ttft_ms", l.p99_ttft_ms, self.p99_ttft_ms),
            ("p99_tpot_ms", l.p99_tpot_ms, self.p99_tpot_ms),
        ] {
            if let Some(lim) = limit {
                if got > lim {
                    return Some(format!("{name} {got:.1} > {lim}"));
                }
            }
        }
        if let Some(min) = l.min_prefix_cache_hit_rate {
            let got = self.prefix_cache_hit_rate.unwrap_or(0.0);
            if got < min {
                return Some(format!("prefix_cache_hit_rate {got:.3} < {min}"));
            }
        }
        None
    }

    /// The rate as `vllm bench serve` writes it.
    pub fn rate_text(&self) -> String {
        self.request_rate.map_or_else(|| "inf".to_string(), |r| format!("{r:.2}"))
    }
}

/// All runs of one search and the best passing one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateSearch {
    pub runs: Vec<RunFigures>,
    /// Index in `runs` of the passing run with the highest throughput.
    pub best: Option<usize>,
}

impl RateSearch {
    pub fn best(&self) -> Option<&RunFigures> {
        self.best.and_then(|i| self.runs.get(i))
    }
}

/// Searches the rate with `run(rate)` (None: unlimited) doing one load run.
pub async fn search<F, Fut, E>(max_runs: u32, tolerance: f64, mut run: F) -> Result<RateSearch, E>
where
    F: FnMut(Option<f64>) -> Fut,
    Fut: Future<Output = Result<RunFigures, E>>,
{
    let mut runs = Vec::new();
    // The offered rate is the one asked for (a replayed dataset's schedule reads as bursts).
    let mut run = |rate: Option<f64>| {
        let fut = run(rate);
        async move {
            let mut f = fut.await?;
            f.request_rate = rate;
            Ok::<RunFigures, E>(f)
        }
    };
    let first = run(None).await?;
    let saturation = first.request_throughput;
    let passed_unlimited = first.passed;
    runs.push(first);
    if !passed_unlimited && saturation > 0.0 {
        // Nothing above the saturation throughput can be sustained: it bounds the bracket.
        let (mut lo, mut hi) = (0.0f64, saturation);
        let mut rate = saturation * 0.9;
        while u32::try_from(runs.len()).unwrap_or(u32::MAX) < max_runs {
            let r = run(Some(rate)).await?;
            let ok = r.passed;
            runs.push(r);
            if ok {
                lo = rate;
            } else {
                hi = rate;
            }
            if lo > 0.0 && (hi - lo) <= tolerance * hi {
                break;
            }
            // Bisect once a passing rate is known; halve until then.
            rate = if lo > 0.0 { (lo + hi) / 2.0 } else { hi / 2.0 };
        }
    }
    let best = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.passed)
        .max_by(|a, b| a.1.request_throughput.total_cmp(&b.1.request_throughput))
        .map(|(i, _)| i);
    Ok(RateSearch { runs, best })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server whose P99 E2E grows as the rate nears its capacity of 20 req/s.
    fn fake(rate: Option<f64>, limits: &Limits) -> RunFigures {
        let offered = rate.unwrap_or(1000.0);
        let served = offered.min(20.0);
        let e2el = 1000.0 / (1.0 - (offered / 20.5).min(0.99));
        let report = LoadReport {
            num_prompts: 100,
            completed: 100,
            failed: 0,
            duration: 100.0 / served,
            request_rate: rate.map_or(RequestRate::Infinite, RequestRate::PerSecond),
            achieved_request_rate: rate.map_or(RequestRate::Infinite, RequestRate::PerSecond),
            max_concurrency: None,
            total_input_tokens: 0,
            total_output_tokens: 0,
            request_throughput: served,
            request_goodput: None,
            output_throughput: served * 10.0,
            total_token_throughput: 0.0,
            mean_ttft_ms: 0.0,
            median_ttft_ms: 0.0,
            std_ttft_ms: 0.0,
            p99_ttft_ms: 0.0,
            mean_tpot_ms: 0.0,
            median_tpot_ms: 0.0,
            std_tpot_ms: 0.0,
            p99_tpot_ms: 0.0,
            mean_itl_ms: 0.0,
            median_itl_ms: 0.0,
            std_itl_ms: 0.0,
            p99_itl_ms: 0.0,
            mean_e2el_ms: e2el,
            median_e2el_ms: e2el,
            std_e2el_ms: 0.0,
            p99_e2el_ms: e2el,
            errors: vec![],
        };
        RunFigures::new(&report, None, limits)
    }

    #[tokio::test]
    async fn brackets_the_rate_within_tolerance() {
        // e2el <= 4000 ms  <=>  rate <= 20.5 x 0.75 = 15.375
        let limits = Limits { p99_e2el_ms: Some(4000.0), ..Default::default() };
        let s = search(8, 0.05, |r| {
            let f = fake(r, &limits);
            async move { Ok::<_, ()>(f) }
        })
        .await
        .expect("search");
        assert!(s.runs[0].request_rate.is_none() && !s.runs[0].passed);
        let best = s.best().expect("a passing rate");
        let rate = best.request_rate.expect("finite");
        assert!((15.375 * 0.9..=15.375).contains(&rate), "{rate}");
        assert!(s.runs.len() <= 8);
        assert!(s.runs.iter().any(|r| r.violation.as_deref().is_some_and(|v| v.starts_with("p99_e2el_ms"))));
    }

    #[tokio::test]
    async fn unlimited_pass_needs_one_run_and_failures_break_runs() {
        let limits = Limits { p99_e2el_ms: Some(1e9), ..Default::default() };
        let s = search(6, 0.05, |r| {
            let f = fake(r, &limits);
            async move { Ok::<_, ()>(f) }
        })
        .await
        .expect("search");
        assert_eq!((s.runs.len(), s.best), (1, Some(0)));
        let mut f = fake(Some(1.0), &limits);
        f.failed = 1;
        assert!(f.check(&limits, Some("HTTP 500")).expect("violation").contains("HTTP 500"));
        let hit = Limits { p99_e2el_ms: Some(1e9), min_prefix_cache_hit_rate: Some(0.5), ..Default::default() };
        assert!(fake(None, &hit).check(&hit, None).expect("violation").starts_with("prefix_cache_hit_rate"));
    }
}
