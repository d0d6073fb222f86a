//! The replica advisor through the binaries, as an operator runs it: `vllm-sim` serves,
//! `gpu-agent` scrapes it with `[advisor]` configured (replica count from a downward-API style
//! file, a capacity profile that the trial launcher writes while the agent runs),
//! `gpu-agent loadgen` sends load; the test reads `/metrics` (and runs promtool on it), the
//! AIBrix-compatible `/metrics/{namespace}/{deployment}` and `agentctl advice --json`, then
//! kills vLLM and checks the advice goes stale without ever reading 0.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::{assert_promtool_clean, bin, free_port, get, metric, wait_for, Proc};
use objectives::profile::{CapacityBucket, CapacityProfile, ProfileLimits, PROFILE_SCHEMA};

const MODEL: &str = "advised-model";

fn agent_metrics(addr: SocketAddr) -> String {
    get(addr, "/metrics").map(|r| r.body).unwrap_or_default()
}

fn m(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric(&agent_metrics(addr), name, labels)
}

fn advice(socket: &Path) -> serde_json::Value {
    let o = Command::new(bin("agentctl"))
        .arg("--socket")
        .arg(socket)
        .args(["advice", "--json"])
        .output()
        .expect("agentctl");
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("advice JSON")
}

/// The AIBrix answer's value for our model.
fn aibrix(addr: SocketAddr, path: &str) -> Option<f64> {
    let r = get(addr, path).ok().filter(|r| r.status == 200)?;
    metric(&r.body, "vllm:deployment_replicas", &[("model_name", MODEL)])
}

fn write_profile(path: &Path, gpu: &str, rate: f64) {
    let p = CapacityProfile {
        schema: PROFILE_SCHEMA,
        model: MODEL.into(),
        gpu: gpu.into(),
        sm_clock_mhz: None,
        flags: Default::default(),
        limits: ProfileLimits { ttft_p99_s: Some(0.5), tpot_p99_s: Some(0.05), e2e_p99_s: None },
        created_unix: 1,
        buckets: vec![CapacityBucket {
            input_tokens: 256,
            output_tokens: 64,
            max_request_rate: rate,
            output_throughput: rate * 64.0,
            p99_ttft_s: 0.3,
            p99_tpot_s: 0.03,
            p99_e2e_s: 2.0,
        }],
    };
    p.save(path).expect("save profile");
}

