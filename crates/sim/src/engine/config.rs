//! The engine's flags, as vLLM's server takes them (defaults are vLLM's for an H100).

use serde::Serialize;

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
