//! One trial: start a server with the trial's flags (a real process or the in-process
//! simulator), search the highest rate within the limits for each length bucket, stop it.
//! Failures (out of memory, early exit, no health, load errors) are results, never fatal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::launch::LiveGroup;
use crate::rate::{self, RateSearch, RunFigures};
use crate::server::{LoadRun, ServerFactory, StartRequest};
use crate::space::{Bucket, LoadSpec, SearchSpace, Workload};
use loadgen::{LengthDist, Schedule, Segment};

/// Seconds a load run may go on after its last arrival (unfinished requests then fail).
pub const RUN_TAIL_S: f64 = 600.0;

/// Why a server did not come up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum StartFailure {
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("exited with code {code:?} before answering /health: {message}")]
    Exited { code: Option<i32>, message: String },
    #[error("no /health answer within {0} s")]
    Timeout(f64),
    #[error("cannot start: {0}")]
    Spawn(String),
    #[error("invalid flags: {0}")]
    Invalid(String),
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrialStatus {
    /// Measured; `score` is the best passing throughput (0 when no rate met the limits).
    Done,
    /// The server did not start.
    StartFailed(StartFailure),
    /// The load could not be run.
    LoadFailed(String),
}

impl TrialStatus {
    pub fn label(&self) -> &'static str {
        match self {
            TrialStatus::Done => "done",
            TrialStatus::StartFailed(StartFailure::OutOfMemory(_)) => "oom",
            TrialStatus::StartFailed(_) => "start-failed",
            TrialStatus::LoadFailed(_) => "load-failed",
        }
    }
}

/// What a trial is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrialKind {
    /// vLLM's default flags (the parameters' `default` values).
    Baseline,
    Search,
    /// The best flags measured on every bucket for the capacity profile.
    Profile,
}

/// A finished trial, as stored and reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub id: u32,
    pub kind: TrialKind,
    /// Indices into the enabled parameters' values (search trials).
    pub point: Option<Vec<usize>>,
    /// Every flag passed (name without dashes -> value).
    pub flags: BTreeMap<String, String>,
    pub gpu_set: String,
    pub status: TrialStatus,
    /// Request throughput (req/s) at the highest rate within the limits on the first bucket;
    /// None when the trial failed.
    pub score: Option<f64>,
    /// One rate search per bucket measured.
    pub searches: Vec<(Bucket, RateSearch)>,
    pub started_unix: u64,
    pub seconds: f64,
}

impl TrialRecord {
    /// The best passing run on the first bucket.
    pub fn best(&self) -> Option<&RunFigures> {
        self.searches.first().and_then(|(_, s)| s.best())
    }

    /// The run whose latency a report shows: the best passing one, else the last run.
    pub fn shown(&self) -> Option<&RunFigures> {
        self.best().or_else(|| self.searches.first().and_then(|(_, s)| s.runs.last()))
    }
}

/// Called with a server's group when it starts (`true`) and stops (`false`).
pub type GroupHook = Arc<dyn Fn(LiveGroup, bool) + Send + Sync>;

/// The schedule of one load run on `w` at `rate` (None: unlimited). A dataset is replayed
/// row by row (a seeded draw of `requests` rows, one single-request segment each, spaced by
/// exponential gaps at `rate`), so prompt and output lengths stay paired.
pub fn schedule(load: &LoadSpec, w: &Workload, rate: Option<f64>) -> Schedule {
    if w.dataset && !load.dataset_rows.is_empty() {
        let mut rng = StdRng::seed_from_u64(load.seed ^ 0x0da7_a5e7);
        let rows = &load.dataset_rows;
        let segments = (0..load.requests)
            .map(|_| {
                let (i, o) = rows[rng.random_range(0..rows.len())];
                let gap = match rate {
                    None => 0.0,
                    Some(r) => -(1.0 - rng.random::<f64>()).ln() / r.max(1e-6),
                };
                Segment::burst(1, gap, LengthDist::Fixed(i), LengthDist::Fixed(o))
            })
            .collect();
        return Schedule { segments };
    }
    let bucket = &w.bucket;
    let len = |n: u32| {
        let spread = crate::saturating_u32((f64::from(n) * load.length_spread).round());
        if spread == 0 {
            LengthDist::Fixed(n)
        } else {
            LengthDist::Uniform { lo: n.saturating_sub(spread).max(1), hi: n + spread }
        }
    };
    let (p, o) = (len(bucket.input_tokens), len(bucket.output_tokens));
    match rate {
        None => Schedule::infinite_rate(load.requests, p, o),
        Some(r) => Schedule::constant(f64::from(load.requests) / r.max(1e-6), r, p, o),
    }
}

