//! Capacity per replica from two sources, combined: the trial launcher's capacity profiles
//! (measured offline, possibly with other flags or an older vLLM) and the online model
//! (fitted to this server now, but extrapolating when the load has been light).
//!
//! The online model's weight grows with the windows it rests on and with how close to its
//! predicted capacity the load has come: a model that has only seen 5% load extrapolates 20x,
//! and there the profile, measured at saturation, is the better guide.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use tracing::warn;

use super::online::{Objectives, OnlineCapacity, OnlineModel};
use objectives::profile::CapacityProfile;

/// Windows after which the online fit counts fully.
const FULL_OBSERVATIONS: f64 = 30.0;
/// Observed load (as a share of the online capacity) at which extrapolation is trusted fully.
const FULL_COVERAGE: f64 = 0.5;
/// Windows before the online model is used at all when there is no profile.
pub const MIN_OBSERVATIONS: f64 = 5.0;

/// The profile bucket used and what it says at the current clock.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileCapacity {
    pub path: PathBuf,
    pub bucket_prompt_tokens: u32,
    pub bucket_output_tokens: u32,
    /// The bucket's rate as measured.
    pub measured_rate: f64,
    /// The clock it was measured at (None: driver-managed, taken as the highest).
    pub measured_clock_mhz: Option<u32>,
    /// The rate scaled to the current clock with the online model's clock dependence.
    pub max_rate: f64,
}

/// Both sources and their combination.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    pub online: Option<OnlineCapacity>,
    pub profile: Option<ProfileCapacity>,
    /// Weight of the online model in `max_rate` (0..1).
    pub online_weight: f64,
    /// Highest recent load as a share of the online estimate: how far it extrapolates.
    pub observed_share: Option<f64>,
    /// Requests per second one replica sustains within the objectives.
    pub max_rate: f64,
}

/// Capacity profiles from files, re-read when they change (the tuner writes them while the
/// agent runs); a bad or missing file is logged once per change and skipped.
#[derive(Debug, Default)]
pub struct Profiles {
    files: Vec<(PathBuf, Option<SystemTime>, Option<CapacityProfile>)>,
}

impl Profiles {
    pub fn new(paths: &[PathBuf]) -> Self {
        let mut p = Self { files: paths.iter().map(|p| (p.clone(), None, None)).collect() };
        p.refresh();
        p
    }

    /// Re-reads files whose modification time changed.
    pub fn refresh(&mut self) {
        for (path, seen, loaded) in &mut self.files {
            let mtime = std::fs::metadata(&*path).and_then(|m| m.modified()).ok();
            if mtime.is_none() || mtime == *seen {
                continue;
            }
            *seen = mtime;
            match CapacityProfile::load(path) {
                Ok(p) => *loaded = Some(p),
                Err(e) => warn!(error = %e, "capacity profile skipped (keeping the last good one)"),
            }
        }
    }

    /// The newest profile for this GPU and model (either may be unknown: then any).
    pub fn best(&self, gpu: &str, model: &str) -> Option<(&Path, &CapacityProfile)> {
        self.files
            .iter()
            .filter_map(|(path, _, p)| p.as_ref().map(|p| (path.as_path(), p)))
            .filter(|(_, p)| gpu.is_empty() || p.gpu == gpu)
            .filter(|(_, p)| model.is_empty() || p.model == model)
            .max_by_key(|(_, p)| p.created_unix)
    }