#[test]
fn advisor_exports_suggestions_aibrix_and_agentctl_and_goes_stale_without_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vport = free_port();
    let vllm =
        Proc::start("vllm-sim", &["--host", "127.0.0.1", "--port", &vport.to_string(), "--served-model-name", MODEL]);
    let vaddr = SocketAddr::from(([127, 0, 0, 1], vport));
    wait_for(Duration::from_secs(20), "vllm-sim /health", || get(vaddr, "/health").ok().filter(|r| r.status == 200));

    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let socket = dir.path().join("agent.sock");
    let replicas = dir.path().join("annotations");
    std::fs::write(&replicas, "kubernetes.io/config.source=\"api\"\ngpu-agent/replicas=\"2\"\n").expect("replicas");
    let profile = dir.path().join("capacity-profile.json");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"{addr}\"\nperiod_seconds = 0.25\nstate_dir = \"{state}\"\n\
             [vllm]\nmetrics_url = \"http://{vaddr}/metrics\"\ntimeout_seconds = 0.2\n\
             [control]\nsocket = \"{socket}\"\n[gpu]\nbackend = \"sim\"\n\
             [advisor]\nreplicas_file = \"{replicas}\"\nprofiles = [\"{profile}\"]\nsmoothing_seconds = 2.0\n\
             stale_after_seconds = 2.0\nnamespace = \"ml\"\ndeployment = \"llama\"\n",
            state = dir.path().join("state").display(),
            socket = socket.display(),
            replicas = replicas.display(),
            profile = profile.display(),
        ),
    )
    .expect("config");
    let agent = Proc::start("gpu-agent", &["--config", cfg.to_str().expect("path")]);
    wait_for(Duration::from_secs(20), "agent socket", || socket.exists().then_some(()));

    // Another deployment's name is not ours.
    let other = get(addr, "/metrics/ml/other").expect("aibrix");
    assert_eq!(other.status, 404);
    assert!(other.body.contains("this agent advises ml/llama"), "{}", other.body);

    // The trial launcher finishes a study while the agent runs: its profile is picked up.
    let status =
        Command::new(bin("agentctl")).arg("--socket").arg(&socket).args(["status", "--json"]).output().expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let gpu = status["gpus"][0]["name"].as_str().expect("gpu name").to_string();
    write_profile(&profile, &gpu, 40.0);

    let trace = dir.path().join("trace.csv");
    std::fs::write(&trace, "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n10,30,256,64\n")
        .expect("trace");
    let load = Proc::start(
        "gpu-agent",
        &["loadgen", "--url", &format!("http://{vaddr}"), "--model", MODEL, "--trace", trace.to_str().expect("path")],
    );

    let labels = [("model_name", MODEL)];
    let text = wait_for(Duration::from_secs(15), "advisor estimates under load", || {
        let t = agent_metrics(addr);
        let busy = metric(&t, "gpu_agent_advisor_arrival_rate_requests_per_second", &labels)? > 10.0
            && metric(
                &t,
                "gpu_agent_advisor_capacity_requests_per_second",
                &[("model_name", MODEL), ("source", "online")],
            )? > 0.0
            && metric(
                &t,
                "gpu_agent_advisor_capacity_requests_per_second",
                &[("model_name", MODEL), ("source", "profile")],
            )? > 0.0;
        busy.then_some(t)
    });
    assert_promtool_clean(&text);
    let demand = metric(&text, "gpu_agent_advisor_demand_replicas", &labels).expect("demand");
    let combined = metric(
        &text,
        "gpu_agent_advisor_capacity_requests_per_second",
        &[("model_name", MODEL), ("source", "combined")],
    )
    .expect("combined capacity");
    let arrival = metric(&text, "gpu_agent_advisor_arrival_rate_requests_per_second", &labels).expect("arrival");
    // Demand in replicas = arrivals over capacity at the default target utilisation 0.9 (the
    // queue-drain term adds a little while requests wait).
    let expected = arrival / (combined * 0.9);
    assert!(
        demand >= expected * 0.99 && demand < expected * 1.3 + 0.01,
        "demand {demand} vs {arrival}/({combined} x 0.9)"
    );
    assert_eq!(metric(&text, "gpu_agent_advisor_current_replicas", &labels), Some(2.0));
    assert_eq!(metric(&text, "gpu_agent_advisor_stale", &[]), Some(0.0));
    let suggested = metric(&text, "gpu_agent_advisor_suggested_replicas", &labels).expect("suggested");
    assert!(suggested >= 1.0, "{suggested}");

    // AIBrix reads the same suggestion, in hundredths of a replica.
    let hundredths = aibrix(addr, "/metrics/ml/llama").expect("AIBrix answer");
    assert!(hundredths >= 100.0 && hundredths % 100.0 == 0.0, "{hundredths}");

    let a = advice(&socket);
    assert_eq!(a["model"], MODEL);
    assert_eq!(a["current_replicas"], 2);
    assert!(a["demand"]["arrival_rate"].as_f64().is_some_and(|r| r > 10.0), "{a}");
    assert!(a["online"]["max_rate"].as_f64().is_some_and(|r| r > 0.0), "{a}");
    assert_eq!(a["profile"]["path"], profile.display().to_string());
    assert_eq!(a["profile"]["measured_rate"], 40.0);
    assert!(a["suggested_replicas"].as_u64().is_some_and(|n| n >= 1), "{a}");
    assert!(a["reason"].as_str().is_some_and(|r| r.contains("req/s arriving")), "{a}");
    let table = Command::new(bin("agentctl")).arg("--socket").arg(&socket).arg("advice").output().expect("advice");
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("replicas   current 2") && table.contains("profile    "), "{table}");

    // The Deployment was scaled: the downward-API file changes and the advisor follows.
    std::fs::write(&replicas, "gpu-agent/replicas=\"3\"\n").expect("replicas");
    wait_for(Duration::from_secs(5), "the new replica count", || {
        (m(addr, "gpu_agent_advisor_current_replicas", &labels)? == 3.0).then_some(())
    });
    let (code, err) = load.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "loadgen: {err}");

    // vLLM dies: the advice goes stale, and every figure keeps its last good value, never 0.
    let before = m(addr, "gpu_agent_advisor_suggested_replicas", &labels).expect("suggested");
    drop(vllm);
    let text = wait_for(Duration::from_secs(10), "stale advice", || {
        let t = agent_metrics(addr);
        (metric(&t, "gpu_agent_advisor_stale", &[])? == 1.0).then_some(t)
    });
    assert!(metric(&text, "gpu_agent_advisor_data_age_seconds", &[]).is_some_and(|a| a > 2.0));
    let stale_suggestion = metric(&text, "gpu_agent_advisor_suggested_replicas", &labels).expect("kept");
    assert!(stale_suggestion >= 1.0, "{stale_suggestion} (was {before})");
    assert!(metric(
        &text,
        "gpu_agent_advisor_capacity_requests_per_second",
        &[("model_name", MODEL), ("source", "combined")]
    )
    .is_some_and(|c| c > 0.0));
    assert_eq!(aibrix(addr, "/metrics/ml/llama"), Some(stale_suggestion * 100.0));
    let a = advice(&socket);
    assert_eq!(a["stale"], true);
    assert!(a["reason"].as_str().is_some_and(|r| r.contains("last good")), "{a}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(m(addr, "gpu_agent_advisor_suggested_replicas", &labels), Some(stale_suggestion));

    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "agent exit: {err}");
}
