//! The trial launcher end to end: `gpu-agent tune` launching real `vllm-sim` servers (whose
//! flags change their capacity and memory fit), a tuner killed with SIGKILL leaving no server
//! behind, a study resumed after a stop, and `agentctl tune` through the daemon.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{bin, free_port, get, procs_with, wait_for, Proc};
use objectives::profile::CapacityProfile;

fn marker(tag: &str) -> String {
    format!("e2e-tune-{tag}-{}", std::process::id())
}

/// vllm-sim through a shell that first prints the GPU set it was given.
fn launch() -> String {
    format!(
        r#"sh -c 'echo "gpu set $CUDA_VISIBLE_DEVICES"; exec "$0" "$@"' {} serve {{model}} --host 127.0.0.1 {{flags}}"#,
        bin("vllm-sim").display()
    )
}

/// Best flags: max-num-seqs 32 (the most capacity) with 2048 batched tokens (400000 does not
/// fit in memory: activations alone exceed the GPU). 5 GiB held by "other processes" makes
/// 0.98..0.94 fail to start, so the memory search must settle on 0.93.
fn space(model: &str, requests: u32) -> String {
    format!(
        r#"
[study]
name = "e2e"
model = "{model}"
strategy = "grid"
trials = 20
startup_timeout_s = 20
stop_grace_s = 5
max_rate_runs = 2
gpu_sets = ["0", "1"]
[[parameter]]
flag = "max-num-seqs"
options = [1, 4, 32]
default = 8
[[parameter]]
flag = "max-num-batched-tokens"
options = [2048, 400000]
default = 2048
[gpu_memory_utilization]
start = 0.98
min = 0.9
[fixed_flags]
sim-other-used-gib = 5
[load]
buckets = [{{ input_tokens = 64, output_tokens = 16 }}, {{ input_tokens = 128, output_tokens = 8 }}]
requests = {requests}
[limits]
p99_e2el_ms = 700
"#
    )
}

fn tune(args: &[&str]) -> std::process::Output {
    Command::new(bin("gpu-agent")).arg("tune").args(args).env("RUST_LOG", "info").output().expect("run gpu-agent tune")
}

