//! A virtual-time model of vLLM V1 serving a Llama-3.1-8B-shaped model on the simulated H100:
//! memory plan (fails to start like vLLM), continuous batching with chunked prefill under
//! `max_num_seqs` / `max_num_batched_tokens`, paged KV blocks with preemption, prefix caching,
//! and vLLM's own `/metrics`. Step times come from the simulated GPU, so they follow its clock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::gpu::{SimGpu, Work};

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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineConfig {
    pub model_name: String,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub gpu_memory_utilization: f64,
    pub block_size: u32,
    pub max_model_len: u32,
    pub enable_prefix_caching: bool,
    /// Memory of one GPU as the CUDA runtime reports it.
    pub gpu_total_gib: f64,
    /// Memory other processes already hold on the GPU.
    pub other_used_gib: f64,
    /// GPUs the model is sharded over (each holds 1/n of weights and KV).
    pub tensor_parallel_size: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_name: "meta-llama/Llama-3.1-8B-Instruct".into(),
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            max_model_len: 8192,
            enable_prefix_caching: true,
            gpu_total_gib: 79.2,
            other_used_gib: 0.5,
            tensor_parallel_size: 1,
        }
    }
}

/// Startup failures, worded as vLLM words them.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("ValueError: {flag} must be {what}, got {value}")]
    InvalidFlag { flag: &'static str, what: &'static str, value: String },
    #[error("ValueError: Free memory on device ({free:.2}/{total:.2} GiB) on startup is less than desired GPU memory utilization ({util}, {wanted:.2} GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.")]
    NotEnoughFree { free: f64, total: f64, util: f64, wanted: f64 },
    #[error("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.")]
    NoCacheBlocks,
    #[error("ValueError: The model's max seq len ({max_model_len}) is larger than the maximum number of tokens that can be stored in KV cache ({kv_tokens}). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.")]
    KvTooSmall { max_model_len: u32, kv_tokens: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub weights_gib: f64,
    pub activation_gib: f64,
    pub kv_cache_gib: f64,
    pub num_gpu_blocks: u32,
}

impl EngineConfig {
    /// What vLLM's startup profiling would find, or the error it would stop with.
    pub fn memory_plan(&self) -> Result<MemoryPlan, SimError> {
        let bad = |flag, what, value: String| Err(SimError::InvalidFlag { flag, what, value });
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs", "at least 1", self.max_num_seqs.to_string());
        }
        if self.max_num_batched_tokens == 0 {
            return bad("--max-num-batched-tokens", "at least 1", self.max_num_batched_tokens.to_string());
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return bad("--gpu-memory-utilization", "in (0, 1]", self.gpu_memory_utilization.to_string());
        }
        if ![8, 16, 32, 64, 128].contains(&self.block_size) {
            return bad("--block-size", "one of 8, 16, 32, 64, 128", self.block_size.to_string());
        }
        if self.max_model_len == 0 {
            return bad("--max-model-len", "at least 1", self.max_model_len.to_string());
        }
        if self.tensor_parallel_size == 0 {
            return bad("--tensor-parallel-size", "at least 1", self.tensor_parallel_size.to_string());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad("--max-num-batched-tokens", "at least --max-num-seqs", self.max_num_batched_tokens.to_string());
        }
        let tp = f64::from(self.tensor_parallel_size);
        let free = self.gpu_total_gib - self.other_used_gib;
        let wanted = self.gpu_memory_utilization * self.gpu_total_gib;
        if wanted > free {
            return Err(SimError::NotEnoughFree {
                free,
                total: self.gpu_total_gib,
                util: self.gpu_memory_utilization,
                wanted,
            });
        }
        let weights_gib = WEIGHT_BYTES / tp / GIB;
        // Profile-run peak: grows with the token budget; CUDA graphs and the sampler with seqs.
        let activation_gib =
            0.6 + f64::from(self.max_num_batched_tokens) * 0.000_3 + f64::from(self.max_num_seqs) * 0.002;
        let kv_cache_gib = wanted - weights_gib - activation_gib;
        let block_bytes = f64::from(self.block_size) * KV_BYTES_PER_TOKEN / tp;
        if kv_cache_gib <= 0.0 || kv_cache_gib * GIB < block_bytes {
            return Err(SimError::NoCacheBlocks);
        }
        let num_gpu_blocks = (kv_cache_gib * GIB / block_bytes) as u32;
        let kv_tokens = u64::from(num_gpu_blocks) * u64::from(self.block_size);
        if kv_tokens < u64::from(self.max_model_len) {
            return Err(SimError::KvTooSmall { max_model_len: self.max_model_len, kv_tokens });
        }
        Ok(MemoryPlan { weights_gib, activation_gib, kv_cache_gib, num_gpu_blocks })
    }
}

pub type RequestId = u64;

