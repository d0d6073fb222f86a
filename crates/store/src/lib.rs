//! One versioned sled store, used by the governor's learnt state and by each tuner study.
//!
//! A store holds a schema version under [`VERSION_KEY`] and typed values encoded with bincode 2
//! (serde). Opening one that is broken or of another version does what its owner asks
//! ([`OnMismatch`]): the governor moves it aside and starts afresh (losing what was learnt
//! costs minutes of exploration, a crash-looping sidecar far more), a study refuses (its
//! trials are the user's results). A filesystem that refuses to write (full, read-only, no
//! permission) never counts as a broken store: the store is left where it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Serialize};
use tracing::warn;

/// One raw key and value, as [`Store::scan_raw`] returns them.
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// Where the schema version is kept (4 bytes, big-endian).
pub const VERSION_KEY: &[u8] = b"__schema_version";

/// What to do with a store that is broken or of another schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMismatch {
    /// Move it to `<path>.corrupt-<unix seconds>` and start an empty one.
    MoveAside,
    /// Fail with [`StoreError::Incompatible`].
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another process (sled lock held)")]
    Locked { path: PathBuf },
    #[error("store {path} cannot be opened; left in place")]
    Refused {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path} is unusable ({why})")]
    Incompatible { path: PathBuf, why: String },
    #[error("store {path}: moving the unusable store aside failed")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path}")]
    Db {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path}: cannot encode `{key}`")]
    Encode {
        path: PathBuf,
        key: String,
        #[source]
        source: bincode::error::EncodeError,
    },
    #[error("store {path}: record `{key}` does not decode")]
    Decode {
        path: PathBuf,
        key: String,
        #[source]
        source: bincode::error::DecodeError,
    },
}

/// An open store of one schema version.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    moved_aside: Option<PathBuf>,
}

/// Why sled would not open a store.
enum OpenProblem {
    Locked,
    Refused(sled::Error),
    Broken(String),
}