fn prefix_tokens(load: &LoadSpec, bucket: &Bucket) -> u32 {
    crate::saturating_u32((f64::from(bucket.input_tokens) * load.prefix_share).round())
}

/// Everything a trial needs besides its flags.
#[derive(Clone)]
pub struct TrialContext {
    pub space: Arc<SearchSpace>,
    pub servers: Arc<dyn ServerFactory>,
    pub hook: GroupHook,
}

// By hand: the hook is a closure, which has no `Debug`.
impl std::fmt::Debug for TrialContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrialContext")
            .field("space", &self.space)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl TrialContext {
    fn start_request<'a>(
        &'a self,
        flags: &'a BTreeMap<String, String>,
        gpu_set: &'a str,
        log: &'a Path,
    ) -> StartRequest<'a> {
        StartRequest { model: &self.space.study.model, flags, gpu_set, log, hook: &self.hook }
    }

    /// Starts and stops a server: whether these flags start at all (the memory search).
    pub async fn starts(
        &self,
        flags: &BTreeMap<String, String>,
        gpu_set: &str,
        log: &Path,
    ) -> Result<(), StartFailure> {
        let server = self.servers.start(self.start_request(flags, gpu_set, log)).await?;
        server.stop().await;
        Ok(())
    }

    /// Runs a trial on `buckets` and returns its status and searches.
    pub async fn run(
        &self,
        flags: &BTreeMap<String, String>,
        gpu_set: &str,
        buckets: &[Workload],
        log: &Path,
    ) -> (TrialStatus, Vec<(Bucket, RateSearch)>) {
        let space = &self.space;
        let (slo, limits) = (space.limits.latency(), space.limits);
        let (runs, tol) = (space.study.max_rate_runs, space.study.rate_tolerance);
        let mut out = Vec::new();
        let server = match self.servers.start(self.start_request(flags, gpu_set, log)).await {
            Ok(s) => s,
            Err(e) => return (TrialStatus::StartFailed(e), out),
        };
        let mut status = TrialStatus::Done;
        for b in buckets {
            let prefix_tokens = prefix_tokens(&space.load, &b.bucket);
            let res = rate::search(runs, tol, |r| {
                let run = LoadRun { schedule: schedule(&space.load, b, r), seed: space.load.seed, prefix_tokens, slo };
                let server = &server;
                async move { server.run(run).await.map(|(rep, hit)| RunFigures::new(&rep, hit, &limits)) }
            })
            .await;
            match res {
                Ok(s) => out.push((b.bucket, s)),
                Err(e) => {
                    status = TrialStatus::LoadFailed(e.to_string());
                    break;
                }
            }
        }
        server.stop().await;
        (status, out)
    }
}

/// A free loopback port (bound, then released for the server).
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port())
}

/// The score of a finished trial: throughput at the best passing rate, 0 when none passed.
pub fn score(status: &TrialStatus, searches: &[(Bucket, RateSearch)]) -> Option<f64> {
    match status {
        TrialStatus::Done => Some(searches.first().and_then(|(_, s)| s.best()).map_or(0.0, |b| b.request_throughput)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::tests::SMALL;

    #[test]
    fn a_dataset_is_replayed_with_paired_lengths_at_the_rate() {
        let mut space = SearchSpace::parse(SMALL).expect("space");
        space.load.dataset_rows = vec![(100, 7), (2000, 3)];
        space.load.requests = 2000;
        let w = Workload { bucket: Bucket { input_tokens: 1050, output_tokens: 5 }, dataset: true };
        let inf: Vec<_> = schedule(&space.load, &w, None).arrivals(1).collect();
        assert_eq!(inf.len(), 2000);
        assert!(inf.iter().all(|a| a.at_s == 0.0 && matches!((a.prompt_tokens, a.max_tokens), (100, 7) | (2000, 3))));
        assert!(inf.iter().any(|a| a.prompt_tokens == 100) && inf.iter().any(|a| a.prompt_tokens == 2000));
        let at = schedule(&space.load, &w, Some(50.0));
        let last = at.arrivals(1).last().expect("arrivals").at_s;
        assert!((last - 40.0).abs() < 4.0, "2000 requests at 50/s span about 40 s: {last}");
        let plain = Workload { dataset: false, ..w };
        assert!(schedule(&space.load, &plain, None).arrivals(1).all(|a| a.prompt_tokens == 1050));
    }
}
