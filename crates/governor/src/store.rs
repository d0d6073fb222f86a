//! Persistence of what the governor learnt: one versioned store (crate `store`), one entry per
//! (GPU model name, vLLM model name).
//!
//! A store that sled cannot open, or one written with another schema version, is moved aside
//! to `<path>.corrupt-<unix seconds>` with a warning and a fresh one is started: losing what
//! was learnt costs a few minutes of exploration, a crash-looping sidecar costs far more.
//! An entry that no longer decodes is dropped the same way (with a warning).
//!
//! Export/import use JSON (`{"schema_version": 3, "gpu_model": .., "vllm_model": .., "state": ..}`)
//! so a model can be inspected, diffed and carried between machines.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use store::OnMismatch;
use tracing::warn;

use crate::GovernorState;

/// Version of the stored layout; bump it whenever `GovernorState` changes shape.
/// 2: the shared reward model lost two features (11 -> 9); version-1 states do not fit it.
/// 3: rewards are learnt from power x TPOT and the shared model gained load curvature
/// (9 -> 12 features); version-2 models mean something else.
pub const SCHEMA_VERSION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot encode the export")]
    Encode(#[source] serde_json::Error),
    #[error("{path}: not a governor export")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a governor export: no `schema_version` number")]
    NoVersion { path: PathBuf },
    #[error("{path}: schema version {found}, this agent reads version {expected}")]
    Version { path: PathBuf, found: u32, expected: u32 },
}

/// What one stored value holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Envelope {
    version: u32,
    saved_unix: u64,
    state: GovernorState,
}

/// The JSON export format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub schema_version: u32,
    pub gpu_model: String,
    pub vllm_model: String,
    pub state: GovernorState,
}