impl OpenProblem {
    fn into_error(self, path: &Path) -> StoreError {
        let path = path.to_owned();
        match self {
            OpenProblem::Locked => StoreError::Locked { path },
            OpenProblem::Refused(source) => StoreError::Refused { path, source },
            OpenProblem::Broken(why) => StoreError::Incompatible { path, why },
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `sled::open`, waiting up to 2 s while the file lock is held: after a `Db` is dropped (a
/// restart in the same process, a store reopened after a failed save) sled's flusher thread
/// still holds the lock until its next tick, so an immediate reopen would find it locked.
pub fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let mut tries = 0;
    loop {
        match sled::open(path) {
            Err(e) if tries < 20 && is_lock_error(&e) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    let msg = e.to_string();
    msg.contains("could not acquire lock")
        || msg.contains("WouldBlock")
        || msg.contains("Resource temporarily unavailable")
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

/// Opens sled without letting a panic inside it (seen on some corrupt files) escape.
fn try_open(path: &Path) -> Result<sled::Db, OpenProblem> {
    let p = path.to_owned();
    match std::panic::catch_unwind(move || open_sled(&p)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) if is_lock_error(&e) => Err(OpenProblem::Locked),
        Ok(Err(e)) if matches!(&e, sled::Error::Io(io) if is_refusal(io)) => Err(OpenProblem::Refused(e)),
        Ok(Err(e)) => Err(OpenProblem::Broken(e.to_string())),
        Err(_) => Err(OpenProblem::Broken("sled panicked while opening".into())),
    }
}

/// Why an opened database cannot be used as version `schema`, if it cannot.
fn incompatible(db: &sled::Db, schema: u32) -> Option<String> {
    match db.get(VERSION_KEY) {
        Ok(Some(v)) => match <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes) {
            Ok(found) if found == schema => None,
            Ok(found) => Some(format!("schema version {found}, expected {schema}")),
            Err(_) => Some("schema version unreadable".into()),
        },
        Ok(None) if db.is_empty() => None,
        Ok(None) => Some("entries without a schema version".into()),
        Err(e) => Some(e.to_string()),
    }
}

impl Store {
    /// Opens (or creates) the store at `path` as version `schema`; `name` says whose store it
    /// is in the warning when one is moved aside.
    pub fn open(name: &str, path: &Path, schema: u32, on_mismatch: OnMismatch) -> Result<Store, StoreError> {
        let why = match try_open(path) {
            Ok(db) => match incompatible(&db, schema) {
                None => return Self::ready(db, path, schema, None),
                Some(why) => why,
            },
            Err(OpenProblem::Broken(why)) => why,
            Err(other) => return Err(other.into_error(path)),
        };
        if on_mismatch == OnMismatch::Refuse {
            return Err(StoreError::Incompatible { path: path.to_owned(), why });
        }
        let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), unix_now()));
        warn!(path = %path.display(), aside = %aside.display(), problem = %why, "{name} unusable; moving it aside and starting empty");
        std::fs::rename(path, &aside).map_err(|source| StoreError::MoveAside { path: path.to_owned(), source })?;
        let db = try_open(path).map_err(|p| p.into_error(path))?;
        Self::ready(db, path, schema, Some(aside))
    }

    fn ready(db: sled::Db, path: &Path, schema: u32, moved_aside: Option<PathBuf>) -> Result<Store, StoreError> {
        let s = Store { db, path: path.to_owned(), moved_aside };
        if s.db.get(VERSION_KEY).map_err(|e| s.db_err(e))?.is_none() {
            s.db.insert(VERSION_KEY, &schema.to_be_bytes()).map_err(|e| s.db_err(e))?;
            s.db.flush().map_err(|e| s.db_err(e))?;
        }
        Ok(s)
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where an unusable store was moved when this one was opened.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }

    /// The value under `key`; a record that does not decode is an error (see [`Store::decode`]).
    pub fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get(key).map_err(|e| self.db_err(e))? {
            Some(v) => self.decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Writes and flushes, so a crash right after loses nothing.
    pub fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|source| {
            StoreError::Encode { path: self.path.clone(), key: String::from_utf8_lossy(key).into_owned(), source }
        })?;
        self.db.insert(key, bytes).map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Removes and flushes; whether something was there.
    pub fn remove(&self, key: &[u8]) -> Result<bool, StoreError> {
        let had = self.db.remove(key).map_err(|e| self.db_err(e))?.is_some();
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(had)
    }

    /// Keys and raw values under `prefix`, in key order.
    pub fn scan_raw(&self, prefix: &[u8]) -> Result<Vec<RawEntry>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.db_err(e)))
            .collect()
    }

    /// Decodes one raw value read under `key`.
    pub fn decode<T: DeserializeOwned>(&self, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v).map_err(|source| {
            StoreError::Decode { path: self.path.clone(), key: String::from_utf8_lossy(key).into_owned(), source }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sled");
        {
            let s = Store::open("test store", &path, 7, OnMismatch::Refuse).expect("open");
            s.put(b"a/1", &(1u32, "one".to_string())).expect("put");
            s.put(b"a/2", &(2u32, "two".to_string())).expect("put");
            s.put(b"b", &3u64).expect("put");
        }
        let s = Store::open("test store", &path, 7, OnMismatch::Refuse).expect("reopen");
        assert_eq!(s.get::<u64>(b"b").expect("get"), Some(3));
        let rows = s.scan_raw(b"a/").expect("scan");
        let decoded: Vec<(u32, String)> = rows.iter().map(|(k, v)| s.decode(k, v).expect("decode")).collect();
        assert_eq!(decoded, vec![(1, "one".into()), (2, "two".into())]);
        assert!(s.remove(b"b").expect("remove"));
        assert!(!s.remove(b"b").expect("remove again"));
    }

    #[test]
    fn another_version_is_refused_or_moved_aside_as_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sled");
        Store::open("test store", &path, 1, OnMismatch::Refuse).expect("open v1").put(b"k", &1u8).expect("put");
        let e = Store::open("test store", &path, 2, OnMismatch::Refuse).expect_err("v2 refuses v1");
        assert!(
            matches!(&e, StoreError::Incompatible { why, .. } if why.contains("schema version 1, expected 2")),
            "{e}"
        );
        let s = Store::open("test store", &path, 2, OnMismatch::MoveAside).expect("v2 moves v1 aside");
        let aside = s.moved_aside().expect("moved").to_owned();
        assert!(aside.exists() && s.get::<u8>(b"k").expect("get").is_none());
    }

    #[test]
    fn a_record_that_does_not_decode_names_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open("test store", &dir.path().join("s.sled"), 1, OnMismatch::Refuse).expect("open");
        s.put(b"k", &1u8).expect("put");
        let e = s.get::<String>(b"k").expect_err("a u8 is no string");
        assert!(e.to_string().contains("record `k` does not decode"), "{e}");
    }
}
