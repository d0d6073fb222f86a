//! What the governor learnt, as persisted (by [`crate::store`]) and exported, and how a
//! governor is restored from it. The serialised shape is versioned by
//! [`crate::store::SCHEMA_VERSION`].

use serde::{Deserialize, Serialize};

use crate::arms::Arm;
use crate::context::{ContextBuilder, DIM, RAW};
use crate::linucb::{LinUcb, LinUcbState, ModelError};
use crate::pooled::SHARED_DIM;
use crate::prune::ArmStats;
use crate::stage::Stage;
use crate::Governor;

/// One clock arm as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmState {
    pub stats: ArmStats,
    pub model: LinUcbState,
    pub coarse: bool,
}

/// Everything learnt, for persistence and export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorState {
    pub arms: Vec<ArmState>,
    pub shared: LinUcbState,
    pub context: ContextBuilder,
    pub baseline_edp: Option<f64>,
    pub decisions: u64,
    pub converged_after: Option<u64>,
    pub sweep_done: bool,
}

/// Why a stored state does not fit this GPU (the governor then starts fresh).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestoreError {
    #[error("normaliser has {got} features, expected {RAW}")]
    Features { got: usize },
    #[error("arm {0} MHz is not a supported clock")]
    Unsupported(u32),
    #[error("the model of arm {mhz} MHz does not fit")]
    ArmModel {
        mhz: u32,
        #[source]
        source: ModelError,
    },
    #[error("the shared model does not fit")]
    SharedModel(#[source] ModelError),
    #[error("no arms")]
    NoArms,
}

impl Governor {
    pub fn state(&self) -> GovernorState {
        GovernorState {
            arms: self
                .arms
                .iter()
                .map(|a| ArmState { stats: a.stats.clone(), model: a.model.state(), coarse: a.coarse })
                .collect(),
            shared: self.shared.state(),
            context: self.ctx.clone(),
            baseline_edp: self.baseline.edp,
            decisions: self.decisions,
            converged_after: self.converged_after,
            sweep_done: self.stage.sweep_done(),
        }
    }

    /// Takes over a stored state if it fits this GPU; changes nothing otherwise.
    pub(crate) fn restore(&mut self, state: GovernorState) -> Result<(), RestoreError> {
        if state.context.norm.dim() != RAW {
            return Err(RestoreError::Features { got: state.context.norm.dim() });
        }
        let mut arms = Vec::with_capacity(state.arms.len());
        for stored in &state.arms {
            let mhz = stored.stats.mhz;
            if !self.clocks.contains(&mhz) {
                return Err(RestoreError::Unsupported(mhz));
            }
            let model =
                LinUcb::from_state(&stored.model, DIM).map_err(|source| RestoreError::ArmModel { mhz, source })?;
            arms.push(Arm { stats: stored.stats.clone(), model, coarse: stored.coarse, banned_until: 0 });
        }
        if arms.is_empty() {
            return Err(RestoreError::NoArms);
        }
        arms.sort_by_key(Arm::mhz);
        self.shared = LinUcb::from_state(&state.shared, SHARED_DIM).map_err(RestoreError::SharedModel)?;
        self.arms = arms;
        self.ctx = state.context;
        self.baseline.edp = state.baseline_edp.filter(|b| b.is_finite() && *b > 0.0);
        self.decisions = state.decisions;
        self.stage = Stage::restored(state.sweep_done);
        self.converged_after = state.converged_after;
        self.refined_around = self.arms.iter().filter(|a| !a.coarse).map(Arm::mhz).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::tests::h100_clocks;
    use crate::GovernorConfig;

    #[test]
    fn a_state_that_does_not_fit_says_why() {
        let mut g = Governor::new(GovernorConfig::default(), &h100_clocks(), None);
        let fresh = g.state();
        let mut other_gpu = fresh.clone();
        other_gpu.arms[0].stats.mhz = 901;
        assert_eq!(g.restore(other_gpu), Err(RestoreError::Unsupported(901)));
        let mut broken = fresh.clone();
        broken.arms[2].model.b.pop();
        let err = g.restore(broken).expect_err("model does not fit");
        assert_eq!(err.to_string(), "the model of arm 1080 MHz does not fit");
        assert_eq!(
            err.source().map(ToString::to_string).as_deref(),
            Some("stored model field `b` has the wrong length")
        );
        let empty = GovernorState { arms: Vec::new(), ..fresh.clone() };
        assert_eq!(g.restore(empty), Err(RestoreError::NoArms));
        assert_eq!(g.state(), fresh, "nothing changed");
    }
}
