//! Applies clock targets to the GPUs of one vLLM process and remembers what it locked, so
//! every exit path (signal, error, drop) can give the clocks back to the driver.

use std::sync::Arc;

use tracing::{info, warn};

use gpu::{GpuBackend, GpuError, GpuSample};

pub use governor::ClockTarget;

/// How far a read-back clock may be from the lock and still agree with it (NVML rounds to its
/// clock table; the backend allows the same slack when it locks).
const READ_BACK_SLACK_MHZ: u32 = 30;

/// Consecutive cycles a read-back clock may disagree with the lock before the keeper stops
/// believing its lock holds. One cycle is forgiven: a reading taken while a change settles.
const MISMATCH_CYCLES: u32 = 2;

/// Owns the clock state of a GPU group (all GPUs of a tensor-parallel vLLM get the same clock).
#[derive(Debug)]
pub struct ClockKeeper {
    gpu: Arc<dyn GpuBackend>,
    indices: Vec<u32>,
    /// What the GPUs run at as far as we know. `None` (unknown) after a change that failed
    /// half-way or a read-back that contradicts the lock: the next `apply` of any target makes
    /// the calls again instead of trusting a state we never reached.
    applied: Option<ClockTarget>,
    /// Cycles in a row whose read-back disagreed with the locked clock.
    mismatches: u32,
}

impl ClockKeeper {
    pub fn new(gpu: Arc<dyn GpuBackend>, indices: Vec<u32>) -> Self {
        Self { gpu, indices, applied: Some(ClockTarget::Default), mismatches: 0 }
    }

    /// The clock we hold. An unknown state reads as `Default`: we hold no lock we know of, and
    /// what a failed lock or a GPU reset leaves behind is the driver's clocks.
    pub fn applied(&self) -> ClockTarget {
        self.applied.unwrap_or(ClockTarget::Default)
    }

    /// True when the GPUs are known to be at `target`, so applying it needs no call.
    pub fn is_at(&self, target: ClockTarget) -> bool {
        self.applied == Some(target)
    }

    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Moves every GPU of the group to `target`. On any failure the whole group is reset,
    /// so the GPUs never end up at different clocks; if that reset fails too the state is
    /// unknown and the next call tries again.
    pub fn apply(&mut self, target: ClockTarget) -> Result<(), GpuError> {
        if self.is_at(target) {
            return Ok(());
        }
        match target {
            ClockTarget::Default => self.reset_all(),
            ClockTarget::Locked(mhz) => {
                for &i in &self.indices {
                    if let Err(e) = self.gpu.lock_sm_clock(i, mhz) {
                        warn!(gpu = i, mhz, error = %e, "locking clock failed; resetting the group");
                        // Some GPUs may be locked already (and this one half-way): give them
                        // all back. Until that works we do not know what they run at.
                        self.applied = None;
                        let _ = self.reset_all();
                        return Err(e);
                    }
                }
                info!(mhz, gpus = ?self.indices, "locked SM clock");
                self.applied = Some(target);
                self.mismatches = 0;
                Ok(())
            }
        }
    }

    /// Gives the clocks back to the driver before the first cycle. A previous agent killed with
    /// SIGKILL (or OOM-killed) cannot reset on its way out, and NVML keeps its lock: starting
    /// from "nothing is ours" would leave that lock in place for as long as the policy wants
    /// driver clocks. A failure (no permission in observe mode, GPU lost) is logged once and
    /// the keeper assumes driver clocks; the read-back check catches a lock that is still there.
    pub fn take_over(&mut self) {
        self.applied = None;
        match self.reset_all() {
            Ok(()) => {
                info!(gpus = ?self.indices, "clocks given back to the driver at start (a killed agent may have left them locked)")
            }
            Err(e) => {
                warn!(gpus = ?self.indices, error = %e, "could not reset clocks at start; a lock left by a killed agent may remain");
                self.applied = Some(ClockTarget::Default);
            }
        }
    }

