//! A simulated H100 whose time and power follow a small parametric model fitted to real
//! measurements (`crates/sim/data/h100-dvfs-sweep.csv`: NVML on an H100 80GB HBM3, 700 W cap).
//!
//! Model (clock `f` in MHz; every parameter is fitted from the embedded sweep at first use):
//! - Voltage rises above a knee: `V(f) = 1 + kv * softplus(f - knee) / 1000` (60 MHz soft edge).
//! - Idle power is leakage, flat at low clocks and rising with `V²`: `p0 + p1 (V² - 1)`
//!   (the table: ~76 W up to 1065 MHz, 120 W at 1980).
//! - Compute-bound work (GEMMs) adds `bc + ac f V²` while the tensor cores are busy; its time is
//!   `cycles / f`. Memory-bound work (streaming the weights, as decode does) adds `bm + am f`
//!   (the decode rows rise linearly with the clock, without the `V²` bend) and takes
//!   `memory_s * g(f) / g(1980)` with `g(f) = (1 + (fm/f)^n)^(1/n)`: flat above `fm` (~1300 MHz),
//!   `∝ 1/f` below it, where the SMs no longer issue loads fast enough to keep HBM busy.
//! - One step's two parts overlap partly: `t = (tc^q + tm^q)^(1/q)` (q = 1 would be one after the
//!   other, q = ∞ full overlap), and each part's power counts for the share of the step it is
//!   busy (`tc/t`, `tm/t`), so mixed work draws more than either kind alone, as decode_b256 does.
//! - Power cap: when the modelled power at the requested clock exceeds 700 W, the GPU runs at the
//!   highest clock that fits under 700 W (found by bisection). This gives both the flat time of
//!   compute work above ~1400 MHz and its 700 W plateau, from the power fit alone.
//!
//! A [`Work`] is given as seconds at 1980 MHz: for pure compute work that already includes the
//! cap, so compute seconds become cycles at the pure-compute capped clock (~1380 MHz).
//! Fit: a grid over (knee, kv) with weighted least squares for the linear coefficients
//! (idle, compute power at <= 1320 MHz, decode_b16 power), then grids minimising the mean
//! absolute relative error for (fm, n) on decode_b16 times and for (q, compute share) on
//! decode_b256 times and powers. `prefill_4k` is a second compute-bound workload in the power
//! fit only; its times are predicted. The test `fit_error_per_point` prints every point's error.

use std::sync::{Mutex, MutexGuard, OnceLock};

use gpu::{GpuBackend, GpuError, GpuInfo, GpuSample};

/// The H100's supported SM clocks: 345..=1980 MHz in 15 MHz steps (110 clocks).
pub const MIN_MHZ: u32 = 345;
pub const MAX_MHZ: u32 = 1980;
pub const STEP_MHZ: u32 = 15;
pub const POWER_CAP_W: f64 = 700.0;
const MEM_CLOCK_MHZ: u32 = 2619;
const SWEEP_CSV: &str = include_str!("../data/h100-dvfs-sweep.csv");
const TOP: f64 = MAX_MHZ as f64;
/// Width of the soft edge of the voltage knee, MHz.
const KNEE_SOFTNESS_MHZ: f64 = 60.0;
/// Compute rows below this share of the cap calibrate compute power (above it the cap may act).
const UNCAPPED_SHARE: f64 = 0.9;

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

