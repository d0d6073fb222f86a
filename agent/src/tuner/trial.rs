//! One trial: start a server with the trial's flags (a real process or the in-process
//! simulator), search the highest rate within the limits for each length bucket, stop it.
//! Failures (out of memory, early exit, no health, load errors) are results, never fatal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::launch::{LiveGroup, Launcher};
use super::rate::{self, RateSearch, RunFigures};
use super::simulate::SimServer;
use super::space::{Bucket, LoadSpec, SearchSpace, Workload};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sim::load::{run_http, LengthDist, LoadOptions, Schedule, Segment};
use crate::vllm::{Scraper, Snapshot};

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

/// Where trials run: real servers from a command template, or the in-process simulator.
#[derive(Debug, Clone)]
pub enum Evaluator {
    Launch(Arc<Launcher>),
    Sim,
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
        let spread = (f64::from(n) * load.length_spread).round() as u32;
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
    (f64::from(bucket.input_tokens) * load.prefix_share).round() as u32
}

/// Prefix-cache hits over queries between two /metrics texts.
fn hit_rate(before: Option<&Snapshot>, after: Option<&Snapshot>) -> Option<f64> {
    let (b, a) = (before?, after?);
    let q = a.prefix_cache_queries_total? - b.prefix_cache_queries_total.unwrap_or(0.0);
    let h = a.prefix_cache_hits_total.unwrap_or(0.0) - b.prefix_cache_hits_total.unwrap_or(0.0);
    (q > 0.0).then(|| h / q)
}

/// Everything a trial needs besides its flags.
#[derive(Clone)]
pub struct TrialContext {
    pub space: Arc<SearchSpace>,
    pub evaluator: Evaluator,
    pub hook: GroupHook,
}

impl TrialContext {
    /// Starts and stops a server: whether these flags start at all (the memory search).
    pub async fn starts(&self, flags: &BTreeMap<String, String>, gpu_set: &str, log: &Path) -> Result<(), StartFailure> {
        match &self.evaluator {
            Evaluator::Sim => SimServer::start(&self.space.study.model, flags).map(|_| ()),
            Evaluator::Launch(l) => {
                let port = free_port().map_err(StartFailure::Spawn)?;
                let hook = Arc::clone(&self.hook);
                let mut s = l.start(&self.space.study.model, flags, gpu_set, port, log, |g| hook(g, true)).await?;
                s.stop(l.stop_grace).await;
                (self.hook)(s.group, false);
                Ok(())
            }
        }
    }

    /// Runs a trial on `buckets` and returns its status and searches.
    pub async fn run(&self, flags: &BTreeMap<String, String>, gpu_set: &str, buckets: &[Workload], log: &Path) -> (TrialStatus, Vec<(Bucket, RateSearch)>) {
        let space = &self.space;
        let slo = space.limits.slo();
        let limits = space.limits;
        let (runs, tol) = (space.study.max_rate_runs, space.study.rate_tolerance);
        let mut out = Vec::new();
        match &self.evaluator {
            Evaluator::Sim => {
                let server = match SimServer::start(&space.study.model, flags) {
                    Ok(s) => s,
                    Err(e) => return (TrialStatus::StartFailed(e), out),
                };
                for b in buckets {
                    let pt = prefix_tokens(&space.load, &b.bucket);
                    let res = rate::search(runs, tol, |r| {
                        let (server, sched, seed) = (server.clone(), schedule(&space.load, b, r), space.load.seed);
                        async move {
                            // Seconds of CPU: off the async workers (the daemon's loop shares them).
                            let got = tokio::task::spawn_blocking(move || server.run(&sched, seed, pt, &slo))
                                .await
                                .map_err(|e| StartFailure::Invalid(format!("simulation task: {e}")))?;
                            got.map(|(rep, hit)| RunFigures::new(&rep, hit, &limits))
                        }
                    })
                    .await;
                    match res {
                        Ok(s) => out.push((b.bucket, s)),
                        Err(e) => return (TrialStatus::LoadFailed(e.to_string()), out),
                    }
                }
                (TrialStatus::Done, out)
            }
            Evaluator::Launch(l) => {
                let port = match free_port() {
                    Ok(p) => p,
                    Err(e) => return (TrialStatus::StartFailed(StartFailure::Spawn(e)), out),
                };
                let hook = Arc::clone(&self.hook);
                let mut server = match l.start(&space.study.model, flags, gpu_set, port, log, |g| hook(g, true)).await {
                    Ok(s) => s,
                    Err(e) => return (TrialStatus::StartFailed(e), out),
                };
                let url = server.url();
                let scraper = Scraper::new();
                let metrics = format!("{url}/metrics");
                let mut status = TrialStatus::Done;
                for b in buckets {
                    let opts = LoadOptions {
                        slo,
                        shared_prefix_tokens: prefix_tokens(&space.load, &b.bucket),
                        ..LoadOptions::default()
                    };
                    let res = rate::search(runs, tol, |r| {
                        let (url, mut opts, scraper, metrics) = (url.clone(), opts.clone(), &scraper, metrics.clone());
                        let sched = schedule(&space.load, b, r);
                        // A run at a rate the server cannot take must still end: the arrivals'
                        // span plus RUN_TAIL_S for the last answers.
                        opts.deadline = Some(Duration::from_secs_f64(sched.duration_s() + RUN_TAIL_S));
                        async move {
                            let snap = |t: Result<String, _>| t.ok().and_then(|t| Snapshot::from_text(&t).ok());
                            let before = snap(scraper.fetch_text(&metrics, Duration::from_secs(5)).await);
                            let rep = run_http(&url, &space.study.model, &sched, space.load.seed, &opts).await?;
                            let after = snap(scraper.fetch_text(&metrics, Duration::from_secs(5)).await);
                            Ok::<_, crate::sim::load::LoadError>(RunFigures::new(&rep, hit_rate(before.as_ref(), after.as_ref()), &limits))
                        }
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
                server.stop(l.stop_grace).await;
                (self.hook)(server.group, false);
                (status, out)
            }
        }
    }
}

/// A free loopback port (bound, then released for the server).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
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
    use crate::tuner::space::tests::SMALL;

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
