//! The agent's own Prometheus metrics: snake_case, `gpu_agent_` prefix, base units
//! (seconds, hertz, watts, joules, ratios 0..1), counters ending in `_total`.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use governor::{Decision, Phase};
use gpu::GpuSample;

use vllm_metrics::Window;

/// Every metric the agent exports, registered in one registry.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    pub cycles: IntCounter,
    pub cycle_duration: Histogram,
    pub vllm_up: IntGauge,
    pub vllm_scrape_errors: IntCounter,
    vllm_running: Gauge,
    vllm_waiting: Gauge,
    vllm_kv_usage: Gauge,
    vllm_request_rate: Gauge,
    vllm_prompt_rate: Gauge,
    vllm_generation_rate: Gauge,
    vllm_prefix_hit: Gauge,
    vllm_latency: GaugeVec,
    gpu_sm_clock: GaugeVec,
    gpu_mem_clock: GaugeVec,
    gpu_power: GaugeVec,
    gpu_energy: prometheus::CounterVec,
    gpu_util: GaugeVec,
    gpu_temp: GaugeVec,
    gpu_errors: IntCounterVec,
    pub clock_target: Gauge,
    pub clock_changes: IntCounter,
    slo: GaugeVec,
    pub slo_violations: IntCounterVec,
    decisions: IntCounter,
    phase: GaugeVec,
    reward: Gauge,
    edp: Gauge,
    converged: IntGauge,
    /// The replica advisor's gauges.
    pub advisor: advisor::metrics::AdvisorMetrics,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("gpu_agent")
}

macro_rules! reg {
    ($registry:expr, $metric:expr) => {{
        let m = $metric.expect("metric definition is valid");
        $registry.register(Box::new(m.clone())).expect("metric names are unique");
        m
    }};
}