/// The governor's persistent store.
#[derive(Debug)]
pub struct Store {
    inner: store::Store,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

const PREFIX: &[u8] = b"governor/";

impl Store {
    /// Opens (or creates) the store at `path`, moving a corrupt or incompatible one aside.
    /// Fails only when even a fresh store cannot be created, or another process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store { inner: store::Store::open("governor store", path, SCHEMA_VERSION, OnMismatch::MoveAside)? })
    }

    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// Where a broken store was moved when this one was opened.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.inner.moved_aside()
    }

    /// Key of one (GPU model, vLLM model) pair. A NUL separates the names (neither contains one).
    pub fn key(gpu_model: &str, vllm_model: &str) -> Vec<u8> {
        let mut k = PREFIX.to_vec();
        k.extend_from_slice(gpu_model.as_bytes());
        k.push(0);
        k.extend_from_slice(vllm_model.as_bytes());
        k
    }

    /// Saves and flushes the state of one pair.
    pub fn save(&self, gpu_model: &str, vllm_model: &str, state: &GovernorState) -> Result<(), StoreError> {
        let env = Envelope { version: SCHEMA_VERSION, saved_unix: unix_now(), state: state.clone() };
        Ok(self.inner.put(&Self::key(gpu_model, vllm_model), &env)?)
    }

    /// The saved state of one pair. An entry that does not decode (or has another version) is
    /// removed with a warning and reads as absent.
    pub fn load(&self, gpu_model: &str, vllm_model: &str) -> Result<Option<GovernorState>, StoreError> {
        let key = Self::key(gpu_model, vllm_model);
        match self.inner.get::<Envelope>(&key) {
            Ok(None) => Ok(None),
            Ok(Some(env)) if env.version == SCHEMA_VERSION => Ok(Some(env.state)),
            Ok(Some(env)) => {
                warn!(
                    gpu_model,
                    vllm_model,
                    found = env.version,
                    expected = SCHEMA_VERSION,
                    "stored governor state has another schema version; dropping it"
                );
                self.inner.remove(&key)?;
                Ok(None)
            }
            Err(store::StoreError::Decode { source, .. }) => {
                warn!(gpu_model, vllm_model, error = %source, "stored governor state does not decode; dropping it");
                self.inner.remove(&key)?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets one pair (`--reset-model`). Returns whether something was stored.
    pub fn remove(&self, gpu_model: &str, vllm_model: &str) -> Result<bool, StoreError> {
        Ok(self.inner.remove(&Self::key(gpu_model, vllm_model))?)
    }

    /// The (GPU model, vLLM model) pairs stored.
    pub fn pairs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self.inner.scan_raw(PREFIX)?;
        Ok(rows
            .iter()
            .filter_map(|(k, _)| {
                let rest = k.strip_prefix(PREFIX)?;
                let cut = rest.iter().position(|b| *b == 0)?;
                Some((
                    String::from_utf8_lossy(&rest[..cut]).into_owned(),
                    String::from_utf8_lossy(&rest[cut + 1..]).into_owned(),
                ))
            })
            .collect())
    }
}

/// The export as JSON text (what `agentctl model export` saves).
pub fn export_text(e: &Export) -> Result<String, StoreError> {
    serde_json::to_string_pretty(e).map_err(StoreError::Encode)
}

/// Parses export text, checking its schema version first (so an old file gets a version
/// error, not a confusing field error); `file` names where it came from in errors.
pub fn parse_export(text: &str, file: &Path) -> Result<Export, StoreError> {
    let format = |source| StoreError::Format { path: file.to_owned(), source };
    let v: serde_json::Value = serde_json::from_str(text).map_err(format)?;
    let found = v
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| StoreError::NoVersion { path: file.to_owned() })?;
    if found != u64::from(SCHEMA_VERSION) {
        return Err(StoreError::Version {
            path: file.to_owned(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            expected: SCHEMA_VERSION,
        });
    }
    serde_json::from_value(v).map_err(format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClockTarget, Governor, GovernorConfig, Observation};

    /// A state with some learning in it.
    fn learnt_state() -> GovernorState {
        let clocks: Vec<u32> = (0..110).map(|i| 345 + 15 * i).collect();
        let mut g = Governor::new(GovernorConfig::default(), &clocks, None);
        let mut applied = ClockTarget::Default;
        for i in 0..30 {
            let mut w = crate::context::tests::window(1.0, 30.0, 500.0, 1500.0 + f64::from(i));
            w.itl = Some(vllm_metrics::Latency { count: 10.0, mean: Some(0.02), p50: None, p90: None, p99: None });
            let d = g.decide(&Observation { window: &w, energy_j: 400.0, seconds: 1.0, applied });
            applied = d.target;
        }
        g.state()
    }

    #[test]
    fn save_load_round_trip_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gov.sled");
        let s = learnt_state();
        {
            let st = Store::open(&path).expect("opens");
            assert_eq!(st.load("H100", "llama").expect("reads"), None);
            st.save("NVIDIA H100 80GB HBM3", "meta-llama/Llama-3.1-8B-Instruct", &s).expect("saves");
            st.save("NVIDIA H100 80GB HBM3", "other", &learnt_state()).expect("saves");
        }
        let st = Store::open(&path).expect("reopens");
        assert_eq!(st.moved_aside(), None);
        let back = st.load("NVIDIA H100 80GB HBM3", "meta-llama/Llama-3.1-8B-Instruct").expect("reads");
        assert_eq!(back.as_ref(), Some(&s));
        assert_eq!(st.pairs().expect("pairs").len(), 2);
        assert!(st.remove("NVIDIA H100 80GB HBM3", "other").expect("removes"));
        assert!(!st.remove("NVIDIA H100 80GB HBM3", "other").expect("removes"));
        assert_eq!(st.load("NVIDIA H100 80GB HBM3", "other").expect("reads"), None);
    }

    #[test]
    fn garbage_in_the_store_files_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gov.sled");
        {
            let st = Store::open(&path).expect("opens");
            st.save("gpu", "model", &learnt_state()).expect("saves");
        }
        let mut wrote = 0;
        for e in std::fs::read_dir(&path).expect("sled dir") {
            let p = e.expect("entry").path();
            if p.is_file() {
                std::fs::write(&p, b"\xde\xad\xbe\xef garbage garbage garbage \x00\x01\x02".repeat(64))
                    .expect("overwrite");
                wrote += 1;
            }
        }
        assert!(wrote > 0, "sled wrote files");
        let st = Store::open(&path).expect("recovers instead of failing");
        let aside = st.moved_aside().expect("moved aside").to_owned();
        assert!(aside.to_string_lossy().contains(".corrupt-"));
        assert!(aside.exists());
        assert_eq!(st.load("gpu", "model").expect("reads"), None, "starts empty");
        st.save("gpu", "model", &learnt_state()).expect("usable");
    }

    #[test]
    fn another_schema_version_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gov.sled");
        {
            let db = sled::open(&path).expect("sled");
            db.insert(store::VERSION_KEY, &(SCHEMA_VERSION + 1).to_be_bytes()).expect("insert");
            db.insert(Store::key("gpu", "model"), b"from the future".to_vec()).expect("insert");
            db.flush().expect("flush");
        }
        let st = Store::open(&path).expect("opens");
        assert!(st.moved_aside().is_some());
        assert_eq!(st.load("gpu", "model").expect("reads"), None);
    }

    #[test]
    fn an_undecodable_entry_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gov.sled");
        let st = Store::open(&path).expect("opens");
        st.inner.put(&Store::key("gpu", "model"), &"not an envelope").expect("insert");
        assert_eq!(st.load("gpu", "model").expect("reads"), None);
        assert!(st.inner.get::<String>(&Store::key("gpu", "model")).expect("get").is_none(), "dropped");
        // An envelope with another version is dropped too.
        let env = Envelope { version: SCHEMA_VERSION + 7, saved_unix: 0, state: learnt_state() };
        st.inner.put(&Store::key("gpu", "model"), &env).expect("insert");
        assert_eq!(st.load("gpu", "model").expect("reads"), None);
    }

    #[test]
    fn export_import_json_with_version_check() {
        let s = learnt_state();
        let e = Export {
            schema_version: SCHEMA_VERSION,
            gpu_model: "gpu".into(),
            vllm_model: "model".into(),
            state: s.clone(),
        };
        let text = export_text(&e).expect("export");
        let back = parse_export(&text, Path::new("x.json")).expect("imports");
        assert_eq!((back.gpu_model.as_str(), back.vllm_model.as_str()), ("gpu", "model"));
        crate::tests::assert_states_close(&back.state, &s);

        let old = text.replacen(&format!("\"schema_version\": {SCHEMA_VERSION}"), "\"schema_version\": 0", 1);
        let e = parse_export(&old, Path::new("x.json")).expect_err("old version");
        assert!(matches!(e, StoreError::Version { found: 0, .. }), "{e}");
        assert!(matches!(parse_export("{not json", Path::new("x.json")), Err(StoreError::Format { .. })));
        assert!(matches!(parse_export("{}", Path::new("x.json")), Err(StoreError::NoVersion { .. })));
    }
}
