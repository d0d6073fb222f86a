//! A study's persistent state in sled (`<study dir>/study.sled`), bincode 2 with serde: the
//! space it was started with, the gpu-memory-utilization found, every finished trial, and the
//! server groups currently running (killed by the next start if the tuner died).

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use store::OnMismatch;

use super::launch::LiveGroup;
use super::trial::TrialRecord;

/// Bump when a stored type changes; older studies are refused with a clear message.
/// 2: the schema version moved to the versioned store's own key (crate `store`).
pub const STUDY_SCHEMA: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("study store {path} is of another version; start a new study directory (or --fresh)")]
    Schema {
        path: String,
        #[source]
        source: store::StoreError,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("study directory {path} holds a study of a different search space or launch command; use another --study-dir (or --fresh to discard it)")]
    Mismatch { path: String },
}

/// What identifies a study: resuming needs the same space and command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyMeta {
    pub schema: u32,
    /// The space as canonical JSON, and the launch command.
    pub space_json: String,
    pub launch: String,
    pub created_unix: u64,
}

/// One study's store: a versioned store that refuses a study of another version (its trials
/// are the user's results, never to be moved aside silently).
#[derive(Debug, Clone)]
pub struct Store {
    inner: store::Store,
}

fn trial_key(id: u32) -> String {
    format!("trial/{id:08}")
}

impl Store {
    /// Opens (or creates) the store and checks it belongs to `meta`'s study.
    pub fn open(dir: &Path, meta: &StudyMeta) -> Result<Store, StoreError> {
        let path = dir.join("study.sled");
        let inner =
            store::Store::open("study store", &path, STUDY_SCHEMA, OnMismatch::Refuse).map_err(|e| match e {
                store::StoreError::Incompatible { .. } => {
                    StoreError::Schema { path: path.display().to_string(), source: e }
                }
                other => StoreError::Store(other),
            })?;
        let s = Store { inner };
        match s.inner.get::<StudyMeta>(b"meta")? {
            Some(old) if old.space_json != meta.space_json || old.launch != meta.launch => {
                return Err(StoreError::Mismatch { path: dir.display().to_string() })
            }
            Some(_) => {}
            None => s.inner.put(b"meta", meta)?,
        }
        Ok(s)
    }

    pub fn gpu_memory_utilization(&self) -> Result<Option<f64>, StoreError> {
        Ok(self.inner.get(b"gmu")?)
    }

    pub fn set_gpu_memory_utilization(&self, v: f64) -> Result<(), StoreError> {
        Ok(self.inner.put(b"gmu", &v)?)
    }

    pub fn put_trial(&self, t: &TrialRecord) -> Result<(), StoreError> {
        Ok(self.inner.put(trial_key(t.id).as_bytes(), t)?)
    }

    /// Every record under `prefix`, in key order.
    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let rows = self.inner.scan_raw(prefix.as_bytes())?;
        rows.iter().map(|(k, v)| Ok(self.inner.decode(k, v)?)).collect()
    }

    /// Every finished trial, by id.
    pub fn trials(&self) -> Result<Vec<TrialRecord>, StoreError> {
        self.scan("trial/")
    }

    pub fn add_live(&self, g: LiveGroup) -> Result<(), StoreError> {
        Ok(self.inner.put(format!("live/{}", g.pgid).as_bytes(), &g)?)
    }

    pub fn remove_live(&self, g: LiveGroup) -> Result<(), StoreError> {
        self.inner.remove(format!("live/{}", g.pgid).as_bytes())?;
        Ok(())
    }

    /// Server groups recorded as running (by a tuner that may have died).
    pub fn live(&self) -> Result<Vec<LiveGroup>, StoreError> {
        self.scan("live/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trial::{StartFailure, TrialKind, TrialStatus};

    fn meta(space: &str) -> StudyMeta {
        StudyMeta { schema: STUDY_SCHEMA, space_json: space.into(), launch: "sim".into(), created_unix: 1 }
    }

    #[test]
    fn trials_and_live_groups_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path(), &meta("{}")).expect("open");
            let t = TrialRecord {
                id: 3,
                kind: TrialKind::Search,
                point: Some(vec![1, 2]),
                flags: [("max-num-seqs".to_string(), "64".to_string())].into(),
                gpu_set: "0".into(),
                status: TrialStatus::StartFailed(StartFailure::OutOfMemory("x".into())),
                score: None,
                searches: vec![],
                started_unix: 5,
                seconds: 1.5,
            };
            s.put_trial(&t).expect("put");
            s.set_gpu_memory_utilization(0.93).expect("gmu");
            s.add_live(LiveGroup { pgid: 77, start_ticks: 9 }).expect("live");
        }
        let s = Store::open(dir.path(), &meta("{}")).expect("reopen");
        let ts = s.trials().expect("trials");
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].point, Some(vec![1, 2]));
        assert_eq!(s.gpu_memory_utilization().expect("gmu"), Some(0.93));
        assert_eq!(s.live().expect("live"), vec![LiveGroup { pgid: 77, start_ticks: 9 }]);
        s.remove_live(LiveGroup { pgid: 77, start_ticks: 9 }).expect("remove");
        assert!(s.live().expect("live").is_empty());
        drop(s);
        let e = Store::open(dir.path(), &meta("{\"other\":1}")).expect_err("mismatch");
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn a_study_of_another_version_is_refused_and_left_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("study.sled");
        store::Store::open("old study", &path, STUDY_SCHEMA - 1, OnMismatch::Refuse)
            .expect("old")
            .put(b"meta", &1u8)
            .expect("put");
        let e = Store::open(dir.path(), &meta("{}")).expect_err("another version");
        assert!(matches!(e, StoreError::Schema { .. }), "{e}");
        assert!(e.to_string().contains("start a new study directory"), "{e}");
        let old = store::Store::open("old study", &path, STUDY_SCHEMA - 1, OnMismatch::Refuse).expect("still there");
        assert_eq!(old.get::<u8>(b"meta").expect("get"), Some(1));
    }
}