/// A malformed sweep table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SweepError {
    #[error("sweep line {line}: bad or missing {field}")]
    BadField { line: usize, field: &'static str },
    #[error("sweep line {line}: unknown workload {name:?}")]
    UnknownWorkload { line: usize, name: String },
    #[error("sweep: {workload} needs at least 3 rows including one at 1980 MHz, found {found}")]
    TooFew { workload: &'static str, found: usize },
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
    pub fn parse(text: &str) -> Result<Sweep, SweepError> {
        let mut s = Sweep::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("sm_mhz") {
                continue;
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let num = |i: usize, field: &'static str| -> Result<f64, SweepError> {
                f.get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or(SweepError::BadField { line: n + 1, field })
            };
            let mhz = f
                .first()
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|m| *m > 0)
                .ok_or(SweepError::BadField { line: n + 1, field: "sm_mhz" })?;
            let watts = num(3, "watts")?;
            let workload = f.get(1).copied().unwrap_or("");
            if workload == "idle" {
                s.idle.push((mhz, watts));
                continue;
            }
            let m = Measured { mhz, seconds: num(2, "sec_per_call")?, watts };
            match workload {
                "gemm8k" => s.gemm.push(m),
                "decode_b16" => s.decode_b16.push(m),
                "decode_b256" => s.decode_b256.push(m),
                "prefill_4k" => s.prefill_4k.push(m),
                other => return Err(SweepError::UnknownWorkload { line: n + 1, name: other.to_string() }),
            }
        }
        for v in [&mut s.gemm, &mut s.decode_b16, &mut s.decode_b256, &mut s.prefill_4k] {
            v.sort_by_key(|m| m.mhz);
        }
        s.idle.sort_by_key(|r| r.0);
        for (workload, rows) in [("gemm8k", &s.gemm), ("decode_b16", &s.decode_b16), ("decode_b256", &s.decode_b256)] {
            if rows.len() < 3 || top(rows).is_none() {
                return Err(SweepError::TooFew { workload, found: rows.len() });
            }
        }
        if s.idle.len() < 3 {
            return Err(SweepError::TooFew { workload: "idle", found: s.idle.len() });
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

/// The row measured at 1980 MHz: the reference that [`Work`] seconds are given at.
fn top(rows: &[Measured]) -> Option<Measured> {
    rows.iter().find(|m| m.mhz == MAX_MHZ).copied()
}

/// The fitted parameters (see the module docs for the formulas).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Voltage knee (MHz) and slope (relative volts per GHz above it).
    pub knee_mhz: f64,
    pub kv: f64,
    /// Idle: `idle_w + idle_v2_w (V² - 1)`.
    pub idle_w: f64,
    pub idle_v2_w: f64,
    /// Compute activity: `compute_w + compute_w_per_ghz * GHz * V²`.
    pub compute_w: f64,
    pub compute_w_per_ghz: f64,
    /// Memory activity: `memory_w + memory_w_per_ghz * GHz`.
    pub memory_w: f64,
    pub memory_w_per_ghz: f64,
    /// Memory time `g(f) = (1 + (mem_knee_mhz / f)^mem_sharpness)^(1 / mem_sharpness)`.
    pub mem_knee_mhz: f64,
    pub mem_sharpness: f64,
    /// Overlap exponent of compute and memory time within one step.
    pub overlap_q: f64,
    /// The clock pure compute work really runs at when 1980 MHz is asked (power cap).
    pub compute_ref_mhz: f64,
}

/// Times and power of a piece of work at an effective clock, before the cap.
#[derive(Debug, Clone, Copy)]
struct Eval {
    seconds: f64,
    watts: f64,
    memory_share: f64,
}

impl Params {
    fn v2(&self, f: f64) -> f64 {
        let x = (f - self.knee_mhz) / KNEE_SOFTNESS_MHZ;
        let soft = KNEE_SOFTNESS_MHZ * if x > 30.0 { x } else { x.exp().ln_1p() };
        let v = 1.0 + self.kv * soft / 1000.0;
        v * v
    }

    pub fn idle_watts(&self, f: f64) -> f64 {
        self.idle_w + self.idle_v2_w * (self.v2(f) - 1.0)
    }

    fn compute_watts(&self, f: f64) -> f64 {
        self.compute_w + self.compute_w_per_ghz * f / 1000.0 * self.v2(f)
    }

    fn memory_watts(&self, f: f64) -> f64 {
        self.memory_w + self.memory_w_per_ghz * f / 1000.0
    }

    fn mem_slowdown(&self, f: f64) -> f64 {
        let g = |f: f64| (1.0 + (self.mem_knee_mhz / f).powf(self.mem_sharpness)).powf(1.0 / self.mem_sharpness);
        g(f) / g(TOP)
    }

    fn eval(&self, f: f64, work: Work) -> Eval {
        let tc = work.compute_s.max(0.0) * self.compute_ref_mhz / f;
        let tm = work.memory_s.max(0.0) * self.mem_slowdown(f);
        let seconds = if tc <= 0.0 {
            tm
        } else if tm <= 0.0 {
            tc
        } else {
            (tc.powf(self.overlap_q) + tm.powf(self.overlap_q)).powf(1.0 / self.overlap_q)
        };
        if seconds <= 0.0 {
            return Eval { seconds: 0.0, watts: self.idle_watts(f), memory_share: 0.0 };
        }
        let watts = self.idle_watts(f) + tc / seconds * self.compute_watts(f) + tm / seconds * self.memory_watts(f);
        Eval { seconds, watts, memory_share: tm / seconds }
    }

    /// Highest clock <= `f` at which `watts_at` stays within the cap (bisection; power rises with the clock).
    fn capped_clock(f: f64, watts_at: impl Fn(f64) -> f64) -> f64 {
        if watts_at(f) <= POWER_CAP_W {
            return f;
        }
        let (mut lo, mut hi) = (50.0, f);
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if watts_at(mid) > POWER_CAP_W {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        lo
    }

    /// Cost of `work` when `mhz` is asked for, and the clock it really runs at.
    fn cost(&self, mhz: u32, work: Work) -> (StepCost, Eval, f64) {
        let f = f64::from(mhz.max(1));
        let fe = Self::capped_clock(f, |x| self.eval(x, work).watts);
        let e = self.eval(fe, work);
        let watts = e.watts.min(POWER_CAP_W);
        (StepCost { seconds: e.seconds, joules: watts * e.seconds, watts }, e, fe)
    }
}

/// The calibrated model of one H100.
#[derive(Debug, Clone)]
pub struct PowerModel {
    pub params: Params,
    /// decode_b256 as fitted: its compute part (not measured) and the batch-16 memory part.
    pub decode_b256_work: Work,
}

/// Weighted least squares for `y ≈ a x1 + b x2`, each row weighted by `1/scale²` (relative error).
fn wls2(rows: &[(f64, f64, f64, f64)]) -> Option<(f64, f64)> {
    let (mut s11, mut s12, mut s22, mut s1y, mut s2y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(x1, x2, y, scale) in rows {
        let w = 1.0 / (scale * scale);
        s11 += w * x1 * x1;
        s12 += w * x1 * x2;
        s22 += w * x2 * x2;
        s1y += w * x1 * y;
        s2y += w * x2 * y;
    }
    let det = s11 * s22 - s12 * s12;
    (det.abs() > 1e-12 * (s11 * s22).max(1e-300))
        .then(|| ((s1y * s22 - s2y * s12) / det, (s2y * s11 - s1y * s12) / det))
}

fn steps(from: f64, to: f64, step: f64) -> impl Iterator<Item = f64> {
    let n = ((to - from) / step).round() as usize;
    (0..=n).map(move |i| from + step * i as f64)
}

impl PowerModel {
    pub fn h100() -> &'static PowerModel {
        static MODEL: OnceLock<PowerModel> = OnceLock::new();
        MODEL.get_or_init(|| {
            let m = PowerModel::fit(Sweep::h100());
            tracing::debug!(params = ?m.params, "simulated H100 fitted");
            m
        })
    }

    /// Fits the parameters to a sweep (see the module docs for the procedure).
    pub fn fit(s: &Sweep) -> PowerModel {
        let mut p = Params {
            knee_mhz: 1000.0,
            kv: 0.5,
            idle_w: 75.0,
            idle_v2_w: 0.0,
            compute_w: 0.0,
            compute_w_per_ghz: 0.0,
            memory_w: 0.0,
            memory_w_per_ghz: 0.0,
            mem_knee_mhz: 1300.0,
            mem_sharpness: 8.0,
            overlap_q: 2.0,
            compute_ref_mhz: TOP,
        };
        let compute_rows: Vec<Measured> =
            s.gemm.iter().chain(&s.prefill_4k).filter(|m| m.watts < UNCAPPED_SHARE * POWER_CAP_W).copied().collect();

        // 1. Power: grid over the voltage knee, linear least squares for the rest.
        let mut best = f64::INFINITY;
        for knee_mhz in steps(600.0, 1700.0, 10.0) {
            for kv in steps(0.02, 3.0, 0.02) {
                let mut q = Params { knee_mhz, kv, ..p };
                let idle: Vec<_> = s.idle.iter().map(|&(m, w)| (1.0, q.v2(f64::from(m)) - 1.0, w, w)).collect();
                let Some((a, b)) = wls2(&idle) else { continue };
                (q.idle_w, q.idle_v2_w) = (a, b);
                let rows = |rows: &[Measured], x2: &dyn Fn(f64) -> f64| -> Vec<(f64, f64, f64, f64)> {
                    rows.iter()
                        .map(|m| {
                            let f = f64::from(m.mhz);
                            (1.0, x2(f), m.watts - q.idle_watts(f), m.watts)
                        })
                        .collect()
                };
                let Some(c) = wls2(&rows(&compute_rows, &|f| f / 1000.0 * q.v2(f))) else { continue };
                let Some(mm) = wls2(&rows(&s.decode_b16, &|f| f / 1000.0)) else { continue };
                (q.compute_w, q.compute_w_per_ghz, q.memory_w, q.memory_w_per_ghz) = (c.0, c.1, mm.0, mm.1);
                let sq = |model: f64, w: f64| ((model - w) / w).powi(2);
                let err = s.idle.iter().map(|&(m, w)| sq(q.idle_watts(f64::from(m)), w)).sum::<f64>()
                    + compute_rows
                        .iter()
                        .map(|m| sq(q.idle_watts(f64::from(m.mhz)) + q.compute_watts(f64::from(m.mhz)), m.watts))
                        .sum::<f64>()
                    + s.decode_b16
                        .iter()
                        .map(|m| sq(q.idle_watts(f64::from(m.mhz)) + q.memory_watts(f64::from(m.mhz)), m.watts))
                        .sum::<f64>();
                if err < best {
                    best = err;
                    p = q;
                }
            }
        }
        // Pure compute work asked to run at 1980 MHz runs where its power meets the cap.
        p.compute_ref_mhz = Params::capped_clock(TOP, |f| p.idle_watts(f) + p.compute_watts(f));

        let rel = |model: f64, measured: f64| ((model - measured) / measured).abs();
        // 2. Memory time: decode_b16 is (almost) pure weight streaming.
        let b16_top = top(&s.decode_b16).map_or(0.0, |m| m.seconds);
        let mut best = f64::INFINITY;
        for knee in steps(900.0, 1700.0, 5.0) {
            for sharp in [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0] {
                let q = Params { mem_knee_mhz: knee, mem_sharpness: sharp, ..p };
                let w = Work { compute_s: 0.0, memory_s: b16_top };
                let err: f64 = s.decode_b16.iter().map(|m| rel(q.cost(m.mhz, w).0.seconds, m.seconds)).sum();
                if err < best {
                    best = err;
                    p = q;
                }
            }
        }
        // 3. Overlap: decode_b256 streams the same weights with 16x the math; its compute part
        // is not measured, so it is fitted along with the overlap exponent.
        let b256_top = top(&s.decode_b256).map_or(0.0, |m| m.seconds);
        let mut work = Work { compute_s: 0.0, memory_s: b16_top };
        let mut best = f64::INFINITY;
        for q_exp in steps(1.0, 6.0, 0.1) {
            for share in steps(0.05, 1.5, 0.01) {
                let q = Params { overlap_q: q_exp, ..p };
                let w = Work { compute_s: share * b256_top, memory_s: b16_top };
                let err: f64 = s
                    .decode_b256
                    .iter()
                    .map(|m| {
                        let c = q.cost(m.mhz, w).0;
                        rel(c.seconds, m.seconds).powi(2) + rel(c.watts, m.watts).powi(2)
                    })
                    .sum();
                if err < best {
                    best = err;
                    p = q;
                    work = w;
                }
            }
        }
        PowerModel { params: p, decode_b256_work: work }
    }

    pub fn idle_watts(&self, mhz: u32) -> f64 {
        self.params.idle_watts(f64::from(mhz))
    }

    pub fn cost(&self, mhz: u32, work: Work) -> StepCost {
        self.params.cost(mhz, work).0
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
    memory_share: f64,
    /// The last step ran below the asked clock to stay under the power cap.
    capped: bool,
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
                last_watts: PowerModel::h100().idle_watts(MIN_MHZ),
                busy_share: 0.0,
                memory_share: 0.0,
                capped: false,
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
        let mhz = st.locked.unwrap_or(MAX_MHZ);
        let (cost, eval, effective) = PowerModel::h100().params.cost(mhz, work);
        for e in &mut st.energy_j {
            *e += cost.joules;
        }
        st.last_watts = cost.watts;
        st.busy_share = if cost.seconds > 0.0 { 1.0 } else { 0.0 };
        st.memory_share = eval.memory_share;
        st.capped = effective < f64::from(mhz) - 1.0;
        cost
    }

    /// Advances time with nothing running: idle power of the locked clock, or of the lowest
    /// clock when the driver manages clocks.
    pub fn idle_for(&self, seconds: f64) {
        if seconds.is_nan() || seconds <= 0.0 {
            return;
        }
        let mut st = self.state();
        let w = PowerModel::h100().idle_watts(st.locked.unwrap_or(MIN_MHZ));
        for e in &mut st.energy_j {
            *e += w * seconds;
        }
        st.last_watts = w;
        st.busy_share = 0.0;
        st.memory_share = 0.0;
        st.capped = false;
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
        // The driver boosts a busy unlocked GPU to the maximum and drops an idle one to the
        // minimum. A locked clock reads back as locked even when the cap holds it lower; the
        // throttle reason says so.
        let clock = st.locked.unwrap_or(if st.busy_share > 0.0 { MAX_MHZ } else { MIN_MHZ });
        let mut throttle = Vec::new();
        if st.capped {
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
            mem_util_pct: (st.memory_share * 100.0).round() as u32,
            // Roughly what an air-cooled H100 shows: ~35 C idle, ~75 C at the power cap.
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

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    fn max(v: &[f64]) -> f64 {
        v.iter().copied().fold(0.0, f64::max)
    }

    /// Recomputes the fit from the embedded CSV and reports the relative error of every point.
    /// decode_b16 at 555 MHz is reported but kept out of the max bound: it ran as fast as at
    /// 690 MHz, which no model where slower clocks mean slower steps can follow.
    #[test]
    fn fit_error_per_point() {
        let s = Sweep::h100();
        let m = PowerModel::fit(s);
        eprintln!("fitted {:?}", m.params);
        let t = |rows: &[Measured]| top(rows).expect("1980 MHz row").seconds;
        let cases: Vec<(&str, &[Measured], Work)> = vec![
            ("gemm8k", &s.gemm, Work { compute_s: t(&s.gemm), memory_s: 0.0 }),
            ("prefill_4k", &s.prefill_4k, Work { compute_s: t(&s.prefill_4k), memory_s: 0.0 }),
            ("decode_b16", &s.decode_b16, Work { compute_s: 0.0, memory_s: t(&s.decode_b16) }),
            ("decode_b256", &s.decode_b256, m.decode_b256_work),
        ];
        let (mut time, mut power, mut time_for_max) = (Vec::new(), Vec::new(), Vec::new());
        eprintln!("workload     MHz  time err  power err");
        for (name, rows, work) in cases {
            for r in rows {
                let c = m.cost(r.mhz, work);
                let (et, ep) = (rel(c.seconds, r.seconds), rel(c.watts, r.watts));
                let outlier = name == "decode_b16" && r.mhz == 555;
                eprintln!(
                    "{name:<11} {:>4}  {:>+7.1}%  {:>+8.1}%{}",
                    r.mhz,
                    et * 100.0,
                    ep * 100.0,
                    if outlier { "  (outlier, not in max)" } else { "" }
                );
                time.push(et.abs());
                power.push(ep.abs());
                if !outlier {
                    time_for_max.push(et.abs());
                }
            }
        }
        for &(mhz, w) in &s.idle {
            let ep = rel(m.idle_watts(mhz), w);
            eprintln!("idle        {mhz:>4}            {:>+8.1}%", ep * 100.0);
            power.push(ep.abs());
        }
        eprintln!(
            "time: mean {:.1}% max {:.1}% (max without the outlier {:.1}%); power: mean {:.1}% max {:.1}%",
            mean(&time) * 100.0,
            max(&time) * 100.0,
            max(&time_for_max) * 100.0,
            mean(&power) * 100.0,
            max(&power) * 100.0
        );
        assert_eq!(time.len(), 48);
        assert!(mean(&time) < 0.03, "time mean {}", mean(&time));
        assert!(max(&time_for_max) < 0.12, "time max {}", max(&time_for_max));
        assert!(max(&time) < 0.30, "outlier {}", max(&time));
        assert!(mean(&power) < 0.04, "power mean {}", mean(&power));
        assert!(max(&power) < 0.12, "power max {}", max(&power));
    }

    #[test]
    fn malformed_sweeps_name_the_line() {
        let bad = "sm_mhz,workload,sec_per_call,watts\n1980,gemm8k,abc,700\n";
        assert_eq!(Sweep::parse(bad).err(), Some(SweepError::BadField { line: 2, field: "sec_per_call" }));
        let unknown = "1980,train,1.0,700\n";
        assert!(matches!(Sweep::parse(unknown), Err(SweepError::UnknownWorkload { line: 1, .. })));
        let short = "1980,gemm8k,1.0,700\n1980,idle,1.0,120\n";
        assert!(matches!(Sweep::parse(short), Err(SweepError::TooFew { workload: "gemm8k", found: 1 })));
    }

    #[test]
    fn decode_at_1200_costs_more_time_and_much_less_energy() {
        let g = SimGpu::h100(1);
        let w = Work { compute_s: 0.0, memory_s: 0.002878 };
        let (hi, lo) = (g.cost(1980, w), g.cost(1200, w));
        let dt = rel(lo.seconds, hi.seconds);
        let de = rel(lo.joules, hi.joules);
        eprintln!("decode 1200 vs 1980 MHz: time {:+.1}%, energy {:+.1}%", dt * 100.0, de * 100.0);
        assert!((0.06..0.13).contains(&dt), "time {:+.1}%", dt * 100.0);
        assert!((-0.31..-0.21).contains(&de), "energy {:+.1}%", de * 100.0);
    }

    #[test]
    fn compute_is_power_capped_above_1455() {
        let g = SimGpu::h100(1);
        let w = Work { compute_s: 0.0016, memory_s: 0.0 };
        let (top, mid) = (g.cost(1980, w), g.cost(1455, w));
        assert!((top.seconds - 0.0016).abs() < 1e-9, "compute seconds are seconds at 1980 MHz");
        assert!(rel(mid.seconds, top.seconds).abs() < 0.02, "1455 is {:+.1}%", rel(mid.seconds, top.seconds) * 100.0);
        assert!(top.watts <= POWER_CAP_W && top.watts > 0.97 * POWER_CAP_W, "{}", top.watts);
        assert!(g.cost(900, w).seconds > mid.seconds * 1.4);
        // Below the measured range the model keeps slowing down (no flat extrapolation).
        assert!(g.cost(MIN_MHZ, w).seconds > g.cost(555, w).seconds * 1.5);
        let idle = g.idle_watts(MIN_MHZ);
        assert!(g.cost(MIN_MHZ, w).watts > idle && g.cost(MIN_MHZ, w).watts < g.cost(555, w).watts);
    }

    #[test]
    fn mixed_work_overlaps_and_draws_more_than_either_part() {
        let g = SimGpu::h100(1);
        let (c, m) = (Work { compute_s: 0.002, memory_s: 0.0 }, Work { compute_s: 0.0, memory_s: 0.002 });
        let both = g.cost(1200, Work { compute_s: 0.002, memory_s: 0.002 });
        let (tc, tm) = (g.cost(1200, c), g.cost(1200, m));
        assert!(both.seconds > tc.seconds.max(tm.seconds) && both.seconds < tc.seconds + tm.seconds);
        assert!(both.watts > tc.watts.max(tm.watts));
        assert_eq!(g.cost(1200, Work::default()).seconds, 0.0);
        let neg = g.cost(1200, Work { compute_s: -1.0, memory_s: f64::NAN });
        assert_eq!(neg.joules, 0.0);
    }

    #[test]
    fn idle_power_depends_on_the_locked_clock() {
        let g = SimGpu::h100(1);
        assert!((g.idle_watts(1980) - 120.2).abs() < 6.0, "{}", g.idle_watts(1980));
        assert!(g.idle_watts(600) < 80.0 && g.idle_watts(600) > 70.0, "{}", g.idle_watts(600));
        assert!((g.idle_watts(MIN_MHZ) - g.idle_watts(600)).abs() < 1.0, "flat at low clocks");
    }

    #[test]
    fn energy_counter_lock_and_reset() {
        let g = SimGpu::h100(2);
        assert_eq!(g.devices().len(), 2);
        assert_eq!(g.devices()[0].sm_clocks_mhz.len(), 110);
        assert_eq!(g.devices()[1].uuid, "GPU-sim-1");
        let c = g.execute(Work { compute_s: 0.5, memory_s: 0.5 });
        g.idle_for(2.0);
        let e = g.sample(1).expect("sample").energy_j;
        let idle = g.idle_watts(MIN_MHZ);
        assert!((e - (c.joules + 2.0 * idle)).abs() < 1e-6, "unlocked idles at the lowest clock: {e}");
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, MIN_MHZ, "idle and unlocked");
        assert_eq!(g.lock_sm_clock(0, 1005).expect("lock"), 1005);
        assert_eq!(g.sample(0).expect("sample").sm_clock_mhz, 1005);
        assert_eq!(g.clock_mhz(), 1005);
        let before = g.sample(0).expect("sample").energy_j;
        let c = g.execute(Work { compute_s: 0.0, memory_s: 0.01 });
        assert!((g.sample(0).expect("sample").energy_j - before - c.joules).abs() < 1e-9);
        assert!(matches!(g.lock_sm_clock(0, 1000), Err(GpuError::UnsupportedClock { .. })));
        assert!(matches!(g.lock_sm_clock(0, 300), Err(GpuError::UnsupportedClock { .. })));
        assert!(matches!(g.sample(2), Err(GpuError::NoSuchGpu { .. })));
        g.reset_sm_clock(0).expect("reset");
        assert_eq!(g.clock_mhz(), 1980);
    }

    #[test]
    fn power_capped_steps_say_so() {
        let g = SimGpu::h100(1);
        g.execute(Work { compute_s: 0.01, memory_s: 0.0 });
        let s = g.sample(0).expect("sample");
        assert_eq!(s.throttle_reasons, vec!["sw_power_cap".to_string()]);
        assert!(s.power_w > 680.0 && s.temperature_c > 70, "{s:?}");
        g.lock_sm_clock(0, 1005).expect("lock");
        g.execute(Work { compute_s: 0.01, memory_s: 0.0 });
        assert!(g.sample(0).expect("sample").throttle_reasons.is_empty());
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
        assert!(g.lock_sm_clock(0, 1200).is_ok());
        g.inject(Fault::Lost);
        assert!(matches!(g.reset_sm_clock(0), Err(GpuError::Lost { index: 0 })));
        assert!(matches!(g.sample(0), Err(GpuError::Lost { index: 0 })));
        g.inject(Fault::None);
        assert!(g.sample(0).is_ok());
    }
}
