//! Memory: the startup plan that fails like vLLM's profiling run when the model does not fit,
//! and the paged KV blocks the scheduler hands out.

use serde::Serialize;

use super::{Engine, EngineConfig, RequestId, GIB, KV_BYTES_PER_TOKEN, WEIGHT_BYTES};

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
        let num_gpu_blocks = crate::saturating_u32(kv_cache_gib * GIB / block_bytes);
        let kv_tokens = u64::from(num_gpu_blocks) * u64::from(self.block_size);
        if kv_tokens < u64::from(self.max_model_len) {
            return Err(SimError::KvTooSmall { max_model_len: self.max_model_len, kv_tokens });
        }
        Ok(MemoryPlan { weights_gib, activation_gib, kv_cache_gib, num_gpu_blocks })
    }
}

impl Engine {
    pub(super) fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Grows `id`'s KV allocation to hold `tokens`; false when the blocks are not there.
    pub(super) fn reserve(&mut self, id: RequestId, tokens: u32) -> bool {
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
}
