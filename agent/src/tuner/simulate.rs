//! The `sim` evaluator (`--launch sim`): the same simulated vLLM engine `vllm-sim` serves, run
//! in-process in virtual time, so a whole study takes seconds instead of hours. Flags map to the
//! engine's config exactly as `vllm-sim` maps them; a flag the simulator does not model is an
//! error, as vLLM's parser would make it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::trial::StartFailure;
use crate::gpu::sim::SimGpu;
use crate::gpu::GpuBackend;
use crate::sim::engine::{Engine, EngineConfig, FinishReason, SimRequest, TokenEvent};
use crate::sim::load::{LoadReport, RequestOutcome, RequestRate, Schedule, Slo};
use crate::vllm::Snapshot;

/// Virtual seconds after which a run is cut (its unfinished requests count as failed).
const MAX_VIRTUAL_S: f64 = 3600.0;

/// Prefix-cache group of the shared prompt prefix (as the HTTP load driver sends it).
const PREFIX_ID: u64 = 1;

/// Flags (name without dashes -> value) to the engine config `vllm-sim` would build, plus the
/// simulated clock lock, if any.
pub fn engine_config(model: &str, flags: &BTreeMap<String, String>) -> Result<(EngineConfig, Option<u32>), StartFailure> {
    let mut c = EngineConfig { model_name: model.to_string(), ..EngineConfig::default() };
    let mut clock = None;
    for (name, value) in flags {
        let bad = || StartFailure::Invalid(format!("argument --{name}: invalid value `{value}`"));
        let num = || value.parse::<f64>().map_err(|_| bad());
        let int = || value.parse::<u32>().map_err(|_| bad());
        match name.replace('_', "-").as_str() {
            "max-num-seqs" => c.max_num_seqs = int()?,
            "max-num-batched-tokens" => c.max_num_batched_tokens = int()?,
            "gpu-memory-utilization" => c.gpu_memory_utilization = num()?,
            "block-size" => c.block_size = int()?,
            "max-model-len" => c.max_model_len = int()?,
            "tensor-parallel-size" => c.tensor_parallel_size = int()?,
            "enable-prefix-caching" => c.enable_prefix_caching = value.parse::<bool>().map_err(|_| bad())?,
            "sim-other-used-gib" => c.other_used_gib = num()?,
            "sim-sm-clock" => clock = Some(int()?),
            // Accepted by vllm-sim and without effect there.
            "dtype" | "kv-cache-dtype" | "seed" | "swap-space" | "enforce-eager" | "served-model-name" => {}
            other => return Err(StartFailure::Invalid(format!("vllm-sim: error: unrecognized arguments: --{other}"))),
        }
    }
    Ok((c, clock))
}

/// A configured simulated server: checks the memory plan like `vllm-sim` at startup.
#[derive(Debug, Clone)]
pub struct SimServer {
    cfg: EngineConfig,
    clock: Option<u32>,
}

impl SimServer {
    pub fn start(model: &str, flags: &BTreeMap<String, String>) -> Result<SimServer, StartFailure> {
        let (cfg, clock) = engine_config(model, flags)?;
        cfg.memory_plan().map_err(|e| {
            let msg = e.to_string();
            if msg.contains("memory") || msg.contains("KV cache") {
                StartFailure::OutOfMemory(msg)
            } else {
                StartFailure::Invalid(msg)
            }
        })?;
        Ok(SimServer { cfg, clock })
    }

