//! Persistence of what the governor learnt: one sled database, one entry per (GPU model name,
//! vLLM model name), values encoded with bincode 2 behind a schema version.
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
use tracing::warn;

use crate::governor::GovernorState;

/// Version of the stored layout; bump it whenever `GovernorState` changes shape.
/// 2: the shared reward model lost two features (11 -> 9); version-1 states do not fit it.
/// 3: rewards are learnt from power x TPOT and the shared model gained load curvature
/// (9 -> 12 features); version-2 models mean something else.
pub const SCHEMA_VERSION: u32 = 3;

const VERSION_KEY: &[u8] = b"__schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {msg}")]
    Open { path: PathBuf, msg: String },
    #[error("store {path} is in use by another process (sled lock held)")]
    Locked { path: PathBuf },
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    #[error("store: cannot encode state: {0}")]
    Encode(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a governor export: {msg}")]
    Format { path: PathBuf, msg: String },
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
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// Where a broken store was moved on open, if one was.
    moved_aside: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("moved_aside", &self.moved_aside).finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why sled would not open a store.
#[derive(Debug)]
enum OpenProblem {
    /// Another process holds the store's lock.
    Locked,
    /// The filesystem refuses (full, read-only, no permission): the store itself may be fine,
    /// so it must stay where it is for the next start.
    Refused(String),
    /// Anything else: the store is taken to be broken.
    Broken(String),
}

/// Opens sled without letting a panic inside it (seen on some corrupt files) escape.
fn try_open(path: &Path) -> Result<sled::Db, OpenProblem> {
    let p = path.to_owned();
    match std::panic::catch_unwind(move || open_sled(&p)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => {
            let msg = e.to_string();
            Err(if is_lock_error(&msg) {
                OpenProblem::Locked
            } else if matches!(&e, sled::Error::Io(io) if is_refusal(io)) {
                OpenProblem::Refused(msg)
            } else {
                OpenProblem::Broken(msg)
            })
        }
        Err(_) => Err(OpenProblem::Broken("sled panicked while opening".into())),
    }
}

/// `sled::open`, waiting up to 2 s while the file lock is held: after a `Db` is dropped (a
/// restart in the same process, a store reopened after a failed save) sled's flusher thread
/// still holds the lock until its next tick, so an immediate reopen would find it locked.
pub fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let mut tries = 0;
    loop {
        match sled::open(path) {
            Err(e) if tries < 20 && is_lock_error(&e.to_string()) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn is_lock_error(msg: &str) -> bool {
    msg.contains("could not acquire lock") || msg.contains("WouldBlock") || msg.contains("Resource temporarily unavailable")
}

/// I/O errors that say the filesystem refuses to write (full, read-only, no permission, over
/// quota), not that the store is corrupt. By errno: the matching `ErrorKind`s are newer than
/// our minimum Rust version.
fn is_refusal(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let refused = [Errno::ENOSPC, Errno::EROFS, Errno::EACCES, Errno::EPERM, Errno::EDQUOT];
    e.kind() == std::io::ErrorKind::PermissionDenied
        || e.raw_os_error().is_some_and(|n| refused.contains(&Errno::from_raw(n)))
}

/// Why an opened database cannot be used as it is, if it cannot.
fn incompatible(db: &sled::Db) -> Option<String> {
    match db.get(VERSION_KEY) {
        Ok(Some(v)) => {
            let found = <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes).ok();
            match found {
                Some(SCHEMA_VERSION) => None,
                Some(f) => Some(format!("schema version {f}, expected {SCHEMA_VERSION}")),
                None => Some("schema version unreadable".into()),
            }
        }
        Ok(None) if db.is_empty() => None,
        Ok(None) => Some("entries without a schema version".into()),
        Err(e) => Some(e.to_string()),
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, moving a corrupt or incompatible one aside.
    /// Fails only when even a fresh store cannot be created, or another process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut moved_aside = None;
        let problem = match try_open(path) {
            Ok(db) => match incompatible(&db) {
                None => return Self::ready(db, path, None),
                Some(why) => {
                    drop(db);
                    why
                }
            },
            Err(OpenProblem::Locked) => return Err(StoreError::Locked { path: path.to_owned() }),
            Err(OpenProblem::Refused(msg)) => {
                return Err(StoreError::Open { path: path.to_owned(), msg: format!("{msg}; left in place") })
            }
            Err(OpenProblem::Broken(msg)) => msg,
        };
        let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), unix_now()));
        warn!(path = %path.display(), aside = %aside.display(), problem = %problem, "governor store unusable; moving it aside and starting empty");
        if let Err(e) = std::fs::rename(path, &aside) {
            return Err(StoreError::Open { path: path.to_owned(), msg: format!("{problem}; moving it aside failed: {e}") });
        }
        moved_aside.get_or_insert(aside);
        let db = try_open(path).map_err(|p| {
            let msg = match p {
                OpenProblem::Locked => "locked by another process".to_string(),
                OpenProblem::Refused(m) | OpenProblem::Broken(m) => m,
            };
            StoreError::Open { path: path.to_owned(), msg }
        })?;
        Self::ready(db, path, moved_aside)
    }

    fn ready(db: sled::Db, path: &Path, moved_aside: Option<PathBuf>) -> Result<Store, StoreError> {
        if db.get(VERSION_KEY)?.is_none() {
            db.insert(VERSION_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            db.flush()?;
        }
        Ok(Store { db, path: path.to_owned(), moved_aside })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a broken store was moved when this one was opened.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }

    /// Key of one (GPU model, vLLM model) pair. A NUL separates the names (neither contains one).
    pub fn key(gpu_model: &str, vllm_model: &str) -> Vec<u8> {
        let mut k = b"governor/".to_vec();
        k.extend_from_slice(gpu_model.as_bytes());
        k.push(0);
        k.extend_from_slice(vllm_model.as_bytes());
        k
    }

    /// Saves and flushes the state of one pair.
    pub fn save(&self, gpu_model: &str, vllm_model: &str, state: &GovernorState) -> Result<(), StoreError> {
        let env = Envelope { version: SCHEMA_VERSION, saved_unix: unix_now(), state: state.clone() };
        let bytes = bincode::serde::encode_to_vec(&env, bincode::config::standard()).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.db.insert(Self::key(gpu_model, vllm_model), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// The saved state of one pair. An entry that does not decode (or has another version) is
    /// removed with a warning and reads as absent.
    pub fn load(&self, gpu_model: &str, vllm_model: &str) -> Result<Option<GovernorState>, StoreError> {
        let key = Self::key(gpu_model, vllm_model);
        let Some(bytes) = self.db.get(&key)? else { return Ok(None) };
        match bincode::serde::decode_from_slice::<Envelope, _>(&bytes, bincode::config::standard()) {
            Ok((env, _)) if env.version == SCHEMA_VERSION => Ok(Some(env.state)),
            Ok((env, _)) => {
                warn!(gpu_model, vllm_model, found = env.version, expected = SCHEMA_VERSION, "stored governor state has another schema version; dropping it");
                self.db.remove(&key)?;
                Ok(None)
            }
            Err(e) => {
                warn!(gpu_model, vllm_model, error = %e, "stored governor state does not decode; dropping it");
                self.db.remove(&key)?;
                Ok(None)
            }
        }
    }

    /// Forgets one pair (`--reset-model`). Returns whether something was stored.
    pub fn remove(&self, gpu_model: &str, vllm_model: &str) -> Result<bool, StoreError> {
        let had = self.db.remove(Self::key(gpu_model, vllm_model))?.is_some();
        self.db.flush()?;
        Ok(had)
    }

    /// The (GPU model, vLLM model) pairs stored.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.db
            .scan_prefix(b"governor/")
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let rest = k.strip_prefix(b"governor/")?;
                let cut = rest.iter().position(|b| *b == 0)?;
                Some((String::from_utf8_lossy(&rest[..cut]).into_owned(), String::from_utf8_lossy(&rest[cut + 1..]).into_owned()))
            })
            .collect()
    }

    /// Writes one pair's state to `file` as JSON. Returns false when nothing is stored.
    pub fn export(&self, gpu_model: &str, vllm_model: &str, file: &Path) -> Result<bool, StoreError> {
        let Some(state) = self.load(gpu_model, vllm_model)? else { return Ok(false) };
        write_export(file, &Export { schema_version: SCHEMA_VERSION, gpu_model: gpu_model.into(), vllm_model: vllm_model.into(), state })?;
        Ok(true)
    }

    /// Reads an export and stores it under the pair it names; returns that pair.
    pub fn import(&self, file: &Path) -> Result<(String, String), StoreError> {
        let e = read_export(file)?;
        self.save(&e.gpu_model, &e.vllm_model, &e.state)?;
        Ok((e.gpu_model, e.vllm_model))
    }
}

