//! A scripted GPU for tests: fixed clocks and counters, every lock recorded, and faults that
//! a test switches on. It models no speed or power (the simulator's H100 does that).

use std::sync::Mutex;

use crate::{GpuBackend, GpuError, GpuInfo, GpuSample};

/// What a [`FakeGpu`] does on the next calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FakeFault {
    #[default]
    None,
    /// Locks and resets fail with [`GpuError::NoPermission`].
    NoPermission,
    /// Every call fails with [`GpuError::Lost`].
    Lost,
}

#[derive(Debug, Default)]
struct FakeState {
    locked: Vec<Option<u32>>,
    /// Every lock (`Some(mhz)`) and reset (`None`), per GPU index, in order.
    calls: Vec<(u32, Option<u32>)>,
    fault: FakeFault,
}

/// `count` GPUs with the clocks given; idle at the lowest, at the lock while locked.
#[derive(Debug)]
pub struct FakeGpu {
    infos: Vec<GpuInfo>,
    state: Mutex<FakeState>,
}

impl FakeGpu {
    pub fn new(count: u32, sm_clocks_mhz: Vec<u32>) -> FakeGpu {
        let infos = (0..count)
            .map(|index| GpuInfo {
                index,
                name: "Fake GPU".into(),
                uuid: format!("GPU-fake-{index}"),
                sm_clocks_mhz: sm_clocks_mhz.clone(),
                power_limit_w: 700.0,
            })
            .collect();
        FakeGpu { infos, state: Mutex::new(FakeState { locked: vec![None; count as usize], ..FakeState::default() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_fault(&self, fault: FakeFault) {
        self.state().fault = fault;
    }

    /// The clock locked on GPU `index`; None while the driver has it.
    pub fn locked(&self, index: u32) -> Option<u32> {
        self.state().locked.get(index as usize).copied().flatten()
    }

    /// Locks (`Some(mhz)`) and resets (`None`) so far, as `(index, what)`.
    pub fn calls(&self) -> Vec<(u32, Option<u32>)> {
        self.state().calls.clone()
    }

    fn info(&self, index: u32) -> Result<&GpuInfo, GpuError> {
        self.infos
            .get(index as usize)
            .ok_or(GpuError::NoSuchGpu { index, count: u32::try_from(self.infos.len()).unwrap_or(u32::MAX) })
    }
}

impl GpuBackend for FakeGpu {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn devices(&self) -> Vec<GpuInfo> {
        self.infos.clone()
    }

    fn sample(&self, index: u32) -> Result<GpuSample, GpuError> {
        let info = self.info(index)?;
        let st = self.state();
        if st.fault == FakeFault::Lost {
            return Err(GpuError::Lost { index });
        }
        let clock = st.locked[index as usize].unwrap_or_else(|| info.min_clock());
        Ok(GpuSample { sm_clock_mhz: clock, mem_clock_mhz: 2619, power_w: 100.0, ..GpuSample::default() })
    }

    fn lock_sm_clock(&self, index: u32, mhz: u32) -> Result<u32, GpuError> {
        let info = self.info(index)?;
        if !info.sm_clocks_mhz.contains(&mhz) {
            return Err(GpuError::UnsupportedClock { index, mhz, min: info.min_clock(), max: info.max_clock() });
        }
        let mut st = self.state();
        match st.fault {
            FakeFault::Lost => return Err(GpuError::Lost { index }),
            FakeFault::NoPermission => return Err(GpuError::NoPermission { index }),
            FakeFault::None => {}
        }
        st.locked[index as usize] = Some(mhz);
        st.calls.push((index, Some(mhz)));
        Ok(mhz)
    }

    fn reset_sm_clock(&self, index: u32) -> Result<(), GpuError> {
        self.info(index)?;
        let mut st = self.state();
        match st.fault {
            FakeFault::Lost => return Err(GpuError::Lost { index }),
            FakeFault::NoPermission => return Err(GpuError::NoPermission { index }),
            FakeFault::None => {}
        }
        st.locked[index as usize] = None;
        st.calls.push((index, None));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_recorded_and_read_back() {
        let g = FakeGpu::new(1, vec![345, 1200, 1980]);
        assert_eq!(g.lock_sm_clock(0, 1200).expect("lock"), 1200);
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, 1200);
        g.reset_sm_clock(0).expect("reset");
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, 345);
        assert_eq!(g.calls(), vec![(0, Some(1200)), (0, None)]);
    }

    #[test]
    fn faults_and_bad_input_are_errors() {
        let g = FakeGpu::new(1, vec![345, 1980]);
        assert!(matches!(g.lock_sm_clock(0, 1000), Err(GpuError::UnsupportedClock { .. })));
        assert!(matches!(g.lock_sm_clock(3, 345), Err(GpuError::NoSuchGpu { index: 3, count: 1 })));
        g.set_fault(FakeFault::NoPermission);
        assert!(matches!(g.lock_sm_clock(0, 345), Err(GpuError::NoPermission { index: 0 })));
        g.set_fault(FakeFault::Lost);
        assert!(matches!(g.sample(0), Err(GpuError::Lost { index: 0 })));
    }

    #[test]
    fn list_report_shows_clock_range_and_sample() {
        let r = crate::list_report(&FakeGpu::new(1, vec![345, 1200, 1980]));
        assert!(r.contains("3 supported, 345..1980 MHz"), "{r}");
        assert!(r.contains("SM 345 MHz"), "an idle, unlocked GPU sits at its lowest clock: {r}");
    }
}
