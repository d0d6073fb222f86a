//! One linear UCB model (Li et al. 2010, "disjoint" LinUCB): ridge regression of the reward on
//! the context, with an upper confidence bound from the inverse design matrix.
//!
//! The inverse is kept up to date with Sherman-Morrison rank-one updates (O(d^2) a step, which
//! is what keeps a decision in microseconds) and rebuilt from `A` by a Cholesky factorisation
//! every [`REFACTOR_EVERY`] updates so rounding errors cannot pile up.

use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

/// Rank-one updates between two exact refactorisations of `A^-1`.
pub const REFACTOR_EVERY: u32 = 32;

/// Why a stored model cannot be restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("stored model has dimension {got}, expected {want}")]
    Dimension { got: usize, want: usize },
    #[error("stored model field `{0}` has the wrong length")]
    Length(&'static str),
    #[error("stored model matrix A is not positive definite")]
    NotPositiveDefinite,
}

/// Serialisable form of a [`LinUcb`] model: `A` row-major, `b`, and the update count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinUcbState {
    pub dim: usize,
    pub lambda: f64,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub n: u64,
}

/// Ridge-regression bandit model for one arm.
#[derive(Debug, Clone)]
pub struct LinUcb {
    lambda: f64,
    a: DMatrix<f64>,
    a_inv: DMatrix<f64>,
    b: DVector<f64>,
    theta: DVector<f64>,
    n: u64,
    since_refactor: u32,
}

