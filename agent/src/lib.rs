//! gpu-agent: a sidecar for vLLM that governs GPU clocks, tunes server flags and advises replicas.

pub mod advisor;
pub mod config;
pub mod control;
pub mod daemon;
pub mod gpu;
pub mod governor;
pub mod http;
pub mod profile;
pub mod sim;
pub mod store;
pub mod tuner;
pub mod vllm;
