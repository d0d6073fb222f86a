//! GPU access behind one trait, so the daemon runs the same on NVML, on the simulator's H100
//! (crate `sim`) and on the scripted [`fake::FakeGpu`] of tests. The NVML backend is behind the
//! `nvml` feature (on by default).

pub mod fake;
#[cfg(feature = "nvml")]
pub mod nvml;

use serde::Serialize;

/// Errors from a GPU backend. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available: {0} (is the NVIDIA driver installed? use --simulate to run without a GPU)")]
    NoDriver(String),
    #[error("permission denied locking clocks on GPU {index}: run as root or with CAP_SYS_ADMIN")]
    NoPermission { index: u32 },
    #[error("GPU {index} not found ({count} present)")]
    NoSuchGpu { index: u32, count: u32 },
    #[error("GPU {index}: {mhz} MHz is not a supported SM clock ({min}..{max} MHz)")]
    UnsupportedClock { index: u32, mhz: u32, min: u32, max: u32 },
    #[error("GPU {index}: asked for {wanted} MHz, clock reads back {got} MHz")]
    NotApplied { index: u32, wanted: u32, got: u32 },
    #[error("GPU {index} is lost (fell off the bus or was reset)")]
    Lost { index: u32 },
    #[error("GPU {index}: {op} failed: {msg}")]
    Call { index: u32, op: &'static str, msg: String },
}

/// Static facts about one GPU, read once at start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// Supported SM clocks in MHz, ascending.
    pub sm_clocks_mhz: Vec<u32>,
    /// Power limit in watts.
    pub power_limit_w: f64,
}

impl GpuInfo {
    pub fn min_clock(&self) -> u32 {
        self.sm_clocks_mhz.first().copied().unwrap_or(0)
    }
    pub fn max_clock(&self) -> u32 {
        self.sm_clocks_mhz.last().copied().unwrap_or(0)
    }
}

/// One reading of a GPU's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub power_w: f64,
    /// Energy since driver load (NVML counts mJ; we report joules). Only advances every ~100 ms.
    pub energy_j: f64,
    pub gpu_util_pct: u32,
    pub mem_util_pct: u32,
    pub temperature_c: u32,
    /// Names of the active throttle reasons, e.g. `sw_power_cap`.
    pub throttle_reasons: Vec<String>,
}

/// What the daemon needs from a GPU. Implementations are cheap to call from any thread.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// Short name for logs and metrics: `nvml` or `sim`.
    fn kind(&self) -> &'static str;
    /// The GPUs this backend sees.
    fn devices(&self) -> Vec<GpuInfo>;
    /// Current counters of one GPU.
    fn sample(&self, index: u32) -> Result<GpuSample, GpuError>;
    /// Lock the SM clock (min = max = `mhz`); returns the clock read back afterwards.
    fn lock_sm_clock(&self, index: u32, mhz: u32) -> Result<u32, GpuError>;
    /// Give the SM clock back to the driver.
    fn reset_sm_clock(&self, index: u32) -> Result<(), GpuError>;
}

/// A readable list of GPUs with clocks and current counters, for `gpu-agent gpus`.
pub fn list_report(backend: &dyn GpuBackend) -> String {
    let mut out = String::new();
    for g in backend.devices() {
        out.push_str(&format!(
            "GPU {} {} ({})\n  SM clocks: {} supported, {}..{} MHz; power limit {:.0} W\n",
            g.index,
            g.name,
            g.uuid,
            g.sm_clocks_mhz.len(),
            g.min_clock(),
            g.max_clock(),
            g.power_limit_w
        ));
        match backend.sample(g.index) {
            Ok(s) => out.push_str(&format!(
                "  now: SM {} MHz, memory {} MHz, {:.1} W, energy {:.1} J, util {}%, {} C, throttle [{}]\n",
                s.sm_clock_mhz,
                s.mem_clock_mhz,
                s.power_w,
                s.energy_j,
                s.gpu_util_pct,
                s.temperature_c,
                s.throttle_reasons.join(", ")
            )),
            Err(e) => out.push_str(&format!("  now: unreadable: {e}\n")),
        }
    }
    out
}