    /// One load run in virtual time on a fresh engine; returns the report and the prefix-cache
    /// hit rate.
    pub fn run(&self, schedule: &Schedule, seed: u64, prefix_tokens: u32, slo: &Slo) -> Result<(LoadReport, Option<f64>), StartFailure> {
        let gpu = Arc::new(SimGpu::h100(self.cfg.tensor_parallel_size.max(1)));
        if let Some(mhz) = self.clock {
            for i in 0..self.cfg.tensor_parallel_size.max(1) {
                gpu.lock_sm_clock(i, mhz).map_err(|e| StartFailure::Invalid(format!("--sim-sm-clock: {e}")))?;
            }
        }
        let mut engine = Engine::new(self.cfg.clone(), gpu).map_err(|e| StartFailure::Invalid(e.to_string()))?;
        let mut arrivals = schedule.arrivals(seed).peekable();
        // id -> (arrival time, outcome so far, time of the last token)
        let mut live: HashMap<u64, (f64, RequestOutcome, f64)> = HashMap::new();
        let mut done: Vec<RequestOutcome> = Vec::new();
        loop {
            while let Some(a) = arrivals.peek() {
                if a.at_s > engine.now() {
                    break;
                }
                let shared = prefix_tokens.min(a.prompt_tokens.saturating_sub(1));
                let id = engine.submit(SimRequest {
                    prompt_tokens: a.prompt_tokens,
                    max_tokens: a.max_tokens,
                    prefix_id: (shared > 0).then_some(PREFIX_ID),
                    prefix_tokens: shared,
                });
                live.insert(id, (a.at_s, RequestOutcome { prompt_tokens: a.prompt_tokens, ..Default::default() }, a.at_s));
                arrivals.next();
            }
            if engine.now() > MAX_VIRTUAL_S {
                break;
            }
            match engine.step() {
                Some(step) => {
                    let now = engine.now();
                    for ev in step.events {
                        match ev {
                            TokenEvent::First { id } => {
                                if let Some((at, o, last)) = live.get_mut(&id) {
                                    o.ttft = now - *at;
                                    o.output_tokens = 1;
                                    *last = now;
                                }
                            }
                            TokenEvent::Token { id } => {
                                if let Some((_, o, last)) = live.get_mut(&id) {
                                    o.itl.push(now - *last);
                                    o.output_tokens += 1;
                                    *last = now;
                                }
                            }
                            TokenEvent::Finished { id, reason } => {
                                if let Some((at, mut o, _)) = live.remove(&id) {
                                    if reason == FinishReason::Length {
                                        o.e2el = now - at;
                                        o.success = true;
                                    } else {
                                        o = RequestOutcome::failed(o.prompt_tokens, "HTTP 400: prompt longer than max_model_len");
                                    }
                                    done.push(o);
                                }
                            }
                        }
                    }
                }
                None => match arrivals.peek() {
                    Some(a) => engine.idle_until(a.at_s),
                    None => break,
                },
            }
        }
        let end = engine.now();
        for (_, (_, o, _)) in live.drain() {
            done.push(RequestOutcome::failed(o.prompt_tokens, "cancelled at the run's deadline"));
        }
        let first_at = schedule.arrivals(seed).next().map_or(0.0, |a| a.at_s);
        let rate = if schedule.is_infinite_rate() {
            RequestRate::Infinite
        } else {
            RequestRate::PerSecond(schedule.expected_requests() / schedule.duration_s().max(1e-9))
        };
        let report = LoadReport::from_outcomes(&done, (end - first_at).max(1e-9), rate, None, slo);
        let hit = Snapshot::from_text(&engine.metrics_text()).ok().and_then(|s| {
            let q = s.prefix_cache_queries_total?;
            (q > 0.0).then(|| s.prefix_cache_hits_total.unwrap_or(0.0) / q)
        });
        Ok((report, hit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::load::LengthDist;

    fn flags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn maps_flags_and_refuses_unknown_ones_and_oom() {
        let (c, clock) = engine_config("m", &flags(&[("max-num-seqs", "32"), ("enable-prefix-caching", "false"), ("sim-sm-clock", "1410")])).expect("ok");
        assert_eq!((c.max_num_seqs, c.enable_prefix_caching, clock), (32, false, Some(1410)));
        let e = engine_config("m", &flags(&[("speculative-config", "x")])).expect_err("unknown");
        assert!(matches!(e, StartFailure::Invalid(ref m) if m.contains("--speculative-config")), "{e:?}");
        let e = SimServer::start("m", &flags(&[("gpu-memory-utilization", "0.995")])).expect_err("does not fit");
        assert!(matches!(e, StartFailure::OutOfMemory(_)), "{e:?}");
    }

    #[test]
    fn virtual_time_run_reports_like_the_http_driver() {
        let s = SimServer::start("m", &flags(&[("max-num-seqs", "8")])).expect("starts");
        let sched = Schedule::infinite_rate(40, LengthDist::Fixed(256), LengthDist::Fixed(32));
        let (r, hit) = s.run(&sched, 1, 128, &Slo::default()).expect("runs");
        assert_eq!((r.completed, r.failed), (40, 0));
        assert_eq!(r.total_output_tokens, 40 * 32);
        assert!(r.p99_e2el_ms > r.median_e2el_ms && r.p99_ttft_ms > 0.0);
        // 8 seats for 40 requests: the last wait for four rounds.
        assert!(r.p99_ttft_ms > 3.0 * r.median_tpot_ms * 32.0, "{} vs {}", r.p99_ttft_ms, r.median_tpot_ms);
        assert!(hit.is_some_and(|h| h > 0.3), "{hit:?}");
        let more = SimServer::start("m", &flags(&[("max-num-seqs", "64")])).expect("starts");
        let (r2, _) = more.run(&sched, 1, 128, &Slo::default()).expect("runs");
        assert!(r2.request_throughput > r.request_throughput * 1.5);
    }
}
