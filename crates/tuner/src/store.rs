//! A study's persistent state in sled (`<study dir>/study.sled`), bincode 2 with serde: the
//! space it was started with, the gpu-memory-utilization found, every finished trial, and the
//! server groups currently running (killed by the next start if the tuner died).

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::launch::LiveGroup;
use super::trial::TrialRecord;

/// Bump when a stored type changes; older studies are refused with a clear message.
pub const STUDY_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("study store {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("study store: cannot encode: {0}")]
    Encode(String),
    #[error("study store: record `{key}` does not decode ({message}); start a new study directory")]
    Decode { key: String, message: String },
    #[error("study store {path} was written by schema {found}, this agent reads {STUDY_SCHEMA}; start a new study directory")]
    Schema { path: String, found: u32 },
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

#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    path: String,
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| StoreError::Encode(e.to_string()))
}

fn dec<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Decode { key: String::from_utf8_lossy(key).into_owned(), message: e.to_string() })
}

fn trial_key(id: u32) -> String {
    format!("trial/{id:08}")
}

impl Store {
    /// Opens (or creates) the store and checks it belongs to `meta`'s study.
    pub fn open(dir: &Path, meta: &StudyMeta) -> Result<Store, StoreError> {
        let path = dir.join("study.sled");
        let p = path.display().to_string();
        let db = store::open_sled(&path).map_err(|source| StoreError::Sled { path: p.clone(), source })?;
        let s = Store { db, path: p.clone() };
        match s.get::<u32>("schema")? {
            Some(found) if found != STUDY_SCHEMA => return Err(StoreError::Schema { path: p, found }),
            _ => {}
        }
        match s.get::<StudyMeta>("meta")? {
            Some(old) if old.space_json != meta.space_json || old.launch != meta.launch => {
                return Err(StoreError::Mismatch { path: dir.display().to_string() })
            }
            Some(_) => {}
            None => {
                s.put("schema", &STUDY_SCHEMA)?;
                s.put("meta", meta)?;
            }
        }
        Ok(s)
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled { path: self.path.clone(), source }
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.db.get(key).map_err(|e| self.sled_err(e))? {
            Some(v) => dec(key.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Writes and flushes, so a crash right after loses nothing.
    fn put<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        self.db.insert(key, enc(v)?).map_err(|e| self.sled_err(e))?;
        self.db.flush().map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    pub fn gpu_memory_utilization(&self) -> Result<Option<f64>, StoreError> {
        self.get("gmu")
    }

    pub fn set_gpu_memory_utilization(&self, v: f64) -> Result<(), StoreError> {
        self.put("gmu", &v)
    }

    pub fn put_trial(&self, t: &TrialRecord) -> Result<(), StoreError> {
        self.put(&trial_key(t.id), t)
    }

    /// Every record under `prefix`, in key order.
    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.sled_err(e))?;
                dec(&k, &v)
            })
            .collect()
    }

    /// Every finished trial, by id.
    pub fn trials(&self) -> Result<Vec<TrialRecord>, StoreError> {
        self.scan("trial/")
    }

    pub fn add_live(&self, g: LiveGroup) -> Result<(), StoreError> {
        self.put(&format!("live/{}", g.pgid), &g)
    }

    pub fn remove_live(&self, g: LiveGroup) -> Result<(), StoreError> {
        self.db.remove(format!("live/{}", g.pgid)).map_err(|e| self.sled_err(e))?;
        self.db.flush().map_err(|e| self.sled_err(e))?;
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
}
