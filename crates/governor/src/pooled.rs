//! Features of the reward model shared by all clock arms.
//!
//! A window's EDP per token moves far more with the load than with the clock, so raw rewards
//! judge the load a clock happened to meet. The shared model regresses the reward on the load
//! and a smooth curve in the clock together, over every window of every arm: two clocks
//! compared in one context differ only by the clock terms.
//!
//! The load is the learnt window's own (what explains its reward): logs of the token rates,
//! their squares and product (EDP falls with the load along a curve), and the prefill share.
//! They are raw (log-compressed) features, not z-scores, whose meaning drifts with the
//! normaliser. The clock curve is a cubic whose first two terms also vary with the prefill
//! share, as compute-bound prefill wants a higher clock than memory-bound decode.

use nalgebra::DVector;

use super::context::RAW;

/// The load features the shared model uses, as indices into the raw features: prompt and
/// generated tokens per second and the prefill share. They are what the clients ask for, so
/// they do not depend on the clock in the long run; queue, running requests, KV usage and
/// tokens per iteration do (a lower clock keeps more requests in flight, and batches them
/// better): conditioning on those would credit the clock's own effect to the load.
const LOAD: [usize; 3] = [3, 4, 7];
/// Index of the prefill share in the raw features.
const PREFILL_SHARE: usize = 7;

/// Clock terms: u, u², u³, and u, u² times the prefill share.
pub const CLOCK_TERMS: usize = 5;
/// Load curvature: squares and product of the two log token rates.
pub const LOAD_CURVE: usize = 3;
/// Dimension of the shared model: load features, bias, clock terms, load curvature.
pub const SHARED_DIM: usize = LOAD.len() + 1 + CLOCK_TERMS + LOAD_CURVE;

/// The clock as an offset in [-1, 1] over the explored range `[lo, hi]` MHz.
pub fn clock_offset(mhz: u32, lo: u32, hi: u32) -> f64 {
    let (lo, hi) = (f64::from(lo), f64::from(hi.max(lo + 1)));
    (2.0 * (f64::from(mhz) - lo) / (hi - lo) - 1.0).clamp(-1.5, 1.5)
}

/// Shared-model features of a window's raw features with clock offset `u`.
pub fn features(raw: &[f64; RAW], u: f64) -> DVector<f64> {
    let finite = |i: usize| if raw[i].is_finite() { raw[i] } else { 0.0 };
    let mut v = DVector::zeros(SHARED_DIM);
    for (k, &i) in LOAD.iter().enumerate() {
        v[k] = finite(i);
    }
    let c = LOAD.len();
    v[c] = 1.0;
    let share = finite(PREFILL_SHARE) - 0.5;
    v[c + 1] = u;
    v[c + 2] = u * u;
    v[c + 3] = u * u * u;
    v[c + 4] = u * share;
    v[c + 5] = u * u * share;
    // Logs of token rates reach ~10: scaled so the squares stay of the same order.
    let (p, g) = (finite(LOAD[0]), finite(LOAD[1]));
    let k = c + 1 + CLOCK_TERMS;
    v[k] = p * p / 10.0;
    v[k + 1] = g * g / 10.0;
    v[k + 2] = p * g / 10.0;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_spans_the_range() {
        assert_eq!(clock_offset(900, 900, 1980), -1.0);
        assert_eq!(clock_offset(1980, 900, 1980), 1.0);
        assert!(clock_offset(1440, 900, 1980).abs() < 1e-12);
        assert_eq!(clock_offset(100, 900, 1980), -1.5, "clamped");
    }

    #[test]
    fn two_clocks_in_one_context_differ_only_in_clock_terms() {
        let raw = [0.0, 3.0, 0.2, 5.0, 7.0, 3.0, 0.0, 0.3];
        let a = features(&raw, -0.5);
        let b = features(&raw, 0.5);
        let d = &a - &b;
        let c = LOAD.len() + 1;
        assert!(d.rows(0, c).iter().all(|x| *x == 0.0));
        assert!(d.rows(c + CLOCK_TERMS, LOAD_CURVE).iter().all(|x| *x == 0.0), "load curvature");
        assert!(d.rows(c, CLOCK_TERMS).iter().any(|x| *x != 0.0));
        assert_eq!(a[c - 1], 1.0, "bias");
        assert_eq!(a[1], 7.0, "generated tokens");
        assert!((a[c + 3] - (-0.5 * (0.3 - 0.5))).abs() < 1e-12, "u x prefill share");
    }

    /// A reward that depends on the load (along a curve) and on the clock separately is
    /// recovered exactly, including the clock curve, even though load and clock were
    /// correlated in the data.
    #[test]
    fn separates_load_from_clock_when_they_are_confounded() {
        let mut m = crate::linucb::LinUcb::new(SHARED_DIM, 1e-6);
        let curve = |u: f64| -0.3 * u * u + 0.1 * u;
        for i in 0..400 {
            let u = ((i % 13) as f64 / 6.0) - 1.0;
            // The load ramps up while the clocks are visited: confounded.
            let load = 5.0 + (i as f64 / 100.0) + 0.3 * u;
            let raw = [0.0, 2.0 + 0.1 * (i % 7) as f64, 0.1, 4.0, load, 3.0, 0.0, 0.2];
            let y = -0.8 * load + 0.05 * load * load + curve(u);
            m.update(&features(&raw, u), y);
        }
        let raw = [0.0, 2.5, 0.1, 4.0, 6.0, 3.0, 0.0, 0.2];
        let pred = |u: f64| m.predict(&features(&raw, u));
        for u in [-1.0, -0.4, 0.0, 0.7, 1.0] {
            let got = pred(u) - pred(0.0);
            assert!((got - (curve(u) - curve(0.0))).abs() < 1e-3, "u {u}: {got}");
        }
    }
}
