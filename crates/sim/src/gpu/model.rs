//! The time and power model of one H100 and its fit to the sweep ([`Sweep`]).
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

use std::sync::OnceLock;

use super::sweep::{top, Measured, Sweep};
use super::{MAX_MHZ, POWER_CAP_W};

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
pub(super) struct Eval {
    seconds: f64,
    watts: f64,
    pub(super) memory_share: f64,
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
    pub(super) fn cost(&self, mhz: u32, work: Work) -> (StepCost, Eval, f64) {
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
    let n = crate::saturating_u32(((to - from) / step).round());
    (0..=n).map(move |i| from + step * f64::from(i))
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
