//! The daemon's side of `agentctl tune`: one study at a time, run by a child process (`gpu-agent
//! tune --progress-json`, the same binary) that the daemon supervises. The study's trials, its
//! memory and its servers live and end with that process, the decision loop keeps cycling,
//! and the child reports its progress as one JSON line per change on its stdout, which the
//! daemon relays to `agentctl tune status`. Stopping sends it SIGTERM: it stops its servers
//! and exits (a study resumes from its store).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::{ErrorKind, Response, StudyPhase, StudyState, TuneCmd, TuneProgress, TuneReply, TuneStart};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;
use tuner::study::{update, SharedProgress};
use tuner::ServerFactory;

use crate::control::error as err;

/// Largest result.json sent whole; beyond it the per-trial detail is left out.
const MAX_RESULTS_BYTES: usize = 900 * 1024;

/// How long a stopped study may take to stop its servers before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

struct Running {
    progress: SharedProgress,
    /// The study process, while it runs.
    pid: Option<Pid>,
    task: JoinHandle<()>,
    dir: PathBuf,
}

/// The agent's tuner: idle, or one study (running or ended).
pub struct TuneService {
    current: Option<Running>,
    /// The program that runs a study (`gpu-agent`; its `tune` subcommand).
    program: PathBuf,
    /// Where `--launch sim` studies run, when this build has the simulator (used here only to
    /// check a request before the study process starts).
    in_process: Option<Arc<dyn ServerFactory>>,
}

impl std::fmt::Debug for TuneService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TuneService")
            .field("program", &self.program)
            .field("study", &self.current.as_ref().map(|r| r.dir.clone()))
            .finish()
    }
}

/// The `gpu-agent tune` arguments for a study request, its directory resolved.
fn study_args(req: &TuneStart, dir: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["tune".into(), "--progress-json".into()];
    a.extend(["--space".into(), req.space.clone().into_os_string()]);
    a.extend(["--launch".into(), req.launch.clone().into()]);
    a.extend(["--study-dir".into(), dir.as_os_str().to_owned()]);
    if let Some(s) = &req.strategy {
        a.extend(["--strategy".into(), s.into()]);
    }
    if let Some(t) = req.trials {
        a.extend(["--trials".into(), t.to_string().into()]);
    }
    if req.fresh {
        a.push("--fresh".into());
    }
    a
}

/// Relays the study process's progress lines until it exits, then makes sure the progress
/// says how it ended (a process that died without a last word failed).
async fn supervise(mut child: tokio::process::Child, progress: SharedProgress) {
    if let Some(out) = child.stdout.take() {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<TuneProgress>(&line) {
                Ok(p) => update(&progress, |cur| *cur = p),
                Err(e) => tracing::debug!(error = %e, "study process: not a progress line"),
            }
        }
    }
    let status = child.wait().await;
    update(&progress, |p| {
        p.running = 0;
        if p.state == StudyState::Running {
            p.state = StudyState::Failed;
            p.message = Some(match &status {
                Ok(s) => format!("the study process ended ({s}) before its study did"),
                Err(e) => format!("the study process could not be waited for: {e}"),
            });
        }
    });
    match status {
        Ok(s) => tracing::info!(status = %s, "study process ended"),
        Err(e) => tracing::warn!(error = %e, "study process could not be waited for"),
    }
}

impl TuneService {
    /// Studies run as `program tune ...`; `in_process` checks `--launch sim` requests.
    pub fn new(program: PathBuf, in_process: Option<Arc<dyn ServerFactory>>) -> Self {
        TuneService { current: None, program, in_process }
    }

    fn snapshot(&self) -> TuneProgress {
        match &self.current {
            Some(r) => r.progress.lock().map(|p| p.clone()).unwrap_or_default(),
            None => TuneProgress::default(),
        }
    }

    fn progress(&self) -> Response {
        Response::Tune(TuneReply::Progress(Box::new(self.snapshot())))
    }

    fn is_running(&self) -> bool {
        self.current.as_ref().is_some_and(|r| !r.task.is_finished())
    }

    /// Answers one `tune` request; studies go under `state_dir/tune/` unless told otherwise.
    pub fn handle(&mut self, cmd: TuneCmd, state_dir: &Path) -> Response {
        match cmd {
            TuneCmd::Start(req) => {
                if self.is_running() {
                    let p = self.snapshot();
                    let why = if p.state == StudyState::Running {
                        format!("study `{}` is running in {}; `agentctl tune stop` first", p.study, p.study_dir)
                    } else {
                        format!(
                            "study `{}` ({}) is still stopping its servers; try again in a moment",
                            p.study, p.state
                        )
                    };
                    return err(ErrorKind::Failed, why);
                }
                let cfg = match tuner::study_config(&req, &state_dir.join("tune"), self.in_process.clone()) {
                    Ok(c) => c,
                    Err(e) => return err(ErrorKind::BadRequest, crate::error_chain(&e)),
                };
                let progress = SharedProgress::default();
                update(&progress, |p| {
                    p.state = StudyState::Running;
                    p.study = cfg.space.study.name.clone();
                    p.study_dir = cfg.dir.display().to_string();
                    p.strategy = cfg.space.study.strategy.to_string();
                    p.trials_total = tuner::study::budget(&cfg.space);
                    p.phase = StudyPhase::Starting;
                });
                let child = tokio::process::Command::new(&self.program)
                    .args(study_args(&req, &cfg.dir))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn();
                let child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        return err(
                            ErrorKind::Failed,
                            format!("cannot start the study process {}: {e}", self.program.display()),
                        )
                    }
                };
                let pid = child.id().and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
                tracing::info!(pid = ?pid.map(Pid::as_raw), dir = %cfg.dir.display(), "study process started");
                let task = tokio::spawn(supervise(child, progress.clone()));
                self.current = Some(Running { progress, pid, task, dir: cfg.dir });
                self.progress()
            }
            TuneCmd::Status => self.progress(),
            TuneCmd::Stop => {
                match &self.current {
                    Some(r) if !r.task.is_finished() => {
                        if let Some(pid) = r.pid {
                            let _ = kill(pid, Signal::SIGTERM);
                        }
                        update(&r.progress, |p| p.phase = StudyPhase::Stopping);
                    }
                    _ => return err(ErrorKind::Failed, "no study is running"),
                }
                self.progress()
            }
            TuneCmd::Results => {
                let Some(r) = &self.current else {
                    return err(ErrorKind::Failed, "no study has run since the agent started");
                };
                let path = r.dir.join("result.json");
                match std::fs::read_to_string(&path) {
                    Ok(text) if text.len() <= MAX_RESULTS_BYTES => Response::Tune(TuneReply::Results(text)),
                    Ok(text) => {
                        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        if let Some(m) = v.as_object_mut() {
                            m.remove("all_trials");
                        }
                        Response::Tune(TuneReply::Results(v.to_string()))
                    }
                    Err(e) => err(ErrorKind::Failed, format!("no results yet ({}: {e})", path.display())),
                }
            }
        }
    }

    /// Stops a running study and waits (bounded) until it has stopped its servers.
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.current.take() {
            if let (Some(pid), false) = (r.pid, r.task.is_finished()) {
                let _ = kill(pid, Signal::SIGTERM);
            }
            let mut task = r.task;
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                // Aborting drops the child, which is killed on drop; its servers die with it
                // (setpriv --pdeathsig) or are killed by the next run of the study.
                task.abort();
            }
        }
    }
}
