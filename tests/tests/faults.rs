//! Fault tests, end to end: the real `gpu-agent` (simulated GPU, `[gpu] backend = "sim"`) next
//! to a vLLM that misbehaves (answers garbage, hangs) or a state store that is corrupt, unusable,
//! held by another agent, on a full or read-only filesystem (tmpfs / bind mounts: root only,
//! skipped with a `SKIPPED:` line otherwise) or truncated; and the agent SIGKILLed with a clock
//! locked, then `gpu-agent reset-clocks` and a restart. In every case the agent must stay up, never lock a clock while it
//! does not understand vLLM, and exit cleanly (code 0, no panic) on SIGTERM.
//! vLLM killed and restarted is covered by `agent_with_vllm_sim.rs`
//! (`pinned_clock_goes_back_to_default_when_vllm_stops_answering`). docs/reliability.md has the
//! table of faults and outcomes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e_tests::{free_port, get, metric, wait_for, Proc};

const PERIOD_S: f64 = 0.25;
const TIMEOUT_S: f64 = 0.2;
const PINNED: &str = "[policy]\nmode = \"pinned\"\npin_mhz = 1200\n";

/// A fake vLLM on a loopback port: a thread that hands every accepted connection to `answer`.
/// Dropping it stops the thread.
struct FakeVllm {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FakeVllm {
    fn start(answer: impl Fn(TcpStream, u64) + Send + 'static) -> FakeVllm {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake vLLM");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (stop2, served2) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let n = served2.fetch_add(1, Ordering::Relaxed);
                        answer(stream, n);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeVllm { addr, stop, served, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads the request head (up to the blank line), so the client does not see a reset.
fn read_head(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
}

/// Bodies that are not vLLM's metrics, in turn: HTML, bytes that are not UTF-8, well-formed
/// Prometheus text without any `vllm:` series, and a `vllm:` line cut in the middle.
fn garbage(n: u64) -> Vec<u8> {
    match n % 4 {
        0 => b"<html><body><h1>502 Bad Gateway</h1></body></html>\n".to_vec(),
        1 => (0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0] | 0x80).collect(),
        2 => b"# TYPE node_load1 gauge\nnode_load1 0.42\n".to_vec(),
        _ => b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\" 3\n".to_vec(),
    }
}

fn answer_garbage(mut s: TcpStream, n: u64) {
    read_head(&mut s);
    let body = garbage(n);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
}

fn start_vllm_sim() -> (Proc, SocketAddr) {
    let port = free_port();
    let p = Proc::start("vllm-sim", &["--host", "127.0.0.1", "--port", &port.to_string()]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(20), "vllm-sim /health", || get(addr, "/health").ok().filter(|r| r.status == 200));
    (p, addr)
}

/// Starts gpu-agent on the simulated GPU with its own config file, listen port and control
/// socket in `dir`, and waits for its first decision cycle.
fn start_agent(dir: &Path, name: &str, vllm_url: &str, state_dir: &Path, extra: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\nperiod_seconds = {PERIOD_S}\nstate_dir = \"{state}\"\n\
             [vllm]\nmetrics_url = \"{vllm_url}\"\ntimeout_seconds = {TIMEOUT_S}\n\
             [control]\nsocket = \"{socket}\"\n\
             [gpu]\nbackend = \"sim\"\nindices = [0]\n{extra}",
            state = state_dir.display(),
            socket = dir.join(format!("{name}.sock")).display()
        ),
    )
    .expect("write config");
    let p = Proc::start("gpu-agent", &["--config", cfg.to_str().expect("utf-8 path")]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(20), "the agent's first cycle", || {
        (agent_metric(addr, "gpu_agent_cycles_total", &[])? >= 1.0).then_some(())
    });
    (p, addr)
}

fn agent_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric(&get(addr, "/metrics").ok()?.body, name, labels)
}

/// SIGTERM, then exit code 0, no panic and the clocks given back on the way out; returns the
/// agent's stderr.
fn stop_cleanly(agent: Proc) -> String {
    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "agent exit code; stderr:\n{err}");
    assert!(!err.contains("panicked"), "the agent panicked:\n{err}");
    assert!(err.contains("shutting down: resetting clocks"), "no clock reset on exit:\n{err}");
    assert!(!err.contains("could not reset clocks"), "the reset on exit failed:\n{err}");
    err
}

