//! Answers `agentctl` requests inside the decision loop. Changes made here live until the next
//! config reload (SIGHUP or `agentctl reload`), which goes back to the file.

use proto::{ErrorKind, GovernorSummary, GpuStatus, ModelCmd, Request, Response, StatusReport, WindowSummary};

use super::clocks::ClockTarget;
use super::Agent;
use objectives::Mode;

fn failed(message: impl Into<String>) -> Response {
    crate::control::error(ErrorKind::Failed, message)
}

fn bad(message: impl Into<String>) -> Response {
    crate::control::error(ErrorKind::BadRequest, message)
}

impl Agent {
    /// One control request (authorisation was checked by the socket server). `Reload` is
    /// answered by the loop, which owns the config path.
    pub fn handle_control(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(Box::new(self.status_report())),
            Request::SetMode(Mode::Pinned(mhz)) => self.handle_control(Request::Pin(mhz)),
            Request::SetMode(mode) => {
                let mut policy = self.cfg.policy.clone();
                policy.mode = mode;
                self.set_policy(policy);
                if mode == Mode::Default {
                    if let Err(e) = self.apply(ClockTarget::Default) {
                        return failed(format!("mode set, but resetting clocks failed: {e}"));
                    }
                }
                Response::Ok(format!("mode {}", self.cfg.policy.mode))
            }
            Request::Pin(mhz) => {
                let mut policy = self.cfg.policy.clone();
                if !matches!(policy.mode, Mode::Pinned(_)) {
                    self.mode_before_pin = policy.mode;
                }
                policy.mode = Mode::Pinned(mhz);
                let mut cfg = self.cfg.clone();
                cfg.policy = policy.clone();
                let gpus = self.status_read().gpus.clone();
                if let Err(e) = super::check_pin(&cfg, &gpus) {
                    return bad(e.to_string().replace("config field `policy.pin_mhz`: ", ""));
                }
                match self.apply(ClockTarget::Locked(mhz)) {
                    Ok(()) => {
                        self.set_policy(policy);
                        Response::Ok(format!("pinned at {mhz} MHz"))
                    }
                    Err(e) => failed(format!("locking {mhz} MHz failed: {e}")),
                }
            }
            Request::Unpin => {
                if !matches!(self.cfg.policy.mode, Mode::Pinned(_)) {
                    return Response::Ok("not pinned".into());
                }
                let mut policy = self.cfg.policy.clone();
                policy.mode = self.mode_before_pin;
                self.set_policy(policy);
                // The governor (or the driver) takes over from the next cycle.
                if self.cfg.policy.mode == Mode::Default {
                    if let Err(e) = self.apply(ClockTarget::Default) {
                        return failed(format!("unpinned, but resetting clocks failed: {e}"));
                    }
                }
                Response::Ok(format!("unpinned; mode {}", self.cfg.policy.mode))
            }
            Request::SetSlo { ttft_s, tpot_s } => {
                let mut policy = self.cfg.policy.clone();
                for (name, value, slot) in
                    [("--ttft", ttft_s, &mut policy.ttft_slo_seconds), ("--tpot", tpot_s, &mut policy.tpot_slo_seconds)]
                {
                    if let Some(v) = value {
                        if !(v > 0.0 && v <= 600.0) {
                            return bad(format!("{name} {v} must be > 0 and <= 600 seconds"));
                        }
                        *slot = v;
                    }
                }
                self.set_policy(policy);
                Response::Ok(format!(
                    "objectives: TTFT {} s, TPOT {} s",
                    self.cfg.policy.ttft_slo_seconds, self.cfg.policy.tpot_slo_seconds
                ))
            }
            Request::Model(cmd) => match cmd {
                ModelCmd::Reset => match self.steering.reset_model() {
                    Ok(()) => Response::Ok("governor model reset; learning afresh".into()),
                    Err(e) => failed(format!("model reset: {}", crate::error_chain(&e))),
                },
                ModelCmd::Export => match self.steering.export() {
                    Ok(json) => Response::ModelState(json),
                    Err(e) => failed(format!("model export: {}", crate::error_chain(&e))),
                },
                ModelCmd::Import(json) => match self.steering.import(&json) {
                    Ok(what) => Response::Ok(format!("governor model imported ({what})")),
                    Err(e) => failed(format!("model import: {}", crate::error_chain(&e))),
                },
            },
            Request::Reload => failed("reload is handled by the daemon loop"),
            Request::Tune(cmd) => {
                let state_dir = self.cfg.agent.state_dir.clone();
                self.tuner.handle(cmd, &state_dir)
            }
            Request::Advice => match &self.status_read().advice {
                Some(a) => Response::Advice(Box::new(super::advice_report::advice_report(a))),
                None if self.cfg.advisor.enabled => failed("no advice yet: the advisor has not run a cycle"),
                None => failed("the replica advisor is disabled (advisor.enabled = false in the config)"),
            },
        }
    }

    fn set_policy(&mut self, policy: crate::config::PolicySection) {
        self.metrics.set_slo(policy.ttft_slo_seconds, policy.tpot_slo_seconds);
        self.steering.set_policy(policy.clone());
        self.cfg.policy = policy;
        let mut st = self.status_write();
        st.mode = self.cfg.policy.mode;
        st.ttft_slo_seconds = self.cfg.policy.ttft_slo_seconds;
        st.tpot_slo_seconds = self.cfg.policy.tpot_slo_seconds;
    }

    pub fn status_report(&self) -> StatusReport {
        let st = self.status_read();
        let gpus = st
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let s = st.samples.get(i);
                GpuStatus {
                    index: g.index,
                    name: g.name.clone(),
                    min_mhz: g.min_clock(),
                    max_mhz: g.max_clock(),
                    sm_clock_mhz: s.map(|s| s.sm_clock_mhz),
                    power_w: s.map(|s| s.power_w),
                    energy_j: s.map(|s| s.energy_j),
                }
            })
            .collect();
        let window = st.window.as_ref().map(|w| WindowSummary {
            seconds: Some(w.seconds),
            request_rate: w.request_rate,
            generation_tokens_rate: w.generation_tokens_rate,
            running: w.num_requests_running,
            waiting: w.num_requests_waiting,
            kv_cache_usage: w.kv_cache_usage,
            ttft_mean_s: w.ttft.as_ref().and_then(|l| l.mean),
            itl_mean_s: w.itl.as_ref().and_then(|l| l.mean),
        });
        let governor = self.steering.governor().map(|g| GovernorSummary {
            decisions: g.decisions(),
            converged_after: g.converged_after(),
            reward: st.decision.as_ref().and_then(|d| d.reward),
            edp_per_token: st.decision.as_ref().and_then(|d| d.edp_per_token),
        });
        StatusReport {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            period_s: self.cfg.agent.period_seconds,
            cycles: st.cycles,
            mode: st.mode,
            phase: st.phase,
            locked_mhz: match self.clocks.applied() {
                ClockTarget::Default => None,
                ClockTarget::Locked(m) => Some(m),
            },
            vllm_url: st.vllm_url.clone(),
            vllm_up: st.vllm_up,
            gpus,
            window,
            ttft_slo_s: self.cfg.policy.ttft_slo_seconds,
            tpot_slo_s: self.cfg.policy.tpot_slo_seconds,
            governor,
            last_error: st.last_error.clone(),
        }
    }
}