#[derive(Debug, Clone)]
pub struct SimRequest {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Requests with the same prefix id share their first `prefix_tokens` tokens.
    pub prefix_id: Option<u64>,
    pub prefix_tokens: u32,
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

/// A Prometheus histogram with fixed bounds.
#[derive(Debug, Clone)]
struct Hist {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Hist {
    fn new(bounds: Vec<f64>) -> Hist {
        Hist { counts: vec![0; bounds.len()], bounds, count: 0, sum: 0.0 }
    }
    fn observe(&mut self, v: f64) {
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
struct Req {
    /// Prompt as submitted (`prompt` grows by the output kept across a preemption).
    orig_prompt: u32,
    prompt: u32,
    max_tokens: u32,
    prefix_id: Option<u64>,
    prefix_tokens: u32,
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

#[derive(Debug)]
struct Metrics {
    prompt_tokens: u64,
    generation_tokens: u64,
    success_length: u64,
    success_abort: u64,
    preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    ttft: Hist,
    itl: Hist,
    e2e: Hist,
    queue: Hist,
    prompt_hist: Hist,
    gen_hist: Hist,
    iteration: Hist,
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
    cached_prefixes: HashSet<u64>,
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
        let m = Metrics {
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
        };
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
            cached_prefixes: HashSet::new(),
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
                prefix_id: req.prefix_id,
                prefix_tokens: req.prefix_tokens.min(prompt),
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

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Grows `id`'s KV allocation to hold `tokens`; false when the blocks are not there.
    fn reserve(&mut self, id: RequestId, tokens: u32) -> bool {
        let need = self.blocks_for(tokens);
        let Some(r) = self.reqs.get(&id) else { return false };
        let extra = need.saturating_sub(r.blocks);
        if extra > self.free_blocks {
            return false;
        }
        self.free_blocks -= extra;
        if let Some(r) = self.reqs.get_mut(&id) {
            r.blocks += extra;
        }
        true
    }

    /// Recompute-style preemption (vLLM V1): the request goes back to the queue's front.
    fn preempt(&mut self, id: RequestId) {
        self.running.retain(|&x| x != id);
        if let Some(r) = self.reqs.get_mut(&id) {
            self.free_blocks += r.blocks;
            r.blocks = 0;
            r.computed = 0;
            // Generated tokens are kept and recomputed with the prompt.
            r.prompt += r.generated;
            r.max_tokens -= r.generated;
            r.generated = 0;
        }
        self.waiting.push_front(id);
        self.m.preemptions += 1;
    }

    /// One scheduler iteration, if there is work; advances virtual time by its duration.
    pub fn step(&mut self) -> Option<StepReport> {
        if !self.has_work() {
            return None;
        }
        let started_at = self.now;
        let mut events = std::mem::take(&mut self.pending_events);
        let mut budget = self.cfg.max_num_batched_tokens;
        // (id, tokens scheduled this step)
        let mut scheduled: Vec<(RequestId, u32)> = Vec::with_capacity(self.running.len() + 8);

        // 1. Running requests, oldest first: decodes take one token, partial prefills a chunk.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (want, ctx) = match self.reqs.get(&id) {
                Some(r) if r.in_decode() => (1, r.context() + 1),
                Some(r) => {
                    let chunk = (r.prompt - r.computed).min(budget);
                    (chunk, r.computed + chunk)
                }
                None => {
                    i += 1;
                    continue;
                }
            };
            if self.reserve(id, ctx) {
                scheduled.push((id, want));
                budget -= want;
                i += 1;
                continue;
            }
            // Out of KV blocks: preempt the newest running request (maybe this one).
            let Some(&victim) = self.running.last() else { break };
            scheduled.retain(|&(s, _)| s != victim);
            self.preempt(victim);
            if victim == id {
                continue; // `i` now points at the next request
            }
        }

        // 2. Waiting requests, first come first served, while seats, budget and blocks last.
        while budget > 0 && (self.running.len() as u32) < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let Some(r) = self.reqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let mut cached = 0;
            if r.computed == 0 && self.cfg.enable_prefix_caching {
                if let Some(p) = r.prefix_id {
                    if self.cached_prefixes.contains(&p) {
                        // Only whole blocks hit, and the last prompt token is always computed.
                        cached = (r.prefix_tokens / self.cfg.block_size * self.cfg.block_size).min(r.prompt - 1);
                    }
                }
            }
            let start = r.computed.max(cached);
            let chunk = (r.prompt - start).min(budget);
            if !self.reserve(id, start + chunk) {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            if let Some(r) = self.reqs.get_mut(&id) {
                if r.first_scheduled.is_none() {
                    r.first_scheduled = Some(self.now);
                    self.m.queue.observe(self.now - r.arrival);
                    if self.cfg.enable_prefix_caching {
                        self.m.prefix_queries += u64::from(r.prompt);
                        self.m.prefix_hits += u64::from(cached);
                    }
                }
                r.computed = start;
            }
            scheduled.push((id, chunk));
            budget -= chunk;
        }

        // 3. Cost of the step on the GPU.
        let (mut prefill, mut decode, mut ctx_tokens, mut attn_flops) = (0u32, 0u32, 0f64, 0f64);
        for &(id, n) in &scheduled {
            if let Some(r) = self.reqs.get(&id) {
                if r.in_decode() {
                    decode += n;
                } else {
                    prefill += n;
                    attn_flops += 4.0 * LAYERS_X_HIDDEN * f64::from(n) * (f64::from(r.computed) + f64::from(n) / 2.0);
                }
                ctx_tokens += f64::from(r.context() + n);
            }
        }
        let tokens = f64::from(prefill + decode);
        let tp = f64::from(self.cfg.tensor_parallel_size);
        let work = Work {
            compute_s: ((2.0 * PARAMS * f64::from(prefill) + attn_flops) / FLOPS
                + 2.0 * PARAMS * f64::from(decode) / DECODE_VISIBLE_FLOPS)
                / tp,
            memory_s: (WEIGHT_BYTES + ctx_tokens * KV_BYTES_PER_TOKEN) / BANDWIDTH / tp,
        };
        let overhead = STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * scheduled.len() as f64;
        let (seconds, joules) = if scheduled.is_empty() {
            // Only pending events to deliver: no GPU work.
            (0.0, 0.0)
        } else {
            self.gpu.idle_for(overhead);
            let cost = self.gpu.execute(work);
            (overhead + cost.seconds, cost.joules + overhead * self.gpu.idle_watts(self.gpu.clock_mhz()))
        };
        self.now += seconds;
        let now = self.now;
        if !scheduled.is_empty() {
            self.m.iteration.observe(tokens);
        }

        // 4. Tokens produced at the end of the step.
        for (id, n) in scheduled {
            let Some(r) = self.reqs.get_mut(&id) else { continue };
            let produces = if r.in_decode() {
                true
            } else {
                r.computed += n;
                self.m.prompt_tokens += u64::from(n);
                if r.computed >= r.prompt {
                    if let Some(p) = r.prefix_id {
                        self.cached_prefixes.insert(p);
                    }
                    true
                } else {
                    false
                }
            };
            if !produces {
                continue;
            }
            r.generated += 1;
            self.m.generation_tokens += 1;
            if r.first_token_at.is_none() {
                r.first_token_at = Some(now);
                self.m.ttft.observe(now - r.arrival);
                events.push(TokenEvent::First { id });
            } else {
                self.m.itl.observe(now - r.last_token_at);
                events.push(TokenEvent::Token { id });
            }
            r.last_token_at = now;
            if r.generated >= r.max_tokens {
                events.push(TokenEvent::Finished { id, reason: FinishReason::Length });
            }
        }
        for ev in &events {
            if let TokenEvent::Finished { id, reason: FinishReason::Length } = ev {
                if let Some(r) = self.reqs.remove(id) {
                    self.free_blocks += r.blocks;
                    self.running.retain(|x| x != id);
                    self.m.success_length += 1;
                    self.m.e2e.observe(now - r.arrival);
                    self.m.prompt_hist.observe(f64::from(r.orig_prompt));
                    self.m.gen_hist.observe(f64::from(r.prompt + r.generated - r.orig_prompt));
                }
            }
        }
        Some(StepReport { started_at, seconds, joules, prefill_tokens: prefill, decode_tokens: decode, events })
    }

    pub fn stats(&self) -> EngineStats {
        let total = self.plan.num_gpu_blocks.max(1);
        EngineStats {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            kv_cache_usage: f64::from(total - self.free_blocks) / f64::from(total),
            now: self.now,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use gpu::GpuBackend;

    fn engine(cfg: EngineConfig) -> (Engine, Arc<SimGpu>) {
        let gpu = Arc::new(SimGpu::h100(1));
        (Engine::new(cfg, gpu.clone()).expect("fits"), gpu)
    }

    fn req(prompt: u32, out: u32) -> SimRequest {
        SimRequest { prompt_tokens: prompt, max_tokens: out, prefix_id: None, prefix_tokens: 0 }
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
        assert_eq!(drain(&mut e) as u32, n);
        assert!(e.m.preemptions > 0, "expected preemptions with {blocks} blocks");
        assert_eq!(e.stats().kv_cache_usage, 0.0, "all blocks freed");
    }

    #[test]
    fn shared_prefixes_hit_the_cache() {
        let (mut e, _) = engine(EngineConfig::default());
        for _ in 0..10 {
            e.submit(SimRequest { prompt_tokens: 1000, max_tokens: 4, prefix_id: Some(7), prefix_tokens: 800 });
            drain(&mut e);
        }
        assert_eq!(e.m.prefix_queries, 10_000);
        assert_eq!(e.m.prefix_hits, 9 * 800);
        assert!(e.m.prompt_tokens < 10_000);
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
            e.submit(SimRequest {
                prompt_tokens: 200 + i * 37,
                max_tokens: 10 + i,
                prefix_id: Some(1),
                prefix_tokens: 64,
            });
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
