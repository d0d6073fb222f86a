//! gpu-agent: a sidecar for vLLM that governs GPU clocks, tunes server flags and advises replicas.

pub mod config;
pub mod daemon;
pub mod gpu;
pub mod http;
pub mod sim;
pub mod vllm;
