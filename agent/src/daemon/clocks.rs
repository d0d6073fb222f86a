//! Applies clock targets to the GPUs of one vLLM process and remembers what it locked, so
//! every exit path (signal, error, drop) can give the clocks back to the driver.

use std::sync::Arc;

use tracing::{info, warn};

use crate::gpu::{GpuBackend, GpuError};

pub use crate::governor::ClockTarget;

/// Owns the clock state of a GPU group (all GPUs of a tensor-parallel vLLM get the same clock).
pub struct ClockKeeper {
    gpu: Arc<dyn GpuBackend>,
    indices: Vec<u32>,
    /// What we last applied successfully; `Default` when nothing of ours is locked.
    applied: ClockTarget,
}

impl ClockKeeper {
    pub fn new(gpu: Arc<dyn GpuBackend>, indices: Vec<u32>) -> Self {
        Self {
            gpu,
            indices,
            applied: ClockTarget::Default,
        }
    }

    pub fn applied(&self) -> ClockTarget {
        self.applied
    }

    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Moves every GPU of the group to `target`. On any failure the whole group is reset,
    /// so the GPUs never end up at different clocks.
    pub fn apply(&mut self, target: ClockTarget) -> Result<(), GpuError> {
        if target == self.applied {
            return Ok(());
        }
        match target {
            ClockTarget::Default => self.reset_all(),
            ClockTarget::Locked(mhz) => {
                for &i in &self.indices {
                    if let Err(e) = self.gpu.lock_sm_clock(i, mhz) {
                        warn!(gpu = i, mhz, error = %e, "locking clock failed; resetting the group");
                        // We may have locked some GPUs already: give them all back.
                        self.applied = ClockTarget::Locked(mhz);
                        let _ = self.reset_all();
                        return Err(e);
                    }
                }
                info!(mhz, gpus = ?self.indices, "locked SM clock");
                self.applied = target;
                Ok(())
            }
        }
    }

    /// Gives every GPU of the group back to the driver. Tries all of them even if one fails.
    pub fn reset_all(&mut self) -> Result<(), GpuError> {
        if self.applied == ClockTarget::Default {
            return Ok(());
        }
        let mut first_err = None;
        for &i in &self.indices {
            if let Err(e) = self.gpu.reset_sm_clock(i) {
                warn!(gpu = i, error = %e, "resetting clock failed");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => {
                info!(gpus = ?self.indices, "clocks reset to driver default");
                self.applied = ClockTarget::Default;
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

impl Drop for ClockKeeper {
    /// Last line of defence (panic unwinding, early return): never leave a GPU locked.
    fn drop(&mut self) {
        let _ = self.reset_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::SimGpu;

    #[test]
    fn locks_all_gpus_and_resets_on_drop() {
        let gpu = Arc::new(SimGpu::h100(2));
        let backend: Arc<dyn GpuBackend> = gpu.clone();
        {
            let mut keeper = ClockKeeper::new(backend.clone(), vec![0, 1]);
            keeper.apply(ClockTarget::Locked(1200)).expect("lock");
            for i in 0..2 {
                assert_eq!(backend.sample(i).expect("sample").sm_clock_mhz, 1200);
            }
            assert_eq!(keeper.applied(), ClockTarget::Locked(1200));
        }
        assert_eq!(gpu.clock_mhz(), 1980, "dropping the keeper gave the clocks back to the driver");
    }

    #[test]
    fn failed_lock_leaves_group_at_default() {
        let gpu = Arc::new(SimGpu::h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        assert!(keeper.apply(ClockTarget::Locked(1001)).is_err(), "1001 is no supported clock");
        assert_eq!(keeper.applied(), ClockTarget::Default);
        assert_eq!(gpu.clock_mhz(), 1980, "driver-managed: boosts to the maximum under work");
    }
}