/// While vLLM is not understood: the agent is alive, not ready, counts the failed scrapes and
/// never locks a clock. Watches for `for_s` seconds and returns how many scrape errors it saw.
fn assert_safe_while_vllm_is_bad(addr: SocketAddr, for_s: f64) -> f64 {
    let start_errors = agent_metric(addr, "gpu_agent_vllm_scrape_errors_total", &[]).expect("scrape errors metric");
    let deadline = Instant::now() + Duration::from_secs_f64(for_s);
    while Instant::now() < deadline {
        let m = get(addr, "/metrics").expect("the agent serves /metrics").body;
        assert_eq!(metric(&m, "gpu_agent_vllm_up", &[]), Some(0.0), "vLLM is not understood:\n{m}");
        assert_eq!(metric(&m, "gpu_agent_clock_target_hertz", &[]), Some(0.0), "no clock may be locked");
        let sm = metric(&m, "gpu_agent_gpu_sm_clock_hertz", &[("gpu", "0")]);
        assert!(sm.is_some_and(|hz| hz != 1200e6), "the GPU must not run at the pinned clock: {sm:?}");
        assert_eq!(get(addr, "/healthz").expect("healthz").status, 200, "the agent itself is alive");
        assert_eq!(get(addr, "/readyz").expect("readyz").status, 503, "not ready without vLLM");
        std::thread::sleep(Duration::from_millis(150));
    }
    let end_errors = agent_metric(addr, "gpu_agent_vllm_scrape_errors_total", &[]).expect("scrape errors metric");
    assert!(end_errors > start_errors, "scrape errors must keep rising: {start_errors} -> {end_errors}");
    end_errors - start_errors
}

#[test]
fn vllm_answering_garbage_never_gets_a_clock_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeVllm::start(answer_garbage);
    let (agent, addr) = start_agent(dir.path(), "agent", &fake.url(), &dir.path().join("state"), PINNED);

    let errors = assert_safe_while_vllm_is_bad(addr, 2.5);
    // Each cycle scrapes once; 2.5 s at 0.25 s: about 10, whatever the machine's load.
    assert!(errors >= 4.0, "only {errors} failed scrapes in 2.5 s");
    assert!(fake.served.load(Ordering::Relaxed) >= 8, "every kind of garbage was served at least twice");

    let err = stop_cleanly(agent);
    assert!(err.contains("vLLM did not answer"), "the failure is logged:\n{err}");
}

#[test]
fn hanging_vllm_is_bounded_by_the_scrape_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts, reads the request and never answers; keeps every connection open.
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let held2 = held.clone();
    let fake = FakeVllm::start(move |mut s, _| {
        read_head(&mut s);
        held2.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    });
    let (agent, addr) = start_agent(dir.path(), "agent", &fake.url(), &dir.path().join("state"), PINNED);

    let m0 = get(addr, "/metrics").expect("metrics").body;
    let cycles0 = metric(&m0, "gpu_agent_cycles_total", &[]).expect("cycles");
    let t0 = Instant::now();
    assert_safe_while_vllm_is_bad(addr, 3.0);
    let m1 = get(addr, "/metrics").expect("metrics").body;
    let elapsed = t0.elapsed().as_secs_f64();
    let cycles = metric(&m1, "gpu_agent_cycles_total", &[]).expect("cycles") - cycles0;
    let rate = cycles / elapsed;
    eprintln!("hanging vLLM: {cycles} cycles in {elapsed:.2} s = {rate:.2}/s (period {PERIOD_S} s)");
    // One cycle per period (4/s) when each hung scrape is cut at 0.2 s; allow a loaded machine.
    assert!(
        (0.5 / PERIOD_S..=1.2 / PERIOD_S).contains(&rate),
        "cycle rate {rate:.2}/s, expected about {}",
        1.0 / PERIOD_S
    );
    // Each cycle really waited for the timeout (the hang is a hang), and no longer.
    let sum = metric(&m1, "gpu_agent_cycle_duration_seconds_sum", &[]).expect("cycle duration sum");
    let count = metric(&m1, "gpu_agent_cycle_duration_seconds_count", &[]).expect("cycle duration count");
    let mean = sum / count;
    assert!((TIMEOUT_S * 0.9..PERIOD_S + 0.1).contains(&mean), "mean cycle {mean:.3} s, scrape timeout {TIMEOUT_S} s");
    assert!(held.lock().unwrap_or_else(|p| p.into_inner()).len() >= 4, "the agent kept connecting");

    let err = stop_cleanly(agent);
    assert!(err.contains("timed out after 200ms"), "the timeout is logged:\n{err}");
}

