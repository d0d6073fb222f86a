//! The advisor's configuration (the `[advisor]` section of the agent's config file).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A setting out of range: the field (as written in the config file) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config field `{field}`: {msg}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub msg: String,
}

fn invalid(field: &'static str, msg: impl Into<String>) -> InvalidSetting {
    InvalidSetting { field, msg: msg.into() }
}

/// The replica advisor: demand, capacity per replica under the objectives, suggested replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvisorConfig {
    /// Whether the advisor runs (it only reads what the decision loop already scraped).
    pub enabled: bool,
    /// Capacity profiles written by the trial launcher; missing files are retried.
    pub profiles: Vec<PathBuf>,
    /// The Deployment's current replica count, when fixed.
    pub replicas: Option<u32>,
    /// A file holding the current replica count (a number, or a downward-API annotations file
    /// with a `gpu-agent/replicas="N"` line); re-read every cycle. Wins over `replicas`.
    pub replicas_file: Option<PathBuf>,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Share of a replica's capacity to plan for (1.0: run replicas right at the objectives).
    pub target_utilization: f64,
    /// Changes within this relative band of the current count are not suggested (HPA: 0.1).
    pub tolerance: f64,
    /// Time constant of the demand's exponential smoothing.
    pub smoothing_seconds: f64,
    /// A lower suggestion is made only after it held this long (the highest of the window wins).
    pub scale_down_delay_seconds: f64,
    /// Without a usable vLLM window for this long the advice is stale (last good value kept).
    pub stale_after_seconds: f64,
    /// vLLM's `--max-num-seqs`: the most requests one replica runs at once.
    pub max_num_seqs: u32,
    /// The AIBrix-compatible endpoint answers `/metrics/{namespace}/{deployment}` for these.
    pub namespace: String,
    pub deployment: String,
    /// `model_name` label; empty: the model vLLM reports.
    pub model_name: String,
    /// `vllm:deployment_replicas` unit: 100 (hundredths, recent AIBrix) or 1 (whole replicas).
    pub aibrix_units_per_replica: u32,
}

impl Default for AdvisorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            profiles: Vec::new(),
            replicas: None,
            replicas_file: None,
            min_replicas: 1,
            max_replicas: 64,
            target_utilization: 0.9,
            tolerance: 0.1,
            smoothing_seconds: 30.0,
            scale_down_delay_seconds: 300.0,
            stale_after_seconds: 30.0,
            max_num_seqs: 256,
            namespace: "default".into(),
            deployment: "vllm".into(),
            model_name: String::new(),
            aibrix_units_per_replica: 100,
        }
    }
}

impl AdvisorConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.min_replicas == 0 {
            return Err(invalid("advisor.min_replicas", "must be at least 1 (the advisor never suggests 0)"));
        }
        if self.max_replicas < self.min_replicas {
            return Err(invalid(
                "advisor.max_replicas",
                format!("{} is below advisor.min_replicas ({})", self.max_replicas, self.min_replicas),
            ));
        }
        if self.replicas == Some(0) {
            return Err(invalid("advisor.replicas", "must be at least 1"));
        }
        let t = self.target_utilization;
        if !(t > 0.0 && t <= 1.0) {
            return Err(invalid("advisor.target_utilization", format!("{t} must be > 0 and <= 1")));
        }
        if !(0.0..0.5).contains(&self.tolerance) {
            return Err(invalid("advisor.tolerance", format!("{} must be >= 0 and < 0.5", self.tolerance)));
        }
        for (field, v) in [
            ("advisor.smoothing_seconds", self.smoothing_seconds),
            ("advisor.scale_down_delay_seconds", self.scale_down_delay_seconds),
        ] {
            if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                return Err(invalid(field, format!("{v} must be between 0 and 86400")));
            }
        }
        let s = self.stale_after_seconds;
        if !(s.is_finite() && s > 0.0 && s <= 86_400.0) {
            return Err(invalid("advisor.stale_after_seconds", format!("{s} must be > 0 and <= 86400")));
        }
        if self.max_num_seqs == 0 {
            return Err(invalid("advisor.max_num_seqs", "must be at least 1"));
        }
        for (field, v) in [("advisor.namespace", &self.namespace), ("advisor.deployment", &self.deployment)] {
            if v.is_empty() || v.contains('/') {
                return Err(invalid(field, format!("{v:?} must be a non-empty name without '/'")));
            }
        }
        if self.model_name.contains(['"', '\\', '\n']) {
            return Err(invalid("advisor.model_name", "must not contain quotes, backslashes or newlines"));
        }
        if !matches!(self.aibrix_units_per_replica, 1 | 100) {
            return Err(invalid(
                "advisor.aibrix_units_per_replica",
                format!("{} must be 1 or 100", self.aibrix_units_per_replica),
            ));
        }
        Ok(())
    }
}
