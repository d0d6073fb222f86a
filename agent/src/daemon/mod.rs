//! The daemon: one decision loop per vLLM process. Each cycle scrapes vLLM, reads the GPUs,
//! decides a clock, applies it and records everything; signals reset clocks or reload config.

mod advice_report;
pub mod clocks;
mod control;
pub mod governing;
mod lifecycle;
pub mod metrics;
pub mod routes;
pub mod systemd;
mod tune;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::backends;
use crate::config::{Config, ConfigError};
use clocks::{ClockKeeper, ClockTarget};
use governor::Decision;
use gpu::{GpuBackend, GpuError, GpuInfo, GpuSample};
use metrics::AgentMetrics;
use objectives::Mode;
use vllm_metrics::{Scraper, Snapshot, Window};

/// Consecutive failed scrapes after which clocks go back to the driver.
pub const VLLM_DOWN_AFTER: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("config field `gpu.indices`: GPU {index} does not exist ({count} GPUs found)")]
    MissingGpu { index: u32, count: usize },
    #[error("config field `policy.pin_mhz`: {mhz} MHz is not a supported SM clock of GPU {index} ({min}..{max} MHz in steps)")]
    BadPin { mhz: u32, index: u32, min: u32, max: u32 },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backend(#[from] crate::backends::BackendError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// How the daemon was started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Config file; re-read on SIGHUP. None: built-in defaults.
    pub config_path: Option<PathBuf>,
    /// `--listen` overrides `agent.listen`.
    pub listen: Option<SocketAddr>,
    /// Run on the simulated GPU with an in-process simulated vLLM and load.
    pub simulate: bool,
    /// Forget the governor's stored state for this GPU and vLLM model and learn afresh.
    pub reset_model: bool,
    /// `--socket` overrides `control.socket`.
    pub socket: Option<PathBuf>,
}

/// What the daemon knows right now; read by the HTTP routes (and the control socket).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub cycles: u64,
    pub vllm_up: bool,
    pub vllm_failures: u32,
    pub vllm_url: String,
    pub last_error: Option<String>,
    pub window: Option<Window>,
    pub gpus: Vec<GpuInfo>,
    pub samples: Vec<GpuSample>,
    /// Locked SM clock in MHz, None when the driver manages clocks.
    pub locked_mhz: Option<u32>,
    pub mode: Mode,
    /// The governor's phase (explore, exploit, fallback, ...), once it has decided.
    pub phase: Option<governor::Phase>,
    pub decision: Option<Decision>,
    pub ttft_slo_seconds: f64,
    pub tpot_slo_seconds: f64,
    #[serde(skip)]
    pub last_cycle: Option<Instant>,
    pub period_seconds: f64,
    /// The replica advisor's last advice; None while it is disabled.
    pub advice: Option<advisor::Advice>,
    /// Where the AIBrix-compatible endpoint answers; None while the advisor is disabled.
    #[serde(skip)]
    pub aibrix: Option<routes::AibrixTarget>,
}

pub type SharedStatus = Arc<RwLock<Status>>;

pub use lifecycle::{run, ReloadError};

/// The decision loop's state: everything one cycle reads and writes.
#[derive(Debug)]
pub struct Agent {
    cfg: Config,
    gpu: Arc<dyn GpuBackend>,
    clocks: ClockKeeper,
    scraper: Scraper,
    previous: Option<(Instant, Snapshot)>,
    last_energy: Vec<Option<f64>>,
    steering: governing::Steering,
    advisor: Option<advisor::Advisor>,
    /// Whether the last replicas_file read failed (logged once per failure streak).
    replicas_error: bool,
    /// The SM clocks the group supports (the advisor needs the highest).
    max_clock_mhz: u32,
    /// The mode `agentctl unpin` goes back to.
    mode_before_pin: Mode,
    started: Instant,
    pub metrics: Arc<AgentMetrics>,
    pub status: SharedStatus,
    /// `agentctl tune`: the trial launcher's study, run in the background.
    tuner: tune::TuneService,
}

