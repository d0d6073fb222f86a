//! vLLM's metric names (V1, with V0 fallbacks) and the [`Snapshot`] they reduce to.
//!
//! Aggregation across series: vLLM V1 emits one series per `engine` (data-parallel rank) and per
//! `model_name`. Counters and count-like gauges (running, waiting, tokens, successes, prefix-cache
//! queries/hits, preemptions) are SUMMED over all series. KV-cache usage is a fraction of each
//! engine's own cache, so it is AVERAGED over series: with equal-sized engines (the data-parallel
//! case) that is exactly the fraction of the total KV capacity in use. Histograms are merged by
//! adding the buckets that have the same `le`, and their counts and sums.
//!
//! When a V1 name is present it wins; the V0 name is read only when the V1 one is absent (some
//! transitional releases export both). A metric with no series at all is `None`, never 0.

use std::collections::{BTreeSet, HashMap};

use serde::{Serialize, Serializer};

use super::parse::{parse, parse_float, Exposition, ParseError, Sample};

/// Metric names, V1 first, then the V0 fallback where the name changed.
pub mod names {
    pub const RUNNING: &str = "vllm:num_requests_running";
    pub const WAITING: &str = "vllm:num_requests_waiting";
    pub const KV_USAGE: &[&str] = &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"];
    pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
    pub const PREFIX_QUERIES: &[&str] = &["vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"];
    pub const PREFIX_HITS: &[&str] = &["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"];
    pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
    pub const PREEMPTIONS: &str = "vllm:num_preemptions_total";
    pub const TTFT: &str = "vllm:time_to_first_token_seconds";
    pub const ITL: &[&str] = &["vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"];
    pub const E2E: &str = "vllm:e2e_request_latency_seconds";
    pub const REQUEST_PROMPT_TOKENS: &str = "vllm:request_prompt_tokens";
    pub const REQUEST_GENERATION_TOKENS: &str = "vllm:request_generation_tokens";
    pub const ITERATION_TOKENS: &str = "vllm:iteration_tokens_total";
    /// Per request: decode time / (output tokens - 1), what benchmarks call TPOT (V1).
    pub const REQUEST_TPOT: &str = "vllm:request_time_per_output_token_seconds";
    pub const QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
    pub const PREFILL_TIME: &str = "vllm:request_prefill_time_seconds";
    pub const DECODE_TIME: &str = "vllm:request_decode_time_seconds";
    pub const ADMISSION_REJECTIONS: &str = "vllm:admission_rejections_total";
    /// An info gauge whose labels are the engine's cache config (block size, KV capacity).
    pub const CACHE_CONFIG: &str = "vllm:cache_config_info";

    /// Names only V1 exports.
    pub const V1_ONLY: &[&str] = &[
        "vllm:kv_cache_usage_perc",
        "vllm:inter_token_latency_seconds_count",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ];
    /// Names only V0 exports (V1 dropped swapping, CPU cache, the averaged throughput gauges and
    /// best_of).
    pub const V0_ONLY: &[&str] = &[
        "vllm:num_requests_swapped",
        "vllm:cpu_cache_usage_perc",
        "vllm:avg_prompt_throughput_toks_per_s",
        "vllm:avg_generation_throughput_toks_per_s",
        "vllm:request_params_best_of_count",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
    ];
}

/// Which vLLM engine generation exported the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V0,
    V1,
    /// Nothing V0- or V1-specific was present (e.g. a partial excerpt).
    Unknown,
}

/// A histogram merged across series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le`; the last one may be `+Inf` (written as the
    /// string "+Inf" in JSON, which has no infinity).
    #[serde(serialize_with = "serialize_buckets")]
    pub buckets: Vec<(f64, f64)>,
    /// Observations: `_count`, or the `+Inf` bucket when `_count` is missing.
    pub count: f64,
    /// Sum of observations; None when `_sum` is not exported.
    pub sum: Option<f64>,
}

