//! Per-request outcomes and the summary report, with `vllm bench serve`'s JSON key names so the
//! same tooling reads both.

use objectives::LatencyLimits;
use serde::{Serialize, Serializer};

/// What one request measured. Times in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutcome {
    pub success: bool,
    pub error: Option<String>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Time to first token.
    pub ttft: f64,
    /// Gaps between consecutive chunks after the first.
    pub itl: Vec<f64>,
    /// Send to last chunk.
    pub e2el: f64,
}

impl RequestOutcome {
    pub fn failed(prompt_tokens: u32, error: impl Into<String>) -> Self {
        RequestOutcome { success: false, error: Some(error.into()), prompt_tokens, ..Default::default() }
    }

    /// (e2e - ttft) / (tokens - 1), or 0 for single-token outputs (as vLLM's bench does).
    pub fn tpot(&self) -> f64 {
        if self.output_tokens > 1 {
            (self.e2el - self.ttft) / f64::from(self.output_tokens - 1)
        } else {
            0.0
        }
    }
}

/// The offered rate: a number, or "inf" when requests were sent all at once (as vLLM writes it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequestRate {
    PerSecond(f64),
    Infinite,
}

impl Serialize for RequestRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestRate::PerSecond(r) => s.serialize_f64(*r),
            RequestRate::Infinite => s.serialize_str("inf"),
        }
    }
}

/// Summary of a load run. Key names follow `vllm bench serve --save-result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub num_prompts: u64,
    pub completed: u64,
    pub failed: u64,
    /// Seconds from the first send until the last request ended.
    pub duration: f64,
    pub request_rate: RequestRate,
    /// The rate requests really went out at (not in `vllm bench serve`'s keys): requests sent
    /// over the time the last one was sent.
    pub achieved_request_rate: RequestRate,
    pub max_concurrency: Option<usize>,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    /// Completed requests meeting every SLO, per second; null without SLOs.
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub std_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub std_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub std_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub mean_e2el_ms: f64,
    pub median_e2el_ms: f64,
    pub std_e2el_ms: f64,
    pub p99_e2el_ms: f64,
    /// The first few distinct failure messages.
    pub errors: Vec<String>,
}

/// Most distinct error messages kept in a report.
const MAX_ERRORS: usize = 10;