/// A small deterministic byte stream (xorshift), standing in for random garbage.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The `decisions=N` of the agent's "clock governor ready" line (what it restored).
fn restored_decisions(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("clock governor ready"))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("decisions=")).and_then(|n| n.parse().ok())
}

fn corrupt_asides(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("governor.sled.corrupt-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an agent until its governor has made `n` decisions, then stops it; returns its log.
fn run_until_decisions(dir: &Path, name: &str, vllm: SocketAddr, state: &Path, n: f64) -> String {
    let (agent, addr) = start_agent(dir, name, &format!("http://{vllm}/metrics"), state, "");
    wait_for(Duration::from_secs(20), "governor decisions", || {
        (agent_metric(addr, "gpu_agent_governor_decisions_total", &[])? >= n).then_some(())
    });
    stop_cleanly(agent)
}

#[test]
fn corrupt_state_store_is_moved_aside_and_a_fresh_one_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let sled_dir = state.join("governor.sled");
    std::fs::create_dir_all(&sled_dir).expect("create store dir");
    let db = noise(7, 64 * 1024);
    let conf = noise(11, 512);
    std::fs::write(sled_dir.join("db"), &db).expect("write db");
    std::fs::write(sled_dir.join("conf"), &conf).expect("write conf");
    let (_vllm, vllm_addr) = start_vllm_sim();

    let err = run_until_decisions(dir.path(), "agent", vllm_addr, &state, 3.0);
    let warning = err
        .lines()
        .find(|l| l.contains("governor store unusable; moving it aside and starting empty"))
        .unwrap_or_else(|| panic!("no warning about the store being moved aside:\n{err}"));
    assert!(
        warning.contains("WARN") && warning.contains("governor.sled.corrupt-"),
        "the line names where it went: {warning}"
    );
    assert!(!err.contains("no state store"), "the fresh store must be usable:\n{err}");
    let asides = corrupt_asides(&state);
    assert_eq!(asides.len(), 1, "one moved-aside store: {asides:?}");
    // Set aside as it was, for whoever wants to look at it.
    assert_eq!(std::fs::read(asides[0].join("db")).expect("aside db"), db);
    assert_eq!(std::fs::read(asides[0].join("conf")).expect("aside conf"), conf);

    // The fresh store kept what the governor learnt: the next agent starts from it.
    let err2 = run_until_decisions(dir.path(), "agent2", vllm_addr, &state, 1.0);
    let restored = restored_decisions(&err2).unwrap_or_else(|| panic!("no governor ready line:\n{err2}"));
    assert!(restored >= 3, "the restarted agent restored {restored} decisions, expected >= 3");
    assert!(!err2.contains("moving it aside"), "the fresh store is not corrupt:\n{err2}");
}

#[test]
fn unusable_state_dir_runs_without_persistence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, "a regular file").expect("write file");
    let state = file.join("state"); // cannot be created, even by root
    let (_vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(dir.path(), "agent", &format!("http://{vllm_addr}/metrics"), &state, "");

    // The governor runs and decides, unpersisted.
    wait_for(Duration::from_secs(20), "governor decisions", || {
        (agent_metric(addr, "gpu_agent_governor_decisions_total", &[])? >= 3.0).then_some(())
    });
    assert_eq!(agent_metric(addr, "gpu_agent_vllm_up", &[]), Some(1.0));
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);

    let err = stop_cleanly(agent);
    let warning = err
        .lines()
        .find(|l| l.contains("no state store: the governor will not remember what it learns"))
        .unwrap_or_else(|| panic!("no warning about the missing store:\n{err}"));
    assert!(warning.contains(&state.display().to_string()), "the line names the directory: {warning}");
    assert_eq!(std::fs::read_to_string(&file).expect("file"), "a regular file", "the file is untouched");
}

