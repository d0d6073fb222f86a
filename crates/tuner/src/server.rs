//! The one seam between a study and where its trials run: a [`ServerFactory`] starts a server
//! with a trial's flags, the [`TrialServer`] it returns runs loads on it and is stopped. The
//! process launcher ([`crate::launch::Launcher`]) is one; the simulator's virtual-time server
//! (crate `sim`, `--launch sim`) is the other. A trial has one loop over its buckets whichever
//! it is.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use loadgen::{LatencyLimits, LoadReport, Schedule};

use crate::trial::{GroupHook, StartFailure};

/// A boxed future, so the traits stay usable as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a server is started with.
#[derive(Clone, Copy)]
pub struct StartRequest<'a> {
    pub model: &'a str,
    /// Every flag (name without dashes -> value).
    pub flags: &'a BTreeMap<String, String>,
    /// The `CUDA_VISIBLE_DEVICES` value.
    pub gpu_set: &'a str,
    /// Where the server's output goes.
    pub log: &'a Path,
    /// Told of a server's process group when it starts (`true`) and stops (`false`).
    pub hook: &'a GroupHook,
}

// By hand: the hook is a closure, which has no `Debug`.
impl std::fmt::Debug for StartRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartRequest")
            .field("model", &self.model)
            .field("flags", &self.flags)
            .field("gpu_set", &self.gpu_set)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadRun {
    pub schedule: Schedule,
    pub seed: u64,
    /// Tokens at the start of each prompt shared by all requests (prefix-cache hits).
    pub prefix_tokens: u32,
    pub slo: LatencyLimits,
}

/// Why a load run gave no report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Load(#[from] loadgen::LoadError),
    #[error("{0}")]
    Simulation(String),
}

/// Starts servers.
pub trait ServerFactory: Send + Sync + std::fmt::Debug {
    /// Starts one server and returns once it is ready for load.
    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<Box<dyn TrialServer>, StartFailure>>;

    /// The GPU a profile measured here is for, when the factory knows it.
    fn gpu_name(&self) -> Option<String> {
        None
    }
}

/// A started server.
pub trait TrialServer: Send + Sync {
    /// Runs one load; the report and the prefix-cache hit rate over the run, when known.
    fn run(&self, run: LoadRun) -> BoxFuture<'_, Result<(LoadReport, Option<f64>), RunError>>;

    /// Stops the server (and everything it started).
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}
