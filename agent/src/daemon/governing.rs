//! Runs the clock governor inside the daemon: builds it once the vLLM model is known, restores
//! and saves what it learnt (per GPU model and vLLM model) and maps the config's mode onto it.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::config::PolicySection;
use governor::store::{export_text, parse_export, Export, Store, StoreError, SCHEMA_VERSION};
use governor::{ClockTarget, Decision, Governor, GovernorConfig, Mode, Observation};
use vllm_metrics::Window;

/// Decisions between two saves of the governor's state.
const SAVE_EVERY: u64 = 30;

#[derive(Debug)]
pub struct Steering {
    clocks_mhz: Vec<u32>,
    gpu_model: String,
    vllm_model: Option<String>,
    governor: Option<Governor>,
    store: Option<Store>,
    /// A store closed after a failed save, to be opened again at the next save.
    closed_store: Option<PathBuf>,
    policy: PolicySection,
    /// `--reset-model`: drop the stored state of the first model seen instead of restoring it.
    reset_pending: bool,
}

/// Why a model command (`agentctl model reset|export|import`) failed.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("nothing learnt yet: the governor starts with the first vLLM window")]
    NothingLearnt,
    #[error("the import was learnt on {found:?}, this agent runs {ours:?}")]
    OtherGpu { found: String, ours: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Steering {
    /// Opens the store in `state_dir`; without one the governor still runs, unpersisted.
    pub fn new(clocks_mhz: Vec<u32>, gpu_model: String, state_dir: &Path, policy: PolicySection) -> Steering {
        let store = match std::fs::create_dir_all(state_dir)
            .map_err(|e| e.to_string())
            .and_then(|()| Store::open(&state_dir.join("governor.sled")).map_err(|e| crate::error_chain(&e)))
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(dir = %state_dir.display(), error = %e, "no state store: the governor will not remember what it learns");
                None
            }
        };
        Steering {
            clocks_mhz,
            gpu_model,
            vllm_model: None,
            governor: None,
            store,
            closed_store: None,
            policy,
            reset_pending: false,
        }
    }

    /// The governor's mode for the config's policy, None when the governor is not consulted.
    pub fn mode(policy: &PolicySection) -> Option<Mode> {
        (policy.mode != Mode::Default).then_some(policy.mode)
    }

    pub fn set_policy(&mut self, policy: PolicySection) {
        if let Some(g) = &mut self.governor {
            if let Some(mode) = Self::mode(&policy) {
                g.set_mode(mode);
            }
            g.set_slo(policy.ttft_slo_seconds, policy.tpot_slo_seconds);
        }
        self.policy = policy;
    }

    pub fn governor(&self) -> Option<&Governor> {
        self.governor.as_ref()
    }

    /// Builds the governor for `model` (restoring its state), or rebuilds it when vLLM now
    /// serves another model.
    fn ensure(&mut self, model: &str) {
        if self.vllm_model.as_deref() == Some(model) && self.governor.is_some() {
            return;
        }
        self.save();
        if std::mem::take(&mut self.reset_pending) {
            match self.forget_stored(model) {
                Ok(found) => info!(model, found, "--reset-model: stored governor state dropped"),
                Err(e) => warn!(error = %crate::error_chain(&e), "--reset-model: could not drop the stored state"),
            }
        }
        let restored = self.store.as_ref().and_then(|s| match s.load(&self.gpu_model, model) {
            Ok(state) => state,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "stored governor state unreadable; starting afresh");
                None
            }
        });
        let g = self.build(restored);
        info!(gpu = %self.gpu_model, model, decisions = g.decisions(), "clock governor ready");
        self.governor = Some(g);
        self.vllm_model = Some(model.to_string());
    }

    /// A governor for the current policy, continuing from `restored` when given.
    fn build(&self, restored: Option<governor::GovernorState>) -> Governor {
        let cfg =
            GovernorConfig { mode: Self::mode(&self.policy).unwrap_or(Mode::Observe), ..GovernorConfig::default() };
        let mut g = Governor::new(cfg, &self.clocks_mhz, restored);
        g.set_slo(self.policy.ttft_slo_seconds, self.policy.tpot_slo_seconds);
        g
    }

    /// One decision from one window. None when the policy leaves clocks to the driver.
    pub fn decide(&mut self, model: &str, window: &Window, energy_j: f64, applied: ClockTarget) -> Option<Decision> {
        Self::mode(&self.policy)?;
        self.ensure(model);
        let g = self.governor.as_mut()?;
        let d = g.decide(&Observation { window, energy_j, seconds: window.seconds, applied });
        if g.decisions() % SAVE_EVERY == 0 {
            self.save();
        }
        Some(d)
    }

    /// Forgets what was learnt for the current models, in memory and in the store.
    pub fn reset_model(&mut self) -> Result<(), SteeringError> {
        if let Some(g) = &mut self.governor {
            g.reset_model();
        }
        if let (Some(s), Some(m)) = (&self.store, &self.vllm_model) {
            s.remove(&self.gpu_model, m)?;
        }
        Ok(())
    }

    /// Makes the governor start from nothing instead of its stored state (`--reset-model`).
    pub fn reset_on_start(&mut self) {
        self.reset_pending = true;
    }

    fn forget_stored(&self, model: &str) -> Result<bool, StoreError> {
        match &self.store {
            Some(s) => s.remove(&self.gpu_model, model),
            None => Ok(false),
        }
    }

    /// The current governor's state as export JSON (with the schema version). The client
    /// writes it to a file as itself: the root agent never writes where a client points it.
    pub fn export(&self) -> Result<String, SteeringError> {
        let (Some(g), Some(model)) = (&self.governor, &self.vllm_model) else {
            return Err(SteeringError::NothingLearnt);
        };
        let e = Export {
            schema_version: SCHEMA_VERSION,
            gpu_model: self.gpu_model.clone(),
            vllm_model: model.clone(),
            state: g.state(),
        };
        Ok(export_text(&e)?)
    }

    /// Loads export JSON learnt on this GPU model and makes the governor continue from it.
    pub fn import(&mut self, text: &str) -> Result<String, SteeringError> {
        let e = parse_export(text, Path::new("the import"))?;
        if e.gpu_model != self.gpu_model {
            return Err(SteeringError::OtherGpu { found: e.gpu_model, ours: self.gpu_model.clone() });
        }
        if let Some(store) = &self.store {
            store.save(&e.gpu_model, &e.vllm_model, &e.state)?;
        }
        if self.vllm_model.as_deref() == Some(e.vllm_model.as_str()) || self.vllm_model.is_none() {
            self.governor = Some(self.build(Some(e.state)));
            self.vllm_model = Some(e.vllm_model.clone());
        }
        Ok(format!("{} on {}", e.vllm_model, e.gpu_model))
    }

    /// Saves the current model's state. After a failed save (disk full, I/O error) sled
    /// refuses every later write, so the store is closed and opened again and the save tried
    /// once more; while it cannot be reopened, each later save tries again. Once space is back,
    /// saving works without a restart, and what was learnt stays in memory meanwhile.
    pub fn save(&mut self) {
        let (Some(g), Some(model)) = (&self.governor, &self.vllm_model) else { return };
        let (state, model) = (g.state(), model.clone());
        if self.store.is_none() && !self.reopen_store() {
            return;
        }
        let Some(store) = &self.store else { return };
        let Err(e) = store.save(&self.gpu_model, &model, &state) else { return };
        warn!(error = %crate::error_chain(&e), "saving the governor state failed; reopening the store to try again");
        let path = store.path().to_owned();
        self.store = None; // sled holds its lock until this handle is gone
        self.closed_store = Some(path.clone());
        if !self.reopen_store() {
            return;
        }
        let Some(store) = &self.store else { return };
        match store.save(&self.gpu_model, &model, &state) {
            Ok(()) => info!(path = %path.display(), "governor state saved after reopening the store"),
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "saving the governor state failed again; will retry at the next save");
                self.store = None;
                self.closed_store = Some(path);
            }
        }
    }

    /// Opens again the store closed after a failed save. True when it is open.
    fn reopen_store(&mut self) -> bool {
        let Some(path) = &self.closed_store else { return false };
        match Store::open(path) {
            Ok(s) => {
                info!(path = %s.path().display(), "state store open again");
                self.store = Some(s);
                self.closed_store = None;
                true
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "the state store cannot be opened again yet; will retry at the next save");
                false
            }
        }
    }
}