#[test]
fn second_agent_on_a_locked_store_runs_without_persistence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_vllm, vllm_addr) = start_vllm_sim();
    let url = format!("http://{vllm_addr}/metrics");
    let (first, first_addr) = start_agent(dir.path(), "first", &url, &state, "");
    wait_for(Duration::from_secs(20), "first agent deciding", || {
        (agent_metric(first_addr, "gpu_agent_governor_decisions_total", &[])? >= 3.0).then_some(())
    });

    let (second, second_addr) = start_agent(dir.path(), "second", &url, &state, "");
    wait_for(Duration::from_secs(20), "second agent deciding", || {
        (agent_metric(second_addr, "gpu_agent_governor_decisions_total", &[])? >= 2.0).then_some(())
    });
    for addr in [first_addr, second_addr] {
        assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
    }
    let err2 = stop_cleanly(second);
    let warning = err2
        .lines()
        .find(|l| l.contains("no state store"))
        .unwrap_or_else(|| panic!("the second agent does not say it runs without a store:\n{err2}"));
    assert!(warning.contains("in use by another process"), "the line says why: {warning}");
    assert!(corrupt_asides(&state).is_empty(), "the first agent's live store must not be moved aside");

    // The first agent is unaffected and keeps its store.
    let before = agent_metric(first_addr, "gpu_agent_governor_decisions_total", &[]).expect("decisions");
    wait_for(Duration::from_secs(10), "first agent still deciding", || {
        (agent_metric(first_addr, "gpu_agent_governor_decisions_total", &[])? > before).then_some(())
    });
    let err1 = stop_cleanly(first);
    assert!(!err1.contains("no state store") && !err1.contains("saving the governor state failed"), "{err1}");
    let err3 = run_until_decisions(dir.path(), "third", vllm_addr, &state, 1.0);
    let restored = restored_decisions(&err3).unwrap_or_else(|| panic!("no governor ready line:\n{err3}"));
    assert!(
        restored as f64 >= before,
        "the first agent's state survived: restored {restored}, it had made {before} decisions"
    );
}

// ---- The agent killed, the disk full or read-only, the store truncated ----

/// Decisions after which the governor has saved at least once (it saves every 30).
const AFTER_FIRST_SAVE: f64 = 31.0;

fn agent_url(vllm: SocketAddr) -> String {
    format!("http://{vllm}/metrics")
}

#[test]
fn sigkill_with_clocks_locked_then_reset_clocks_and_a_restart_restores_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(dir.path(), "agent", &agent_url(vllm_addr), &state, "");
    // Killed past its first save, while the governor holds a lock.
    let decisions = wait_for(Duration::from_secs(25), "a saved governor holding a lock", || {
        let m = get(addr, "/metrics").ok()?.body;
        let d = metric(&m, "gpu_agent_governor_decisions_total", &[])?;
        let locked = metric(&m, "gpu_agent_clock_target_hertz", &[])? > 0.0;
        (d >= AFTER_FIRST_SAVE && locked).then_some(d)
    });
    agent.signal("KILL");
    let (code, err) = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(code, None, "killed by a signal, no exit code");
    assert!(!err.contains("shutting down"), "SIGKILL gives the agent no way out:\n{err}");

    // What the systemd unit's ExecStopPost runs: reset every configured GPU, say which.
    let out = std::process::Command::new(e2e_tests::bin("gpu-agent"))
        .args(["reset-clocks", "--config"])
        .arg(dir.path().join("agent.toml"))
        .output()
        .expect("run gpu-agent reset-clocks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reset-clocks: {:?}\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "reset SM clocks of GPU [0]");

    // A restarted agent takes the clocks over from whatever was left, and continues from the
    // last periodic save (the exit save never happened).
    let err2 = run_until_decisions(dir.path(), "agent2", vllm_addr, &state, 1.0);
    assert!(err2.contains("clocks given back to the driver at start"), "{err2}");
    let restored = restored_decisions(&err2).unwrap_or_else(|| panic!("no governor ready line:\n{err2}"));
    assert!(
        restored >= 30 && restored as f64 <= decisions,
        "restored {restored} decisions; the last save before the kill was at 30 or later, the agent had made {decisions}"
    );
    assert!(
        !err2.contains("moving it aside") && !err2.contains("no state store"),
        "the killed agent's store is fine:\n{err2}"
    );
}

