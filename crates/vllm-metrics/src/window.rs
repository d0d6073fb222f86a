//! What happened between two snapshots: rates, ratios and latency statistics over the window.
//!
//! Counter resets: if any cumulative quantity (a counter, a histogram's count, sum or any
//! bucket) went DOWN, or a histogram's bucket bounds changed, vLLM restarted (or an engine went
//! away). The whole window is then treated as reset, like Prometheus' `increase()`: every delta
//! is the current value itself (counted from 0 at the restart), `counter_reset` is set, and no
//! rate is ever negative. A counter missing from the older snapshot counts from 0 (labelled
//! series appear on their first increment); one missing from the newer snapshot gives None.

use serde::Serialize;

use super::snapshot::{CacheConfig, Histogram, Snapshot};

/// Latency statistics of one histogram over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Observations in the window.
    pub count: f64,
    /// Delta sum / delta count; None without observations or without `_sum`.
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

/// Rates and statistics between two snapshots (the default: a window that read nothing).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    /// Length of the window in seconds, as given.
    pub seconds: f64,
    /// A cumulative value went down: deltas are the newer snapshot's values (see module docs).
    pub counter_reset: bool,
    /// Latest values of the gauges.
    pub num_requests_running: Option<f64>,
    pub num_requests_waiting: Option<f64>,
    pub kv_cache_usage: Option<f64>,
    /// Finished requests per second.
    pub request_rate: Option<f64>,
    pub prompt_tokens_rate: Option<f64>,
    pub generation_tokens_rate: Option<f64>,
    /// Prefix-cache hits / queries in the window; None when there were no queries.
    pub prefix_hit_ratio: Option<f64>,
    /// Preemptions in the window.
    pub preemptions: Option<f64>,
    /// Scheduled tokens per engine step (iteration_tokens delta sum / delta count).
    pub tokens_per_iteration: Option<f64>,
    /// Mean prompt and output length of the requests finished in the window.
    pub mean_prompt_tokens: Option<f64>,
    pub mean_generation_tokens: Option<f64>,
    /// Requests refused at admission in the window.
    pub admission_rejections: Option<f64>,
    pub ttft: Option<Latency>,
    pub itl: Option<Latency>,
    /// Per-request TPOT where the server exports it (V1's `request_time_per_output_token`).
    pub tpot: Option<Latency>,
    pub e2e: Option<Latency>,
    pub queue: Option<Latency>,
    pub prefill: Option<Latency>,
    pub decode: Option<Latency>,
    /// The KV cache of the newer snapshot.
    pub cache: Option<CacheConfig>,
}

impl Window {
    /// The window from `prev` to `cur`, which were taken `seconds` apart. Rates are None when
    /// `seconds` is not a positive finite number.
    pub fn between(prev: &Snapshot, cur: &Snapshot, seconds: f64) -> Self {
        let reset = went_down(prev, cur);
        let counter = |f: fn(&Snapshot) -> Option<f64>| -> Option<f64> {
            let now = f(cur)?;
            match f(prev) {
                Some(before) if !reset => Some(now - before),
                _ => Some(now),
            }
        };
        let hist = |f: fn(&Snapshot) -> Option<&Histogram>| -> Option<Histogram> {
            let now = f(cur)?;
            Some(match f(prev) {
                Some(before) if !reset => delta(now, before),
                _ => now.clone(),
            })
        };
        let rate = |d: Option<f64>| d.filter(|_| seconds.is_finite() && seconds > 0.0).map(|d| d / seconds);

        let queries = counter(|s| s.prefix_cache_queries_total);
        let hits = counter(|s| s.prefix_cache_hits_total);
        let mean_of = |h: Option<Histogram>| h.and_then(|h| mean(&h));
        let lat = |f: fn(&Snapshot) -> Option<&Histogram>| hist(f).map(|h| latency(&h));
        Self {
            seconds,
            counter_reset: reset,
            num_requests_running: cur.num_requests_running,
            num_requests_waiting: cur.num_requests_waiting,
            kv_cache_usage: cur.kv_cache_usage,
            request_rate: rate(counter(|s| s.request_success_total)),
            prompt_tokens_rate: rate(counter(|s| s.prompt_tokens_total)),
            generation_tokens_rate: rate(counter(|s| s.generation_tokens_total)),
            prefix_hit_ratio: match (hits, queries) {
                (Some(h), Some(q)) if q > 0.0 => Some(h / q),
                _ => None,
            },
            preemptions: counter(|s| s.num_preemptions_total),
            tokens_per_iteration: mean_of(hist(|s| s.iteration_tokens.as_ref())),
            mean_prompt_tokens: mean_of(hist(|s| s.prompt_tokens.as_ref())),
            mean_generation_tokens: mean_of(hist(|s| s.generation_tokens.as_ref())),
            admission_rejections: counter(|s| s.admission_rejections_total),
            ttft: lat(|s| s.ttft_seconds.as_ref()),
            itl: lat(|s| s.itl_seconds.as_ref()),
            tpot: lat(|s| s.tpot_seconds.as_ref()),
            e2e: lat(|s| s.e2e_seconds.as_ref()),
            queue: lat(|s| s.queue_seconds.as_ref()),
            prefill: lat(|s| s.prefill_seconds.as_ref()),
            decode: lat(|s| s.decode_seconds.as_ref()),
            cache: cur.cache.clone(),
        }
    }

