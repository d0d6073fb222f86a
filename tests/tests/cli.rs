//! One-shot `gpu-agent` subcommands as an operator runs them: exit codes and one-line errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use e2e_tests::bin;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/vllm-metrics/fixtures").join(name)
}

fn agent(args: &[&str]) -> Output {
    Command::new(bin("gpu-agent")).args(args).env("RUST_LOG", "warn").output().expect("run gpu-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn inspect_prints_what_the_agent_reads_from_a_v1_response() {
    // The doc excerpt marks gaps with `...` lines: drop them to get exposition text.
    let text: String = std::fs::read_to_string(fixture("v1-docs-excerpt.txt"))
        .expect("sample")
        .lines()
        .filter(|l| l.trim() != "...")
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("v1.txt");
    std::fs::write(&file, text).expect("write");
    let out = agent(&["inspect", "--metrics-file", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["num_requests_running"], 8.0);
    assert_eq!(v["generation_tokens_total"], 27453.0);
    assert_eq!(v["request_success_total"], 132.0);
    assert_eq!(v["ttft_seconds"]["count"], 140.0);
    assert!(v["num_requests_waiting"].is_null(), "absent in the sample: null, never a made-up 0");
}

#[test]
fn inspect_reads_v0_names() {
    let out = agent(&["inspect", "--metrics-file", fixture("v0-opt125m.txt").to_str().expect("path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["prompt_tokens_total"], 5.0);
    assert_eq!(v["generation_tokens_total"], 7.0);
    assert_eq!(v["num_requests_running"], 0.0);
    assert_eq!(v["kv_cache_usage"], 0.0);
    assert!(v["ttft_seconds"]["count"].as_f64().is_some());
    assert!(v["itl_seconds"]["sum"].as_f64().is_some(), "V0 time_per_output_token maps to ITL");
}

#[test]
fn inspect_rejects_malformed_input_with_the_line_number_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.txt");
    std::fs::write(&file, "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\nvllm:num_requests_waiting{model_name=\"x\" 3\n")
        .expect("write");
    let out = agent(&["inspect", "--metrics-file", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("line 3"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let out = agent(&["inspect", "--metrics-file", "/nonexistent/metrics.txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/metrics.txt"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(agent(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(agent(&["inspect"]).status.code(), Some(2), "inspect needs a file or URL");
    assert_eq!(agent(&["--listen", "not-an-address"]).status.code(), Some(2));
}

#[test]
fn config_errors_name_the_field_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "[agent]\nperiod_seconds = 1.0\nlisten_addr = \"0.0.0.0:1\"\n").expect("write");
    let path = file.to_str().expect("path");
    for args in [vec!["check-config", path], vec!["--config", path]] {
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("listen_addr") && err.contains("line 3"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/agent.toml");
    let out = agent(&["check-config", example.to_str().expect("path")]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn gpus_lists_the_simulated_h100_and_try_lock_reads_back() {
    let out = agent(&["gpus", "--simulate", "--try-lock", "1200"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("H100"), "{text}");
    assert!(text.contains("345") && text.contains("1980"), "{text}");
    assert!(text.contains("read back 1200 MHz"), "{text}");

    let out = agent(&["gpus", "--simulate", "--try-lock", "1201"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("1201"), "{}", stderr(&out));
}

#[test]
fn nvml_without_a_driver_fails_with_a_clear_message() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    for args in [vec!["gpus"], vec!["reset-clocks"], vec![]] {
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("NVML") && err.contains("--simulate"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn vllm_sim_refuses_to_start_when_memory_does_not_fit() {
    let run = |args: &[&str]| {
        Command::new(bin("vllm-sim")).args(args).env("RUST_LOG", "warn").output().expect("run vllm-sim")
    };
    let port = e2e_tests::free_port().to_string();
    let out = run(&["--host", "127.0.0.1", "--port", &port, "--gpu-memory-utilization", "0.999"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("less than desired GPU memory utilization"), "{err}");
    let out = run(&["--host", "127.0.0.1", "--port", &port, "--gpu-memory-utilization", "0.2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("No available memory for the cache blocks"), "{}", stderr(&out));
    assert_eq!(run(&["--max-num-seqs", "lots"]).status.code(), Some(2), "usage error");
}
