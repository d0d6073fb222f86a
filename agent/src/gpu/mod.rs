//! GPU access behind one trait, so the daemon runs the same on NVML and on the simulator.

pub mod nvml;
pub mod sim;

pub use nvml::list_report;

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
pub trait GpuBackend: Send + Sync {
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