#[test]
fn tune_launches_vllm_sim_finds_the_best_flags_and_writes_every_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = marker("best");
    let space_path = dir.path().join("space.toml");
    std::fs::write(&space_path, space(&model, 16)).expect("space");
    let study = dir.path().join("study");
    let started = Instant::now();
    let o = tune(&[
        "--space",
        space_path.to_str().expect("path"),
        "--launch",
        &launch(),
        "--study-dir",
        study.to_str().expect("path"),
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    eprintln!("study took {:?}", started.elapsed());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
    assert_eq!(v["gpu_memory_utilization"], 0.93, "{v}");
    assert_eq!(v["best"]["flags"]["max-num-seqs"], "32", "{v}");
    assert_eq!(v["best"]["flags"]["max-num-batched-tokens"], "2048", "{v}");
    assert_eq!(v["trials"], 7, "baseline + 6 grid points: {v}");
    assert_eq!(v["failed_trials"], 3, "the three 400000-token trials do not fit: {v}");
    assert!(v["improvement_over_baseline"].as_f64().is_some_and(|x| x > 0.2), "32 seats beat the default 8: {v}");

    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("result.json")).expect("result.json")).expect("json");
    let trials = result["all_trials"].as_array().expect("trials");
    let oom: Vec<&serde_json::Value> = trials.iter().filter(|t| t["status"] == "oom").collect();
    assert_eq!(oom.len(), 3);
    assert!(
        oom[0]["error"].as_str().is_some_and(|e| e.contains("No available memory for the cache blocks")),
        "{}",
        oom[0]
    );
    // The unlimited run is recorded with vllm bench serve's keys; 1 seat fails the limit there.
    let one_seat =
        trials.iter().find(|t| t["flags"]["max-num-seqs"] == "1" && t["status"] == "done").expect("1-seat trial");
    let runs = one_seat["buckets"][0]["runs"].as_array().expect("runs");
    assert_eq!(runs[0]["request_rate"], "inf");
    assert_eq!(runs[0]["passed"], false);
    for key in [
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "p99_ttft_ms",
        "p99_tpot_ms",
        "p99_e2el_ms",
        "completed",
    ] {
        assert!(runs[0].get(key).is_some(), "{key} missing");
    }

    let txt = std::fs::read_to_string(study.join("result.txt")).expect("result.txt");
    assert!(
        txt.lines().any(|l| l.starts_with("max_num_seqs: 32, max_num_batched_tokens: 2048, request_rate: ")
            && l.contains(", e2el: ")
            && l.contains(", goodput: ")),
        "{txt}"
    );
    assert!(
        txt.lines().last().is_some_and(
            |l| l.starts_with("best_max_num_seqs: 32, best_max_num_batched_tokens: 2048, best_throughput: ")
        ),
        "{txt}"
    );
    let csv = std::fs::read_to_string(study.join("trials.csv")).expect("csv");
    assert!(csv.starts_with("id,kind,status,gpu_set,max-num-seqs,max-num-batched-tokens,"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 7 + 1, "header, 7 trials, the profile run: {csv}");
    let svg = std::fs::read_to_string(study.join("report.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("Pareto front") && svg.contains("baseline"), "svg");
    assert!(std::fs::read_to_string(study.join("trials/0001.log")).expect("trial log").contains("Uvicorn running"));
    // Two GPU sets: trials ran on both, each server told its own.
    let sets: std::collections::BTreeSet<String> =
        trials.iter().map(|t| t["gpu_set"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(sets.into_iter().collect::<Vec<_>>(), ["0", "1"]);
    for t in trials.iter().filter(|t| t["kind"] != "profile") {
        let log = std::fs::read_to_string(study.join(format!("trials/{:04}.log", t["id"].as_u64().expect("id"))))
            .expect("log");
        assert!(log.starts_with(&format!("gpu set {}\n", t["gpu_set"].as_str().expect("set"))), "{log}");
    }

    // The capacity profile: the best flags measured on both buckets.
    let p = CapacityProfile::load(&study.join("capacity-profile.json")).expect("profile");
    assert_eq!(p.model, model);
    assert_eq!(p.flags.get("max-num-seqs").map(String::as_str), Some("32"));
    assert_eq!(p.buckets.len(), 2);
    assert!(p.buckets.iter().all(|b| b.max_request_rate > 0.0 && b.p99_e2e_s <= 0.7));
    assert_eq!(p.limits.e2e_p99_s, Some(0.7));

    assert!(procs_with(&model).is_empty(), "no server left running");
}

#[test]
fn a_failed_memory_search_is_a_reported_result_not_an_abort() {
    let dir = tempfile::tempdir().expect("tempdir");
    let space_path = dir.path().join("space.toml");
    // 200 GiB held by other processes: no utilisation from 0.98 down to 0.9 starts.
    let text = space(&marker("nomem"), 4).replace("sim-other-used-gib = 5", "sim-other-used-gib = 200");
    std::fs::write(&space_path, text).expect("space");
    let study = dir.path().join("study");
    let args = ["--space", space_path.to_str().expect("path"), "--launch", &launch(), "--study-dir"];
    let o = tune(&[&args[..], &[study.to_str().expect("path"), "--json"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary on stdout");
    let why = v["failure"].as_str().unwrap_or_default();
    assert!(why.starts_with("memory search: no --gpu-memory-utilization from 0.98 down to 0.9"), "{v}");
    assert!(why.contains("Free memory on device"), "the server's own words: {v}");
    assert!(v["gpu_memory_utilization"].is_null() && v["trials"] == 0, "{v}");
    let txt = std::fs::read_to_string(study.join("result.txt")).expect("result.txt");
    assert!(txt.starts_with("study failed: memory search"), "{txt}");
    assert!(study.join("result.json").exists() && study.join("trials.csv").exists());
    let o = tune(&[&args[..], &[study.to_str().expect("path")]].concat());
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("failed      memory search"), "{out}");
}

#[test]
fn a_sigkilled_tuner_leaves_no_server_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = marker("kill");
    let space_path = dir.path().join("space.toml");
    // Many requests: the first trial is still loading its server when the tuner is killed.
    std::fs::write(&space_path, space(&model, 4000)).expect("space");
    let study = dir.path().join("study");
    let tuner = Proc::start(
        "gpu-agent",
        &[
            "tune",
            "--space",
            space_path.to_str().expect("path"),
            "--launch",
            &launch(),
            "--study-dir",
            study.to_str().expect("path"),
        ],
    );
    // A trial server (not the memory search's short-lived ones) is up once trial 0's log exists.
    wait_for(Duration::from_secs(30), "a trial server", || {
        (study.join("trials/0000.log").exists() && !procs_with(&model).is_empty()).then_some(())
    });
    tuner.signal("KILL");
    let _ = tuner.wait_exit(Duration::from_secs(10));
    wait_for(Duration::from_secs(10), "servers to die with the tuner", || procs_with(&model).is_empty().then_some(()));

    // The next start on the same study reuses the memory search and is stopped by SIGTERM
    // (servers stopped, exit 130).
    let again = Proc::start(
        "gpu-agent",
        &[
            "tune",
            "--space",
            space_path.to_str().expect("path"),
            "--launch",
            &launch(),
            "--study-dir",
            study.to_str().expect("path"),
        ],
    );
    wait_for(Duration::from_secs(30), "the resumed trial's server", || (!procs_with(&model).is_empty()).then_some(()));
    again.signal("TERM");
    let (code, err) = again.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("memory-0.98") && !err.contains("does not start"), "memory search not repeated: {err}");
    assert!(procs_with(&model).is_empty(), "SIGTERM stops the servers");
}

fn sim_space(trials: u32) -> String {
    format!(
        r#"
[study]
name = "sim"
model = "m"
strategy = "tpe"
trials = {trials}
[[parameter]]
flag = "max-num-seqs"
range = {{ start = 8, end = 256, step = 8 }}
default = 256
[[parameter]]
flag = "max-num-batched-tokens"
options = [1024, 2048, 4096, 8192]
default = 8192
[gpu_memory_utilization]
fixed = 0.9
[load]
buckets = [{{ input_tokens = 512, output_tokens = 64 }}]
requests = 100
[limits]
p99_ttft_ms = 300
p99_tpot_ms = 20
"#
    )
}

#[test]
fn a_study_resumes_with_its_finished_trials_and_bad_input_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let space_path = dir.path().join("space.toml");
    let study = dir.path().join("study");
    let args = |trials: &str| {
        vec![
            "--space".to_string(),
            space_path.display().to_string(),
            "--launch".into(),
            "sim".into(),
            "--study-dir".into(),
            study.display().to_string(),
            "--trials".into(),
            trials.into(),
            "--json".into(),
        ]
    };
    std::fs::write(&space_path, sim_space(6)).expect("space");
    let first = tune(&args("6").iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    let second = tune(&args("9").iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).expect("json");
    assert_eq!(v["trials"], 9);
    let ran: Vec<&str> = err.lines().filter(|l| l.contains("trial done")).collect();
    assert_eq!(ran.len(), 3, "only the 3 new trials run: {err}");
    assert!(ran.iter().all(|l| !l.contains("id=0 ") && !l.contains("id=5 ")), "{err}");

    // Run again when done: nothing runs, and the summary reads as flags and figures.
    let mut plain = args("9");
    plain.pop();
    let o = tune(&plain.iter().map(String::as_str).collect::<Vec<_>>());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("trial done"));
    assert!(
        out.starts_with("best flags  --gpu-memory-utilization 0.9 --max-num-batched-tokens ")
            && out.contains("\nbaseline    "),
        "{out}"
    );

    // A different space in the same directory is refused, not mixed in.
    std::fs::write(&space_path, sim_space(6).replace("p99_tpot_ms = 20", "p99_tpot_ms = 30")).expect("space");
    let o = tune(&args("6").iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("different search space"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Bad input: one line naming the field, exit 2.
    std::fs::write(&space_path, sim_space(6).replace("step = 8 }", "step = 0 }")).expect("space");
    let o = tune(&args("6").iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("parameter[0].range") && err.trim().lines().count() == 1, "{err}");
    let o = tune(&["--space", space_path.to_str().expect("path"), "--launch", "vllm serve m"]);
    assert_eq!(o.status.code(), Some(2));
    // A command that cannot run stops the study at once, naming it.
    std::fs::write(&space_path, sim_space(6)).expect("space");
    let o = tune(&[
        "--space",
        space_path.to_str().expect("path"),
        "--launch",
        "/nonexistent/vllm serve {flags}",
        "--study-dir",
        dir.path().join("x").to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/vllm"), "{err}");
}

/// Children of `parent` running `gpu-agent tune --progress-json` (the daemon's study process).
fn study_processes(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the comm may hold spaces, so read after its ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            ppid == Some(parent) && cmd.contains(" tune --progress-json")
        })
        .collect()
}

#[test]
fn agentctl_tune_runs_a_study_in_the_daemon_while_it_keeps_cycling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let socket = dir.path().join("agent.sock");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nperiod_seconds = 0.25\nstate_dir = \"{}\"\n[vllm]\ntimeout_seconds = 0.2\n",
            dir.path().join("state").display()
        ),
    )
    .expect("config");
    let agent = Proc::start(
        "gpu-agent",
        &[
            "--simulate",
            "--config",
            cfg.to_str().expect("path"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
            socket.to_str().expect("path"),
        ],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(30), "agent socket", || socket.exists().then_some(()));
    let space_path = dir.path().join("space.toml");
    std::fs::write(&space_path, sim_space(8)).expect("space");
    let ctl = |args: &[&str]| {
        Command::new(bin("agentctl")).arg("--socket").arg(&socket).args(args).output().expect("agentctl")
    };

    let cycles = |addr| {
        let m = get(addr, "/metrics").expect("metrics").body;
        e2e_tests::metric(&m, "gpu_agent_cycles_total", &[]).unwrap_or(0.0)
    };
    let before = cycles(addr);
    let o =
        ctl(&["tune", "start", "--space", space_path.to_str().expect("path"), "--launch", "sim", "--wait", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).expect("progress json");
    assert_eq!(p["state"], "finished", "{p}");
    assert_eq!(p["trials_done"], 8);
    assert!(p["best_score"].as_f64().is_some_and(|s| s > 0.0), "{p}");
    assert!(
        p["study_dir"].as_str().is_some_and(|d| d.starts_with(dir.path().join("state/tune").to_str().expect("path"))),
        "{p}"
    );
    assert!(cycles(addr) > before, "the decision loop kept cycling");

    let o = ctl(&["tune", "results"]);
    assert_eq!(o.status.code(), Some(0));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("result.json");
    assert_eq!(r["trials"], 8);
    assert!(Path::new(r["study_dir"].as_str().expect("dir")).join("report.svg").exists());

    let o = ctl(&["tune", "status"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("best flags --enable-prefix-caching")
            || String::from_utf8_lossy(&o.stdout).contains("best flags --gpu-memory-utilization"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Stop a long study half-way, then resume it: the trials done are kept.
    let long = dir.path().join("long.toml");
    std::fs::write(
        &long,
        sim_space(120)
            .replace("name = \"sim\"", "name = \"long\"")
            .replace("strategy = \"tpe\"", "strategy = \"grid\""),
    )
    .expect("space");
    let o = ctl(&["tune", "start", "--space", long.to_str().expect("path"), "--launch", "sim", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let progress =
        |o: std::process::Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("progress json");
    wait_for(Duration::from_secs(20), "a few trials", || {
        (progress(ctl(&["tune", "status", "--json"]))["trials_done"].as_u64() >= Some(3)).then_some(())
    });
    // The study runs in a process of its own, a child of the agent.
    let children = study_processes(agent.pid());
    assert_eq!(children.len(), 1, "one study process: {children:?}");
    // Results so far are there mid-study.
    let mid: serde_json::Value =
        serde_json::from_slice(&ctl(&["tune", "results"]).stdout).expect("result.json mid-study");
    assert!(mid["trials"].as_u64() >= Some(3), "{mid}");
    let o = ctl(&["tune", "start", "--space", space_path.to_str().expect("path"), "--launch", "sim"]);
    assert_eq!(o.status.code(), Some(1), "one study at a time");
    assert!(String::from_utf8_lossy(&o.stderr).contains("is running"));
    assert_eq!(ctl(&["tune", "stop"]).status.code(), Some(0));
    let stopped = wait_for(Duration::from_secs(20), "the study to stop", || {
        let p = progress(ctl(&["tune", "status", "--json"]));
        (p["state"] == "stopped").then_some(p)
    });
    let done = stopped["trials_done"].as_u64().expect("done");
    assert!(done < 120, "{stopped}");
    wait_for(Duration::from_secs(10), "the study process to exit", || {
        study_processes(agent.pid()).is_empty().then_some(())
    });
    let o = ctl(&["tune", "start", "--space", long.to_str().expect("path"), "--launch", "sim", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    wait_for(Duration::from_secs(20), "the resumed study to run more trials", || {
        (progress(ctl(&["tune", "status", "--json"]))["trials_done"].as_u64() > Some(done)).then_some(())
    });
    assert_eq!(ctl(&["tune", "stop"]).status.code(), Some(0));
    wait_for(Duration::from_secs(20), "the study to stop", || {
        (progress(ctl(&["tune", "status", "--json"]))["state"] == "stopped").then_some(())
    });
    wait_for(Duration::from_secs(10), "the study process to exit", || {
        study_processes(agent.pid()).is_empty().then_some(())
    });
    // The resumed study kept the first run's trials: one baseline, no point tried twice.
    let r: serde_json::Value = serde_json::from_slice(&ctl(&["tune", "results"]).stdout).expect("result.json");
    let trials = r["all_trials"].as_array().expect("trials");
    assert!(trials.len() as u64 > done);
    assert_eq!(trials.iter().filter(|t| t["kind"] == "baseline").count(), 1);
    let points: std::collections::BTreeSet<String> =
        trials.iter().filter(|t| t["kind"] == "search").map(|t| t["flags"].to_string()).collect();
    assert_eq!(points.len(), trials.len() - 1, "no point tried twice");

    let o = ctl(&["tune", "start", "--space", "/nonexistent.toml", "--launch", "sim"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.toml"));
    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_dataset_of_request_lengths_is_tuned_on_and_profiled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: String = (0..50).map(|i| format!("{},{}\n", 200 + 40 * (i % 10), 20 + 4 * (i % 5))).collect();
    std::fs::write(dir.path().join("lengths.csv"), format!("input_tokens,output_tokens\n{rows}")).expect("dataset");
    let space = sim_space(5).replace(
        "buckets = [{ input_tokens = 512, output_tokens = 64 }]",
        "dataset = \"lengths.csv\"\nbuckets = [{ input_tokens = 2048, output_tokens = 16 }]",
    );
    let space_path = dir.path().join("space.toml");
    std::fs::write(&space_path, space).expect("space");
    let study = dir.path().join("study");
    let o = tune(&[
        "--space",
        space_path.to_str().expect("path"),
        "--launch",
        "sim",
        "--study-dir",
        study.to_str().expect("path"),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let p = CapacityProfile::load(&study.join("capacity-profile.json")).expect("profile");
    // The dataset's mean lengths (380 in, 28 out) first, then the extra bucket.
    let lens: Vec<(u32, u32)> = p.buckets.iter().map(|b| (b.input_tokens, b.output_tokens)).collect();
    assert_eq!(lens, vec![(380, 28), (2048, 16)]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("result.json")).expect("json")).expect("json");
    let first = &r["all_trials"][0]["buckets"][0]["runs"][0];
    assert_eq!(first["request_rate"], "inf");
    assert_eq!(first["completed"], 100, "`requests` rows replayed: {first}");
}
