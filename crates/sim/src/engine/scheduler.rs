//! The scheduler: one vLLM V1 iteration per [`Engine::step`] (running requests first, then
//! waiting ones while seats, token budget and KV blocks last; recompute preemption when blocks
//! run out), its cost on the simulated GPU, and the tokens it produces.

use super::{
    Engine, FinishReason, RequestId, StepReport, TokenEvent, BANDWIDTH, DECODE_VISIBLE_FLOPS, FLOPS,
    KV_BYTES_PER_TOKEN, LAYERS_X_HIDDEN, PARAMS, PER_SEQ_OVERHEAD_S, STEP_OVERHEAD_S, WEIGHT_BYTES,
};
use crate::gpu::Work;

impl Engine {
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
        while budget > 0 && u32::try_from(self.running.len()).unwrap_or(u32::MAX) < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let Some(r) = self.reqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let mut cached = 0;
            if r.computed == 0 && self.cfg.enable_prefix_caching {
                // Only whole blocks hit, and the last prompt token is always computed (for its
                // logits), as vLLM caps a hit at the prompt less one token.
                let max = usize::try_from((r.prompt - 1) / self.cfg.block_size).unwrap_or(usize::MAX);
                let hit = self.prefix_cache.lookup(&r.block_hashes, max);
                cached = u32::try_from(hit).unwrap_or(u32::MAX).saturating_mul(self.cfg.block_size);
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
                    if self.cfg.enable_prefix_caching {
                        self.prefix_cache.insert(&r.block_hashes);
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
}
