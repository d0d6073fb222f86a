//! Real trials: the server command template (`vllm serve {model} {flags}`) expanded, started
//! in its own process group on a port and GPU set, waited for on `/health`, and stopped as a
//! whole group (SIGTERM, then SIGKILL after a grace period).
//!
//! A server must not outlive the tuner. Three layers, because the workspace forbids the
//! `unsafe` a `prctl(PR_SET_PDEATHSIG)` in `pre_exec` would need:
//! 1. every stop path (normal end, error, SIGTERM/SIGINT, a dropped trial) kills the group: the
//!    [`Server`] kills its group when dropped;
//! 2. when `setpriv` (util-linux) is installed the command runs under
//!    `setpriv --pdeathsig KILL`, so the kernel kills the server if the tuner dies by SIGKILL;
//! 3. live groups are recorded in the study store, and the next tuner start on that study kills
//!    any that survived (checking the process start time, so a reused id is left alone).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use loadgen::{run_http, LoadOptions, LoadReport};
use vllm_metrics::Snapshot;

use crate::server::{BoxFuture, LoadRun, RunError, ServerFactory, StartRequest, TrialServer};
use crate::trial::{free_port, GroupHook, StartFailure, RUN_TAIL_S};

/// A command template split into words, with `{model}`, `{port}` and `{flags}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    words: Vec<String>,
}

impl Template {
    /// Splits on whitespace, honouring single and double quotes (no other shell syntax).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quote: Option<char> = None;
        let mut in_word = false;
        for c in text.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => cur.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    in_word = true;
                }
                (None, c) if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                (None, c) => {
                    cur.push(c);
                    in_word = true;
                }
            }
        }
        if quote.is_some() {
            return Err("--launch: unterminated quote".into());
        }
        if in_word {
            words.push(cur);
        }
        if words.is_empty() {
            return Err("--launch: empty command".into());
        }
        if !words.iter().any(|w| w == "{flags}") {
            return Err("--launch: the template needs a `{flags}` word, e.g. `vllm serve MODEL {flags}`".into());
        }
        Ok(Template { words })
    }

    /// The argv for one trial. Without a `{port}` word, `--port N` is added to the flags;
    /// without a `--host`, `--host 127.0.0.1` (vLLM listens on every address by default, and a
    /// trial server is only for the tuner's load).
    pub fn argv(&self, model: &str, port: u16, flags: &BTreeMap<String, String>) -> Vec<String> {
        let mut flag_words = render_flags(flags);
        if !self.words.iter().any(|w| w.contains("{port}")) {
            flag_words.extend(["--port".to_string(), port.to_string()]);
        }
        if !self.words.iter().any(|w| w == "--host" || w.starts_with("--host=")) {
            flag_words.extend(["--host".to_string(), "127.0.0.1".to_string()]);
        }
        let mut out = Vec::new();
        for w in &self.words {
            if w == "{flags}" {
                out.extend(flag_words.iter().cloned());
            } else {
                out.push(w.replace("{model}", model).replace("{port}", &port.to_string()));
            }
        }
        out
    }
}

/// `--name value` pairs; `true`/`false` become `--name` / `--no-name` (vLLM's boolean style).
pub fn render_flags(flags: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in flags {
        match value.as_str() {
            "true" => out.push(format!("--{name}")),
            "false" => out.push(format!("--no-{name}")),
            v => {
                out.push(format!("--{name}"));
                out.push(v.to_string());
            }
        }
    }
    out
}

/// A server group the store remembers until it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveGroup {
    pub pgid: i32,
    /// Start time of the leader in clock ticks since boot (/proc/PID/stat field 22).
    pub start_ticks: u64,
}

/// The leader's start time, or None when it is gone.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills a group left by a previous tuner if its leader is still the same process.
pub fn kill_leftover(g: LiveGroup) -> bool {
    if start_ticks(g.pgid) == Some(g.start_ticks) {
        warn!(pgid = g.pgid, "killing a server group left running by an earlier tuner");
        let _ = killpg(Pid::from_raw(g.pgid), Signal::SIGKILL);
        return true;
    }
    false
}

/// The program a command names: a path, or looked up in PATH. `setpriv` would start even when
/// the program does not exist, so it is checked here.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if name.contains('/') {
        let p = PathBuf::from(name);
        return runnable(&p).then_some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| runnable(p)))
        .unwrap_or_default()
}

/// Whether `setpriv --pdeathsig` can be used here.
fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// How to start servers.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub template: Template,
    pub startup_timeout: Duration,
    pub stop_grace: Duration,
}

/// A running server: its process group, port and log.
#[derive(Debug)]
pub struct Server {
    child: tokio::process::Child,
    pub group: LiveGroup,
    pub port: u16,
    pub log: PathBuf,
    stopped: bool,
}

/// Log lines that mean the server ran out of GPU memory (vLLM's and PyTorch's wording), or of
/// host memory on vLLM's CPU build, where `--gpu-memory-utilization` is a share of host RAM.
const OOM_MARKERS: &[&str] = &[
    "CUDA out of memory",
    "OutOfMemoryError",
    "out of memory",
    "No available memory for the cache blocks",
    "Free memory on device",
    "that can be stored in KV cache",
    "less than desired CPU memory utilization",
    "Cannot allocate memory",
];