impl Agent {
    pub fn new(cfg: Config, gpu: Arc<dyn GpuBackend>) -> Result<Self, DaemonError> {
        let devices = gpu.devices();
        let infos = cfg
            .gpu
            .indices
            .iter()
            .map(|&index| {
                devices
                    .iter()
                    .find(|d| d.index == index)
                    .cloned()
                    .ok_or(DaemonError::MissingGpu { index, count: devices.len() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_pin(&cfg, &infos)?;
        let metrics = Arc::new(AgentMetrics::new());
        metrics.set_slo(cfg.policy.ttft_slo_seconds, cfg.policy.tpot_slo_seconds);
        let status = Status {
            vllm_url: cfg.vllm.metrics_url.clone(),
            gpus: infos.clone(),
            mode: cfg.policy.mode,
            ttft_slo_seconds: cfg.policy.ttft_slo_seconds,
            tpot_slo_seconds: cfg.policy.tpot_slo_seconds,
            period_seconds: cfg.agent.period_seconds,
            aibrix: routes::AibrixTarget::from_config(&cfg.advisor),
            ..Status::default()
        };
        // One clock for the whole group: only clocks every GPU supports.
        let mut clocks = infos.first().map(|g| g.sm_clocks_mhz.clone()).unwrap_or_default();
        clocks.retain(|c| infos.iter().all(|g| g.sm_clocks_mhz.contains(c)));
        let gpu_model = infos.first().map(|g| g.name.clone()).unwrap_or_default();
        let max_clock_mhz = clocks.last().copied().unwrap_or(0);
        let steering = governing::Steering::new(clocks, gpu_model, &cfg.agent.state_dir, cfg.policy.clone());
        Ok(Self {
            steering,
            advisor: cfg.advisor.enabled.then(|| advisor::Advisor::new(cfg.advisor.clone())),
            replicas_error: false,
            max_clock_mhz,
            mode_before_pin: if matches!(cfg.policy.mode, Mode::Pinned(_)) { Mode::Slo } else { cfg.policy.mode },
            started: Instant::now(),
            clocks: ClockKeeper::new(gpu.clone(), cfg.gpu.indices.clone()),
            scraper: Scraper::new(),
            previous: None,
            last_energy: vec![None; cfg.gpu.indices.len()],
            gpu,
            metrics,
            status: Arc::new(RwLock::new(status)),
            tuner: tune::TuneService::new(study_program(), backends::in_process_servers()),
            cfg,
        })
    }

    /// Takes a reloaded config. GPU settings cannot change without a restart.
    pub fn reconfigure(&mut self, new: Config) -> Result<(), DaemonError> {
        if new.gpu != self.cfg.gpu {
            return Err(DaemonError::Config(ConfigError::Invalid {
                field: "gpu",
                msg: "changing GPUs needs a restart".into(),
            }));
        }
        let infos = self.status_read().gpus.clone();
        check_pin(&new, &infos)?;
        self.metrics.set_slo(new.policy.ttft_slo_seconds, new.policy.tpot_slo_seconds);
        self.steering.set_policy(new.policy.clone());
        if new.vllm.metrics_url != self.cfg.vllm.metrics_url {
            self.previous = None;
        }
        match (&mut self.advisor, new.advisor.enabled) {
            (Some(a), true) => a.reconfigure(new.advisor.clone()),
            (None, true) => self.advisor = Some(advisor::Advisor::new(new.advisor.clone())),
            (_, false) => self.advisor = None,
        }
        {
            let mut st = self.status_write();
            st.vllm_url = new.vllm.metrics_url.clone();
            st.mode = new.policy.mode;
            st.ttft_slo_seconds = new.policy.ttft_slo_seconds;
            st.tpot_slo_seconds = new.policy.tpot_slo_seconds;
            st.period_seconds = new.agent.period_seconds;
            st.aibrix = routes::AibrixTarget::from_config(&new.advisor);
            if !new.advisor.enabled {
                st.advice = None;
            }
        }
        self.cfg = new;
        Ok(())
    }

    /// One decision cycle. Never fails: problems are logged, counted and shown in status.
    pub async fn cycle(&mut self) {
        let started = Instant::now();
        let timeout = Duration::from_secs_f64(self.cfg.vllm.timeout_seconds);
        let scraped = self.scraper.scrape(&self.cfg.vllm.metrics_url, timeout).await;
        let now = Instant::now();
        // GPU counters at the same edge as the vLLM window, so its energy matches it.
        let (samples, energy_j) = self.read_gpus();
        // A lock that no longer holds (GPU reset behind our back) is applied again below.
        self.clocks.check_read_back(&samples);

        let mut window = None;
        let mut last_error = None;
        let mut decision = None;
        let failures = match scraped {
            Ok(snap) => {
                if let Some((at, prev)) = &self.previous {
                    let w = Window::between(prev, &snap, now.duration_since(*at).as_secs_f64());
                    self.metrics.record_window(&w);
                    self.count_slo_violations(&w);
                    let model = snap.model_names.first().map_or("unknown", String::as_str);
                    decision = self.steering.decide(model, &w, energy_j, self.clocks.applied());
                    window = Some(w);
                }
                self.previous = Some((now, snap));
                self.metrics.vllm_up.set(1);
                0
            }
            Err(e) => {
                let failures = self.status_read().vllm_failures + 1;
                if failures == 1 || failures % 30 == 0 {
                    warn!(url = %self.cfg.vllm.metrics_url, error = %crate::error_chain(&e), failures, "vLLM did not answer");
                }
                self.metrics.vllm_up.set(0);
                self.metrics.vllm_scrape_errors.inc();
                last_error = Some(crate::error_chain(&e));
                failures
            }
        };

        if let Some(d) = &decision {
            self.metrics.record_decision(d);
        }
        // The clock the window ran at, for the advisor's fit (apply may change it now).
        let window_clock = self.clocks.applied();
        let target = self.decide(failures, decision.as_ref());
        if let Err(e) = self.apply(target) {
            last_error = Some(e.to_string());
        }
        let advice = self.advise(window.as_ref(), window_clock);

        self.metrics.cycles.inc();
        self.metrics.cycle_duration.observe(started.elapsed().as_secs_f64());
        let cycles = self.status_read().cycles + 1;
        // Rounded and at least 1; `as` saturates.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let every = (SUMMARY_EVERY_S / self.cfg.agent.period_seconds).round().max(1.0) as u64;
        if cycles % every == 0 {
            summarise(window.as_ref(), &samples, self.clocks.applied());
        }
        let mut st = self.status_write();
        st.cycles = cycles;
        st.vllm_up = failures == 0;
        st.vllm_failures = failures;
        if window.is_some() || failures > 0 {
            st.window = window;
        }
        if let Some(d) = decision {
            st.phase = Some(d.phase);
            st.decision = Some(d);
        }
        st.samples = samples;
        st.locked_mhz = match self.clocks.applied() {
            ClockTarget::Default => None,
            ClockTarget::Locked(m) => Some(m),
        };
        st.last_error = last_error;
        st.last_cycle = Some(Instant::now());
        if advice.is_some() {
            st.advice = advice;
        }
    }

    /// Feeds the cycle's window (None: vLLM did not answer), which ran at `window_clock`, to
    /// the replica advisor, which estimates the capacity at the clock now applied; records its
    /// gauges.
    fn advise(&mut self, window: Option<&Window>, window_clock: ClockTarget) -> Option<advisor::Advice> {
        let gpu = self.status_read().gpus.first().map(|g| g.name.clone()).unwrap_or_default();
        let advisor = self.advisor.as_mut()?;
        let replicas = match advisor::current_replicas(advisor.config()) {
            Ok(n) => {
                self.replicas_error = false;
                n
            }
            Err(e) => {
                if !self.replicas_error {
                    warn!(error = %crate::error_chain(&e), "replica count unknown: no suggestion until it can be read");
                }
                self.replicas_error = true;
                None
            }
        };
        let max = f64::from(self.max_clock_mhz);
        let mhz = |c: ClockTarget| match c {
            ClockTarget::Locked(m) => f64::from(m),
            ClockTarget::Default => max,
        };
        let model = self.previous.as_ref().and_then(|(_, s)| s.model_names.first().cloned()).unwrap_or_default();
        let ctx = advisor::Context {
            now_s: self.started.elapsed().as_secs_f64(),
            model: &model,
            gpu: &gpu,
            clock_mhz: mhz(self.clocks.applied()),
            window_clock_mhz: mhz(window_clock),
            max_clock_mhz: max,
            objectives: objectives::Objectives {
                ttft_s: self.cfg.policy.ttft_slo_seconds,
                tpot_s: self.cfg.policy.tpot_slo_seconds,
            },
            replicas,
        };
        let advice = advisor.observe(window, &ctx);
        self.metrics.advisor.record(&advice);
        Some(advice)
    }

    /// The clock for this cycle. Safety first: once vLLM has not answered for
    /// [`VLLM_DOWN_AFTER`] cycles, clocks go back to the driver; a single miss keeps the
    /// current clock. Otherwise the governor's choice, or the fixed policy.
    fn decide(&self, vllm_failures: u32, decision: Option<&Decision>) -> ClockTarget {
        if vllm_failures >= VLLM_DOWN_AFTER {
            return ClockTarget::Default;
        }
        if vllm_failures > 0 {
            return self.clocks.applied();
        }
        match (self.cfg.policy.mode, decision) {
            (Mode::Default, _) => ClockTarget::Default,
            (Mode::Pinned(mhz), _) => ClockTarget::Locked(mhz),
            (_, Some(d)) => d.target,
            // No window yet (first scrape): keep what is applied.
            _ => self.clocks.applied(),
        }
    }

    fn apply(&mut self, target: ClockTarget) -> Result<(), GpuError> {
        if self.clocks.is_at(target) {
            return Ok(());
        }
        let result = self.clocks.apply(target);
        match &result {
            Ok(()) => self.metrics.clock_changes.inc(),
            Err(_) => {
                for &i in self.clocks.indices() {
                    self.metrics.gpu_error(i, "set_clock");
                }
            }
        }
        let hz = match self.clocks.applied() {
            ClockTarget::Default => 0.0,
            ClockTarget::Locked(m) => f64::from(m) * 1e6,
        };
        self.metrics.clock_target.set(hz);
        result
    }

    /// Samples every GPU of the group; also returns the energy the group used since the last
    /// reading (summed over GPUs).
    fn read_gpus(&mut self) -> (Vec<GpuSample>, f64) {
        let mut out = Vec::with_capacity(self.cfg.gpu.indices.len());
        let mut energy = 0.0;
        for (slot, &i) in self.cfg.gpu.indices.iter().enumerate() {
            match self.gpu.sample(i) {
                Ok(s) => {
                    let delta = match self.last_energy[slot] {
                        // A counter that went backwards (driver reload) restarts the delta.
                        Some(prev) if s.energy_j >= prev => s.energy_j - prev,
                        _ => 0.0,
                    };
                    self.last_energy[slot] = Some(s.energy_j);
                    energy += delta;
                    self.metrics.record_gpu(i, &s, delta);
                    out.push(s);
                }
                Err(e) => {
                    warn!(gpu = i, error = %e, "reading GPU failed");
                    self.metrics.gpu_error(i, "sample");
                }
            }
        }
        (out, energy)
    }

    fn count_slo_violations(&self, w: &Window) {
        let checks = [
            ("ttft", w.ttft.as_ref().and_then(|l| l.mean), self.cfg.policy.ttft_slo_seconds),
            ("tpot", w.tpot_or_itl().and_then(|l| l.mean), self.cfg.policy.tpot_slo_seconds),
        ];
        for (kind, value, slo) in checks {
            if value.is_some_and(|v| v > slo) {
                self.metrics.slo_violations.with_label_values(&[kind]).inc();
            }
        }
    }

    fn status_read(&self) -> std::sync::RwLockReadGuard<'_, Status> {
        self.status.read().unwrap_or_else(|p| p.into_inner())
    }

    fn status_write(&self) -> std::sync::RwLockWriteGuard<'_, Status> {
        self.status.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Seconds between the one-line summaries in the log.
const SUMMARY_EVERY_S: f64 = 10.0;

/// One log line an operator (or a newcomer running `--simulate`) can read at a glance.
fn summarise(w: Option<&Window>, samples: &[GpuSample], clock: ClockTarget) {
    let ms = |l: &Option<vllm_metrics::Latency>| {
        l.as_ref().and_then(|l| l.p50).map_or("-".to_string(), |v| format!("{:.0} ms", v * 1e3))
    };
    let vllm = match w {
        Some(w) => format!(
            "{:.1} req/s, {:.0} tok/s out, running {}, waiting {}, KV {:.0}%, TTFT p50 {}, ITL p50 {}",
            w.request_rate.unwrap_or(0.0),
            w.generation_tokens_rate.unwrap_or(0.0),
            w.num_requests_running.unwrap_or(0.0),
            w.num_requests_waiting.unwrap_or(0.0),
            w.kv_cache_usage.unwrap_or(0.0) * 100.0,
            ms(&w.ttft),
            ms(&w.itl)
        ),
        None => "no window".into(),
    };
    let gpus: Vec<String> = samples.iter().map(|s| format!("{} MHz {:.0} W", s.sm_clock_mhz, s.power_w)).collect();
    let clock = match clock {
        ClockTarget::Default => "driver".to_string(),
        ClockTarget::Locked(m) => format!("locked {m} MHz"),
    };
    info!("vLLM: {vllm} | GPU: {} | clock {clock}", gpus.join(", "));
}

/// The program that runs a study: this very binary (its `tune` subcommand).
fn study_program() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("gpu-agent"))
}

fn check_pin(cfg: &Config, gpus: &[GpuInfo]) -> Result<(), DaemonError> {
    let Mode::Pinned(mhz) = cfg.policy.mode else {
        return Ok(());
    };
    for g in gpus {
        if !g.sm_clocks_mhz.contains(&mhz) {
            return Err(DaemonError::BadPin { mhz, index: g.index, min: g.min_clock(), max: g.max_clock() });
        }
    }
    Ok(())
}
