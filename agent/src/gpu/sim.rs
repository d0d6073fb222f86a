//! A simulated H100 whose time and power per unit of work follow real measurements
//! (`agent/data/h100-dvfs-sweep.csv`, measured with NVML on an H100 80GB HBM3, 700 W cap).
//!
//! Model: work is split into a compute-bound part and a memory-bound part, each given as the
//! seconds it takes at 1980 MHz. Each part slows down with the clock along its own measured
//! curve (compute: the 8192^3 GEMM, which is power-capped above ~1380 MHz so higher clocks buy
//! nothing; memory: the batch-16 decode, flat down to ~1300 MHz, slower below), interpolated
//! linearly between the measured clocks. The parts run one after the other. The power of a step
//! with compute share `s` of its time is `(1-s) P_mem + s P_compute + s(1-s) Y`: the two pure
//! curves at the ends, plus an overlap term `Y(f)` (memory streaming while the SMs compute draws
//! more than either alone) calibrated on the batch-256 decode; at most the 700 W cap.
//! Idle power depends on the locked clock (120 W at 1980 MHz, ~75 W at low clocks); an unlocked
//! GPU drops to its lowest clock when idle, as the driver does, and idles at that power.
//! The `prefill_4k` rows are not used for calibration: the tests predict them and report the
//! error per point.

use std::sync::{Mutex, MutexGuard, OnceLock};

use super::{GpuBackend, GpuError, GpuInfo, GpuSample};

/// The H100's supported SM clocks: 345..=1980 MHz in 15 MHz steps (110 clocks).
pub const MIN_MHZ: u32 = 345;
pub const MAX_MHZ: u32 = 1980;
pub const STEP_MHZ: u32 = 15;
pub const POWER_CAP_W: f64 = 700.0;
const MEM_CLOCK_MHZ: u32 = 2619;
const SWEEP_CSV: &str = include_str!("../../data/h100-dvfs-sweep.csv");

/// Work of one engine step, as seconds it would take at the maximum clock (1980 MHz) on an
/// unloaded H100.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub compute_s: f64,
    pub memory_s: f64,
}

/// What a piece of work costs at some clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub seconds: f64,
    pub joules: f64,
    pub watts: f64,
}

/// One measured row of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub mhz: u32,
    pub seconds: f64,
    pub watts: f64,
}

/// Measured curves by workload, clocks ascending.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub gemm: Vec<Measured>,
    pub decode_b16: Vec<Measured>,
    pub decode_b256: Vec<Measured>,
    pub prefill_4k: Vec<Measured>,
    /// (MHz, idle watts)
    pub idle: Vec<(u32, f64)>,
}

impl Sweep {
    /// Parses the sweep CSV (`sm_mhz,workload,sec_per_call,watts,...`; `#` lines are comments).
    pub fn parse(text: &str) -> Result<Sweep, String> {
        let mut s = Sweep::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("sm_mhz") {
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize, what: &str| -> Result<f64, String> {
                f.get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("line {}: bad {what}", n + 1))
            };
            let mhz = num(0, "sm_mhz")? as u32;
            let watts = num(3, "watts")?;
            if f.get(1) == Some(&"idle") {
                s.idle.push((mhz, watts));
                continue;
            }
            let m = Measured { mhz, seconds: num(2, "sec_per_call")?, watts };
            match f.get(1).copied() {
                Some("gemm8k") => s.gemm.push(m),
                Some("decode_b16") => s.decode_b16.push(m),
                Some("decode_b256") => s.decode_b256.push(m),
                Some("prefill_4k") => s.prefill_4k.push(m),
                other => return Err(format!("line {}: unknown workload {other:?}", n + 1)),
            }
        }
        for v in [&mut s.gemm, &mut s.decode_b16, &mut s.decode_b256, &mut s.prefill_4k] {
            v.sort_by_key(|m| m.mhz);
        }
        s.idle.sort_by_key(|r| r.0);
        if s.gemm.len() < 2 || s.decode_b16.len() < 2 || s.idle.len() < 2 {
            return Err("sweep needs at least two clocks of gemm8k, decode_b16 and idle".into());
        }
        Ok(s)
    }

    /// The embedded H100 measurements.
    pub fn h100() -> &'static Sweep {
        static SWEEP: OnceLock<Sweep> = OnceLock::new();
        #[allow(clippy::expect_used)] // embedded data, checked by tests
        SWEEP.get_or_init(|| Sweep::parse(SWEEP_CSV).expect("embedded sweep parses"))
    }
}

