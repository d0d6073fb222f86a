//! `agentctl` without an agent: exit codes and messages. Having an integration test here also
//! makes `cargo test --workspace` build `agentctl` for the end-to-end tests in `tests/`.

use std::process::Command;

fn agentctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentctl")).args(args).env_remove("AGENTCTL_SOCKET").output().expect("run")
}

#[test]
fn unreachable_agent_exits_3_naming_the_socket() {
    let out = agentctl(&["--socket", "/nonexistent/agent.sock", "status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/agent.sock"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(agentctl(&["pin"]).status.code(), Some(2));
    assert_eq!(agentctl(&["pin", "fast"]).status.code(), Some(2));
    assert_eq!(agentctl(&["mode", "turbo"]).status.code(), Some(2));
    assert_eq!(agentctl(&["slo"]).status.code(), Some(2), "slo needs a value");
    assert_eq!(agentctl(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn version() {
    let out = agentctl(&["--version"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("agentctl {}", env!("CARGO_PKG_VERSION")));
}