    /// Gives every GPU of the group back to the driver. Tries all of them even if one fails.
    pub fn reset_all(&mut self) -> Result<(), GpuError> {
        if self.is_at(ClockTarget::Default) {
            return Ok(());
        }
        let mut first_err = None;
        let mut failed = 0;
        for &i in &self.indices {
            if let Err(e) = self.gpu.reset_sm_clock(i) {
                warn!(gpu = i, error = %e, "resetting clock failed");
                first_err.get_or_insert(e);
                failed += 1;
            }
        }
        match first_err {
            None => {
                info!(gpus = ?self.indices, "clocks reset to driver default");
                self.applied = Some(ClockTarget::Default);
                self.mismatches = 0;
                Ok(())
            }
            Some(e) => {
                // Every GPU refused: they are where they were. Some refused: the group is mixed.
                if failed < self.indices.len() {
                    self.applied = None;
                }
                Err(e)
            }
        }
    }

    /// Checks this cycle's readings against the lock we hold. A GPU reset, `nvidia-smi -rgc`
    /// or `gpu-agent reset-clocks` behind our back leaves driver clocks while we would go on
    /// believing ours; after [`MISMATCH_CYCLES`] cycles of disagreement the state becomes
    /// unknown, so the next `apply` locks again. Returns true when it did so.
    ///
    /// A clock below the lock with a power or thermal throttle reason is the driver protecting
    /// the GPU under our lock, not a disagreement. A cycle without readings tells
    /// nothing and leaves the count as it is.
    pub fn check_read_back(&mut self, samples: &[GpuSample]) -> bool {
        let Some(ClockTarget::Locked(mhz)) = self.applied else {
            self.mismatches = 0;
            return false;
        };
        if samples.is_empty() {
            return false;
        }
        let off = samples.iter().find(|s| disagrees(s, mhz));
        let Some(off) = off else {
            self.mismatches = 0;
            return false;
        };
        self.mismatches += 1;
        if self.mismatches < MISMATCH_CYCLES {
            return false;
        }
        warn!(
            locked = mhz,
            read_back = off.sm_clock_mhz,
            cycles = self.mismatches,
            "the GPU does not run at the clock we locked (reset behind our back?); locking again"
        );
        self.applied = None;
        self.mismatches = 0;
        true
    }
}

/// Throttle reasons under which the driver runs a locked GPU below its lock to protect it.
/// `gpu_idle` is not one: a locked GPU holds its clock when idle, only a driver-managed one drops.
const PROTECTIVE_THROTTLES: &[&str] = &[
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
];

