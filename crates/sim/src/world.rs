//! `gpu-agent --simulate`: a simulated H100, a simulated vLLM on a loopback port and a
//! built-in varying load, so the whole agent runs on a laptop exactly as it would in a pod.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::engine::EngineConfig;
use crate::gpu::SimGpu;
use crate::server::{ServerError, SimServer};
use gpu::GpuBackend;
use loadgen::Schedule;

#[derive(Debug)]
pub struct Simulation {
    gpu: Arc<SimGpu>,
    server: SimServer,
    load: JoinHandle<()>,
}

impl Simulation {
    /// Starts the simulated vLLM with `gpus` tensor-parallel GPUs and loops the demo load.
    pub async fn start(gpus: usize) -> Result<Simulation, ServerError> {
        let gpu = Arc::new(SimGpu::h100(u32::try_from(gpus.max(1)).unwrap_or(u32::MAX)));
        let cfg = EngineConfig::default();
        let model = cfg.model_name.clone();
        let server = SimServer::start(cfg, gpu.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let base = format!("http://{}", server.local_addr());
        let load = tokio::spawn(async move {
            let schedule = Schedule::demo();
            for round in 0u64.. {
                let report = loadgen::run_http(&base, &model, &schedule, round, &loadgen::LoadOptions::default()).await;
                match report {
                    Ok(r) => info!(round, completed = r.completed, failed = r.failed, "demo load round finished"),
                    Err(e) => warn!(error = %e, "demo load round failed"),
                }
            }
        });
        Ok(Simulation { gpu, server, load })
    }

    pub fn gpu(&self) -> Arc<dyn GpuBackend> {
        self.gpu.clone()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.local_addr())
    }

    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.base_url())
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        self.load.abort();
    }
}