/// Linear interpolation over (x, y) points sorted by x, flat beyond the ends.
fn interp(points: &[(f64, f64)], x: f64) -> f64 {
    match points {
        [] => 0.0,
        [only] => only.1,
        _ => {
            if x <= points[0].0 {
                return points[0].1;
            }
            for w in points.windows(2) {
                let ((x0, y0), (x1, y1)) = (w[0], w[1]);
                if x <= x1 {
                    return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
                }
            }
            points[points.len() - 1].1
        }
    }
}

/// Time factor (relative to 1980 MHz) and power of one kind of work, against the clock.
#[derive(Debug, Clone)]
struct Curve {
    slowdown: Vec<(f64, f64)>,
    watts: Vec<(f64, f64)>,
}

impl Curve {
    fn from(rows: &[Measured]) -> Curve {
        let top = rows.iter().max_by_key(|m| m.mhz).map_or(1.0, |m| m.seconds);
        Curve {
            slowdown: rows.iter().map(|m| (f64::from(m.mhz), m.seconds / top)).collect(),
            watts: rows.iter().map(|m| (f64::from(m.mhz), m.watts)).collect(),
        }
    }
}

/// The calibrated time/power model of one H100.
#[derive(Debug, Clone)]
pub struct PowerModel {
    compute: Curve,
    memory: Curve,
    /// Overlap power (W) by clock, see the module docs.
    overlap: Vec<(f64, f64)>,
    idle: Vec<(f64, f64)>,
}

impl PowerModel {
    pub fn h100() -> &'static PowerModel {
        static MODEL: OnceLock<PowerModel> = OnceLock::new();
        MODEL.get_or_init(|| PowerModel::calibrate(Sweep::h100()))
    }

    /// Calibrates on the compute-bound GEMM, the memory-bound batch-16 decode, the mixed
    /// batch-256 decode (overlap power only) and the idle rows.
    pub fn calibrate(s: &Sweep) -> PowerModel {
        let mut m = PowerModel {
            compute: Curve::from(&s.gemm),
            memory: Curve::from(&s.decode_b16),
            overlap: Vec::new(),
            idle: s.idle.iter().map(|&(m, w)| (f64::from(m), w)).collect(),
        };
        let (Some(b16), Some(b256)) = (s.decode_b16.last(), s.decode_b256.last()) else {
            return m;
        };
        // decode_b256 = the batch-16 memory traffic plus extra compute, split at 1980 MHz.
        let work = Work { compute_s: (b256.seconds - b16.seconds).max(0.0), memory_s: b16.seconds };
        m.overlap = s
            .decode_b256
            .iter()
            .filter_map(|r| {
                let (f, tc, tm) = m.split(r.mhz, work);
                let share = tc / (tc + tm);
                let ends = (1.0 - share) * interp(&m.memory.watts, f) + share * interp(&m.compute.watts, f);
                (share > 0.0 && share < 1.0).then(|| (f, (r.watts - ends) / (share * (1.0 - share))))
            })
            .collect();
        m
    }

    /// Clock as f64, and the compute and memory seconds of `work` at that clock.
    fn split(&self, mhz: u32, work: Work) -> (f64, f64, f64) {
        let f = f64::from(mhz);
        let tc = work.compute_s.max(0.0) * interp(&self.compute.slowdown, f);
        let tm = work.memory_s.max(0.0) * interp(&self.memory.slowdown, f);
        (f, tc, tm)
    }

    pub fn idle_watts(&self, mhz: u32) -> f64 {
        interp(&self.idle, f64::from(mhz))
    }

    pub fn cost(&self, mhz: u32, work: Work) -> StepCost {
        let (f, tc, tm) = self.split(mhz, work);
        let seconds = tc + tm;
        if seconds <= 0.0 {
            return StepCost { seconds: 0.0, joules: 0.0, watts: self.idle_watts(mhz) };
        }
        let s = tc / seconds;
        let watts = ((1.0 - s) * interp(&self.memory.watts, f)
            + s * interp(&self.compute.watts, f)
            + s * (1.0 - s) * interp(&self.overlap, f))
            .min(POWER_CAP_W);
        StepCost { seconds, joules: watts * seconds, watts }
    }
}