    /// Time per output token as the TPOT objective means it: the per-request histogram where
    /// the server exports it (mean over requests, as `vllm bench serve` reports TPOT), else
    /// inter-token latency (mean over tokens; V0 and servers without it).
    pub fn tpot_or_itl(&self) -> Option<&Latency> {
        self.tpot.as_ref().filter(|l| l.count > 0.0).or(self.itl.as_ref())
    }
}

fn mean(h: &Histogram) -> Option<f64> {
    (h.count > 0.0).then_some(h.sum?).map(|s| s / h.count)
}

fn latency(h: &Histogram) -> Latency {
    Latency { count: h.count, mean: mean(h), p50: h.quantile(0.5), p90: h.quantile(0.9), p99: h.quantile(0.99) }
}

/// `cur - prev` bucket by bucket; the caller made sure the bounds match and nothing went down.
fn delta(cur: &Histogram, prev: &Histogram) -> Histogram {
    Histogram {
        buckets: cur.buckets.iter().zip(&prev.buckets).map(|(c, p)| (c.0, c.1 - p.1)).collect(),
        count: cur.count - prev.count,
        sum: match (cur.sum, prev.sum) {
            (Some(c), Some(p)) => Some(c - p),
            _ => None,
        },
    }
}

/// True when any cumulative value of `cur` is below its value in `prev`, or a histogram's
/// bucket bounds changed: the signs of a restart.
fn went_down(prev: &Snapshot, cur: &Snapshot) -> bool {
    let counters: [fn(&Snapshot) -> Option<f64>; 7] = [
        |s| s.admission_rejections_total,
        |s| s.prompt_tokens_total,
        |s| s.generation_tokens_total,
        |s| s.request_success_total,
        |s| s.prefix_cache_queries_total,
        |s| s.prefix_cache_hits_total,
        |s| s.num_preemptions_total,
    ];
    let counter_down = counters.iter().any(|f| matches!((f(prev), f(cur)), (Some(p), Some(c)) if c < p));
    let hists: [fn(&Snapshot) -> Option<&Histogram>; 10] = [
        |s| s.ttft_seconds.as_ref(),
        |s| s.itl_seconds.as_ref(),
        |s| s.tpot_seconds.as_ref(),
        |s| s.queue_seconds.as_ref(),
        |s| s.prefill_seconds.as_ref(),
        |s| s.decode_seconds.as_ref(),
        |s| s.e2e_seconds.as_ref(),
        |s| s.prompt_tokens.as_ref(),
        |s| s.generation_tokens.as_ref(),
        |s| s.iteration_tokens.as_ref(),
    ];
    let hist_down = hists.iter().any(|f| match (f(prev), f(cur)) {
        (Some(p), Some(c)) => {
            c.count < p.count
                || matches!((p.sum, c.sum), (Some(ps), Some(cs)) if cs < ps)
                || c.buckets.len() != p.buckets.len()
                || c.buckets.iter().zip(&p.buckets).any(|(cb, pb)| cb.0 != pb.0 || cb.1 < pb.1)
        }
        _ => false,
    });
    counter_down || hist_down
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One engine's exposition with the given cumulative values.
    fn text(success: f64, prompt: f64, gen: f64, queries: f64, hits: f64, ttft: [f64; 4], ttft_sum: f64) -> String {
        format!(
            r#"vllm:num_requests_running{{engine="0",model_name="m"}} 5
vllm:num_requests_waiting{{engine="0",model_name="m"}} 2
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.25
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {success}
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
vllm:generation_tokens_total{{engine="0",model_name="m"}} {gen}
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}
vllm:num_preemptions_total{{engine="0",model_name="m"}} 1
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.2",model_name="m"}} {}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.5",model_name="m"}} {}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {}
vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {}
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="m"}} {ttft_sum}
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="m"}} {}
vllm:iteration_tokens_total_count{{engine="0",model_name="m"}} {}
vllm:iteration_tokens_total_sum{{engine="0",model_name="m"}} {}
"#,
            ttft[0],
            ttft[1],
            ttft[2],
            ttft[3],
            ttft[3],
            success * 10.0,
            success * 10.0,
            prompt + gen,
        )
    }

    #[test]
    fn tpot_is_the_per_request_histogram_where_served() {
        use crate::testdata::{V1_CPU_AFTER_40, V1_CPU_IDLE};
        let w = Window::between(&snap(V1_CPU_IDLE), &snap(V1_CPU_AFTER_40), 8.0);
        assert!(!w.counter_reset);
        assert_eq!(w.request_rate, Some(5.0));
        let tpot = w.tpot_or_itl().expect("tpot");
        assert_eq!(tpot.count, 40.0, "one observation per request, not per token");
        assert!(tpot.mean.is_some_and(|m| m > 0.0 && m < 0.05), "{tpot:?}");
        assert_eq!(w.itl.as_ref().map(|l| l.count), Some(1240.0));
        assert_eq!(w.cache.as_ref().and_then(|c| c.kv_cache_tokens), Some(2_097_152.0));
        assert_eq!(w.prefix_hit_ratio, Some(4992.0 / 10240.0));
        // Without the per-request histogram (V0, the simulator) it is inter-token latency.
        let v0 = Window::between(&snap(crate::testdata::V0), &snap(crate::testdata::V0), 1.0);
        assert!(v0.tpot.is_none() && v0.tpot_or_itl() == v0.itl.as_ref());
    }

    fn snap(t: &str) -> Snapshot {
        Snapshot::from_text(t).expect("test exposition parses")
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn rates_ratios_and_latency_over_a_window() {
        let a = snap(&text(100.0, 5000.0, 20000.0, 1000.0, 400.0, [5.0, 10.0, 20.0, 20.0], 3.0));
        // 40 more requests: ttft buckets gain 10, 20, 10, 0 -> 10, 30, 40, 40 (cumulative deltas).
        let b = snap(&text(140.0, 9000.0, 28000.0, 1500.0, 700.0, [15.0, 40.0, 60.0, 60.0], 11.0));
        let w = Window::between(&a, &b, 4.0);
        assert!(!w.counter_reset);
        assert!(close(w.request_rate, 10.0));
        assert!(close(w.prompt_tokens_rate, 1000.0));
        assert!(close(w.generation_tokens_rate, 2000.0));
        assert!(close(w.prefix_hit_ratio, 0.6));
        assert_eq!(w.preemptions, Some(0.0));
        assert_eq!(w.num_requests_running, Some(5.0));
        assert_eq!(w.num_requests_waiting, Some(2.0));
        assert_eq!(w.kv_cache_usage, Some(0.25));
        // iteration tokens: delta sum 12000 over delta count 400 steps.
        assert!(close(w.tokens_per_iteration, 30.0));
        let ttft = w.ttft.expect("ttft");
        assert_eq!(ttft.count, 40.0);
        assert!(close(ttft.mean, 8.0 / 40.0));
        // Same bucket deltas as the hand-computed case in snapshot.rs.
        assert!(close(ttft.p50, 0.15));
        assert!(close(ttft.p90, 0.38));
        assert!(close(ttft.p99, 0.488));
        assert_eq!(w.itl, None, "not exported");
        assert_eq!(w.mean_prompt_tokens, None);
    }

    #[test]
    fn an_idle_window_has_zero_rates_and_no_latency_statistics() {
        let a = snap(&text(100.0, 5000.0, 20000.0, 1000.0, 400.0, [5.0, 10.0, 20.0, 20.0], 3.0));
        let w = Window::between(&a, &a, 1.0);
        assert_eq!(w.request_rate, Some(0.0));
        assert_eq!(w.generation_tokens_rate, Some(0.0));
        assert_eq!(w.prefix_hit_ratio, None, "no queries in the window");
        assert_eq!(w.tokens_per_iteration, None);
        let ttft = w.ttft.expect("histogram exported");
        assert_eq!((ttft.count, ttft.mean, ttft.p50), (0.0, None, None));
    }

    #[test]
    fn a_restart_counts_from_zero_and_never_goes_negative() {
        let before = snap(&text(1000.0, 50000.0, 200000.0, 1000.0, 400.0, [50.0, 100.0, 200.0, 200.0], 30.0));
        let after = snap(&text(20.0, 1000.0, 4000.0, 100.0, 50.0, [10.0, 15.0, 20.0, 20.0], 2.0));
        let w = Window::between(&before, &after, 2.0);
        assert!(w.counter_reset);
        assert!(close(w.request_rate, 10.0));
        assert!(close(w.prompt_tokens_rate, 500.0));
        assert!(close(w.generation_tokens_rate, 2000.0));
        assert!(close(w.prefix_hit_ratio, 0.5));
        let ttft = w.ttft.expect("ttft");
        assert_eq!(ttft.count, 20.0);
        assert!(close(ttft.mean, 0.1));
        // 10 of 20 in (0, 0.1]: median at the bound.
        assert!(close(ttft.p50, 0.1));
    }

    #[test]
    fn one_counter_down_resets_the_whole_window() {
        // Only the histogram went down; the counters grew past their old values after a restart.
        let before = snap(&text(10.0, 100.0, 100.0, 10.0, 5.0, [50.0, 100.0, 200.0, 200.0], 30.0));
        let after = snap(&text(30.0, 300.0, 300.0, 20.0, 10.0, [1.0, 2.0, 3.0, 3.0], 0.3));
        let w = Window::between(&before, &after, 1.0);
        assert!(w.counter_reset);
        assert!(close(w.request_rate, 30.0), "not 20: the old total belongs to the old process");
    }

    #[test]
    fn a_series_new_in_the_window_counts_from_zero_and_a_vanished_one_is_none() {
        let a = snap("vllm:num_requests_running{model_name=\"m\"} 0\n");
        let b = snap("vllm:num_requests_running{model_name=\"m\"} 1\nvllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 3\n");
        let w = Window::between(&a, &b, 3.0);
        assert!(close(w.request_rate, 1.0));
        let w = Window::between(&b, &a, 3.0);
        assert_eq!(w.request_rate, None);
        assert!(!w.counter_reset);
    }

    #[test]
    fn no_rates_from_a_zero_length_window() {
        let a = snap(&text(1.0, 1.0, 1.0, 1.0, 1.0, [1.0, 1.0, 1.0, 1.0], 1.0));
        let b = snap(&text(2.0, 2.0, 2.0, 2.0, 2.0, [1.0, 1.0, 2.0, 2.0], 2.0));
        let w = Window::between(&a, &b, 0.0);
        assert_eq!(w.request_rate, None);
        assert_eq!(w.generation_tokens_rate, None);
        assert_eq!(w.ttft.map(|l| l.count), Some(1.0), "counts do not need the length");
    }

    #[test]
    fn mean_lengths_from_the_request_histograms_of_the_v0_fixture() {
        let b = snap(crate::testdata::V0);
        let a = snap("vllm:num_requests_running{model_name=\"facebook/opt-125m\"} 0\n");
        let w = Window::between(&a, &b, 1.0);
        assert!(close(w.mean_prompt_tokens, 5.0));
        assert!(close(w.mean_generation_tokens, 7.0));
        let itl = w.itl.expect("itl from the V0 name");
        assert!(close(itl.p50, 0.0375));
    }
}