/// True when a reading cannot come from a GPU locked at `mhz`.
fn disagrees(s: &GpuSample, mhz: u32) -> bool {
    let above = s.sm_clock_mhz > mhz + READ_BACK_SLACK_MHZ;
    let protected = s.throttle_reasons.iter().any(|r| PROTECTIVE_THROTTLES.contains(&r.as_str()));
    let below_unexplained = s.sm_clock_mhz + READ_BACK_SLACK_MHZ < mhz && !protected;
    above || below_unexplained
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
    use gpu::fake::{FakeFault, FakeGpu};

    /// An H100's SM clocks: 345..1980 MHz in 15 MHz steps.
    fn h100(count: u32) -> FakeGpu {
        FakeGpu::new(count, (0..110).map(|i| 345 + 15 * i).collect())
    }

    #[test]
    fn locks_all_gpus_and_resets_on_drop() {
        let gpu = Arc::new(h100(2));
        let backend: Arc<dyn GpuBackend> = gpu.clone();
        {
            let mut keeper = ClockKeeper::new(backend.clone(), vec![0, 1]);
            keeper.apply(ClockTarget::Locked(1200)).expect("lock");
            for i in 0..2 {
                assert_eq!(backend.sample(i).expect("sample").sm_clock_mhz, 1200);
            }
            assert_eq!(keeper.applied(), ClockTarget::Locked(1200));
        }
        assert_eq!(gpu.locked(0), None, "dropping the keeper gave the clocks back to the driver");
    }

    #[test]
    fn failed_lock_leaves_group_at_default() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        assert!(keeper.apply(ClockTarget::Locked(1001)).is_err(), "1001 is no supported clock");
        assert_eq!(keeper.applied(), ClockTarget::Default);
        assert_eq!(gpu.locked(0), None, "driver-managed: boosts to the maximum under work");
    }

    #[test]
    fn lock_and_reset_both_failing_leave_an_unknown_state_that_is_retried() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        gpu.set_fault(FakeFault::NoPermission);
        assert!(keeper.apply(ClockTarget::Locked(1200)).is_err());
        assert!(!keeper.is_at(ClockTarget::Locked(1200)), "a failed lock is not recorded as held");
        assert!(!keeper.is_at(ClockTarget::Default), "nor is the reset that failed after it");
        assert_eq!(keeper.applied(), ClockTarget::Default, "reported as no lock of ours");
        gpu.set_fault(FakeFault::None);
        keeper.apply(ClockTarget::Locked(1200)).expect("retried once the GPU accepts calls");
        assert_eq!(gpu.locked(0), Some(1200));
        assert!(keeper.is_at(ClockTarget::Locked(1200)));
    }

    #[test]
    fn failed_move_between_locks_does_not_claim_the_new_clock() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        keeper.apply(ClockTarget::Locked(1200)).expect("lock");
        gpu.set_fault(FakeFault::NoPermission);
        assert!(keeper.apply(ClockTarget::Locked(1500)).is_err());
        assert!(!keeper.is_at(ClockTarget::Locked(1500)));
        gpu.set_fault(FakeFault::None);
        keeper.apply(ClockTarget::Locked(1500)).expect("retried");
        assert_eq!(gpu.locked(0), Some(1500));
    }

    #[test]
    fn unknown_state_is_reset_on_drop() {
        let gpu = Arc::new(h100(1));
        {
            let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
            keeper.apply(ClockTarget::Locked(1200)).expect("lock");
            gpu.set_fault(FakeFault::NoPermission);
            assert!(keeper.apply(ClockTarget::Locked(1500)).is_err());
            gpu.set_fault(FakeFault::None);
        }
        assert_eq!(gpu.locked(0), None, "dropping a keeper in an unknown state still resets");
    }

    fn reading(mhz: u32, throttle: &[&str]) -> GpuSample {
        GpuSample {
            sm_clock_mhz: mhz,
            throttle_reasons: throttle.iter().map(|t| t.to_string()).collect(),
            ..GpuSample::default()
        }
    }

    #[test]
    fn read_back_disagreeing_for_two_cycles_makes_the_lock_unknown() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        keeper.apply(ClockTarget::Locked(1200)).expect("lock");
        assert!(!keeper.check_read_back(&[reading(1200, &[])]), "agrees");
        assert!(!keeper.check_read_back(&[reading(1980, &[])]), "one cycle is forgiven");
        assert!(!keeper.check_read_back(&[]), "no reading: no verdict");
        assert!(keeper.check_read_back(&[reading(1980, &[])]), "the second disagreeing cycle");
        assert!(!keeper.is_at(ClockTarget::Locked(1200)));
        keeper.apply(ClockTarget::Locked(1200)).expect("locks again");
        assert!(keeper.is_at(ClockTarget::Locked(1200)));
    }

    #[test]
    fn throttled_or_rounded_read_back_agrees_with_the_lock() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        keeper.apply(ClockTarget::Locked(1500)).expect("lock");
        for _ in 0..5 {
            assert!(!keeper.check_read_back(&[reading(1200, &["sw_power_cap"])]), "capped below the lock");
            assert!(!keeper.check_read_back(&[reading(1515, &[])]), "within the slack");
        }
        assert!(!keeper.check_read_back(&[reading(345, &["gpu_idle"])]));
        assert!(keeper.check_read_back(&[reading(345, &["gpu_idle"])]), "idle clocks: the driver's, not our lock");
    }

    #[test]
    fn read_back_is_ignored_when_the_driver_has_the_clocks() {
        let gpu = Arc::new(h100(1));
        let mut keeper = ClockKeeper::new(gpu, vec![0]);
        for _ in 0..3 {
            assert!(!keeper.check_read_back(&[reading(345, &[])]));
        }
        assert!(keeper.is_at(ClockTarget::Default));
    }

    #[test]
    fn take_over_resets_a_lock_left_behind() {
        let gpu = Arc::new(h100(1));
        gpu.lock_sm_clock(0, 1200).expect("a lock left by a killed agent");
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        keeper.take_over();
        assert_eq!(gpu.locked(0), None, "given back to the driver");
        assert!(keeper.is_at(ClockTarget::Default));

        gpu.set_fault(FakeFault::NoPermission);
        let mut keeper = ClockKeeper::new(gpu.clone(), vec![0]);
        keeper.take_over();
        assert!(keeper.is_at(ClockTarget::Default), "a failed reset at start assumes driver clocks");
    }
}