/// A fault to inject into the simulated GPU (for reliability tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Clock changes fail.
    SetFails,
    /// Reads fail.
    ReadFails,
    /// The GPU fell off the bus: everything fails.
    Lost,
}

#[derive(Debug)]
struct State {
    locked: Option<u32>,
    energy_j: Vec<f64>,
    last_watts: f64,
    busy_share: f64,
    fault: Fault,
    /// Free-running GPUs (no engine drives them) idle along the wall clock from here.
    wall: Option<std::time::Instant>,
}

/// `count` simulated H100s of one tensor-parallel group: they share one clock and each does
/// the same work (as vLLM's TP ranks do).
#[derive(Debug)]
pub struct SimGpu {
    count: u32,
    state: Mutex<State>,
}

impl SimGpu {
    pub fn h100(count: u32) -> SimGpu {
        let count = count.max(1);
        SimGpu {
            count,
            state: Mutex::new(State {
                locked: None,
                energy_j: vec![0.0; count as usize],
                last_watts: PowerModel::h100().idle_watts(MAX_MHZ),
                busy_share: 0.0,
                fault: Fault::None,
                wall: None,
            }),
        }
    }

    /// GPUs that no simulated engine drives (e.g. `backend = "sim"` next to a separate
    /// `vllm-sim`): they idle in wall-clock time, so their energy counter advances.
    pub fn free_running(count: u32) -> SimGpu {
        let g = SimGpu::h100(count);
        g.state().wall = Some(std::time::Instant::now());
        g
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The supported clocks, ascending.
    pub fn clocks() -> Vec<u32> {
        (MIN_MHZ..=MAX_MHZ).step_by(STEP_MHZ as usize).collect()
    }

    /// Pure: what `work` would cost at `clock_mhz`.
    pub fn cost(&self, clock_mhz: u32, work: Work) -> StepCost {
        PowerModel::h100().cost(clock_mhz, work)
    }

    pub fn idle_watts(&self, clock_mhz: u32) -> f64 {
        PowerModel::h100().idle_watts(clock_mhz)
    }

    /// Current effective SM clock: the locked one, or the maximum (the driver boosts when busy).
    pub fn clock_mhz(&self) -> u32 {
        self.state().locked.unwrap_or(MAX_MHZ)
    }

    /// Runs `work` at the current clock on every GPU of the group and counts its energy.
    pub fn execute(&self, work: Work) -> StepCost {
        let mut st = self.state();
        let cost = PowerModel::h100().cost(st.locked.unwrap_or(MAX_MHZ), work);
        for e in &mut st.energy_j {
            *e += cost.joules;
        }
        st.last_watts = cost.watts;
        st.busy_share = 1.0;
        cost
    }

    /// Advances time with nothing running: idle power of the locked clock, or of the lowest
    /// clock when the driver manages clocks.
    pub fn idle_for(&self, seconds: f64) {
        if seconds <= 0.0 {
            return;
        }
        let mut st = self.state();
        let w = PowerModel::h100().idle_watts(st.locked.unwrap_or(MIN_MHZ));
        for e in &mut st.energy_j {
            *e += w * seconds;
        }
        st.last_watts = w;
        st.busy_share = 0.0;
    }

    /// Makes later calls fail as a real GPU would (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        self.state().fault = fault;
    }

    fn check(&self, index: u32, st: &State, op: Fault) -> Result<(), GpuError> {
        if index >= self.count {
            return Err(GpuError::NoSuchGpu { index, count: self.count });
        }
        match st.fault {
            Fault::Lost => Err(GpuError::Lost { index }),
            f if f == op => Err(GpuError::Call { index, op: "simulated", msg: format!("injected fault {f:?}") }),
            _ => Ok(()),
        }
    }
}

impl GpuBackend for SimGpu {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn devices(&self) -> Vec<GpuInfo> {
        (0..self.count)
            .map(|index| GpuInfo {
                index,
                name: "NVIDIA H100 80GB HBM3 (simulated)".into(),
                uuid: format!("GPU-sim-{index}"),
                sm_clocks_mhz: Self::clocks(),
                power_limit_w: POWER_CAP_W,
            })
            .collect()
    }