impl Histogram {
    /// The `q` quantile (0..=1), interpolated linearly within the bucket it falls in, as
    /// Prometheus' `histogram_quantile` does: a rank in the `+Inf` bucket returns the highest
    /// finite bound; the lowest bucket starts at 0 (unless its bound is <= 0, then that bound).
    /// A missing `+Inf` bucket is taken to hold `count`, since `_count` is that bucket by
    /// definition. None when there are no observations or no finite bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let mut b: Vec<(f64, f64)> = self.buckets.iter().copied().filter(|(le, _)| !le.is_nan()).collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        if b.last().is_none_or(|l| l.0 != f64::INFINITY) {
            b.push((f64::INFINITY, self.count));
        }
        // Cumulative counts can only grow; merged or delta'd buckets may wobble by rounding.
        let mut max = 0.0_f64;
        for bucket in &mut b {
            max = max.max(bucket.1);
            bucket.1 = max;
        }
        if b.len() < 2 {
            return None;
        }
        let total = b[b.len() - 1].1;
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let last = b.len() - 1;
        let idx = b[..last].iter().position(|&(_, c)| c >= rank).unwrap_or(last);
        if idx == last {
            return Some(b[last - 1].0);
        }
        if idx == 0 && b[0].0 <= 0.0 {
            return Some(b[0].0);
        }
        let (start, below) = if idx == 0 { (0.0, 0.0) } else { b[idx - 1] };
        let (end, upto) = b[idx];
        let in_bucket = upto - below;
        if in_bucket <= 0.0 {
            return Some(start);
        }
        Some(start + (end - start) * (rank - below) / in_bucket)
    }
}