/// A filesystem mounted for one test, unmounted (lazily) when dropped.
struct Mount {
    at: PathBuf,
}

impl Mount {
    /// A tmpfs of `kib` KiB at `at`; None where this process may not mount (printed).
    fn tmpfs(at: &Path, kib: u32) -> Option<Mount> {
        std::fs::create_dir_all(at).expect("mount point");
        let size = format!("size={kib}k");
        Self::run(&["-t", "tmpfs", "-o", &size, "tmpfs", &at.display().to_string()])?;
        Some(Mount { at: at.to_owned() })
    }

    /// `at` bound onto itself, read-only: even root cannot write there.
    fn read_only(at: &Path) -> Option<Mount> {
        let p = at.display().to_string();
        Self::run(&["--bind", &p, &p])?;
        let m = Mount { at: at.to_owned() };
        Self::run(&["-o", "remount,bind,ro", &p])?;
        Some(m)
    }

    fn run(args: &[&str]) -> Option<()> {
        match std::process::Command::new("mount").args(args).output() {
            Ok(o) if o.status.success() => Some(()),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: `mount {}` is not permitted here: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Fills the filesystem holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn disk_full_while_saving_keeps_governing_and_saves_once_space_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let Some(_mount) = Mount::tmpfs(&state, 2048) else { return };
    let (_vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(dir.path(), "agent", &agent_url(vllm_addr), &state, "");
    // The store is open (the agent decides); then the disk fills before the first save.
    wait_for(Duration::from_secs(20), "governor decisions", || {
        (agent_metric(addr, "gpu_agent_governor_decisions_total", &[])? >= 2.0).then_some(())
    });
    let filler = fill(&state);
    let decisions = wait_for(Duration::from_secs(25), "a save on the full disk", || {
        agent_metric(addr, "gpu_agent_governor_decisions_total", &[]).filter(|d| *d >= AFTER_FIRST_SAVE + 1.0)
    });
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
    assert_eq!(agent_metric(addr, "gpu_agent_vllm_up", &[]), Some(1.0), "still governing");

    // Space is back: the save on the way out reopens the store and succeeds.
    std::fs::remove_file(&filler).expect("remove filler");
    let err = stop_cleanly(agent);
    assert!(err.contains("saving the governor state failed; reopening the store to try again"), "{err}");
    assert!(err.contains("No space left on device"), "the log says why:\n{err}");
    assert!(err.contains("left in place"), "a full disk does not make the store corrupt:\n{err}");
    assert!(err.contains("state store open again"), "{err}");
    assert!(err.contains("clocks reset to driver default"), "{err}");
    assert!(!err.contains("moving it aside"), "{err}");
    assert!(corrupt_asides(&state).is_empty());

    let err2 = run_until_decisions(dir.path(), "agent2", vllm_addr, &state, 1.0);
    let restored = restored_decisions(&err2).unwrap_or_else(|| panic!("no governor ready line:\n{err2}"));
    assert!(
        restored as f64 >= decisions,
        "what was learnt on the full disk survived: restored {restored}, had {decisions}"
    );
}

#[test]
fn read_only_state_dir_leaves_the_store_in_place_and_runs_unpersisted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_vllm, vllm_addr) = start_vllm_sim();
    let _ = run_until_decisions(dir.path(), "first", vllm_addr, &state, 3.0);
    let saved = std::fs::read(state.join("governor.sled/db")).expect("store written");

    let Some(ro) = Mount::read_only(&state) else { return };
    let (agent, addr) = start_agent(dir.path(), "agent", &agent_url(vllm_addr), &state, "");
    wait_for(Duration::from_secs(20), "governor decisions", || {
        (agent_metric(addr, "gpu_agent_governor_decisions_total", &[])? >= 3.0).then_some(())
    });
    let err = stop_cleanly(agent);
    let warning = err
        .lines()
        .find(|l| l.contains("no state store: the governor will not remember what it learns"))
        .unwrap_or_else(|| panic!("no warning about the missing store:\n{err}"));
    assert!(warning.contains("Read-only file system") && warning.contains("left in place"), "{warning}");
    assert!(!err.contains("moving it aside"), "a read-only store is not corrupt:\n{err}");
    drop(ro);

    assert_eq!(std::fs::read(state.join("governor.sled/db")).expect("store"), saved, "untouched");
    assert!(corrupt_asides(&state).is_empty());
    let err3 = run_until_decisions(dir.path(), "third", vllm_addr, &state, 1.0);
    let restored = restored_decisions(&err3).unwrap_or_else(|| panic!("no governor ready line:\n{err3}"));
    assert!(restored >= 3, "the first agent's state survived the read-only run: restored {restored}");
}

#[test]
fn truncated_store_keeps_its_last_complete_save_or_is_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_vllm, vllm_addr) = start_vllm_sim();
    // Two saves: the first agent's on exit, then the second's with more decisions.
    let _ = run_until_decisions(dir.path(), "first", vllm_addr, &state, 3.0);
    let err = run_until_decisions(dir.path(), "second", vllm_addr, &state, 3.0);
    let first_save = restored_decisions(&err).unwrap_or_else(|| panic!("no governor ready line:\n{err}"));
    assert!(first_save >= 3, "{err}");
    let db = state.join("governor.sled/db");
    let bytes = std::fs::read(&db).expect("store written");
    let end = bytes.iter().rposition(|b| *b != 0).expect("data in the store") + 1;

    // A crash in the middle of the last write: its tail is gone. sled's log recovery stops at
    // the last complete message, so at worst the last save is lost, never the store.
    let torn = dir.path().join("torn");
    copy_dir(&state, &torn);
    std::fs::OpenOptions::new()
        .write(true)
        .open(torn.join("governor.sled/db"))
        .expect("open")
        .set_len((end - 16) as u64)
        .expect("truncate");
    let err = run_until_decisions(dir.path(), "torn", vllm_addr, &torn, 1.0);
    let restored = restored_decisions(&err).unwrap_or_else(|| panic!("no governor ready line:\n{err}"));
    assert!(
        restored >= first_save,
        "an earlier complete save is restored ({restored}, first save {first_save}):\n{err}"
    );
    assert!(!err.contains("moving it aside"), "{err}");

    // Cut short at 64 bytes: the store cannot be read, it is set aside.
    std::fs::copy(state.join("governor.sled/conf"), state.join("governor.sled.conf.orig")).expect("keep conf");
    std::fs::OpenOptions::new().write(true).open(&db).expect("open").set_len(64).expect("truncate");
    let err = run_until_decisions(dir.path(), "cut", vllm_addr, &state, 3.0);
    assert!(err.contains("governor store unusable; moving it aside and starting empty"), "{err}");
    assert_eq!(restored_decisions(&err), Some(0), "starts empty:\n{err}");
    let asides = corrupt_asides(&state);
    assert_eq!(asides.len(), 1, "{asides:?}");
    // Set aside for inspection. Not byte for byte: sled's recovery zeroes the torn message it
    // stopped at before it gives up, so only the header before it is compared.
    let conf = std::fs::read(state.join("governor.sled.conf.orig")).expect("conf copy");
    assert!(std::fs::read(asides[0].join("conf")).expect("aside conf") == conf, "conf set aside unchanged");
    let aside_db = std::fs::read(asides[0].join("db")).expect("aside db");
    assert!(aside_db.len() >= 32 && aside_db[..32] == bytes[..32], "db set aside: its header is the truncated store's");
    // The fresh store works.
    let err = run_until_decisions(dir.path(), "after", vllm_addr, &state, 1.0);
    assert!(restored_decisions(&err).is_some_and(|n| n >= 3), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").filter_map(Result::ok) {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}
