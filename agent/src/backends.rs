//! What this build can run on, chosen from the config: the one place that looks at the
//! optional features. `nvml` brings the real GPU; `simulate` brings the simulator's H100, the
//! simulated vLLM of `--simulate` and the in-process trial servers of `tune --launch sim`.
//! A build without a feature answers a request for it with a one-line error naming it.

use std::sync::Arc;

use gpu::{GpuBackend, GpuError};
use tuner::ServerFactory;

use crate::config::GpuBackendKind;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{what} needs a gpu-agent built with the `{feature}` feature")]
    NotBuilt { what: &'static str, feature: &'static str },
    #[cfg(feature = "simulate")]
    #[error("simulated vLLM failed to start")]
    Simulation(#[source] sim::server::ServerError),
}

/// Opens the GPU backend; `indices` are the GPUs the agent must see (empty: all of them).
pub fn open_gpu(kind: GpuBackendKind, indices: &[u32]) -> Result<Arc<dyn GpuBackend>, BackendError> {
    match kind {
        GpuBackendKind::Nvml => open_nvml(indices),
        GpuBackendKind::Sim => open_sim(indices),
    }
}

#[cfg(feature = "nvml")]
fn open_nvml(indices: &[u32]) -> Result<Arc<dyn GpuBackend>, BackendError> {
    Ok(Arc::new(gpu::nvml::NvmlGpu::open(indices)?))
}

#[cfg(not(feature = "nvml"))]
fn open_nvml(_: &[u32]) -> Result<Arc<dyn GpuBackend>, BackendError> {
    Err(BackendError::NotBuilt { what: "gpu.backend = \"nvml\"", feature: "nvml" })
}

#[cfg(feature = "simulate")]
fn open_sim(indices: &[u32]) -> Result<Arc<dyn GpuBackend>, BackendError> {
    let count = indices.iter().max().map_or(1, |m| m + 1);
    Ok(Arc::new(sim::gpu::SimGpu::free_running(count)))
}

#[cfg(not(feature = "simulate"))]
fn open_sim(_: &[u32]) -> Result<Arc<dyn GpuBackend>, BackendError> {
    Err(BackendError::NotBuilt { what: "gpu.backend = \"sim\"", feature: "simulate" })
}

/// Where `tune --launch sim` trials run, when this build has the simulator.
pub fn in_process_servers() -> Option<Arc<dyn ServerFactory>> {
    #[cfg(feature = "simulate")]
    return Some(Arc::new(sim::tune::VirtualServers));
    #[cfg(not(feature = "simulate"))]
    None
}

/// The world of `--simulate`: a simulated GPU, a simulated vLLM on loopback and a load.
#[cfg(feature = "simulate")]
pub use sim::world::Simulation;

/// Starts the world of `--simulate` with `gpus` tensor-parallel GPUs.
#[cfg(feature = "simulate")]
pub async fn start_simulation(gpus: usize) -> Result<Simulation, BackendError> {
    Simulation::start(gpus).await.map_err(BackendError::Simulation)
}

/// This build has no simulator, so no simulation can exist.
#[cfg(not(feature = "simulate"))]
#[derive(Debug)]
pub enum Simulation {}

#[cfg(not(feature = "simulate"))]
impl Simulation {
    pub fn gpu(&self) -> Arc<dyn GpuBackend> {
        match *self {}
    }
    pub fn base_url(&self) -> String {
        match *self {}
    }
    pub fn metrics_url(&self) -> String {
        match *self {}
    }
}

#[cfg(not(feature = "simulate"))]
pub async fn start_simulation(_: usize) -> Result<Simulation, BackendError> {
    Err(BackendError::NotBuilt { what: "--simulate", feature: "simulate" })
}
