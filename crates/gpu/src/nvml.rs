//! The real GPU through NVML (nvml-wrapper 0.13). The NVIDIA library is loaded at run time, so
//! a machine without a driver gets a clear error instead of a crash.

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::GpuLockedClocksSetting;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::{GpuBackend, GpuError, GpuInfo, GpuSample};

/// How far below the locked clock a read-back may be and still count as applied: a GPU at its
/// power or thermal limit runs below the lock, which is the driver protecting the GPU.
const READ_BACK_SLACK_MHZ: u32 = 30;

pub struct NvmlGpu {
    nvml: Nvml,
    infos: Vec<GpuInfo>,
}

impl std::fmt::Debug for NvmlGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpu").field("gpus", &self.infos).finish()
    }
}

fn call_err(index: u32, op: &'static str, e: NvmlError) -> GpuError {
    match e {
        NvmlError::NoPermission => GpuError::NoPermission { index },
        NvmlError::GpuLost => GpuError::Lost { index },
        other => GpuError::Call { index, op, msg: other.to_string() },
    }
}

impl NvmlGpu {
    /// Opens NVML and the GPUs at `indices` (all GPUs when empty), reading their static facts.
    pub fn open(indices: &[u32]) -> Result<NvmlGpu, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NoDriver(e.to_string()))?;
        let count = nvml.device_count().map_err(|e| GpuError::NoDriver(e.to_string()))?;
        let wanted: Vec<u32> = if indices.is_empty() { (0..count).collect() } else { indices.to_vec() };
        let mut infos = Vec::with_capacity(wanted.len());
        for &index in &wanted {
            if index >= count {
                return Err(GpuError::NoSuchGpu { index, count });
            }
            let d = nvml.device_by_index(index).map_err(|e| call_err(index, "open", e))?;
            infos.push(read_info(index, &d)?);
        }
        Ok(NvmlGpu { nvml, infos })
    }

    fn device(&self, index: u32) -> Result<Device<'_>, GpuError> {
        if !self.infos.iter().any(|i| i.index == index) {
            return Err(GpuError::NoSuchGpu { index, count: u32::try_from(self.infos.len()).unwrap_or(u32::MAX) });
        }
        self.nvml.device_by_index(index).map_err(|e| call_err(index, "open", e))
    }
}

fn read_info(index: u32, d: &Device<'_>) -> Result<GpuInfo, GpuError> {
    let name = d.name().map_err(|e| call_err(index, "name", e))?;
    let uuid = d.uuid().map_err(|e| call_err(index, "uuid", e))?;
    // SM clocks are listed per memory clock; the highest memory clock is the one in use.
    let mem = d
        .supported_memory_clocks()
        .map_err(|e| call_err(index, "supported_memory_clocks", e))?
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut clocks = d.supported_graphics_clocks(mem).map_err(|e| call_err(index, "supported_graphics_clocks", e))?;
    clocks.sort_unstable();
    clocks.dedup();
    // Not every board reports a limit; 0 means unknown, and clocks still work without it.
    let power_limit_w = match d.enforced_power_limit() {
        Ok(mw) => f64::from(mw) / 1000.0,
        Err(e) => {
            tracing::warn!(gpu = index, error = %e, "power limit unreadable");
            0.0
        }
    };
    Ok(GpuInfo { index, name, uuid, sm_clocks_mhz: clocks, power_limit_w })
}

/// snake_case names of the active throttle reasons.
fn throttle_names(r: ThrottleReasons) -> Vec<String> {
    let table = [
        (ThrottleReasons::GPU_IDLE, "gpu_idle"),
        (ThrottleReasons::APPLICATIONS_CLOCKS_SETTING, "applications_clocks_setting"),
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST, "sync_boost"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
    ];
    table.iter().filter(|(bit, _)| r.contains(*bit)).map(|(_, n)| (*n).to_string()).collect()
}

impl GpuBackend for NvmlGpu {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> Vec<GpuInfo> {
        self.infos.clone()
    }

    fn sample(&self, index: u32) -> Result<GpuSample, GpuError> {
        let d = self.device(index)?;
        let util = d.utilization_rates().map_err(|e| call_err(index, "utilization_rates", e))?;
        Ok(GpuSample {
            sm_clock_mhz: d.clock_info(Clock::SM).map_err(|e| call_err(index, "clock_info", e))?,
            mem_clock_mhz: d.clock_info(Clock::Memory).map_err(|e| call_err(index, "clock_info", e))?,
            power_w: f64::from(d.power_usage().map_err(|e| call_err(index, "power_usage", e))?) / 1000.0,
            energy_j: d.total_energy_consumption().map_err(|e| call_err(index, "total_energy_consumption", e))? as f64
                / 1000.0,
            gpu_util_pct: util.gpu,
            mem_util_pct: util.memory,
            temperature_c: d.temperature(TemperatureSensor::Gpu).map_err(|e| call_err(index, "temperature", e))?,
            throttle_reasons: d.current_throttle_reasons().map(throttle_names).unwrap_or_default(),
        })
    }

    fn lock_sm_clock(&self, index: u32, mhz: u32) -> Result<u32, GpuError> {
        let info = self
            .infos
            .iter()
            .find(|i| i.index == index)
            .ok_or(GpuError::NoSuchGpu { index, count: u32::try_from(self.infos.len()).unwrap_or(u32::MAX) })?;
        if !info.sm_clocks_mhz.contains(&mhz) {
            return Err(GpuError::UnsupportedClock { index, mhz, min: info.min_clock(), max: info.max_clock() });
        }
        let mut d = self.device(index)?;
        d.set_gpu_locked_clocks(GpuLockedClocksSetting::Numeric { min_clock_mhz: mhz, max_clock_mhz: mhz })
            .map_err(|e| call_err(index, "set_gpu_locked_clocks", e))?;
        // Success does not always mean applied: read the clock back.
        let got = d.clock_info(Clock::SM).map_err(|e| call_err(index, "clock_info", e))?;
        if got > mhz + READ_BACK_SLACK_MHZ {
            return Err(GpuError::NotApplied { index, wanted: mhz, got });
        }
        if got + READ_BACK_SLACK_MHZ < mhz {
            // Below the lock: throttled (power/thermal) or idle-clocked; the lock still holds.
            tracing::debug!(gpu = index, wanted = mhz, got, "clock reads back below the lock (throttled or idle)");
        }
        Ok(got)
    }

    fn reset_sm_clock(&self, index: u32) -> Result<(), GpuError> {
        let mut d = self.device(index)?;
        d.reset_gpu_locked_clocks().map_err(|e| call_err(index, "reset_gpu_locked_clocks", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_open_is_a_clear_error_not_a_panic() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return; // a real driver: covered by the device run in the notes
        }
        let e = NvmlGpu::open(&[0]).expect_err("no driver here").to_string();
        assert!(e.contains("NVML is not available") && e.contains("--simulate"), "{e}");
        assert!(!e.contains('\n'));
    }
}