pub fn write_export(file: &Path, e: &Export) -> Result<(), StoreError> {
    std::fs::write(file, export_text(e)?).map_err(|source| StoreError::Write { path: file.to_owned(), source })
}

/// The export as JSON text (what `write_export` writes and `agentctl model export` saves).
pub fn export_text(e: &Export) -> Result<String, StoreError> {
    serde_json::to_string_pretty(e).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Reads an export file, checking its schema version first (so an old file gets a version
/// error, not a confusing field error).
pub fn read_export(file: &Path) -> Result<Export, StoreError> {
    let text = std::fs::read_to_string(file).map_err(|source| StoreError::Read { path: file.to_owned(), source })?;
    parse_export(&text, file)
}

/// Parses export text; `file` names where it came from in errors.
pub fn parse_export(text: &str, file: &Path) -> Result<Export, StoreError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| StoreError::Format { path: file.to_owned(), msg: e.to_string() })?;
    let found = v
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| StoreError::Format { path: file.to_owned(), msg: "no `schema_version` number".into() })?;
    if found != u64::from(SCHEMA_VERSION) {
        return Err(StoreError::Version { path: file.to_owned(), found: u32::try_from(found).unwrap_or(u32::MAX), expected: SCHEMA_VERSION });
    }
    serde_json::from_value(v).map_err(|e| StoreError::Format { path: file.to_owned(), msg: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::{ClockTarget, Governor, GovernorConfig, Observation};

    /// A state with some learning in it.
    fn learnt_state() -> GovernorState {
        let clocks: Vec<u32> = (0..110).map(|i| 345 + 15 * i).collect();
        let mut g = Governor::new(GovernorConfig::default(), &clocks, None);
        let mut applied = ClockTarget::Default;
        for i in 0..30 {
            let mut w = crate::governor::context::tests::window(1.0, 30.0, 500.0, 1500.0 + f64::from(i));
            w.itl = Some(crate::vllm::Latency { count: 10.0, mean: Some(0.02), p50: None, p90: None, p99: None });
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
        assert_eq!(st.pairs().len(), 2);
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
                std::fs::write(&p, b"\xde\xad\xbe\xef garbage garbage garbage \x00\x01\x02".repeat(64)).expect("overwrite");
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
            db.insert(VERSION_KEY, &(SCHEMA_VERSION + 1).to_be_bytes()).expect("insert");
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
        st.db.insert(Store::key("gpu", "model"), b"\x07\x07garbage".to_vec()).expect("insert");
        assert_eq!(st.load("gpu", "model").expect("reads"), None);
        assert!(st.db.get(Store::key("gpu", "model")).expect("get").is_none(), "dropped");
        // An envelope with another version is dropped too.
        let env = Envelope { version: SCHEMA_VERSION + 7, saved_unix: 0, state: learnt_state() };
        let bytes = bincode::serde::encode_to_vec(&env, bincode::config::standard()).expect("encode");
        st.db.insert(Store::key("gpu", "model"), bytes).expect("insert");
        assert_eq!(st.load("gpu", "model").expect("reads"), None);
    }

    #[test]
    fn export_import_json_with_version_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Store::open(&dir.path().join("a.sled")).expect("opens");
        let b = Store::open(&dir.path().join("b.sled")).expect("opens");
        let file = dir.path().join("export.json");
        assert!(!a.export("gpu", "model", &file).expect("nothing to export"));
        let s = learnt_state();
        a.save("gpu", "model", &s).expect("saves");
        assert!(a.export("gpu", "model", &file).expect("exports"));
        assert_eq!(b.import(&file).expect("imports"), ("gpu".to_string(), "model".to_string()));
        let got = b.load("gpu", "model").expect("reads").expect("imported");
        crate::governor::tests::assert_states_close(&got, &s);

        let text = std::fs::read_to_string(&file).expect("read");
        let old = text.replacen(&format!("\"schema_version\": {SCHEMA_VERSION}"), "\"schema_version\": 0", 1);
        std::fs::write(&file, old).expect("write");
        let e = b.import(&file).expect_err("old version");
        assert!(matches!(e, StoreError::Version { found: 0, .. }), "{e}");
        std::fs::write(&file, "{not json").expect("write");
        assert!(matches!(b.import(&file), Err(StoreError::Format { .. })));
    }
}
