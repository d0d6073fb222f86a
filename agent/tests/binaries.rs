//! The daemon's binary starts and describes itself. Having an integration test here also makes
//! `cargo test --workspace` build `gpu-agent` before any test runs, which the end-to-end tests
//! in the workspace's `tests/` crate rely on.

use std::process::Command;

#[test]
fn gpu_agent_reports_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-agent")).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("gpu-agent {}", env!("CARGO_PKG_VERSION")));
}
