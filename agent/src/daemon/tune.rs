//! The daemon's side of `agentctl tune`: one study at a time in a background task, so the
//! decision loop keeps cycling while trials run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::{ErrorKind, Response, StudyPhase, StudyState, TuneCmd, TuneProgress, TuneReply};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tuner::study::{run_study, SharedProgress, TuneError};
use tuner::ServerFactory;

/// Largest result.json sent whole; beyond it the per-trial detail is left out.
const MAX_RESULTS_BYTES: usize = 900 * 1024;

struct Running {
    progress: SharedProgress,
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
    dir: PathBuf,
}

/// The agent's tuner: idle, or one study (running or ended).
#[derive(Default)]
pub struct TuneService {
    current: Option<Running>,
    /// Where `--launch sim` studies run (the simulator), when the daemon was built with it.
    in_process: Option<Arc<dyn ServerFactory>>,
}

impl std::fmt::Debug for TuneService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TuneService").field("study", &self.current.as_ref().map(|r| r.dir.clone())).finish()
    }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error { kind, message: message.into() }
}

impl TuneService {
    pub fn new(in_process: Option<Arc<dyn ServerFactory>>) -> Self {
        TuneService { current: None, in_process }
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
                    return err(
                        ErrorKind::Failed,
                        format!("study `{}` is running in {}; `agentctl tune stop` first", p.study, p.study_dir),
                    );
                }
                let cfg = match tuner::study_config(&req, &state_dir.join("tune"), self.in_process.clone()) {
                    Ok(c) => c,
                    Err(e) => return err(ErrorKind::BadRequest, crate::error_chain(&e)),
                };
                let progress = SharedProgress::default();
                if let Ok(mut p) = progress.lock() {
                    p.state = StudyState::Running;
                    p.study = cfg.space.study.name.clone();
                    p.study_dir = cfg.dir.display().to_string();
                    p.strategy = cfg.space.study.strategy.to_string();
                    p.trials_total = tuner::study::budget(&cfg.space);
                    p.phase = StudyPhase::Starting;
                }
                let (cancel, rx) = watch::channel(false);
                let dir = cfg.dir.clone();
                let shared = progress.clone();
                let task = tokio::spawn(async move {
                    let result = run_study(cfg, shared.clone(), rx).await;
                    if let Err(e) = result {
                        tracing::warn!(error = %crate::error_chain(&e), "study ended");
                        if let Ok(mut p) = shared.lock() {
                            p.state =
                                if matches!(e, TuneError::Stopped) { StudyState::Stopped } else { StudyState::Failed };
                            p.running = 0;
                            p.message = Some(crate::error_chain(&e));
                        }
                    }
                });
                self.current = Some(Running { progress, cancel, task, dir });
                self.progress()
            }
            TuneCmd::Status => self.progress(),
            TuneCmd::Stop => {
                match &self.current {
                    Some(r) if !r.task.is_finished() => {
                        let _ = r.cancel.send(true);
                        if let Ok(mut p) = r.progress.lock() {
                            p.phase = StudyPhase::Stopping;
                        }
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

    /// Stops a running study and waits (bounded) until its servers are stopped.
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.current.take() {
            let _ = r.cancel.send(true);
            let mut task = r.task;
            if tokio::time::timeout(Duration::from_secs(60), &mut task).await.is_err() {
                // Aborting drops the trials, whose servers are killed on drop.
                task.abort();
            }
        }
    }
}
