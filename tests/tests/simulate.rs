//! The quick start: `gpu-agent --simulate` runs the whole agent on the simulated GPU, vLLM and
//! load, and its `/metrics` passes `promtool check metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use e2e_tests::{assert_promtool_clean, free_port, get, metric, wait_for, Proc};

#[test]
fn simulate_runs_end_to_end_and_metrics_pass_promtool() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let agent = Proc::start("gpu-agent", &["--simulate", "--listen", &addr.to_string()]);

    // The built-in load makes vLLM busy: tokens flow and latencies are measured.
    let text = wait_for(Duration::from_secs(30), "simulated load visible in the agent", || {
        let m = get(addr, "/metrics").ok()?.body;
        let busy = metric(&m, "gpu_agent_vllm_generation_tokens_per_second", &[])? > 0.0
            && metric(&m, "gpu_agent_vllm_latency_seconds", &[("kind", "itl"), ("stat", "mean")])? > 0.0
            && metric(&m, "gpu_agent_gpu_energy_joules_total", &[("gpu", "0")])? > 0.0;
        busy.then_some(m)
    });
    assert_eq!(metric(&text, "gpu_agent_vllm_up", &[]), Some(1.0));
    assert!(metric(&text, "gpu_agent_gpu_power_watts", &[("gpu", "0")]).is_some_and(|w| w > 50.0));
    assert_eq!(get(addr, "/readyz").expect("readyz").status, 200);

    assert_promtool_clean(&text);

    agent.signal("TERM");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}