/// Classifies a failed start from the log's tail.
pub fn classify_exit(log: &str, code: Option<i32>) -> StartFailure {
    let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let last: String = last.chars().take(300).collect();
    if OOM_MARKERS.iter().any(|m| log.contains(m)) {
        let line = log.lines().rev().find(|l| OOM_MARKERS.iter().any(|m| l.contains(m))).unwrap_or(&last).trim();
        return StartFailure::OutOfMemory(line.chars().take(300).collect());
    }
    StartFailure::Exited { code, message: last }
}

impl Launcher {
    /// Starts one server and waits until `/health` answers 200.
    pub async fn spawn(
        &self,
        model: &str,
        flags: &BTreeMap<String, String>,
        gpu_set: &str,
        port: u16,
        log: &Path,
        on_spawn: impl FnOnce(LiveGroup),
    ) -> Result<Server, StartFailure> {
        let argv = self.template.argv(model, port, flags);
        if find_program(&argv[0]).is_none() {
            return Err(StartFailure::Spawn(format!("`{}`: no such program", argv[0])));
        }
        let file =
            std::fs::File::create(log).map_err(|e| StartFailure::Spawn(format!("log {}: {e}", log.display())))?;
        let err = file.try_clone().map_err(|e| StartFailure::Spawn(e.to_string()))?;
        let mut cmd = match setpriv() {
            Some(sp) => {
                let mut c = tokio::process::Command::new(sp);
                c.args(["--pdeathsig", "KILL", "--"]).args(&argv);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.env("CUDA_VISIBLE_DEVICES", gpu_set)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        info!(port, gpu_set, cmd = %argv.join(" "), "starting server");
        let child = cmd.spawn().map_err(|e| StartFailure::Spawn(format!("`{}`: {e}", argv[0])))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| StartFailure::Spawn("no pid".into()))?;
        let group = LiveGroup { pgid: pid, start_ticks: start_ticks(pid).unwrap_or(0) };
        on_spawn(group);
        let mut server = Server { child, group, port, log: log.to_path_buf(), stopped: false };
        let url = format!("http://127.0.0.1:{port}/health");
        let scraper = vllm_metrics::Scraper::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                server.stopped = true;
                // The leader is gone; its children may not be.
                let _ = killpg(Pid::from_raw(group.pgid), Signal::SIGKILL);
                let text = std::fs::read_to_string(log).unwrap_or_default();
                return Err(classify_exit(&text, status.code()));
            }
            if scraper.fetch_text(&url, Duration::from_secs(2)).await.is_ok() {
                info!(port, seconds = started.elapsed().as_secs_f64(), "server healthy");
                return Ok(server);
            }
            if started.elapsed() > self.startup_timeout {
                server.stop(self.stop_grace).await;
                return Err(StartFailure::Timeout(self.startup_timeout.as_secs_f64()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Server {
    /// SIGTERM to the group, SIGKILL after `grace` if the leader is still there.
    pub async fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        let pg = Pid::from_raw(self.group.pgid);
        let _ = killpg(pg, Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            warn!(pgid = self.group.pgid, "server ignored SIGTERM; killing its group");
        }
        // Children that outlive the leader are killed too.
        let _ = killpg(pg, Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.stopped = true;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = killpg(Pid::from_raw(self.group.pgid), Signal::SIGKILL);
        }
    }
}

/// A server started by [`Launcher`], as a study's trials see it.
struct ProcessServer {
    server: std::sync::Mutex<Option<Server>>,
    url: String,
    model: String,
    scraper: vllm_metrics::Scraper,
    stop_grace: Duration,
    hook: GroupHook,
}

/// Prefix-cache hits over queries between two /metrics texts.
fn hit_rate(before: Option<&Snapshot>, after: Option<&Snapshot>) -> Option<f64> {
    let (b, a) = (before?, after?);
    let q = a.prefix_cache_queries_total? - b.prefix_cache_queries_total.unwrap_or(0.0);
    let h = a.prefix_cache_hits_total.unwrap_or(0.0) - b.prefix_cache_hits_total.unwrap_or(0.0);
    (q > 0.0).then(|| h / q)
}

impl ServerFactory for Launcher {
    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<Box<dyn TrialServer>, StartFailure>> {
        Box::pin(async move {
            let port = free_port().map_err(|e| StartFailure::Spawn(format!("no free port: {e}")))?;
            let hook = Arc::clone(req.hook);
            let server = self.spawn(req.model, req.flags, req.gpu_set, port, req.log, |g| hook(g, true)).await?;
            Ok(Box::new(ProcessServer {
                url: server.url(),
                server: std::sync::Mutex::new(Some(server)),
                model: req.model.to_string(),
                scraper: vllm_metrics::Scraper::new(),
                stop_grace: self.stop_grace,
                hook,
            }) as Box<dyn TrialServer>)
        })
    }
}

impl TrialServer for ProcessServer {
    fn run(&self, run: LoadRun) -> BoxFuture<'_, Result<(LoadReport, Option<f64>), RunError>> {
        Box::pin(async move {
            // A run at a rate the server cannot take must still end: the arrivals' span plus
            // RUN_TAIL_S for the last answers.
            let opts = LoadOptions {
                slo: run.slo,
                shared_prefix_tokens: run.prefix_tokens,
                deadline: Some(Duration::from_secs_f64(run.schedule.duration_s() + RUN_TAIL_S)),
                ..LoadOptions::default()
            };
            let metrics = format!("{}/metrics", self.url);
            let snap = |t: Result<String, _>| t.ok().and_then(|t| Snapshot::from_text(&t).ok());
            let before = snap(self.scraper.fetch_text(&metrics, Duration::from_secs(5)).await);
            let rep = run_http(&self.url, &self.model, &run.schedule, run.seed, &opts).await?;
            let after = snap(self.scraper.fetch_text(&metrics, Duration::from_secs(5)).await);
            Ok((rep, hit_rate(before.as_ref(), after.as_ref())))
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let server = self.server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(mut server) = server {
                server.stop(self.stop_grace).await;
                (self.hook)(server.group, false);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_expands_flags_model_and_port() {
        let t = Template::parse("vllm serve {model} --host 127.0.0.1 {flags} --extra 'a b'").expect("parses");
        let flags = BTreeMap::from([
            ("max-num-seqs".to_string(), "64".to_string()),
            ("enable-prefix-caching".to_string(), "false".to_string()),
        ]);
        let argv = t.argv("org/m", 8123, &flags);
        assert_eq!(
            argv,
            [
                "vllm",
                "serve",
                "org/m",
                "--host",
                "127.0.0.1",
                "--no-enable-prefix-caching",
                "--max-num-seqs",
                "64",
                "--port",
                "8123",
                "--extra",
                "a b"
            ]
        );
        let t = Template::parse("srv --listen=:{port} {flags}").expect("parses");
        assert_eq!(t.argv("m", 9, &BTreeMap::new()), ["srv", "--listen=:9", "--host", "127.0.0.1"]);
        let t = Template::parse("vllm serve m --host=0.0.0.0 {flags}").expect("parses");
        assert_eq!(t.argv("m", 9, &BTreeMap::new()), ["vllm", "serve", "m", "--host=0.0.0.0", "--port", "9"]);
        assert!(Template::parse("vllm serve m").expect_err("no flags").contains("{flags}"));
        assert!(Template::parse("x 'open {flags}").expect_err("quote").contains("quote"));
    }

    #[test]
    fn programs_are_found_in_path_or_by_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("/nonexistent/vllm").is_none());
        assert!(find_program("no-such-program-here").is_none());
    }

    #[test]
    fn exits_are_classified_from_the_log() {
        let oom = "INFO loading\nValueError: No available memory for the cache blocks. Try increasing\n";
        assert!(matches!(classify_exit(oom, Some(1)), StartFailure::OutOfMemory(m) if m.contains("cache blocks")));
        // vLLM 0.32's CPU build, --gpu-memory-utilization 0.98 on a 24 GB machine (from its log).
        let cpu = "(VllmWorker-0 pid=16596) ERROR 12-02 06:38:53 [multiproc_executor.py:953] ValueError: Available \
                   memory on node 0 (8.23/12.59 GiB) on startup is less than desired CPU memory utilization (0.98, \
                   12.34 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of CPU \
                   memory reserved\nRuntimeError: Engine core initialization failed. See root cause above.\n";
        assert!(matches!(classify_exit(cpu, Some(1)), StartFailure::OutOfMemory(m) if m.contains("node 0")));
        let torch = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nexit\n";
        assert!(matches!(classify_exit(torch, Some(1)), StartFailure::OutOfMemory(_)));
        let other = "error: unrecognized arguments: --bogus\n\n";
        assert!(
            matches!(classify_exit(other, Some(2)), StartFailure::Exited { code: Some(2), message } if message.contains("--bogus"))
        );
    }

    #[test]
    fn start_ticks_reads_our_own_process() {
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(start_ticks(me).is_some());
        assert_eq!(start_ticks(i32::MAX), None);
        assert!(!kill_leftover(LiveGroup { pgid: me, start_ticks: 1 }), "a different start time is not ours");
    }

    #[test]
    fn leftover_groups_are_killed_whole() {
        use std::os::unix::process::CommandExt;
        // A group leader with a child, as a server with workers.
        let mut leader =
            std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).process_group(0).spawn().expect("spawn");
        let pid = i32::try_from(leader.id()).expect("pid");
        std::thread::sleep(Duration::from_millis(200));
        let g = LiveGroup { pgid: pid, start_ticks: start_ticks(pid).expect("running") };
        assert!(kill_leftover(g));
        let status = leader.wait().expect("wait");
        assert!(!status.success());
        // The child was in the group too: nothing alive (zombies aside) remains in it.
        let alive_in_group = || {
            std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let rest: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
                rest.len() > 2 && rest[0] != "Z" && rest[2] == pid.to_string()
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive_in_group() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!alive_in_group(), "group gone");
    }
}
