//! Where `--launch sim` trials run ([`VirtualServers`], the tuner's [`ServerFactory`]): the
//! same simulated vLLM engine `vllm-sim` serves, run in-process in virtual time, so a whole
//! study takes seconds instead of hours. Flags map to the engine's config exactly as `vllm-sim`
//! maps them; a flag the simulator does not model is an error, as vLLM's parser would make it.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpu::GpuBackend;
use loadgen::{LatencyLimits, LoadReport, RequestRate, Schedule};
use tuner::server::{BoxFuture, LoadRun, RunError, ServerFactory, StartRequest, TrialServer};
use tuner::trial::StartFailure;
use vllm_metrics::Snapshot;

use crate::drive::{Driver, Until};
use crate::engine::{Engine, EngineConfig};
use crate::flags::engine_config;
use crate::gpu::SimGpu;

/// Virtual seconds after which a run is cut (its unfinished requests count as failed).
const MAX_VIRTUAL_S: f64 = 3600.0;

/// The tuner's in-process servers: each start is a [`VirtualServer`].
#[derive(Debug, Default, Clone, Copy)]
pub struct VirtualServers;

impl ServerFactory for VirtualServers {
    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<Box<dyn TrialServer>, StartFailure>> {
        let started = VirtualServer::start(req.model, req.flags);
        Box::pin(async move { started.map(|s| Box::new(s) as Box<dyn TrialServer>) })
    }

    fn gpu_name(&self) -> Option<String> {
        Some("NVIDIA H100 80GB HBM3 (simulated)".into())
    }
}

impl TrialServer for VirtualServer {
    fn run(&self, run: LoadRun) -> BoxFuture<'_, Result<(LoadReport, Option<f64>), RunError>> {
        let server = self.clone();
        Box::pin(async move {
            // Seconds of CPU: off the async workers (the daemon's loop shares them).
            tokio::task::spawn_blocking(move || server.run(&run.schedule, run.seed, run.prefix_tokens, &run.slo))
                .await
                .map_err(|e| RunError::Simulation(format!("simulation task: {e}")))?
                .map_err(|e| RunError::Simulation(e.to_string()))
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A configured simulated server: checks the memory plan like `vllm-sim` at startup.
#[derive(Debug, Clone)]
pub struct VirtualServer {
    cfg: EngineConfig,
    clock: Option<u32>,
}

impl VirtualServer {
    pub fn start(model: &str, flags: &BTreeMap<String, String>) -> Result<VirtualServer, StartFailure> {
        let (cfg, clock) = engine_config(model, flags).map_err(|e| StartFailure::Invalid(e.to_string()))?;
        cfg.memory_plan().map_err(|e| {
            let msg = e.to_string();
            if msg.contains("memory") || msg.contains("KV cache") {
                StartFailure::OutOfMemory(msg)
            } else {
                StartFailure::Invalid(msg)
            }
        })?;
        Ok(VirtualServer { cfg, clock })
    }

    /// One load run in virtual time on a fresh engine, driven to the load's end ([`Driver`]);
    /// returns the report and the prefix-cache hit rate.
    pub fn run(
        &self,
        schedule: &Schedule,
        seed: u64,
        prefix_tokens: u32,
        slo: &LatencyLimits,
    ) -> Result<(LoadReport, Option<f64>), StartFailure> {
        let gpu = Arc::new(SimGpu::h100(self.cfg.tensor_parallel_size.max(1)));
        if let Some(mhz) = self.clock {
            for i in 0..self.cfg.tensor_parallel_size.max(1) {
                gpu.lock_sm_clock(i, mhz).map_err(|e| StartFailure::Invalid(format!("--sim-sm-clock: {e}")))?;
            }
        }
        let engine = Engine::new(self.cfg.clone(), gpu).map_err(|e| StartFailure::Invalid(e.to_string()))?;
        let mut driver = Driver::new(engine).with_shared_prefix(prefix_tokens).tracking_outcomes();
        driver.extend(schedule.arrivals(seed));
        driver.advance(Until::Drained { deadline_s: MAX_VIRTUAL_S });
        let end = driver.now();
        let done = driver.take_outcomes("cancelled at the run's deadline");
        let first_at = schedule.arrivals(seed).next().map_or(0.0, |a| a.at_s);
        let rate = if schedule.is_infinite_rate() {
            RequestRate::Infinite
        } else {
            RequestRate::PerSecond(schedule.expected_requests() / schedule.duration_s().max(1e-9))
        };
        let report = LoadReport::from_outcomes(&done, (end - first_at).max(1e-9), rate, None, slo);
        let hit = Snapshot::from_text(&driver.engine().metrics_text()).ok().and_then(|s| {
            let q = s.prefix_cache_queries_total?;
            (q > 0.0).then(|| s.prefix_cache_hits_total.unwrap_or(0.0) / q)
        });
        Ok((report, hit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loadgen::LengthDist;

    fn flags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn maps_flags_and_refuses_unknown_ones_and_oom() {
        let (c, clock) = engine_config(
            "m",
            &flags(&[("max-num-seqs", "32"), ("enable-prefix-caching", "false"), ("sim-sm-clock", "1410")]),
        )
        .expect("ok");
        assert_eq!((c.max_num_seqs, c.enable_prefix_caching, clock), (32, false, Some(1410)));
        let e = VirtualServer::start("m", &flags(&[("speculative-config", "x")])).expect_err("unknown");
        assert!(matches!(e, StartFailure::Invalid(ref m) if m.contains("--speculative-config")), "{e:?}");
        let e = VirtualServer::start("m", &flags(&[("gpu-memory-utilization", "0.995")])).expect_err("does not fit");
        assert!(matches!(e, StartFailure::OutOfMemory(_)), "{e:?}");
    }

    #[test]
    fn virtual_time_run_reports_like_the_http_driver() {
        let s = VirtualServer::start("m", &flags(&[("max-num-seqs", "8")])).expect("starts");
        let sched = Schedule::infinite_rate(40, LengthDist::Fixed(256), LengthDist::Fixed(32));
        let (r, hit) = s.run(&sched, 1, 128, &LatencyLimits::default()).expect("runs");
        assert_eq!((r.completed, r.failed), (40, 0));
        assert_eq!(r.total_output_tokens, 40 * 32);
        assert!(r.p99_e2el_ms > r.median_e2el_ms && r.p99_ttft_ms > 0.0);
        // 8 seats for 40 requests: the last wait for four rounds.
        assert!(r.p99_ttft_ms > 3.0 * r.median_tpot_ms * 32.0, "{} vs {}", r.p99_ttft_ms, r.median_tpot_ms);
        assert!(hit.is_some_and(|h| h > 0.3), "{hit:?}");
        let more = VirtualServer::start("m", &flags(&[("max-num-seqs", "64")])).expect("starts");
        let (r2, _) = more.run(&sched, 1, 128, &LatencyLimits::default()).expect("runs");
        assert!(r2.request_throughput > r.request_throughput * 1.5);
    }
}
