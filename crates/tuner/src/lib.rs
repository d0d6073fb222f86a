//! Trial launcher: tunes vLLM server flags for the most request throughput within latency
//! limits. A study reads a search space ([`space`]), finds the highest
//! `--gpu-memory-utilization` that starts, runs a baseline trial and then trials picked by
//! grid, random or TPE ([`strategy`]); each trial starts a server ([`launch`], or the in-process
//! simulator, [`simulate`]), searches the highest rate within the limits ([`rate`]) and stops
//! it. Trials are stored as they finish ([`store`]) so a study resumes; the outputs and the
//! capacity profile for the replica advisor are written at the end ([`report`]).

pub mod launch;
pub mod rate;
pub mod report;
pub mod server;
pub mod space;
pub mod store;
pub mod strategy;
pub mod study;
pub mod trial;

/// `x` as a u32 exactly as `as` converts it: toward zero, saturating at 0 and `u32::MAX`, NaN
/// to 0. Callers round first where they mean to round.
// The crate's f64 -> u32 casts all come here: `as` saturates, which is what every caller wants.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn saturating_u32(x: f64) -> u32 {
    x as u32
}

pub use server::ServerFactory;
pub use space::{SearchSpace, Strategy};
pub use study::{run_study, StudyConfig, TuneError};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why a study could not be set up: bad input, named.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Space(#[from] space::SpaceError),
    #[error("{0}")]
    Invalid(String),
}

/// The study a `tune start` asks for: the space with its overrides, where trials run (the
/// launch command, or `in_process` for `--launch sim`), and the study directory (default
/// `<default_root>/<study name>`).
pub fn study_config(
    req: &proto::TuneStart,
    default_root: &Path,
    in_process: Option<Arc<dyn ServerFactory>>,
) -> Result<StudyConfig, SetupError> {
    let mut space = SearchSpace::load(&req.space)?;
    if let Some(s) = &req.strategy {
        space.study.strategy = s.parse().map_err(|e| SetupError::Invalid(format!("--strategy: {e}")))?;
    }
    if let Some(t) = req.trials {
        if t == 0 {
            return Err(SetupError::Invalid("--trials: must be at least 1".into()));
        }
        space.study.trials = t;
    }
    let servers: Arc<dyn ServerFactory> = if req.launch.trim() == "sim" {
        in_process.ok_or_else(|| {
            SetupError::Invalid(
                "--launch sim: this gpu-agent was built without the simulator (feature `simulate`)".into(),
            )
        })?
    } else {
        let template = launch::Template::parse(&req.launch).map_err(SetupError::Invalid)?;
        Arc::new(launch::Launcher {
            template,
            startup_timeout: Duration::from_secs_f64(space.study.startup_timeout_s),
            stop_grace: Duration::from_secs_f64(space.study.stop_grace_s),
        })
    };
    let dir: PathBuf = req.study_dir.clone().unwrap_or_else(|| default_root.join(&space.study.name));
    Ok(StudyConfig { space, launch: req.launch.trim().to_string(), servers, dir, fresh: req.fresh })
}