    fn sample(&self, index: u32) -> Result<GpuSample, GpuError> {
        let mut st = self.state();
        self.check(index, &st, Fault::ReadFails)?;
        if let Some(since) = st.wall {
            let w = PowerModel::h100().idle_watts(st.locked.unwrap_or(MIN_MHZ));
            let dt = since.elapsed().as_secs_f64();
            for e in &mut st.energy_j {
                *e += w * dt;
            }
            st.wall = Some(std::time::Instant::now());
            st.last_watts = w;
        }
        // The driver boosts a busy unlocked GPU to the maximum and drops an idle one to the minimum.
        let clock = st.locked.unwrap_or(if st.busy_share > 0.0 { MAX_MHZ } else { MIN_MHZ });
        let mut throttle = Vec::new();
        if st.last_watts >= POWER_CAP_W - 0.5 {
            throttle.push("sw_power_cap".to_string());
        }
        if st.busy_share == 0.0 && st.locked.is_none() {
            throttle.push("gpu_idle".to_string());
        }
        Ok(GpuSample {
            sm_clock_mhz: clock,
            mem_clock_mhz: MEM_CLOCK_MHZ,
            power_w: st.last_watts,
            energy_j: st.energy_j[index as usize],
            gpu_util_pct: (st.busy_share * 100.0).round() as u32,
            mem_util_pct: (st.busy_share * 60.0).round() as u32,
            // Roughly what an air-cooled H100 shows: ~30 C idle, ~75 C at the power cap.
            temperature_c: (30.0 + st.last_watts * 0.065).round() as u32,
            throttle_reasons: throttle,
        })
    }

    fn lock_sm_clock(&self, index: u32, mhz: u32) -> Result<u32, GpuError> {
        let mut st = self.state();
        self.check(index, &st, Fault::SetFails)?;
        if !(MIN_MHZ..=MAX_MHZ).contains(&mhz) || (mhz - MIN_MHZ) % STEP_MHZ != 0 {
            return Err(GpuError::UnsupportedClock { index, mhz, min: MIN_MHZ, max: MAX_MHZ });
        }
        // One clock for the whole group, as the agent always sets them together.
        st.locked = Some(mhz);
        Ok(mhz)
    }

