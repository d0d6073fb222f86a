//! What the governor learnt, as persisted (by [`crate::store`]) and exported, and how a
//! governor is restored from it. The serialised shape is versioned by
//! [`crate::store::SCHEMA_VERSION`].

use serde::{Deserialize, Serialize};

use crate::arms::Arm;
use crate::context::{ContextBuilder, DIM, RAW};
use crate::linucb::{LinUcb, LinUcbState};
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
    pub(crate) fn restore(&mut self, state: GovernorState) -> Result<(), String> {
        if state.context.norm.dim() != RAW {
            return Err(format!("normaliser has {} features, expected {RAW}", state.context.norm.dim()));
        }
        let mut arms = Vec::with_capacity(state.arms.len());
        for stored in &state.arms {
            let mhz = stored.stats.mhz;
            if !self.clocks.contains(&mhz) {
                return Err(format!("arm {mhz} MHz is not a supported clock"));
            }
            let model = LinUcb::from_state(&stored.model, DIM).map_err(|e| e.to_string())?;
            arms.push(Arm { stats: stored.stats.clone(), model, coarse: stored.coarse, banned_until: 0 });
        }
        if arms.is_empty() {
            return Err("no arms".into());
        }
        arms.sort_by_key(Arm::mhz);
        self.shared = LinUcb::from_state(&state.shared, SHARED_DIM).map_err(|e| e.to_string())?;
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