impl AgentMetrics {
    #[allow(clippy::expect_used)] // definitions are constants: a failure is a programming error caught by tests
    pub fn new() -> Self {
        let r = Registry::new();
        let gpu = &["gpu"];
        let build = reg!(
            r,
            IntGauge::with_opts(
                opts("build_info", "Always 1; labels say which agent runs.")
                    .const_label("version", env!("CARGO_PKG_VERSION"))
            )
        );
        build.set(1);
        Self {
            cycles: reg!(r, IntCounter::with_opts(opts("cycles_total", "Decision cycles run."))),
            cycle_duration: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cycle_duration_seconds",
                        "Time one decision cycle took (scrape, read GPUs, decide, apply)."
                    )
                    .namespace("gpu_agent")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
                )
            ),
            vllm_up: reg!(r, IntGauge::with_opts(opts("vllm_up", "1 if the last vLLM scrape succeeded."))),
            vllm_scrape_errors: reg!(
                r,
                IntCounter::with_opts(opts("vllm_scrape_errors_total", "Failed vLLM scrapes."))
            ),
            vllm_running: reg!(r, Gauge::with_opts(opts("vllm_requests_running", "Requests in vLLM's running batch."))),
            vllm_waiting: reg!(r, Gauge::with_opts(opts("vllm_requests_waiting", "Requests queued in vLLM."))),
            vllm_kv_usage: reg!(r, Gauge::with_opts(opts("vllm_kv_cache_usage_ratio", "KV-cache usage, 0..1."))),
            vllm_request_rate: reg!(
                r,
                Gauge::with_opts(opts(
                    "vllm_request_rate_per_second",
                    "Finished requests per second over the last window."
                ))
            ),
            vllm_prompt_rate: reg!(
                r,
                Gauge::with_opts(opts(
                    "vllm_prompt_tokens_per_second",
                    "Prompt tokens per second over the last window."
                ))
            ),
            vllm_generation_rate: reg!(
                r,
                Gauge::with_opts(opts(
                    "vllm_generation_tokens_per_second",
                    "Generated tokens per second over the last window."
                ))
            ),
            vllm_prefix_hit: reg!(
                r,
                Gauge::with_opts(opts(
                    "vllm_prefix_cache_hit_ratio",
                    "Prefix-cache hits over queries in the last window."
                ))
            ),
            vllm_latency: reg!(
                r,
                GaugeVec::new(
                    opts("vllm_latency_seconds", "Request latencies over the last window, from vLLM's histograms."),
                    &["kind", "stat"]
                )
            ),
            gpu_sm_clock: reg!(r, GaugeVec::new(opts("gpu_sm_clock_hertz", "Current SM clock."), gpu)),
            gpu_mem_clock: reg!(r, GaugeVec::new(opts("gpu_memory_clock_hertz", "Current memory clock."), gpu)),
            gpu_power: reg!(r, GaugeVec::new(opts("gpu_power_watts", "Power draw."), gpu)),
            gpu_energy: reg!(
                r,
                prometheus::CounterVec::new(
                    opts("gpu_energy_joules_total", "Energy the GPU used since the agent started (NVML counter)."),
                    gpu
                )
            ),
            gpu_util: reg!(r, GaugeVec::new(opts("gpu_utilization_ratio", "SM busy share, 0..1."), gpu)),
            gpu_temp: reg!(r, GaugeVec::new(opts("gpu_temperature_celsius", "GPU temperature."), gpu)),
            gpu_errors: reg!(
                r,
                IntCounterVec::new(opts("gpu_errors_total", "Failed GPU reads or clock changes."), &["gpu", "op"])
            ),
            clock_target: reg!(
                r,
                Gauge::with_opts(opts(
                    "clock_target_hertz",
                    "SM clock the agent has locked; 0 when the driver manages clocks."
                ))
            ),
            clock_changes: reg!(
                r,
                IntCounter::with_opts(opts("clock_changes_total", "Clock locks and resets applied."))
            ),
            slo: reg!(r, GaugeVec::new(opts("slo_objective_seconds", "Configured latency objectives."), &["kind"])),
            slo_violations: reg!(
                r,
                IntCounterVec::new(
                    opts("slo_violations_total", "Windows whose mean latency broke an objective."),
                    &["kind"]
                )
            ),
            decisions: reg!(
                r,
                IntCounter::with_opts(opts("governor_decisions_total", "Decisions the clock governor made."))
            ),
            phase: reg!(
                r,
                GaugeVec::new(
                    opts("governor_phase", "1 for the governor's current phase, 0 for the others."),
                    &["phase"]
                )
            ),
            reward: reg!(
                r,
                Gauge::with_opts(opts("governor_reward", "Reward the governor learnt from the last window."))
            ),
            edp: reg!(
                r,
                Gauge::with_opts(opts(
                    "governor_edp_joule_seconds_per_token",
                    "Energy per generated token times mean time per output token, last window."
                ))
            ),
            converged: reg!(
                r,
                IntGauge::with_opts(opts("governor_converged", "1 once the governor has settled on a clock."))
            ),
            advisor: advisor::metrics::AdvisorMetrics::new(&r).expect("advisor metric definitions are valid"),
            registry: r,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn set_slo(&self, ttft_s: f64, tpot_s: f64) {
        self.slo.with_label_values(&["ttft"]).set(ttft_s);
        self.slo.with_label_values(&["tpot"]).set(tpot_s);
    }

    /// Records one vLLM window. Quantities the window lacks keep their last value rather than
    /// dropping to 0, which a dashboard would read as "no load".
    pub fn record_window(&self, w: &Window) {
        let gauges = [
            (&self.vllm_running, w.num_requests_running),
            (&self.vllm_waiting, w.num_requests_waiting),
            (&self.vllm_kv_usage, w.kv_cache_usage),
            (&self.vllm_request_rate, w.request_rate),
            (&self.vllm_prompt_rate, w.prompt_tokens_rate),
            (&self.vllm_generation_rate, w.generation_tokens_rate),
            (&self.vllm_prefix_hit, w.prefix_hit_ratio),
        ];
        for (gauge, value) in gauges {
            if let Some(v) = value {
                gauge.set(v);
            }
        }
        // `tpot` (per request) only where vLLM exports it; the others from every release.
        let kinds = [("ttft", &w.ttft), ("itl", &w.itl), ("tpot", &w.tpot), ("e2e", &w.e2e), ("queue", &w.queue)];
        for (kind, lat) in kinds {
            let Some(lat) = lat else { continue };
            for (stat, v) in [("mean", lat.mean), ("p50", lat.p50), ("p90", lat.p90), ("p99", lat.p99)] {
                if let Some(v) = v {
                    self.vllm_latency.with_label_values(&[kind, stat]).set(v);
                }
            }
        }
    }

    /// Records one GPU reading; `energy_delta_j` is what the NVML counter advanced since the last one.
    pub fn record_gpu(&self, index: u32, s: &GpuSample, energy_delta_j: f64) {
        let g = index.to_string();
        let g = [g.as_str()];
        self.gpu_sm_clock.with_label_values(&g).set(f64::from(s.sm_clock_mhz) * 1e6);
        self.gpu_mem_clock.with_label_values(&g).set(f64::from(s.mem_clock_mhz) * 1e6);
        self.gpu_power.with_label_values(&g).set(s.power_w);
        if energy_delta_j > 0.0 {
            self.gpu_energy.with_label_values(&g).inc_by(energy_delta_j);
        } else {
            // Make the series exist from the first reading on.
            self.gpu_energy.with_label_values(&g).inc_by(0.0);
        }
        self.gpu_util.with_label_values(&g).set(f64::from(s.gpu_util_pct) / 100.0);
        self.gpu_temp.with_label_values(&g).set(f64::from(s.temperature_c));
    }

    /// Records one governor decision.
    pub fn record_decision(&self, d: &Decision) {
        self.decisions.inc();
        // Every phase, so the phase gauge always has the full set of series.
        for p in Phase::ALL {
            self.phase.with_label_values(&[p.as_str()]).set(if p == d.phase { 1.0 } else { 0.0 });
        }
        if let Some(r) = d.reward {
            self.reward.set(r);
        }
        if let Some(e) = d.edp_per_token {
            self.edp.set(e);
        }
        self.converged.set(i64::from(d.converged));
    }

    pub fn gpu_error(&self, index: u32, op: &str) {
        self.gpu_errors.with_label_values(&[&index.to_string(), op]).inc();
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}
