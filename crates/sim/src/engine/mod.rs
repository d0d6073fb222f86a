//! A virtual-time model of vLLM V1 serving a Llama-3.1-8B-shaped model on the simulated H100:
//! memory plan (fails to start like vLLM), continuous batching with chunked prefill under
//! `max_num_seqs` / `max_num_batched_tokens`, paged KV blocks with preemption, prefix caching,
//! and vLLM's own `/metrics`. Step times come from the simulated GPU, so they follow its clock.
//!
//! Split by concern: the flags ([`EngineConfig`]), the startup memory plan and the KV blocks
//! (`memory`), the scheduler's step (`scheduler`) and the `/metrics` text (`metrics`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use crate::gpu::SimGpu;

mod config;
mod memory;
mod metrics;
mod prefix;
mod scheduler;

pub use config::EngineConfig;
pub use memory::{MemoryPlan, SimError};
use metrics::Metrics;
pub use prefix::BlockHasher;
use prefix::PrefixCache;

/// Llama-3.1-8B: parameters, bf16 bytes, KV bytes per token (2 x 32 layers x 8 heads x 128 x 2 B).
const PARAMS: f64 = 8.03e9;
const WEIGHT_BYTES: f64 = PARAMS * 2.0;
const KV_BYTES_PER_TOKEN: f64 = 131_072.0;
const LAYERS_X_HIDDEN: f64 = 32.0 * 4096.0;
/// Achieved HBM bandwidth and dense bf16 throughput (prefill_4k: 7.7 TFLOP in 11.2 ms) at 1980 MHz.
const BANDWIDTH: f64 = 3.0e12;
const FLOPS: f64 = 6.5e14;
/// Decode GEMMs overlap with streaming the weights, so only part of their FLOPs shows as time.
/// Calibrated on the sweep: batch 256 through 3.75e9 parameters (1.9 TFLOP) adds only 0.66 ms
/// over batch 16, i.e. 2.9e15 FLOP/s of visible time.
const DECODE_VISIBLE_FLOPS: f64 = 2.9e15;
/// Per-step CPU work (scheduling, sampling, launch): not clock dependent.
const STEP_OVERHEAD_S: f64 = 0.0015;
const PER_SEQ_OVERHEAD_S: f64 = 0.000_01;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub type RequestId = u64;

#[derive(Debug, Clone)]
pub struct SimRequest {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Chained hashes of the prompt's full KV blocks ([`BlockHasher`]), what the prefix cache
    /// keys on; empty when the content is unknown (nothing hits).
    pub block_hashes: Vec<u64>,
}

