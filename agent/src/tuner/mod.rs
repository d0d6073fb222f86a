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
pub mod simulate;
pub mod space;
pub mod store;
pub mod strategy;
pub mod study;
pub mod trial;

pub use space::{SearchSpace, Strategy};
pub use study::{run_study, StudyConfig, TuneError};
pub use trial::Evaluator;
