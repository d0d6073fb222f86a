//! A study: find the gpu-memory-utilization that starts, run the baseline and the search
//! trials (in parallel over the GPU sets), measure the best flags on every length bucket, and
//! write the outputs. Every finished trial is stored before the next starts, so a study that is
//! stopped or crashes resumes where it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::{StudyPhase, StudyState, TuneProgress};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::launch::{kill_leftover, LiveGroup};
use super::report::{self, StudySummary};
use super::server::ServerFactory;
use super::space::SearchSpace;
use super::store::{Store, StoreError, StudyMeta, STUDY_SCHEMA};
use super::strategy::{self, Dim, Observed, Point};
use super::trial::{score, StartFailure, TrialContext, TrialKind, TrialRecord, TrialStatus};
use objectives::profile::{CapacityBucket, CapacityProfile, ProfileLimits, PROFILE_SCHEMA};

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("study directory {path}")]
    Dir { path: String, source: std::io::Error },
    #[error("no --gpu-memory-utilization from {start} down to {min} starts the server; last failure: {last}")]
    NoMemory { start: f64, min: f64, last: String },
    #[error("the server does not start with the baseline flags: {0}")]
    Start(StartFailure),
    #[error("stopped")]
    Stopped,
    #[error("writing results: {0}")]
    Report(String),
    #[error("a trial task failed: {0}")]
    Task(String),
}

/// A study to run.
#[derive(Clone, Debug)]
pub struct StudyConfig {
    pub space: SearchSpace,
    /// The launch command as given (`sim` for the simulator): part of the study's identity.
    pub launch: String,
    pub servers: Arc<dyn ServerFactory>,
    pub dir: PathBuf,
    /// Discard an earlier study in `dir` instead of resuming it.
    pub fresh: bool,
}

/// Shared progress, read by `agentctl tune status` and the standalone progress line.
pub type SharedProgress = Arc<Mutex<TuneProgress>>;