impl SimRequest {
    /// A request whose prompt content is unknown: it neither hits nor fills the prefix cache.
    pub fn new(prompt_tokens: u32, max_tokens: u32) -> SimRequest {
        SimRequest { prompt_tokens, max_tokens, block_hashes: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    First { id: RequestId },
    Token { id: RequestId },
    Finished { id: RequestId, reason: FinishReason },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FinishReason {
    Length,
    Abort,
}

#[derive(Debug, Clone)]
pub struct StepReport {
    pub started_at: f64,
    pub seconds: f64,
    pub joules: f64,
    pub prefill_tokens: u32,
    pub decode_tokens: u32,
    pub events: Vec<TokenEvent>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EngineStats {
    pub running: u32,
    pub waiting: u32,
    pub kv_cache_usage: f64,
    pub now: f64,
}

#[derive(Debug)]
struct Req {
    /// Prompt as submitted (`prompt` grows by the output kept across a preemption).
    orig_prompt: u32,
    prompt: u32,
    max_tokens: u32,
    block_hashes: Vec<u64>,
    arrival: f64,
    /// Prompt tokens already in the KV cache (computed or cached).
    computed: u32,
    generated: u32,
    blocks: u32,
    first_scheduled: Option<f64>,
    first_token_at: Option<f64>,
    last_token_at: f64,
}

impl Req {
    fn context(&self) -> u32 {
        self.computed + self.generated
    }
    fn in_decode(&self) -> bool {
        self.computed >= self.prompt
    }
}

/// The engine. Not thread-safe itself: callers wrap it in a Mutex.
pub struct Engine {
    cfg: EngineConfig,
    plan: MemoryPlan,
    gpu: Arc<SimGpu>,
    now: f64,
    next_id: RequestId,
    reqs: HashMap<RequestId, Req>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    free_blocks: u32,
    prefix_cache: PrefixCache,
    m: Metrics,
    /// Finished-at-submit events (e.g. too long) delivered with the next step.
    pending_events: Vec<TokenEvent>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("now", &self.now).field("stats", &self.stats()).finish()
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig, gpu: Arc<SimGpu>) -> Result<Engine, SimError> {
        let plan = cfg.memory_plan()?;
        let m = Metrics::new(&cfg);
        Ok(Engine {
            free_blocks: plan.num_gpu_blocks,
            plan,
            cfg,
            gpu,
            now: 0.0,
            next_id: 1,
            reqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix_cache: PrefixCache::new(plan.num_gpu_blocks),
            m,
            pending_events: Vec::new(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    pub fn now(&self) -> f64 {
        self.now
    }

    /// A request arrives now. One longer than `max_model_len` is aborted at once.
    pub fn submit(&mut self, req: SimRequest) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        let prompt = req.prompt_tokens.max(1);
        if u64::from(prompt) + u64::from(req.max_tokens) > u64::from(self.cfg.max_model_len) {
            self.m.success_abort += 1;
            self.pending_events.push(TokenEvent::Finished { id, reason: FinishReason::Abort });
            return id;
        }
        self.reqs.insert(
            id,
            Req {
                orig_prompt: prompt,
                prompt,
                max_tokens: req.max_tokens.max(1),
                block_hashes: req.block_hashes,
                arrival: self.now,
                computed: 0,
                generated: 0,
                blocks: 0,
                first_scheduled: None,
                first_token_at: None,
                last_token_at: self.now,
            },
        );
        self.waiting.push_back(id);
        id
    }

    /// Drops a request (client went away), freeing its KV blocks.
    pub fn abort(&mut self, id: RequestId) {
        if let Some(r) = self.reqs.remove(&id) {
            self.free_blocks += r.blocks;
            self.running.retain(|&x| x != id);
            self.waiting.retain(|&x| x != id);
            self.m.success_abort += 1;
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.pending_events.is_empty()
    }

    /// Advances idle time to `t` (the GPU idles at its current clock).
    pub fn idle_until(&mut self, t: f64) {
        if t > self.now {
            self.gpu.idle_for(t - self.now);
            self.now = t;
        }
    }

    pub fn stats(&self) -> EngineStats {
        let total = self.plan.num_gpu_blocks.max(1);
        EngineStats {
            running: u32::try_from(self.running.len()).unwrap_or(u32::MAX),
            waiting: u32::try_from(self.waiting.len()).unwrap_or(u32::MAX),
            kv_cache_usage: f64::from(total - self.free_blocks) / f64::from(total),
            now: self.now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu::GpuBackend;

    fn engine(cfg: EngineConfig) -> (Engine, Arc<SimGpu>) {
        let gpu = Arc::new(SimGpu::h100(1));
        (Engine::new(cfg, gpu.clone()).expect("fits"), gpu)
    }

    fn req(prompt: u32, out: u32) -> SimRequest {
        SimRequest::new(prompt, out)
    }

    /// A request whose first `shared` tokens are prefix group `group`'s.
    fn grouped(prompt: u32, out: u32, group: u64, shared: u32) -> SimRequest {
        let block_hashes = BlockHasher::with_prefix_group(EngineConfig::default().block_size, group, shared).finish();
        SimRequest { prompt_tokens: prompt, max_tokens: out, block_hashes }
    }

    /// Runs until idle, returning finished ids.
    fn drain(e: &mut Engine) -> usize {
        let mut done = 0;
        while let Some(r) = e.step() {
            done += r.events.iter().filter(|ev| matches!(ev, TokenEvent::Finished { .. })).count();
        }
        done
    }

    #[test]
    fn memory_fit_behaves_like_vllm() {
        let plan = EngineConfig::default().memory_plan().expect("0.9 fits");
        assert!(plan.weights_gib > 14.0 && plan.weights_gib < 15.5, "{plan:?}");
        assert!(plan.num_gpu_blocks > 10_000, "{plan:?}");
        let too_much = EngineConfig { gpu_memory_utilization: 0.995, ..Default::default() };
        assert!(matches!(too_much.memory_plan(), Err(SimError::NotEnoughFree { .. })));
        assert!(EngineConfig { gpu_memory_utilization: 0.98, ..Default::default() }.memory_plan().is_ok());
        let tiny = EngineConfig { gpu_memory_utilization: 0.2, ..Default::default() };
        assert!(matches!(tiny.memory_plan(), Err(SimError::NoCacheBlocks)));
        let big_batch =
            EngineConfig { gpu_memory_utilization: 0.25, max_num_batched_tokens: 65536, ..Default::default() };
        assert!(big_batch.memory_plan().is_err(), "a huge token budget at low utilization fails");
        let long = EngineConfig { gpu_memory_utilization: 0.245, max_model_len: 131072, ..Default::default() };
        assert!(matches!(long.memory_plan(), Err(SimError::KvTooSmall { .. })));
        let e = EngineConfig { block_size: 7, ..Default::default() }.memory_plan().expect_err("bad block");
        assert!(e.to_string().contains("--block-size"), "{e}");
    }

    #[test]
    fn decode_steps_have_realistic_latency_and_respond_to_the_clock() {
        let itl_at = |mhz: u32| {
            let (mut e, gpu) = engine(EngineConfig::default());
            gpu.lock_sm_clock(0, mhz).expect("lock");
            for _ in 0..64 {
                e.submit(req(512, 128));
            }
            drain(&mut e);
            e.m.itl.sum / e.m.itl.count as f64
        };
        let (fast, slow) = (itl_at(1980), itl_at(900));
        assert!(fast > 0.005 && fast < 0.02, "batch-64 ITL {fast}");
        assert!(slow > fast * 1.2, "lower clock slows decode: {fast} vs {slow}");
    }

    #[test]
    fn batch_1_decode_takes_about_7_ms_and_prefill_scales_with_tokens() {
        let (mut e, _) = engine(EngineConfig::default());
        e.submit(req(2000, 10));
        let first = e.step().expect("prefill step");
        assert!(first.prefill_tokens == 2000 && first.seconds > 0.05, "{first:?}");
        let second = e.step().expect("decode step");
        assert!((0.006..0.009).contains(&second.seconds), "{second:?}");
    }

    #[test]
    fn max_num_seqs_limits_the_batch_and_queue_builds() {
        let (mut e, _) = engine(EngineConfig { max_num_seqs: 8, ..Default::default() });
        for _ in 0..20 {
            e.submit(req(100, 50));
        }
        e.step();
        let s = e.stats();
        assert_eq!((s.running, s.waiting), (8, 12));
        assert_eq!(drain(&mut e), 20);
        assert_eq!(e.m.success_length, 20);
        assert_eq!(e.m.generation_tokens, 20 * 50);
    }

    #[test]
    fn kv_exhaustion_preempts_and_everything_still_finishes() {
        let cfg = EngineConfig { gpu_memory_utilization: 0.245, max_model_len: 4096, ..Default::default() };
        let blocks = cfg.memory_plan().expect("fits").num_gpu_blocks;
        let (mut e, _) = engine(cfg);
        let n = blocks * 16 / 1500 + 20;
        for _ in 0..n {
            e.submit(req(500, 1000));
        }
        assert_eq!(u32::try_from(drain(&mut e)), Ok(n));
        assert!(e.m.preemptions > 0, "expected preemptions with {blocks} blocks");
        assert_eq!(e.stats().kv_cache_usage, 0.0, "all blocks freed");
    }

    #[test]
    fn shared_prefixes_hit_the_cache() {
        let (mut e, _) = engine(EngineConfig::default());
        for _ in 0..10 {
            e.submit(grouped(1000, 4, 7, 800));
            drain(&mut e);
        }
        assert_eq!(e.m.prefix_queries, 10_000);
        assert_eq!(e.m.prefix_hits, 9 * 800);
        assert!(e.m.prompt_tokens < 10_000);
    }

    #[test]
    fn cached_blocks_are_the_leading_ones_and_never_the_whole_prompt() {
        let (mut e, _) = engine(EngineConfig::default());
        let prompt = |ids: std::ops::Range<u64>| {
            let mut h = BlockHasher::new(16);
            ids.clone().for_each(|i| h.push_id(i));
            SimRequest {
                prompt_tokens: u32::try_from(ids.end - ids.start).unwrap_or(0),
                max_tokens: 2,
                block_hashes: h.finish(),
            }
        };
        e.submit(prompt(0..64));
        drain(&mut e);
        assert_eq!(e.m.prefix_hits, 0);
        // The same 64 tokens: 4 full blocks cached, but the last token is computed, so 3 hit.
        e.submit(prompt(0..64));
        drain(&mut e);
        assert_eq!(e.m.prefix_hits, 48);
        // 40 shared tokens, then different ones: the 2 full shared blocks hit.
        let mut h = BlockHasher::new(16);
        (0..40).chain(900..940).for_each(|i| h.push_id(i));
        e.submit(SimRequest { prompt_tokens: 80, max_tokens: 2, block_hashes: h.finish() });
        drain(&mut e);
        assert_eq!(e.m.prefix_hits, 48 + 32);
        assert_eq!(e.m.prefix_queries, 64 + 64 + 80);
        // Unknown content neither hits nor is cached.
        let before = e.prefix_cache.len();
        e.submit(req(64, 2));
        drain(&mut e);
        assert_eq!((e.m.prefix_hits, e.prefix_cache.len()), (80, before));
    }

    #[test]
    fn the_prefix_cache_holds_at_most_the_kv_block_count() {
        let cfg = EngineConfig { gpu_memory_utilization: 0.245, max_model_len: 4096, ..Default::default() };
        let (mut e, _) = engine(cfg);
        let blocks = e.plan.num_gpu_blocks as usize;
        for g in 0..(blocks / 200 + 5) as u64 {
            e.submit(grouped(4096 - 8, 1, g, 4096 - 8));
            drain(&mut e);
        }
        assert_eq!(e.prefix_cache.len(), blocks);
    }

    #[test]
    fn too_long_requests_abort_at_once() {
        let (mut e, _) = engine(EngineConfig { max_model_len: 1024, ..Default::default() });
        let id = e.submit(req(1000, 100));
        let r = e.step().expect("event");
        assert_eq!(r.events, vec![TokenEvent::Finished { id, reason: FinishReason::Abort }]);
        assert!(!e.has_work());
    }

    #[test]
    fn metrics_text_is_well_formed_and_parses_as_v1() {
        let (mut e, _) = engine(EngineConfig::default());
        for _ in 0..5 {
            e.submit(req(300, 20));
        }
        drain(&mut e);
        let text = e.metrics_text();
        let snap = vllm_metrics::Snapshot::from_text(&text).expect("parses");
        assert_eq!(snap.generation_tokens_total, Some(100.0));
        assert_eq!(snap.request_success_total, Some(5.0));
        assert_eq!(snap.ttft_seconds.as_ref().map(|h| h.count), Some(5.0));
        assert_eq!(snap.itl_seconds.as_ref().map(|h| h.count), Some(95.0));
        assert!(matches!(snap.version, vllm_metrics::Version::V1));
        assert!(text
            .contains("vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.0"));
    }

    /// Checks the exposition line by line: every sample is `name{labels} value` with a float value,
    /// and each histogram's `+Inf` bucket equals its `_count`.
    fn check_prometheus_text(text: &str) {
        let mut inf = HashMap::new();
        let mut count = HashMap::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = series.split_once('{').unwrap_or_else(|| panic!("no labels: {line}"));
            assert!(labels.ends_with('}'), "unclosed labels: {line}");
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name: {line}"
            );
            for pair in labels.trim_end_matches('}').split(',') {
                let (k, q) = pair.split_once('=').unwrap_or_else(|| panic!("bad label {pair}: {line}"));
                assert!(!k.is_empty() && q.len() >= 2 && q.starts_with('"') && q.ends_with('"'), "bad label: {line}");
            }
            if let Some(base) = name.strip_suffix("_bucket") {
                if labels.contains("le=\"+Inf\"") {
                    inf.insert(base.to_string(), v);
                }
            } else if let Some(base) = name.strip_suffix("_count") {
                count.insert(base.to_string(), v);
            }
        }
        assert_eq!(inf.len(), 7, "seven histograms");
        assert_eq!(inf, count, "+Inf bucket == _count for every histogram");
    }

    #[test]
    fn metrics_text_is_prometheus_text_format() {
        let (mut e, _) = engine(EngineConfig::default());
        check_prometheus_text(&e.metrics_text());
        for i in 0..30 {
            e.submit(grouped(200 + i * 37, 10 + i, 1, 64));
        }
        for _ in 0..20 {
            e.step();
        }
        e.abort(30);
        drain(&mut e);
        let text = e.metrics_text();
        check_prometheus_text(&text);
        for name in [
            "vllm:kv_cache_usage_perc",
            "vllm:num_preemptions_total",
            "vllm:request_queue_time_seconds_sum",
            "vllm:iteration_tokens_total_bucket",
            "vllm:cache_config_info",
            "finished_reason=\"abort\"} 1.0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    /// Steady Poisson-free arrivals (one every 50 ms, 512 in / 128 out) settle into a steady state:
    /// throughput matches the offered load, the queue stays empty, TTFT and ITL are sensible.
    #[test]
    fn steady_load_reaches_a_steady_state() {
        let (mut e, _) = engine(EngineConfig::default());
        let (gap, horizon) = (0.05, 60.0);
        let mut next = 0.0;
        let (mut gen_at_30, mut running_sum, mut samples, mut max_waiting) = (None, 0.0, 0u32, 0);
        while e.now() < horizon {
            while next <= e.now() {
                e.submit(req(512, 128));
                next += gap;
            }
            if e.has_work() {
                e.step();
            } else {
                e.idle_until(next);
            }
            if e.now() >= 30.0 {
                gen_at_30.get_or_insert(e.m.generation_tokens);
                running_sum += f64::from(e.stats().running);
                samples += 1;
                max_waiting = max_waiting.max(e.stats().waiting);
            }
        }
        let tput = (e.m.generation_tokens - gen_at_30.unwrap_or(0)) as f64 / (e.now() - 30.0);
        assert!((tput - 128.0 / gap).abs() < 0.1 * 128.0 / gap, "throughput {tput} tok/s");
        let mean_running = running_sum / f64::from(samples);
        assert!((10.0..60.0).contains(&mean_running), "running {mean_running}");
        assert!(max_waiting <= 2, "queue stays short: {max_waiting}");
        let ttft = e.m.ttft.sum / e.m.ttft.count as f64;
        let itl = e.m.itl.sum / e.m.itl.count as f64;
        eprintln!("steady 20 req/s: {tput:.0} tok/s, running {mean_running:.1}, TTFT {ttft:.4} s, ITL {itl:.4} s");
        assert!(ttft > 0.01 && ttft < 0.1, "TTFT {ttft}");
        assert!(itl > 0.006 && itl < 0.02, "ITL {itl}");
        assert_eq!(e.m.preemptions, 0);
    }

    #[test]
    fn idle_time_costs_idle_energy() {
        let (mut e, gpu) = engine(EngineConfig::default());
        e.idle_until(10.0);
        assert_eq!(e.now(), 10.0);
        let j = gpu.sample(0).expect("sample").energy_j;
        let want = 10.0 * gpu.idle_watts(crate::gpu::MIN_MHZ);
        assert!((j - want).abs() < 1e-6, "driver-managed idle at the lowest clock: {j} vs {want}");
    }

    /// Throughput figure and step rate: `cargo test --release -p gpu-agent engine_speed -- --nocapture`.
    #[test]
    fn engine_speed() {
        let (mut e, _) = engine(EngineConfig::default());
        for _ in 0..64 {
            e.submit(req(512, 256));
        }
        let t0 = std::time::Instant::now();
        let mut steps = 0;
        while e.step().is_some() {
            steps += 1;
        }
        let wall = t0.elapsed().as_secs_f64();
        let tokens = e.m.generation_tokens as f64;
        eprintln!(
            "batch 64: {:.0} output tokens/s simulated; {steps} steps in {:.1} ms ({:.0} steps/s)",
            tokens / e.now(),
            wall * 1e3,
            f64::from(steps) / wall
        );
        assert!(tokens / e.now() > 2000.0);
    }
}