    pub fn len(&self) -> usize {
        self.files.iter().filter(|f| f.2.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the capacity is computed for.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub prompt_tokens: f64,
    pub output_tokens: f64,
    pub clock_mhz: f64,
    pub max_clock_mhz: f64,
}

/// Combines the sources for one load. None when neither can say anything yet.
pub fn combine(
    model: &OnlineModel,
    profile: Option<(&Path, &CapacityProfile)>,
    load: Load,
    obj: Objectives,
    max_num_seqs: f64,
) -> Option<Capacity> {
    let cap_at = |clock: f64| {
        model.capacity(load.prompt_tokens, load.output_tokens, obj, clock, load.max_clock_mhz, max_num_seqs)
    };
    let fitted = model.observations() >= MIN_OBSERVATIONS;
    let online = fitted.then(|| cap_at(load.clock_mhz)).filter(|c| c.max_rate.is_finite() && c.max_rate > 0.0);
    let profile = profile.and_then(|(path, p)| {
        let b = p.nearest(load.prompt_tokens, load.output_tokens)?;
        let measured_clock = p.sm_clock_mhz.map_or(load.max_clock_mhz, f64::from);
        // Scale to the clock we run at by the online model's clock dependence, once it has one.
        let scale = match online {
            Some(now) => {
                let then = cap_at(measured_clock).max_rate;
                if then > 0.0 {
                    now.max_rate / then
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        Some(ProfileCapacity {
            path: path.to_owned(),
            bucket_prompt_tokens: b.input_tokens,
            bucket_output_tokens: b.output_tokens,
            measured_rate: b.max_request_rate,
            measured_clock_mhz: p.sm_clock_mhz,
            max_rate: b.max_request_rate * scale,
        })
    });
    let online_weight = match (&online, &profile) {
        (Some(o), Some(_)) => {
            let rest_on = (model.observations() / FULL_OBSERVATIONS).min(1.0);
            let coverage = (model.peak_rate() / (FULL_COVERAGE * o.max_rate)).min(1.0);
            rest_on * coverage
        }
        (Some(_), None) => 1.0,
        _ => 0.0,
    };
    let max_rate = match (&online, &profile) {
        (Some(o), Some(p)) => online_weight * o.max_rate + (1.0 - online_weight) * p.max_rate,
        (Some(o), None) => o.max_rate,
        (None, Some(p)) => p.max_rate,
        (None, None) => return None,
    };
    let observed_share = online.map(|o| model.peak_rate() / o.max_rate);
    (max_rate > 0.0).then_some(Capacity { online, profile, online_weight, observed_share, max_rate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use objectives::profile::{CapacityBucket, ProfileLimits, PROFILE_SCHEMA};

    fn profile(gpu: &str, created: u64, rate: f64) -> CapacityProfile {
        CapacityProfile {
            schema: PROFILE_SCHEMA,
            model: "m".into(),
            gpu: gpu.into(),
            sm_clock_mhz: None,
            flags: Default::default(),
            limits: ProfileLimits::default(),
            created_unix: created,
            buckets: vec![CapacityBucket {
                input_tokens: 512,
                output_tokens: 256,
                max_request_rate: rate,
                output_throughput: rate * 256.0,
                p99_ttft_s: 0.2,
                p99_tpot_s: 0.03,
                p99_e2e_s: 5.0,
            }],
        }
    }

    const LOAD: Load = Load { prompt_tokens: 500.0, output_tokens: 250.0, clock_mhz: 1980.0, max_clock_mhz: 1980.0 };
    const OBJ: Objectives = Objectives { ttft_s: 0.5, tpot_s: 0.05 };

    #[test]
    fn without_data_the_profile_alone_and_without_both_nothing() {
        let m = OnlineModel::new();
        assert!(combine(&m, None, LOAD, OBJ, 256.0).is_none());
        let p = profile("H100", 1, 12.0);
        let c = combine(&m, Some((Path::new("p.json"), &p)), LOAD, OBJ, 256.0).expect("profile");
        assert_eq!((c.max_rate, c.online_weight), (12.0, 0.0));
        assert!(c.online.is_none());
    }

    /// Trains a model on windows from a server with a known step time at `rate` req/s.
    fn trained(rate: f64) -> OnlineModel {
        let mut m = OnlineModel::new();
        for k in 0..60 {
            let r = rate * (0.8 + 0.02 * f64::from(k % 20));
            let w = crate::testutil::modelled(r, 500.0, 250.0, 0.008, 0.00004, 0.00002);
            m.observe(&w, 1980.0, 1980.0, r);
        }
        m
    }

    #[test]
    fn the_online_model_weighs_more_once_the_load_came_near_its_estimate() {
        let p = profile("H100", 1, 12.0);
        let src = Some((Path::new("p.json"), &p));
        let light = combine(&trained(2.0), src, LOAD, OBJ, 256.0).expect("capacity");
        let heavy = combine(&trained(40.0), src, LOAD, OBJ, 256.0).expect("capacity");
        let online = |c: &Capacity| c.online.expect("online").max_rate;
        assert!(light.online_weight < 0.2, "{light:?}");
        assert!(heavy.online_weight > 0.9, "{heavy:?}");
        assert!(light.observed_share.is_some_and(|s| s < 0.1));
        // The combination lies between the sources, near the weightier one.
        for c in [&light, &heavy] {
            let (lo, hi) = (online(c).min(12.0), online(c).max(12.0));
            assert!(c.max_rate >= lo - 1e-9 && c.max_rate <= hi + 1e-9, "{c:?}");
        }
        assert!((light.max_rate - 12.0).abs() < (light.max_rate - online(&light)).abs());
        assert!((heavy.max_rate - online(&heavy)).abs() < (heavy.max_rate - 12.0).abs());
    }

    #[test]
    fn files_are_picked_by_gpu_and_age_and_bad_ones_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("{i}.json"))).collect();
        profile("H100", 5, 10.0).save(&paths[0]).expect("save");
        profile("H100", 9, 20.0).save(&paths[1]).expect("save");
        profile("A100", 99, 30.0).save(&paths[2]).expect("save");
        std::fs::write(&paths[3], "{not json").expect("write");
        let mut ps = Profiles::new(&paths);
        assert_eq!(ps.len(), 3);
        assert_eq!(ps.best("H100", "m").map(|b| b.1.created_unix), Some(9));
        assert_eq!(ps.best("", "").map(|b| b.1.gpu.as_str()), Some("A100"));
        assert!(ps.best("H100", "other-model").is_none());
        // A file that appears later is picked up.
        let late = dir.path().join("late.json");
        let mut ps2 = Profiles::new(std::slice::from_ref(&late));
        assert!(ps2.is_empty());
        profile("H100", 1, 1.0).save(&late).expect("save");
        ps2.refresh();
        assert_eq!(ps2.len(), 1);
        ps.refresh();
        assert_eq!(ps.len(), 3);
    }
}