/// A count of trials as the progress reports it (u32, as trial ids are).
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Changes the shared progress in place (a poisoned lock is skipped: progress is only shown).
pub fn update(p: &SharedProgress, f: impl FnOnce(&mut TuneProgress)) {
    if let Ok(mut g) = p.lock() {
        f(&mut g);
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The search's dimensions.
pub fn dims(space: &SearchSpace) -> Vec<Dim> {
    space.active().iter().map(|p| Dim { len: p.values().len(), ordinal: p.ordinal() }).collect()
}

/// Flags every trial passes: the fixed ones and the memory utilisation.
fn base_flags(space: &SearchSpace, gmu: f64) -> BTreeMap<String, String> {
    let mut f: BTreeMap<String, String> = space.fixed_flags.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    f.insert("gpu-memory-utilization".into(), format!("{gmu}"));
    f
}

/// The flags of a grid point.
pub fn point_flags(space: &SearchSpace, gmu: f64, point: &[usize]) -> BTreeMap<String, String> {
    let mut f = base_flags(space, gmu);
    for (p, &i) in space.active().iter().zip(point) {
        if let Some(v) = p.values().get(i) {
            f.insert(p.flag.clone(), v.clone());
        }
    }
    f
}

/// The baseline: each parameter's `default`, or left out (vLLM's own default).
fn baseline_flags(space: &SearchSpace, gmu: f64) -> BTreeMap<String, String> {
    let mut f = base_flags(space, gmu);
    for p in &space.parameters {
        if let Some(d) = &p.default {
            f.insert(p.flag.clone(), d.to_string());
        }
    }
    f
}

/// Trials a study runs, baseline included: `study.trials`, or every grid point and the baseline.
pub fn budget(space: &SearchSpace) -> u32 {
    // At most `study.trials`, a u32.
    u32::try_from(u64::from(space.study.trials).min(space.grid_size() + 1)).unwrap_or(space.study.trials)
}

/// Runs (or resumes) a study to the end, or until `cancel` turns true.
pub async fn run_study(
    cfg: StudyConfig,
    progress: SharedProgress,
    mut cancel: watch::Receiver<bool>,
) -> Result<StudySummary, TuneError> {
    let dir = cfg.dir.clone();
    let dir_err = |source| TuneError::Dir { path: dir.display().to_string(), source };
    std::fs::create_dir_all(dir.join("trials")).map_err(dir_err)?;
    if cfg.fresh {
        let old = dir.join("study.sled");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(dir_err)?;
        }
    }
    let space = Arc::new(cfg.space.clone());
    let meta = StudyMeta {
        schema: STUDY_SCHEMA,
        // The trial budget and the GPU sets are not part of the identity: a study may be
        // resumed with more trials or on other GPUs.
        space_json: serde_json::to_string(&SearchSpace {
            study: super::space::StudySpec { trials: 0, gpu_sets: Vec::new(), ..space.study.clone() },
            ..(*space).clone()
        })
        .unwrap_or_default(),
        launch: cfg.launch.clone(),
        created_unix: now_unix(),
    };
    let store = Store::open(&dir, &meta)?;
    for g in store.live()? {
        kill_leftover(g);
        store.remove_live(g)?;
    }
    let hook_store = store.clone();
    let hook: super::trial::GroupHook = Arc::new(move |g: LiveGroup, up: bool| {
        let r = if up { hook_store.add_live(g) } else { hook_store.remove_live(g) };
        if let Err(e) = r {
            warn!(error = %e, "cannot record a server group in the study store");
        }
    });
    let ctx = TrialContext { space: Arc::clone(&space), servers: Arc::clone(&cfg.servers), hook };
    let dims = dims(&space);
    let budget = budget(&space);
    update(&progress, |p| {
        p.state = StudyState::Running;
        p.study = space.study.name.clone();
        p.study_dir = dir.display().to_string();
        p.strategy = space.study.strategy.to_string();
        p.trials_total = budget;
    });

    // 1. gpu-memory-utilization.
    update(&progress, |p| p.phase = StudyPhase::MemorySearch);
    let gmu = match (space.gpu_memory_utilization.fixed, store.gpu_memory_utilization()?) {
        (Some(f), _) => f,
        (None, Some(found)) => found,
        (None, None) => {
            let found = tokio::select! {
                r = memory_search(&ctx, &dir) => r,
                _ = cancelled(&mut cancel) => return Err(TuneError::Stopped),
            };
            match found {
                Ok(found) => {
                    store.set_gpu_memory_utilization(found)?;
                    found
                }
                // Nothing to tune, but the outputs say why: a result, not an empty abort.
                Err(e @ (TuneError::NoMemory { .. } | TuneError::Start(_))) => {
                    let why = format!("memory search: {e}");
                    warn!("{why}");
                    update(&progress, |p| p.phase = StudyPhase::Reports);
                    let summary = report::write_all(&dir, &space, &[], None, Some(why.clone()), false)
                        .map_err(|e| TuneError::Report(e.to_string()))?;
                    update(&progress, |p| {
                        p.state = StudyState::Failed;
                        p.phase = StudyPhase::Done;
                        p.message = Some(why);
                    });
                    return Ok(summary);
                }
                Err(e) => return Err(e),
            }
        }
    };
    info!(gpu_memory_utilization = gmu, "memory utilisation");
    update(&progress, |p| p.gpu_memory_utilization = Some(gmu));

    // 2. Baseline and search trials.
    let mut records = store.trials()?;
    let mut next_id = records.iter().map(|r| r.id + 1).max().unwrap_or(0);
    let mut rng = StdRng::seed_from_u64(space.study.seed ^ u64::from(next_id).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let sets = space.study.gpu_sets.clone();
    let mut free: Vec<usize> = (0..sets.len()).rev().collect();
    let mut running: JoinSet<(TrialRecord, usize)> = JoinSet::new();
    let mut pending: Vec<(u32, Option<Point>)> = Vec::new();
    let searched = |recs: &[TrialRecord]| count_u32(recs.iter().filter(|r| r.kind != TrialKind::Profile).count());
    show(&progress, &records);
    update(&progress, |p| p.phase = StudyPhase::Trials);
    loop {
        while let Some(&set) = free.last() {
            if searched(&records) + count_u32(pending.len()) >= budget {
                break;
            }
            let has_baseline =
                records.iter().any(|r| r.kind == TrialKind::Baseline) || pending.iter().any(|p| p.1.is_none());
            let (kind, point, flags) = if !has_baseline {
                (TrialKind::Baseline, None, baseline_flags(&space, gmu))
            } else {
                let history: Vec<Observed> = records
                    .iter()
                    .filter_map(|r| r.point.clone().map(|point| Observed { point, score: r.score }))
                    .collect();
                let busy: Vec<Point> = pending.iter().filter_map(|p| p.1.clone()).collect();
                match strategy::suggest(space.study.strategy, &dims, &history, &busy, &mut rng) {
                    Some(pt) => (TrialKind::Search, Some(pt.clone()), point_flags(&space, gmu, &pt)),
                    None => break,
                }
            };
            free.pop();
            let id = next_id;
            next_id += 1;
            pending.push((id, point.clone()));
            let (ctx, gpu_set, log) = (ctx.clone(), sets[set].clone(), dir.join("trials").join(format!("{id:04}.log")));
            let buckets = space.workloads().into_iter().take(1).collect::<Vec<_>>();
            tracing::debug!(id, ?kind, flags = ?flags, gpu_set = %gpu_set, "trial starts");
            running.spawn(async move {
                let started = Instant::now();
                let started_unix = now_unix();
                let (status, searches) = ctx.run(&flags, &gpu_set, &buckets, &log).await;
                let score = score(&status, &searches);
                let rec = TrialRecord {
                    id,
                    kind,
                    point,
                    flags,
                    gpu_set,
                    status,
                    score,
                    searches,
                    started_unix,
                    seconds: started.elapsed().as_secs_f64(),
                };
                (rec, set)
            });
        }
        update(&progress, |p| p.running = count_u32(running.len()));
        if running.is_empty() {
            break;
        }
        tokio::select! {
            done = running.join_next() => {
                let Some(done) = done else { break };
                let (rec, set) = done.map_err(|e| TuneError::Task(e.to_string()))?;
                info!(id = rec.id, kind = ?rec.kind, status = rec.status.label(), score = ?rec.score, flags = ?rec.flags, "trial done");
                if let TrialStatus::StartFailed(e @ StartFailure::Spawn(_)) = &rec.status {
                    // The command cannot run at all (missing binary, no port): every trial
                    // would fail the same way.
                    running.abort_all();
                    while running.join_next().await.is_some() {}
                    return Err(TuneError::Start(e.clone()));
                }
                store.put_trial(&rec)?;
                append_trial_log(&dir, &rec);
                pending.retain(|p| p.0 != rec.id);
                free.push(set);
                records.push(rec);
                show(&progress, &records);
                // Results so far, so `tune results` and the files are useful mid-study.
                if let Err(e) = report::write_all(&dir, &space, &records, Some(gmu), None, false) {
                    warn!(error = %e, "cannot write the results so far");
                }
            }
            _ = cancelled(&mut cancel) => {
                // Dropping the trials kills their servers (see launch::Server's Drop).
                running.abort_all();
                while running.join_next().await.is_some() {}
                update(&progress, |p| p.running = 0);
                let _ = write_outputs(&dir, &space, &records, gmu, None, &progress);
                return Err(TuneError::Stopped);
            }
        }
    }

    // 3. Capacity profile of the best flags on every bucket.
    let best = report::best(&records).cloned();
    let mut profile_rec = None;
    if let Some(best) = &best {
        if space.workloads().len() == 1 {
            profile_rec = Some(best.clone());
        } else if let Some(done) = records.iter().find(|r| r.kind == TrialKind::Profile && r.flags == best.flags) {
            profile_rec = Some(done.clone());
        } else {
            update(&progress, |p| p.phase = StudyPhase::CapacityProfile);
            let id = next_id;
            let log = dir.join("trials").join(format!("{id:04}.log"));
            let started = Instant::now();
            let workloads = space.workloads();
            let run = ctx.run(&best.flags, &sets[0], &workloads, &log);
            let (status, searches) = tokio::select! {
                r = run => r,
                _ = cancelled(&mut cancel) => {
                    let _ = write_outputs(&dir, &space, &records, gmu, None, &progress);
                    return Err(TuneError::Stopped);
                }
            };
            let score = score(&status, &searches);
            let rec = TrialRecord {
                id,
                kind: TrialKind::Profile,
                point: None,
                flags: best.flags.clone(),
                gpu_set: sets[0].clone(),
                status,
                score,
                searches,
                started_unix: now_unix(),
                seconds: started.elapsed().as_secs_f64(),
            };
            store.put_trial(&rec)?;
            append_trial_log(&dir, &rec);
            records.push(rec.clone());
            profile_rec = Some(rec);
        }
    }
    let profile = profile_rec.as_ref().and_then(|r| capacity_profile(&space, cfg.servers.as_ref(), r));
    let summary = write_outputs(&dir, &space, &records, gmu, profile.as_ref(), &progress)?;
    update(&progress, |p| {
        p.state = StudyState::Finished;
        p.phase = StudyPhase::Done;
        if summary.best.is_none() {
            p.message = Some("no trial met the limits at any rate".into());
        }
    });
    Ok(summary)
}

async fn cancelled(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow() {
            return;
        }
        if rx.changed().await.is_err() {
            // The sender is gone: nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Highest utilisation (from `start` down by `step`) that starts with the baseline flags
/// (vLLM's defaults), as auto_tune.sh does; trials whose flags need more memory then fail as
/// out-of-memory and are recorded as such.
async fn memory_search(ctx: &TrialContext, dir: &Path) -> Result<f64, TuneError> {
    let m = &ctx.space.gpu_memory_utilization;
    let mut u = m.start;
    let mut last = String::from("none tried");
    while u >= m.min - 1e-9 {
        let v = (u * 1000.0).round() / 1000.0;
        let flags = baseline_flags(&ctx.space, v);
        let log = dir.join("trials").join(format!("memory-{v}.log"));
        match ctx.starts(&flags, &ctx.space.study.gpu_sets[0], &log).await {
            Ok(()) => return Ok(v),
            Err(StartFailure::OutOfMemory(msg)) => {
                info!(gpu_memory_utilization = v, "does not start: {msg}");
                last = msg;
            }
            Err(other) => return Err(TuneError::Start(other)),
        }
        u -= m.step;
    }
    Err(TuneError::NoMemory { start: m.start, min: m.min, last })
}

fn show(progress: &SharedProgress, records: &[TrialRecord]) {
    let searched: Vec<&TrialRecord> = records.iter().filter(|r| r.kind != TrialKind::Profile).collect();
    let best = report::best(records);
    update(progress, |p| {
        p.trials_done = count_u32(searched.len());
        p.trials_failed = count_u32(searched.iter().filter(|r| r.score.is_none()).count());
        p.best_score = best.and_then(|b| b.score);
        p.best_flags = best.map(|b| b.flags.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        p.baseline_score = searched.iter().find(|r| r.kind == TrialKind::Baseline).and_then(|r| r.score);
    });
}

/// One line per rate run at the end of the trial's log (the server's own output is above).
fn append_trial_log(dir: &Path, rec: &TrialRecord) {
    use std::io::Write;
    let path = dir.join("trials").join(format!("{:04}.log", rec.id));
    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) else { return };
    let _ = writeln!(f, "# trial {} ({:?}) flags {:?}: {}", rec.id, rec.kind, rec.flags, rec.status.label());
    if let TrialStatus::StartFailed(e) = &rec.status {
        let _ = writeln!(f, "# {e}");
    }
    for (b, s) in &rec.searches {
        for r in &s.runs {
            let _ = writeln!(
                f,
                "# bucket {}/{} rate {} -> {:.2} req/s, p99 e2el {:.0} ms, ttft {:.0} ms, tpot {:.1} ms: {}",
                b.input_tokens,
                b.output_tokens,
                r.rate_text(),
                r.request_throughput,
                r.p99_e2el_ms,
                r.p99_ttft_ms,
                r.p99_tpot_ms,
                r.violation.as_deref().unwrap_or("within limits")
            );
        }
    }
}

/// The profile the replica advisor reads: per bucket, the best passing rate and its figures.
fn capacity_profile(space: &SearchSpace, servers: &dyn ServerFactory, rec: &TrialRecord) -> Option<CapacityProfile> {
    let buckets: Vec<CapacityBucket> = rec
        .searches
        .iter()
        .filter_map(|(b, s)| {
            let best = s.best()?;
            Some(CapacityBucket {
                input_tokens: b.input_tokens,
                output_tokens: b.output_tokens,
                max_request_rate: best.request_rate.unwrap_or(best.request_throughput),
                output_throughput: best.output_throughput,
                p99_ttft_s: best.p99_ttft_ms / 1e3,
                p99_tpot_s: best.p99_tpot_ms / 1e3,
                p99_e2e_s: best.p99_e2el_ms / 1e3,
            })
        })
        .collect();
    if buckets.is_empty() {
        return None;
    }
    let gpu = space.study.gpu.clone().or_else(|| servers.gpu_name()).unwrap_or_else(|| "unknown".into());
    let l = &space.limits;
    Some(CapacityProfile {
        schema: PROFILE_SCHEMA,
        model: space.study.model.clone(),
        gpu,
        sm_clock_mhz: rec.flags.get("sim-sm-clock").and_then(|v| v.parse().ok()),
        flags: rec.flags.clone(),
        limits: ProfileLimits::from(l.latency()),
        created_unix: now_unix(),
        buckets,
    })
}

fn write_outputs(
    dir: &Path,
    space: &SearchSpace,
    records: &[TrialRecord],
    gmu: f64,
    profile: Option<&CapacityProfile>,
    progress: &SharedProgress,
) -> Result<StudySummary, TuneError> {
    update(progress, |p| p.phase = StudyPhase::Reports);
    if let Some(p) = profile {
        p.save(&dir.join("capacity-profile.json")).map_err(|e| TuneError::Report(e.to_string()))?;
    }
    report::write_all(dir, space, records, Some(gmu), None, profile.is_some())
        .map_err(|e| TuneError::Report(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::tests::SMALL;

    #[test]
    fn flags_of_points_and_the_baseline() {
        let mut space = SearchSpace::parse(SMALL).expect("space");
        let f = point_flags(&space, 0.9, &[2, 1]);
        assert_eq!(f.get("max-num-seqs").map(String::as_str), Some("64"));
        assert_eq!(f.get("max-num-batched-tokens").map(String::as_str), Some("2048"));
        assert_eq!(f.get("gpu-memory-utilization").map(String::as_str), Some("0.9"));
        assert!(!f.contains_key("block-size"), "disabled parameters are left out");
        let b = baseline_flags(&space, 0.93);
        assert_eq!(b.get("max-num-seqs").map(String::as_str), Some("256"), "the default, not in the options");
        assert!(!b.contains_key("max-num-batched-tokens"), "no default: vLLM's own");
        assert_eq!(budget(&space), 13, "12 points and the baseline");
        space.study.trials = 5;
        assert_eq!(budget(&space), 5);
    }
}
