//! vLLM's own `/metrics`: the counters and histograms the engine keeps, and their Prometheus
//! text as a vLLM V1 server writes it (names, help texts, buckets and float formatting).

use std::fmt::Write as _;

use super::{Engine, EngineConfig};

/// A Prometheus histogram with fixed bounds.
#[derive(Debug, Clone)]
pub(super) struct Hist {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    pub(super) count: u64,
    pub(super) sum: f64,
}

impl Hist {
    fn new(bounds: Vec<f64>) -> Hist {
        Hist { counts: vec![0; bounds.len()], bounds, count: 0, sum: 0.0 }
    }
    pub(super) fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// vLLM's 1-2-5 buckets up to `max`.
fn buckets_125(max: u32) -> Vec<f64> {
    let mut out = Vec::new();
    let mut mag = 1u64;
    'outer: loop {
        for m in [1, 2, 5] {
            let v = m * mag;
            if v > u64::from(max) {
                break 'outer;
            }
            out.push(v as f64);
        }
        mag *= 10;
    }
    out
}

#[derive(Debug)]
pub(super) struct Metrics {
    pub(super) prompt_tokens: u64,
    pub(super) generation_tokens: u64,
    pub(super) success_length: u64,
    pub(super) success_abort: u64,
    pub(super) preemptions: u64,
    pub(super) prefix_queries: u64,
    pub(super) prefix_hits: u64,
    pub(super) ttft: Hist,
    pub(super) itl: Hist,
    pub(super) e2e: Hist,
    pub(super) queue: Hist,
    pub(super) prompt_hist: Hist,
    pub(super) gen_hist: Hist,
    pub(super) iteration: Hist,
}

impl Metrics {
    /// Empty, with vLLM's bucket bounds (the token histograms' bounds follow the config).
    pub(super) fn new(cfg: &EngineConfig) -> Metrics {
        Metrics {
            prompt_tokens: 0,
            generation_tokens: 0,
            success_length: 0,
            success_abort: 0,
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            ttft: Hist::new(vec![
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0,
            ]),
            itl: Hist::new(vec![
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0,
            ]),
            e2e: Hist::new(latency_buckets()),
            queue: Hist::new(latency_buckets()),
            prompt_hist: Hist::new(buckets_125(cfg.max_model_len)),
            gen_hist: Hist::new(buckets_125(cfg.max_model_len)),
            iteration: Hist::new(
                [1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0]
                    .into_iter()
                    .filter(|&b| b <= f64::from(cfg.max_num_batched_tokens))
                    .collect(),
            ),
        }
    }
}

impl Engine {
    /// The `/metrics` response of a vLLM V1 server in this state.
    pub fn metrics_text(&self) -> String {
        let labels = format!("engine=\"0\",model_name=\"{}\"", self.cfg.model_name);
        let st = self.stats();
        let mut o = String::with_capacity(16 * 1024);
        let scalar = |o: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {}", py(v));
        };
        scalar(
            &mut o,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            f64::from(st.running),
        );
        scalar(
            &mut o,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            f64::from(st.waiting),
        );
        scalar(
            &mut o,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            st.kv_cache_usage,
        );
        scalar(
            &mut o,
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            self.m.prefix_queries as f64,
        );
        scalar(
            &mut o,
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            self.m.prefix_hits as f64,
        );
        scalar(
            &mut o,
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            self.m.preemptions as f64,
        );
        scalar(
            &mut o,
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            self.m.prompt_tokens as f64,
        );
        scalar(
            &mut o,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            self.m.generation_tokens as f64,
        );
        let _ = writeln!(
            o,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter"
        );
        for (reason, v) in [("stop", 0), ("length", self.m.success_length), ("abort", self.m.success_abort)] {
            let _ = writeln!(o, "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {}", py(v as f64));
        }
        let hists = [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", &self.m.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &self.m.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", &self.m.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", &self.m.queue),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", &self.m.prompt_hist),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", &self.m.gen_hist),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", &self.m.iteration),
        ];
        for (name, help, h) in hists {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut cum = 0;
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                cum += c;
                let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{}\"}} {}", py(*b), py(cum as f64));
            }
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", py(h.count as f64));
            let _ = writeln!(o, "{name}_count{{{labels}}} {}", py(h.count as f64));
            let _ = writeln!(o, "{name}_sum{{{labels}}} {}", py(h.sum));
        }
        let _ = writeln!(
            o,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"{}\",engine=\"0\",gpu_memory_utilization=\"{}\",num_gpu_blocks=\"{}\"}} 1.0",
            self.cfg.block_size,
            if self.cfg.enable_prefix_caching { "True" } else { "False" },
            self.cfg.gpu_memory_utilization,
            self.plan.num_gpu_blocks
        );
        o
    }
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
        1920.0, 7680.0,
    ]
}

/// Formats like Python's float repr for whole numbers (`8.0`), as vLLM's client library does.
fn py(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}