/// mean, median, population std and p99 (numpy's linear interpolation), in ms; zeros when empty.
fn summary_ms(mut xs: Vec<f64>) -> [f64; 4] {
    if xs.is_empty() {
        return [0.0; 4];
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pct = |p: f64| {
        let rank = p / 100.0 * (n - 1.0);
        // rank is in 0..=n-1: both are indices into xs.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        xs[lo] + (xs[hi] - xs[lo]) * (rank - lo as f64)
    };
    [mean * 1e3, pct(50.0) * 1e3, std * 1e3, pct(99.0) * 1e3]
}

impl LoadReport {
    /// Summarises outcomes of a run that took `duration` seconds.
    pub fn from_outcomes(
        outcomes: &[RequestOutcome],
        duration: f64,
        request_rate: RequestRate,
        max_concurrency: Option<usize>,
        slo: &LatencyLimits,
    ) -> LoadReport {
        let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.success).collect();
        let completed = ok.len() as u64;
        let total_input_tokens: u64 = ok.iter().map(|o| u64::from(o.prompt_tokens)).sum();
        let total_output_tokens: u64 = ok.iter().map(|o| u64::from(o.output_tokens)).sum();
        let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
        let mut errors: Vec<String> = Vec::new();
        for e in outcomes.iter().filter_map(|o| o.error.as_ref()) {
            if errors.len() < MAX_ERRORS && !errors.contains(e) {
                errors.push(e.clone());
            }
        }
        let ttft = summary_ms(ok.iter().map(|o| o.ttft).collect());
        let tpot = summary_ms(ok.iter().filter(|o| o.output_tokens > 1).map(|o| o.tpot()).collect());
        let itl = summary_ms(ok.iter().flat_map(|o| o.itl.iter().copied()).collect());
        let e2el = summary_ms(ok.iter().map(|o| o.e2el).collect());
        let good = ok.iter().filter(|o| slo.met_by(o.ttft, o.tpot(), o.e2el)).count();
        LoadReport {
            num_prompts: outcomes.len() as u64,
            completed,
            failed: outcomes.len() as u64 - completed,
            duration,
            request_rate,
            achieved_request_rate: request_rate,
            max_concurrency,
            total_input_tokens,
            total_output_tokens,
            request_throughput: per_s(completed as f64),
            request_goodput: slo.is_set().then(|| per_s(good as f64)),
            output_throughput: per_s(total_output_tokens as f64),
            total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
            mean_ttft_ms: ttft[0],
            median_ttft_ms: ttft[1],
            std_ttft_ms: ttft[2],
            p99_ttft_ms: ttft[3],
            mean_tpot_ms: tpot[0],
            median_tpot_ms: tpot[1],
            std_tpot_ms: tpot[2],
            p99_tpot_ms: tpot[3],
            mean_itl_ms: itl[0],
            median_itl_ms: itl[1],
            std_itl_ms: itl[2],
            p99_itl_ms: itl[3],
            mean_e2el_ms: e2el[0],
            median_e2el_ms: e2el[1],
            std_e2el_ms: e2el[2],
            p99_e2el_ms: e2el[3],
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ttft: f64, e2el: f64, tokens: u32) -> RequestOutcome {
        RequestOutcome {
            success: true,
            error: None,
            prompt_tokens: 10,
            output_tokens: tokens,
            ttft,
            itl: vec![(e2el - ttft) / f64::from(tokens.max(2) - 1); tokens.saturating_sub(1) as usize],
            e2el,
        }
    }

    #[test]
    fn summary_matches_numpy() {
        // numpy: mean 2.5, median 2.5, std 1.118034, percentile(99) 3.97
        let s = summary_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert!((s[0] - 2500.0).abs() < 1e-9);
        assert!((s[1] - 2500.0).abs() < 1e-9);
        assert!((s[2] - 1118.034).abs() < 1e-3);
        assert!((s[3] - 3970.0).abs() < 1e-9);
        assert_eq!(summary_ms(vec![]), [0.0; 4]);
    }

    #[test]
    fn report_counts_throughput_and_goodput() {
        let outs = vec![ok(0.1, 1.1, 11), ok(0.5, 2.5, 5), RequestOutcome::failed(10, "HTTP 500")];
        let slo = LatencyLimits { ttft_ms: Some(200.0), ..Default::default() };
        let r = LoadReport::from_outcomes(&outs, 2.0, RequestRate::PerSecond(1.5), None, &slo);
        assert_eq!((r.num_prompts, r.completed, r.failed), (3, 2, 1));
        assert_eq!((r.total_input_tokens, r.total_output_tokens), (20, 16));
        assert!((r.request_throughput - 1.0).abs() < 1e-12);
        assert!((r.output_throughput - 8.0).abs() < 1e-12);
        assert!((r.total_token_throughput - 18.0).abs() < 1e-12);
        assert_eq!(r.request_goodput, Some(0.5));
        // tpot: (1.0/10, 2.0/4) -> mean 300 ms
        assert!((r.mean_tpot_ms - 300.0).abs() < 1e-9);
        assert_eq!(r.errors, vec!["HTTP 500".to_string()]);
        let json = serde_json::to_value(&r).expect("serialize");
        for key in [
            "completed",
            "failed",
            "duration",
            "request_rate",
            "request_throughput",
            "output_throughput",
            "total_token_throughput",
            "p99_ttft_ms",
            "median_tpot_ms",
            "std_itl_ms",
            "mean_e2el_ms",
            "request_goodput",
            "total_input_tokens",
            "total_output_tokens",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        let inf = LoadReport::from_outcomes(&outs, 2.0, RequestRate::Infinite, Some(4), &LatencyLimits::default());
        let json = serde_json::to_value(&inf).expect("serialize");
        assert_eq!(json["request_rate"], "inf");
        assert!(json["request_goodput"].is_null());
    }
}