fn serialize_buckets<S: Serializer>(buckets: &[(f64, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Le {
        Num(f64),
        Text(&'static str),
    }
    let mut seq = s.serialize_seq(Some(buckets.len()))?;
    for &(le, count) in buckets {
        let le = if le == f64::INFINITY { Le::Text("+Inf") } else { Le::Num(le) };
        seq.serialize_element(&(le, count))?;
    }
    seq.end()
}

/// The KV cache an engine set up, from the labels of `vllm:cache_config_info` (summed over
/// engines: the capacity of the whole server). Fields a release does not label are None.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheConfig {
    pub block_size: Option<f64>,
    /// KV blocks allocated (`num_gpu_blocks`, also on the CPU build).
    pub num_blocks: Option<f64>,
    /// Tokens the KV cache holds: `kv_cache_size_tokens`, else blocks x block size.
    pub kv_cache_tokens: Option<f64>,
    /// Requests of `--max-model-len` tokens that fit at once (`kv_cache_max_concurrency`).
    pub max_concurrency_at_max_len: Option<f64>,
    pub prefix_caching: Option<bool>,
}

/// What one `/metrics` response says, reduced to the quantities the agent uses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub version: Version,
    /// Distinct `model_name` label values on `vllm:` series, sorted.
    pub model_names: Vec<String>,
    /// Distinct `engine` label values; 1 when vLLM series carry no `engine` label (V0), 0 when
    /// there is no `vllm:` series at all.
    pub engines: usize,
    pub num_requests_running: Option<f64>,
    pub num_requests_waiting: Option<f64>,
    /// Fraction 0..1, mean over engines.
    pub kv_cache_usage: Option<f64>,
    pub prompt_tokens_total: Option<f64>,
    pub generation_tokens_total: Option<f64>,
    /// Summed over every `finished_reason`.
    pub request_success_total: Option<f64>,
    pub prefix_cache_queries_total: Option<f64>,
    pub prefix_cache_hits_total: Option<f64>,
    pub num_preemptions_total: Option<f64>,
    /// Requests refused before they were queued (`max_num_queued_*` limits), all reasons.
    pub admission_rejections_total: Option<f64>,
    pub ttft_seconds: Option<Histogram>,
    pub itl_seconds: Option<Histogram>,
    /// Per-request TPOT (V1 only); the objective is checked on it where served.
    pub tpot_seconds: Option<Histogram>,
    pub e2e_seconds: Option<Histogram>,
    pub queue_seconds: Option<Histogram>,
    pub prefill_seconds: Option<Histogram>,
    pub decode_seconds: Option<Histogram>,
    pub prompt_tokens: Option<Histogram>,
    pub generation_tokens: Option<Histogram>,
    pub iteration_tokens: Option<Histogram>,
    pub cache: Option<CacheConfig>,
}

impl Snapshot {
    /// Parses exposition text and reduces it.
    pub fn from_text(text: &str) -> Result<Self, ParseError> {
        Ok(Self::from_exposition(&parse(text)?))
    }

    /// Reduces a parsed exposition; other exporters' metrics are ignored.
    pub fn from_exposition(exp: &Exposition) -> Self {
        let idx = Index::new(exp);
        let vllm: Vec<&Sample> = exp.samples.iter().filter(|s| s.name.starts_with("vllm:")).collect();
        let model_names: BTreeSet<&str> = vllm.iter().filter_map(|s| s.label("model_name")).collect();
        let engine_ids: BTreeSet<&str> = vllm.iter().filter_map(|s| s.label("engine")).collect();
        let engines = match (engine_ids.len(), vllm.is_empty()) {
            (0, true) => 0,
            (0, false) => 1,
            (n, _) => n,
        };
        let version = if !engine_ids.is_empty() || names::V1_ONLY.iter().any(|n| idx.has(n)) {
            Version::V1
        } else if names::V0_ONLY.iter().any(|n| idx.has(n)) {
            Version::V0
        } else {
            Version::Unknown
        };
        Self {
            version,
            model_names: model_names.into_iter().map(str::to_string).collect(),
            engines,
            num_requests_running: idx.sum(names::RUNNING),
            num_requests_waiting: idx.sum(names::WAITING),
            kv_cache_usage: idx.first(names::KV_USAGE, Index::mean),
            prompt_tokens_total: idx.sum(names::PROMPT_TOKENS),
            generation_tokens_total: idx.sum(names::GENERATION_TOKENS),
            request_success_total: idx.sum(names::REQUEST_SUCCESS),
            prefix_cache_queries_total: idx.first(names::PREFIX_QUERIES, Index::sum),
            prefix_cache_hits_total: idx.first(names::PREFIX_HITS, Index::sum),
            num_preemptions_total: idx.sum(names::PREEMPTIONS),
            admission_rejections_total: idx.sum(names::ADMISSION_REJECTIONS),
            ttft_seconds: idx.histogram(names::TTFT),
            itl_seconds: idx.first(names::ITL, Index::histogram),
            tpot_seconds: idx.histogram(names::REQUEST_TPOT),
            e2e_seconds: idx.histogram(names::E2E),
            queue_seconds: idx.histogram(names::QUEUE_TIME),
            prefill_seconds: idx.histogram(names::PREFILL_TIME),
            decode_seconds: idx.histogram(names::DECODE_TIME),
            prompt_tokens: idx.histogram(names::REQUEST_PROMPT_TOKENS),
            generation_tokens: idx.histogram(names::REQUEST_GENERATION_TOKENS),
            iteration_tokens: idx.histogram(names::ITERATION_TOKENS),
            cache: idx.cache_config(),
        }
    }
}

/// Samples by name.
struct Index<'a>(HashMap<&'a str, Vec<&'a Sample>>);

impl<'a> Index<'a> {
    fn new(exp: &'a Exposition) -> Self {
        let mut map: HashMap<&str, Vec<&Sample>> = HashMap::new();
        for s in &exp.samples {
            map.entry(s.name.as_str()).or_default().push(s);
        }
        Self(map)
    }

    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn series(&self, name: &str) -> &[&'a Sample] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    fn sum(&self, name: &str) -> Option<f64> {
        let s = self.series(name);
        (!s.is_empty()).then(|| s.iter().map(|x| x.value).sum())
    }

    fn mean(&self, name: &str) -> Option<f64> {
        let s = self.series(name);
        (!s.is_empty()).then(|| s.iter().map(|x| x.value).sum::<f64>() / s.len() as f64)
    }

    /// The first of `names` (V1, then V0) that has a value.
    fn first<T>(&self, names: &[&str], f: impl Fn(&Self, &str) -> Option<T>) -> Option<T> {
        names.iter().find_map(|n| f(self, n))
    }

    /// `cache_config_info` labels, numbers summed over engines ("None" labels are skipped).
    fn cache_config(&self) -> Option<CacheConfig> {
        let series = self.series(names::CACHE_CONFIG);
        if series.is_empty() {
            return None;
        }
        let total = |label: &str| -> Option<f64> {
            let values: Vec<f64> = series.iter().filter_map(|s| s.label(label).and_then(parse_float)).collect();
            (!values.is_empty()).then(|| values.iter().sum())
        };
        let block_size = series.iter().find_map(|s| s.label("block_size").and_then(parse_float));
        let num_blocks = total("num_gpu_blocks");
        let kv_cache_tokens = total("kv_cache_size_tokens").or_else(|| Some(num_blocks? * block_size?));
        Some(CacheConfig {
            block_size,
            num_blocks,
            kv_cache_tokens,
            max_concurrency_at_max_len: total("kv_cache_max_concurrency"),
            prefix_caching: series.iter().find_map(|s| match s.label("enable_prefix_caching") {
                Some("True" | "true") => Some(true),
                Some("False" | "false") => Some(false),
                _ => None,
            }),
        })
    }

    fn histogram(&self, base: &str) -> Option<Histogram> {
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.series(&format!("{base}_bucket")) {
            // The parser checked `le` on typed histograms; untyped stray buckets are skipped.
            let Some(le) = s.label("le").and_then(parse_float) else { continue };
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let inf = buckets.last().filter(|b| b.0 == f64::INFINITY).map(|b| b.1);
        let count = self.sum(&format!("{base}_count")).or(inf)?;
        Some(Histogram { buckets, count, sum: self.sum(&format!("{base}_sum")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testdata::{v1_without_gaps as v1, V0, V1_CPU_AFTER_40, V1_CPU_IDLE};

    #[test]
    fn a_real_v1_server_after_a_known_load() {
        let s = Snapshot::from_text(V1_CPU_AFTER_40).expect("parses");
        assert_eq!(s.version, Version::V1);
        assert_eq!((s.model_names.as_slice(), s.engines), (&["tiny-llama".to_string()][..], 1));
        assert_eq!(s.request_success_total, Some(40.0));
        assert_eq!(s.prompt_tokens_total, Some(40.0 * 256.0));
        assert_eq!(s.generation_tokens_total, Some(40.0 * 32.0));
        assert_eq!(s.prefix_cache_queries_total, Some(10240.0));
        assert_eq!(s.prefix_cache_hits_total, Some(39.0 * 128.0), "the 128-token prefix, one 128-token block");
        assert_eq!(s.admission_rejections_total, Some(0.0));
        for (name, h) in [("ttft", &s.ttft_seconds), ("tpot", &s.tpot_seconds), ("e2e", &s.e2e_seconds)] {
            assert_eq!(h.as_ref().map(|h| h.count), Some(40.0), "{name}");
        }
        for (name, h) in [("queue", &s.queue_seconds), ("prefill", &s.prefill_seconds), ("decode", &s.decode_seconds)] {
            assert_eq!(h.as_ref().map(|h| h.count), Some(40.0), "{name}");
        }
        assert_eq!(s.itl_seconds.as_ref().map(|h| h.count), Some(40.0 * 31.0));
        assert_eq!(s.generation_tokens.as_ref().and_then(|h| h.sum), Some(1280.0));
        let c = s.cache.expect("cache_config_info");
        assert_eq!(c.block_size, Some(128.0));
        assert_eq!(c.num_blocks, Some(16384.0));
        assert_eq!(c.kv_cache_tokens, Some(2_097_152.0));
        assert_eq!(c.max_concurrency_at_max_len, Some(1024.0));
        assert_eq!(c.prefix_caching, Some(true));
        let idle = Snapshot::from_text(V1_CPU_IDLE).expect("parses");
        assert_eq!((idle.request_success_total, idle.generation_tokens_total), (Some(0.0), Some(0.0)));
        assert_eq!(idle.tpot_seconds.map(|h| h.count), Some(0.0));
    }

    #[test]
    fn v0_fixture_reduces_with_fallback_names() {
        let s = Snapshot::from_text(V0).expect("parses");
        assert_eq!(s.version, Version::V0);
        assert_eq!(s.model_names, vec!["facebook/opt-125m".to_string()]);
        assert_eq!(s.engines, 1);
        assert_eq!(s.num_requests_running, Some(0.0));
        assert_eq!(s.num_requests_waiting, Some(0.0));
        assert_eq!(s.kv_cache_usage, Some(0.0), "from gpu_cache_usage_perc");
        assert_eq!(s.prompt_tokens_total, Some(5.0));
        assert_eq!(s.generation_tokens_total, Some(7.0));
        assert_eq!(s.request_success_total, Some(1.0));
        assert_eq!(s.num_preemptions_total, Some(0.0));
        assert_eq!(s.prefix_cache_queries_total, None, "not exported: None, not 0");
        assert_eq!(s.prefix_cache_hits_total, None);
        assert_eq!(s.iteration_tokens, None);
        let itl = s.itl_seconds.expect("from time_per_output_token_seconds");
        assert_eq!(itl.count, 6.0);
        assert_eq!(itl.sum, Some(0.19016313552856445));
        assert_eq!(itl.buckets.len(), 14);
        assert_eq!(itl.buckets[2], (0.05, 6.0));
        assert_eq!(itl.buckets[13], (f64::INFINITY, 6.0));
        let ttft = s.ttft_seconds.expect("ttft");
        assert_eq!((ttft.count, ttft.sum), (1.0, Some(0.31326723098754883)));
        assert_eq!(s.e2e_seconds.map(|h| h.count), Some(1.0));
        assert_eq!(s.prompt_tokens.and_then(|h| h.sum), Some(5.0));
        assert_eq!(s.generation_tokens.and_then(|h| h.sum), Some(7.0));
    }

    #[test]
    fn v1_excerpt_reduces_and_keeps_missing_as_none() {
        let s = Snapshot::from_text(&v1()).expect("parses");
        assert_eq!(s.version, Version::Unknown, "the excerpt has no V0- or V1-only name");
        assert_eq!(s.model_names, vec!["meta-llama/Llama-3.1-8B-Instruct".to_string()]);
        assert_eq!(s.num_requests_running, Some(8.0));
        assert_eq!(s.num_requests_waiting, None);
        assert_eq!(s.kv_cache_usage, None);
        assert_eq!(s.generation_tokens_total, Some(27453.0));
        assert_eq!(s.prompt_tokens_total, None);
        assert_eq!(s.request_success_total, Some(132.0));
        let ttft = s.ttft_seconds.expect("ttft");
        assert_eq!(ttft.count, 140.0);
        assert_eq!(ttft.sum, None);
        assert_eq!(ttft.buckets.len(), 8);
        assert_eq!(s.itl_seconds, None);
    }

    const TWO_ENGINES: &str = r#"# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3
vllm:num_requests_running{engine="1",model_name="m"} 4
vllm:num_requests_waiting{engine="0",model_name="m"} 1
vllm:num_requests_waiting{engine="1",model_name="m"} 0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 50
vllm:gpu_prefix_cache_queries_total{engine="1",model_name="m"} 7
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 2
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="m"} 1
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.1",model_name="m"} 4
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 5
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.5
vllm:inter_token_latency_seconds_bucket{engine="1",le="0.010",model_name="m"} 2
vllm:inter_token_latency_seconds_bucket{engine="1",le="0.1",model_name="m"} 2
vllm:inter_token_latency_seconds_bucket{engine="1",le="+Inf",model_name="m"} 3
vllm:inter_token_latency_seconds_count{engine="1",model_name="m"} 3
vllm:inter_token_latency_seconds_sum{engine="1",model_name="m"} 1.5
vllm:time_per_output_token_seconds_count{engine="1",model_name="m"} 99
"#;

    #[test]
    fn engines_are_summed_kv_averaged_histograms_merged_v1_names_win() {
        let s = Snapshot::from_text(TWO_ENGINES).expect("parses");
        assert_eq!(s.version, Version::V1);
        assert_eq!(s.engines, 2);
        assert_eq!(s.model_names, vec!["m".to_string()]);
        assert_eq!(s.num_requests_running, Some(7.0));
        assert_eq!(s.num_requests_waiting, Some(1.0));
        let kv = s.kv_cache_usage.expect("kv");
        assert!((kv - 0.4).abs() < 1e-12, "mean of 0.2 and 0.6, V0 name ignored: {kv}");
        assert_eq!(s.prefix_cache_queries_total, Some(150.0));
        assert_eq!(s.request_success_total, Some(17.0));
        let itl = s.itl_seconds.expect("itl");
        // "0.01" and "0.010" are the same bound.
        assert_eq!(itl.buckets, vec![(0.01, 3.0), (0.1, 6.0), (f64::INFINITY, 8.0)]);
        assert_eq!(itl.count, 8.0);
        assert_eq!(itl.sum, Some(2.0));
    }

    #[test]
    fn quantiles_match_hand_computed_values() {
        let h = Histogram {
            buckets: vec![(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (f64::INFINITY, 40.0)],
            count: 40.0,
            sum: Some(8.0),
        };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
        // rank 4 in (0, 0.1] holding 10: 0.1 * 4/10
        assert!(close(h.quantile(0.1), 0.04));
        // rank 20: 10 below, (0.1, 0.2] holds 20: 0.1 + 0.1 * 10/20
        assert!(close(h.quantile(0.5), 0.15));
        // rank 36: 30 below, (0.2, 0.5] holds 10: 0.2 + 0.3 * 6/10
        assert!(close(h.quantile(0.9), 0.38));
        // rank 39.6: 0.2 + 0.3 * 9.6/10
        assert!(close(h.quantile(0.99), 0.488));
        assert!(close(h.quantile(1.0), 0.5));
        assert_eq!(h.quantile(1.5), None);

        // Ranks in the +Inf bucket give the highest finite bound.
        let tail = Histogram { buckets: vec![(1.0, 5.0), (2.0, 8.0), (f64::INFINITY, 10.0)], count: 10.0, sum: None };
        assert_eq!(tail.quantile(0.9), Some(2.0));
        // rank 6.5: 1 + 1 * 1.5/3
        assert!(close(tail.quantile(0.65), 1.5));

        // No +Inf bucket: `count` stands for it.
        let open = Histogram { buckets: vec![(1.0, 5.0), (2.0, 8.0)], count: 10.0, sum: None };
        assert_eq!(open.quantile(0.99), Some(2.0));
        assert!(close(open.quantile(0.25), 0.5));

        let empty = Histogram { buckets: vec![(1.0, 0.0), (f64::INFINITY, 0.0)], count: 0.0, sum: Some(0.0) };
        assert_eq!(empty.quantile(0.5), None);
    }

    #[test]
    fn v0_fixture_itl_median_is_inside_its_bucket() {
        let s = Snapshot::from_text(V0).expect("parses");
        let itl = s.itl_seconds.expect("itl");
        // All 6 observations in (0.025, 0.05]: rank 3 -> 0.025 + 0.025 * 3/6.
        assert!(itl.quantile(0.5).is_some_and(|q| (q - 0.0375).abs() < 1e-12));
    }

    #[test]
    fn json_writes_the_inf_bound_as_text() {
        let h = Histogram { buckets: vec![(0.5, 1.0), (f64::INFINITY, 2.0)], count: 2.0, sum: Some(1.5) };
        let v = serde_json::to_value(&h).expect("serializes");
        assert_eq!(v, serde_json::json!({"buckets": [[0.5, 1.0], ["+Inf", 2.0]], "count": 2.0, "sum": 1.5}));
    }

    #[test]
    fn no_vllm_series_means_no_engines() {
        let s = Snapshot::from_text("process_open_fds 3\n").expect("parses");
        assert_eq!(s.engines, 0);
        assert_eq!(s.version, Version::Unknown);
        assert_eq!(s.num_requests_running, None);
    }
}
