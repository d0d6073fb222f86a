//! Capacity profiles: what one vLLM replica can serve under the latency limits, per
//! input/output length bucket. The trial launcher writes one per finished study
//! (`<study dir>/capacity-profile.json`); the replica advisor reads them (`advisor.profiles` in
//! the config) as one of its two sources of capacity.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::LatencyLimits;

/// Bump when a field changes meaning; older files are refused with a clear message.
pub const PROFILE_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read capacity profile {path}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write capacity profile {path}")]
    Write { path: String, source: std::io::Error },
    #[error("capacity profile {path}: {message}")]
    Invalid { path: String, message: String },
}

/// The [`LatencyLimits`] the capacities were measured under, as the profile writes them
/// (seconds, P99; None: no limit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileLimits {
    pub e2e_p99_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub tpot_p99_s: Option<f64>,
}

impl From<LatencyLimits> for ProfileLimits {
    fn from(l: LatencyLimits) -> Self {
        ProfileLimits {
            e2e_p99_s: l.e2e_ms.map(|v| v / 1e3),
            ttft_p99_s: l.ttft_ms.map(|v| v / 1e3),
            tpot_p99_s: l.tpot_ms.map(|v| v / 1e3),
        }
    }
}

/// The highest request rate one replica sustains within the limits for one length bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityBucket {
    /// Mean prompt length of the load, tokens.
    pub input_tokens: u32,
    /// Mean output length of the load, tokens.
    pub output_tokens: u32,
    /// Requests per second within the limits.
    pub max_request_rate: f64,
    /// Output tokens per second at that rate.
    pub output_throughput: f64,
    pub p99_ttft_s: f64,
    pub p99_tpot_s: f64,
    pub p99_e2e_s: f64,
}

/// One replica's capacity with the best flags a study found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityProfile {
    pub schema: u32,
    /// Served model name.
    pub model: String,
    /// GPU name as NVML (or the simulator) reports it.
    pub gpu: String,
    /// The SM clock the capacities were measured at; None: driver-managed clocks.
    pub sm_clock_mhz: Option<u32>,
    /// vLLM flags (name without dashes -> value) of the configuration measured.
    pub flags: BTreeMap<String, String>,
    pub limits: ProfileLimits,
    /// Unix seconds when the study finished.
    pub created_unix: u64,
    pub buckets: Vec<CapacityBucket>,
}

impl CapacityProfile {
    /// Checks what serde cannot: schema, at least one bucket, finite positive figures.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema != PROFILE_SCHEMA {
            return Err(format!(
                "field `schema`: {} is not supported (this agent reads {PROFILE_SCHEMA})",
                self.schema
            ));
        }
        if self.buckets.is_empty() {
            return Err("field `buckets`: empty".into());
        }
        for (i, b) in self.buckets.iter().enumerate() {
            if b.input_tokens == 0 || b.output_tokens == 0 {
                return Err(format!("field `buckets[{i}]`: input_tokens and output_tokens must be positive"));
            }
            if !(b.max_request_rate.is_finite() && b.max_request_rate >= 0.0) {
                return Err(format!("field `buckets[{i}].max_request_rate`: {} is not a rate", b.max_request_rate));
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<CapacityProfile, ProfileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: p.clone(), source })?;
        let profile: CapacityProfile = serde_json::from_str(&text)
            .map_err(|e| ProfileError::Invalid { path: p.clone(), message: e.to_string() })?;
        profile.validate().map_err(|message| ProfileError::Invalid { path: p, message })?;
        Ok(profile)
    }

    /// Writes atomically (temp file + rename), so a reader never sees half a profile.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let p = path.display().to_string();
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| ProfileError::Invalid { path: p.clone(), message: e.to_string() })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| ProfileError::Write { path: p, source })
    }

    /// The bucket closest to a load of `input_tokens` / `output_tokens` (distance on log
    /// lengths, so 512 vs 1024 is as far as 2048 vs 4096).
    pub fn nearest(&self, input_tokens: f64, output_tokens: f64) -> Option<&CapacityBucket> {
        let d = |b: &CapacityBucket| {
            let li = (f64::from(b.input_tokens).ln() - input_tokens.max(1.0).ln()).abs();
            let lo = (f64::from(b.output_tokens).ln() - output_tokens.max(1.0).ln()).abs();
            li * li + lo * lo
        };
        self.buckets.iter().min_by(|a, b| d(a).total_cmp(&d(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(i: u32, o: u32, rate: f64) -> CapacityBucket {
        CapacityBucket {
            input_tokens: i,
            output_tokens: o,
            max_request_rate: rate,
            output_throughput: rate * f64::from(o),
            p99_ttft_s: 0.2,
            p99_tpot_s: 0.03,
            p99_e2e_s: 4.0,
        }
    }

    fn profile() -> CapacityProfile {
        CapacityProfile {
            schema: PROFILE_SCHEMA,
            model: "m".into(),
            gpu: "NVIDIA H100 80GB HBM3".into(),
            sm_clock_mhz: None,
            flags: BTreeMap::from([("max-num-seqs".into(), "128".into())]),
            limits: ProfileLimits { e2e_p99_s: Some(10.0), ..Default::default() },
            created_unix: 1,
            buckets: vec![bucket(512, 128, 20.0), bucket(4096, 256, 5.0), bucket(256, 1024, 8.0)],
        }
    }

    #[test]
    fn round_trip_and_nearest_bucket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("capacity-profile.json");
        profile().save(&path).expect("save");
        let back = CapacityProfile::load(&path).expect("load");
        assert_eq!(back, profile());
        assert_eq!(back.nearest(3000.0, 200.0).map(|b| b.input_tokens), Some(4096));
        assert_eq!(back.nearest(600.0, 100.0).map(|b| b.input_tokens), Some(512));
        assert_eq!(back.nearest(300.0, 900.0).map(|b| b.output_tokens), Some(1024));
    }

    #[test]
    fn invalid_profiles_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.json");
        let mut p = profile();
        p.schema = 9;
        p.save(&path).expect("save");
        let e = CapacityProfile::load(&path).expect_err("schema").to_string();
        assert!(e.contains("`schema`"), "{e}");
        let mut p = profile();
        p.buckets.clear();
        p.save(&path).expect("save");
        assert!(CapacityProfile::load(&path).expect_err("empty").to_string().contains("`buckets`"));
        std::fs::write(&path, r#"{"schema":1,"bogus":2}"#).expect("write");
        assert!(CapacityProfile::load(&path).expect_err("unknown").to_string().contains("bogus"));
    }
}
