//! The agent and the simulated vLLM as separate processes, driven as an operator would:
//! `vllm-sim` serves, `gpu-agent` scrapes it, `gpu-agent loadgen` sends load, and the test
//! reads the agent's `/metrics`, `/healthz` and `/readyz` over HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use e2e_tests::{free_port, get, metric, wait_for, Proc};

fn start_vllm_sim() -> (Proc, SocketAddr) {
    let port = free_port();
    let p = Proc::start("vllm-sim", &["--host", "127.0.0.1", "--port", &port.to_string()]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(20), "vllm-sim /health", || get(addr, "/health").ok().filter(|r| r.status == 200));
    (p, addr)
}

fn start_agent(dir: &tempfile::TempDir, vllm: SocketAddr, policy: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\nperiod_seconds = 0.25\nstate_dir = \"{state}\"\n\
             [vllm]\nmetrics_url = \"http://{vllm}/metrics\"\ntimeout_seconds = 0.2\n\
             [control]\nsocket = \"{socket}\"\n\
             [gpu]\nbackend = \"sim\"\nindices = [0]\n{policy}",
            state = dir.path().join("state").display(),
            socket = dir.path().join("agent.sock").display()
        ),
    )
    .expect("write config");
    let p = Proc::start("gpu-agent", &["--config", cfg.to_str().expect("utf-8 path")]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(20), "agent scraping vLLM", || {
        let m = get(addr, "/metrics").ok()?.body;
        (metric(&m, "gpu_agent_vllm_up", &[])? == 1.0).then_some(())
    });
    (p, addr)
}

fn agent_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric(&get(addr, "/metrics").ok()?.body, name, labels)
}

#[test]
fn agent_metrics_follow_the_load_on_vllm_sim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(&dir, vllm_addr, "");

    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
    assert_eq!(get(addr, "/readyz").expect("readyz").status, 200);
    // Idle: nothing generated.
    wait_for(Duration::from_secs(5), "an idle window", || {
        (agent_metric(addr, "gpu_agent_vllm_generation_tokens_per_second", &[])? == 0.0).then_some(())
    });

    // 6 s of load at 20 requests/s, from the agent's own load generator, as a separate process.
    let trace = dir.path().join("trace.csv");
    std::fs::write(&trace, "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n6,20,256,64\n")
        .expect("write trace");
    let load = Proc::start(
        "gpu-agent",
        &["loadgen", "--url", &format!("http://{vllm_addr}"), "--trace", trace.to_str().expect("path")],
    );

    let busy = wait_for(Duration::from_secs(15), "generation tokens under load", || {
        agent_metric(addr, "gpu_agent_vllm_generation_tokens_per_second", &[]).filter(|&v| v > 100.0)
    });
    let running = wait_for(Duration::from_secs(10), "running requests under load", || {
        agent_metric(addr, "gpu_agent_vllm_requests_running", &[]).filter(|&v| v > 0.0)
    });
    let ttft = wait_for(Duration::from_secs(10), "TTFT from vLLM's histogram", || {
        agent_metric(addr, "gpu_agent_vllm_latency_seconds", &[("kind", "ttft"), ("stat", "mean")]).filter(|&v| v > 0.0)
    });
    assert!(ttft < 5.0, "TTFT {ttft} s is implausible for 20 req/s");
    eprintln!("under load: {busy:.0} generated tokens/s, {running} running, mean TTFT {:.1} ms", ttft * 1e3);

    let (code, err) = load.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "loadgen failed: {err}");
    // Load over: the window rates fall back to zero.
    wait_for(Duration::from_secs(10), "rates back to zero after the load", || {
        (agent_metric(addr, "gpu_agent_vllm_request_rate_per_second", &[])? == 0.0).then_some(())
    });
    let energy = agent_metric(addr, "gpu_agent_gpu_energy_joules_total", &[("gpu", "0")]).expect("energy counter");
    assert!(energy > 0.0, "energy counter should advance, got {energy}");

    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "agent exit: {err}");
}

#[test]
fn pinned_clock_goes_back_to_default_when_vllm_stops_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(&dir, vllm_addr, "[policy]\nmode = \"pinned\"\npin_mhz = 1200\n");
    wait_for(Duration::from_secs(5), "the pinned clock", || {
        (agent_metric(addr, "gpu_agent_clock_target_hertz", &[])? == 1200e6).then_some(())
    });
    wait_for(Duration::from_secs(3), "the GPU reading the pinned clock", || {
        (agent_metric(addr, "gpu_agent_gpu_sm_clock_hertz", &[("gpu", "0")])? == 1200e6).then_some(())
    });

    drop(vllm); // killed
                // Two failed cycles of 0.25 s (+ scrape timeouts): well within 3 s.
    wait_for(Duration::from_secs(3), "clock reset after vLLM died", || {
        (agent_metric(addr, "gpu_agent_clock_target_hertz", &[])? == 0.0).then_some(())
    });
    assert_eq!(agent_metric(addr, "gpu_agent_vllm_up", &[]), Some(0.0));
    assert_eq!(get(addr, "/readyz").expect("readyz").status, 503);
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200, "the agent itself is alive");

    // vLLM comes back: the agent keeps retrying and locks again.
    let port = vllm_addr.port().to_string();
    let _vllm2 = Proc::start("vllm-sim", &["--host", "127.0.0.1", "--port", &port]);
    wait_for(Duration::from_secs(20), "clock locked again after vLLM returned", || {
        (agent_metric(addr, "gpu_agent_clock_target_hertz", &[])? == 1200e6).then_some(())
    });

    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "agent exit: {err}");
    assert!(err.contains("clocks reset"), "the agent logs the reset on exit: {err}");
}

#[test]
fn sighup_reloads_config_and_bad_reload_keeps_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_vllm, vllm_addr) = start_vllm_sim();
    let (agent, addr) = start_agent(&dir, vllm_addr, "");
    assert_eq!(agent_metric(addr, "gpu_agent_slo_objective_seconds", &[("kind", "ttft")]), Some(0.5));

    let cfg = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&cfg).expect("read config");
    std::fs::write(&cfg, format!("{text}[policy]\nttft_slo_seconds = 0.25\n")).expect("write");
    agent.signal("HUP");
    wait_for(Duration::from_secs(5), "reloaded SLO", || {
        (agent_metric(addr, "gpu_agent_slo_objective_seconds", &[("kind", "ttft")])? == 0.25).then_some(())
    });

    std::fs::write(&cfg, format!("{text}[policy]\nttft_slo_secs = 0.1\n")).expect("write");
    agent.signal("HUP");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(agent_metric(addr, "gpu_agent_slo_objective_seconds", &[("kind", "ttft")]), Some(0.25));
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);

    agent.signal("INT");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "agent exit: {err}");
    assert!(err.contains("ttft_slo_secs"), "the rejected reload names the field: {err}");
}