impl LinUcb {
    /// A fresh model with prior `A = lambda I`, `b = 0` (so theta = 0).
    pub fn new(dim: usize, lambda: f64) -> Self {
        let lambda = if lambda.is_finite() && lambda > 0.0 { lambda } else { 1.0 };
        Self {
            lambda,
            a: DMatrix::identity(dim, dim) * lambda,
            a_inv: DMatrix::identity(dim, dim) / lambda,
            b: DVector::zeros(dim),
            theta: DVector::zeros(dim),
            n: 0,
            since_refactor: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.b.len()
    }

    /// Number of rewards this model has learnt from.
    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn theta(&self) -> &DVector<f64> {
        &self.theta
    }

    pub fn a_inv(&self) -> &DMatrix<f64> {
        &self.a_inv
    }

    /// Expected reward in context `x`.
    pub fn predict(&self, x: &DVector<f64>) -> f64 {
        self.theta.dot(x)
    }

    /// Confidence width `sqrt(x' A^-1 x)`.
    pub fn width(&self, x: &DVector<f64>) -> f64 {
        x.dot(&(&self.a_inv * x)).max(0.0).sqrt()
    }

    /// Upper confidence bound `theta' x + alpha sqrt(x' A^-1 x)`.
    pub fn ucb(&self, x: &DVector<f64>, alpha: f64) -> f64 {
        self.predict(x) + alpha * self.width(x)
    }

    /// Learns reward `r` in context `x`. Non-finite input is ignored (a bad window must not
    /// poison the model).
    pub fn update(&mut self, x: &DVector<f64>, r: f64) {
        if x.len() != self.dim() || !r.is_finite() || x.iter().any(|v| !v.is_finite()) {
            return;
        }
        self.a += x * x.transpose();
        self.b += x * r;
        self.n += 1;
        self.since_refactor += 1;
        if self.since_refactor >= REFACTOR_EVERY {
            self.refactor();
            return;
        }
        // Sherman-Morrison: (A + x x')^-1 = A^-1 - (A^-1 x)(A^-1 x)' / (1 + x' A^-1 x).
        let ax = &self.a_inv * x;
        let denom = 1.0 + x.dot(&ax);
        self.a_inv -= (&ax * ax.transpose()) / denom;
        self.theta = &self.a_inv * &self.b;
    }

    /// Rebuilds `A^-1` and theta exactly from `A` and `b` (Cholesky; `A` is symmetric positive
    /// definite by construction since it starts at `lambda I`).
    pub fn refactor(&mut self) {
        self.since_refactor = 0;
        if let Some(ch) = self.a.clone().cholesky() {
            self.a_inv = ch.inverse();
            self.theta = ch.solve(&self.b);
        }
    }

    /// Forgets part of what was learnt: `A <- lambda I + keep (A - lambda I)`, `b <- keep b`.
    /// Used when the workload shifts, so old windows weigh less without throwing them away.
    pub fn forget(&mut self, keep: f64) {
        let keep = keep.clamp(0.0, 1.0);
        let prior = DMatrix::<f64>::identity(self.dim(), self.dim()) * self.lambda;
        self.a = &prior + (&self.a - &prior) * keep;
        self.b *= keep;
        // Rounded, between 0 and the old n (keep is clamped to 0..=1).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = (self.n as f64 * keep).round() as u64;
        self.n = n;
        self.refactor();
    }

    pub fn state(&self) -> LinUcbState {
        LinUcbState {
            dim: self.dim(),
            lambda: self.lambda,
            a: self.a.transpose().as_slice().to_vec(),
            b: self.b.as_slice().to_vec(),
            n: self.n,
        }
    }

    /// Restores a model, checking its shape against the dimension the caller expects.
    pub fn from_state(s: &LinUcbState, dim: usize) -> Result<Self, ModelError> {
        if s.dim != dim {
            return Err(ModelError::Dimension { got: s.dim, want: dim });
        }
        if s.a.len() != dim * dim {
            return Err(ModelError::Length("a"));
        }
        if s.b.len() != dim {
            return Err(ModelError::Length("b"));
        }
        let mut m = Self::new(dim, s.lambda);
        m.a = DMatrix::from_row_slice(dim, dim, &s.a);
        m.b = DVector::from_column_slice(&s.b);
        m.n = s.n;
        let ch = m.a.clone().cholesky().ok_or(ModelError::NotPositiveDefinite)?;
        m.a_inv = ch.inverse();
        m.theta = ch.solve(&m.b);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_x(rng: &mut rand::rngs::StdRng, d: usize) -> DVector<f64> {
        DVector::from_fn(d, |_, _| rng.random_range(-3.0..3.0))
    }

    /// theta and A^-1 after many Sherman-Morrison steps agree with a direct solve.
    #[test]
    fn theta_matches_direct_solve() {
        let d = 8;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut m = LinUcb::new(d, 2.0);
        let mut a = DMatrix::<f64>::identity(d, d) * 2.0;
        let mut b = DVector::<f64>::zeros(d);
        // 45 updates: crosses one refactorisation and ends 13 rank-one steps after it.
        for _ in 0..45 {
            let x = random_x(&mut rng, d);
            let r = rng.random_range(-2.0..2.0);
            m.update(&x, r);
            a += &x * x.transpose();
            b += &x * r;
        }
        let direct = a.clone().lu().solve(&b).expect("A is invertible");
        assert!((m.theta() - &direct).amax() < 1e-9, "theta {} vs {}", m.theta(), direct);
        let inv = a.try_inverse().expect("invertible");
        assert!((m.a_inv() - inv).amax() < 1e-9);
        assert_eq!(m.count(), 45);
    }

    #[test]
    fn learns_a_linear_reward_and_narrows_its_bound() {
        let d = 3;
        let truth = DVector::from_vec(vec![0.5, -1.0, 2.0]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut m = LinUcb::new(d, 1.0);
        let probe = DVector::from_vec(vec![1.0, 0.5, -0.5]);
        let w0 = m.width(&probe);
        for _ in 0..200 {
            let x = random_x(&mut rng, d);
            m.update(&x, truth.dot(&x));
        }
        assert!((m.theta() - &truth).amax() < 0.01, "{}", m.theta());
        assert!(m.width(&probe) < w0 / 10.0);
        assert!(m.ucb(&probe, 1.0) > m.predict(&probe));
    }

    #[test]
    fn non_finite_rewards_are_ignored() {
        let mut m = LinUcb::new(2, 1.0);
        let x = DVector::from_vec(vec![1.0, 1.0]);
        m.update(&x, f64::NAN);
        m.update(&DVector::from_vec(vec![f64::INFINITY, 1.0]), 1.0);
        m.update(&DVector::from_vec(vec![1.0]), 1.0);
        assert_eq!(m.count(), 0);
        assert_eq!(m.predict(&x), 0.0);
    }

    #[test]
    fn forgetting_moves_toward_the_prior() {
        let mut m = LinUcb::new(2, 1.0);
        let x = DVector::from_vec(vec![1.0, 0.0]);
        for _ in 0..10 {
            m.update(&x, 1.0);
        }
        let w = m.width(&x);
        m.forget(0.1);
        assert_eq!(m.count(), 1);
        assert!(m.width(&x) > w);
        // A = [1 + 1, 0; 0, 1], b = [1, 0]: theta_0 = 0.5.
        assert!((m.theta()[0] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn state_round_trips_and_checks_shape() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut m = LinUcb::new(4, 5.0);
        for _ in 0..9 {
            let x = random_x(&mut rng, 4);
            m.update(&x, 0.3);
        }
        let s = m.state();
        let back = LinUcb::from_state(&s, 4).expect("restores");
        assert!((back.theta() - m.theta()).amax() < 1e-12);
        assert_eq!(back.count(), 9);
        assert_eq!(LinUcb::from_state(&s, 5).unwrap_err(), ModelError::Dimension { got: 4, want: 5 });
        let mut bad = s.clone();
        bad.a.pop();
        assert_eq!(LinUcb::from_state(&bad, 4).unwrap_err(), ModelError::Length("a"));
        let mut neg = s;
        neg.a = vec![0.0; 16];
        neg.a[0] = -1.0;
        assert_eq!(LinUcb::from_state(&neg, 4).unwrap_err(), ModelError::NotPositiveDefinite);
    }
}