    fn reset_sm_clock(&self, index: u32) -> Result<(), GpuError> {
        let mut st = self.state();
        self.check(index, &st, Fault::SetFails)?;
        st.locked = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b) / b
    }

    /// Predicts the held-out rows (prefill_4k as compute work, decode_b256 as its measured
    /// 1980 MHz split into memory and compute) and reports the error per point.
    #[test]
    fn fit_to_the_h100_table_with_error_per_point() {
        let s = Sweep::h100();
        let m = PowerModel::calibrate(s);
        let top = |rows: &[Measured]| rows.iter().max_by_key(|r| r.mhz).copied().expect("rows");
        let b16_top = top(&s.decode_b16).seconds;
        let b256_top = top(&s.decode_b256).seconds;
        let cases: Vec<(&str, &[Measured], Work)> = vec![
            ("gemm8k", &s.gemm, Work { compute_s: top(&s.gemm).seconds, memory_s: 0.0 }),
            ("decode_b16", &s.decode_b16, Work { compute_s: 0.0, memory_s: b16_top }),
            ("prefill_4k", &s.prefill_4k, Work { compute_s: top(&s.prefill_4k).seconds, memory_s: 0.0 }),
            ("decode_b256", &s.decode_b256, Work { compute_s: b256_top - b16_top, memory_s: b16_top }),
        ];
        let mut held_out_time = Vec::new();
        let mut held_out_power = Vec::new();
        eprintln!("workload     MHz  time err  power err");
        for (name, rows, work) in cases {
            for r in rows {
                let c = m.cost(r.mhz, work);
                let (et, ep) = (rel(c.seconds, r.seconds), rel(c.watts, r.watts));
                eprintln!("{name:<11} {:>4}  {:>+7.1}%  {:>+8.1}%", r.mhz, et * 100.0, ep * 100.0);
                if name != "prefill_4k" {
                    assert!(et.abs() < 0.08, "{name} {} MHz: time off by {et}", r.mhz);
                    assert!(ep.abs() < 0.01 || r.watts > POWER_CAP_W, "{name} {} MHz: power off by {ep}", r.mhz);
                } else {
                    held_out_time.push(et.abs());
                    held_out_power.push(ep.abs());
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "held-out prefill_4k: time error mean {:.1}% max {:.1}%, power error mean {:.1}% max {:.1}%",
            mean(&held_out_time) * 100.0,
            max(&held_out_time) * 100.0,
            mean(&held_out_power) * 100.0,
            max(&held_out_power) * 100.0
        );
        assert!(mean(&held_out_time) < 0.03 && max(&held_out_time) < 0.05);
        assert!(mean(&held_out_power) < 0.06 && max(&held_out_power) < 0.10);
    }

    #[test]
    fn decode_at_1200_costs_more_time_and_much_less_energy() {
        let g = SimGpu::h100(1);
        let w = Work { compute_s: 0.0, memory_s: 0.002878 };
        let (hi, lo) = (g.cost(1980, w), g.cost(1200, w));
        let dt = rel(lo.seconds, hi.seconds);
        let de = rel(lo.joules, hi.joules);
        assert!((0.07..0.11).contains(&dt), "time +{:.1}%", dt * 100.0);
        assert!((-0.30..-0.22).contains(&de), "energy {:.1}%", de * 100.0);
    }

    #[test]
    fn compute_is_power_capped_above_1455() {
        let g = SimGpu::h100(1);
        let w = Work { compute_s: 0.0016, memory_s: 0.0 };
        let gain = rel(g.cost(1455, w).seconds, g.cost(1980, w).seconds);
        assert!(gain.abs() < 0.02, "1980 vs 1455 differ by {:.1}%", gain * 100.0);
        assert!(g.cost(1980, w).watts <= POWER_CAP_W);
        assert!(g.cost(900, w).seconds > g.cost(1455, w).seconds * 1.3);
    }

    #[test]
    fn idle_power_depends_on_the_locked_clock() {
        let g = SimGpu::h100(1);
        assert!((g.idle_watts(1980) - 120.2).abs() < 0.01);
        assert!(g.idle_watts(600) < 80.0);
    }

    #[test]
    fn energy_counter_lock_and_reset() {
        let g = SimGpu::h100(2);
        assert_eq!(g.devices().len(), 2);
        assert_eq!(g.devices()[0].sm_clocks_mhz.len(), 110);
        let c = g.execute(Work { compute_s: 0.5, memory_s: 0.5 });
        g.idle_for(2.0);
        let e = g.sample(1).expect("sample").energy_j;
        let idle = g.idle_watts(MIN_MHZ);
        assert!((e - (c.joules + 2.0 * idle)).abs() < 1e-6, "unlocked idles at the lowest clock: {e}");
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, MIN_MHZ, "idle and unlocked");
        assert_eq!(g.lock_sm_clock(0, 1005).expect("lock"), 1005);
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, 1005);
        assert_eq!(g.clock_mhz(), 1005);
        assert!(matches!(g.lock_sm_clock(0, 1000), Err(GpuError::UnsupportedClock { .. })));
        assert!(matches!(g.lock_sm_clock(0, 300), Err(GpuError::UnsupportedClock { .. })));
        assert!(matches!(g.sample(2), Err(GpuError::NoSuchGpu { .. })));
        g.reset_sm_clock(0).expect("reset");
        assert_eq!(g.clock_mhz(), 1980);
    }

    #[test]
    fn free_running_gpu_idles_in_wall_time() {
        let g = SimGpu::free_running(1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let e = g.sample(0).expect("sample").energy_j;
        assert!((0.02 * 70.0..5.0 * 120.0).contains(&e), "{e}");
    }

    #[test]
    fn injected_faults_fail_like_a_gpu() {
        let g = SimGpu::h100(1);
        g.inject(Fault::SetFails);
        assert!(g.lock_sm_clock(0, 1200).is_err());
        assert!(g.sample(0).is_ok());
        g.inject(Fault::ReadFails);
        assert!(g.sample(0).is_err());
        g.inject(Fault::Lost);
        assert!(matches!(g.reset_sm_clock(0), Err(GpuError::Lost { index: 0 })));
        g.inject(Fault::None);
        assert!(g.sample(0).is_ok());
    }
}
