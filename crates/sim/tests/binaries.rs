//! `vllm-sim` starts and describes itself. Having an integration test here also makes `cargo
//! test --workspace` build `vllm-sim` before any test runs, which the end-to-end tests in the
//! workspace's `tests/` crate rely on.

use std::process::Command;

#[test]
fn vllm_sim_lists_vllms_flag_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim")).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--port", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--block-size"] {
        assert!(help.contains(flag), "vllm-sim --help lacks {flag}");
    }
}
