//! Builds the deb (cargo-deb) and rpm (cargo-generate-rpm) packages from a release build and
//! checks what they install, with `dpkg-deb` and `rpm` as an operator would.
//! Needs the tools: CI installs them (.ci/run); elsewhere the test says it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success())
}

/// A tool-gated run: CI must have every tool, a developer machine may lack them.
fn tools_present(tools: &[(&str, &str)]) -> bool {
    let missing: Vec<&str> = tools.iter().filter(|(c, a)| !have(c, a)).map(|(c, _)| *c).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide {missing:?}");
    eprintln!("skipped: {missing:?} not installed");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The build the packages ship, in its own target dir (so it never waits on the `cargo test`
/// that runs this), shared by the package tests: the daemon without the simulator and the lab
/// (`--no-default-features --features nvml`), agentctl, and vllm-sim for trying it out.
fn release_target() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target/packaging");
        run(Command::new(env!("CARGO")).current_dir(root()).args(PACKAGED_BUILD).arg("--target-dir").arg(&dir));
        dir
    })
}

/// `cargo` arguments of the packaged build (README, "Install from a package").
const PACKAGED_BUILD: &[&str] = &[
    "build",
    "--release",
    "-p",
    "gpu-agent",
    "-p",
    "agentctl",
    "-p",
    "sim",
    "--bins",
    "--no-default-features",
    "--features",
    "gpu-agent/nvml",
];

fn newest(dir: &Path, ext: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("package dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no .{ext} in {}", dir.display()))
}

/// Whether a maintainer script runs a command that starts the service (a message telling the
/// operator to start it does not count).
fn starts_service(script: &str) -> bool {
    script.lines().map(str::trim).any(|l| {
        l.starts_with("systemctl start")
            || l.starts_with("deb-systemd-invoke start")
            || (l.starts_with("systemctl") && l.contains("enable") && l.contains("--now"))
    })
}

#[test]
fn deb_package_installs_binaries_config_unit_and_scripts() {
    if !tools_present(&[("cargo-deb", "--version"), ("dpkg-deb", "--version")]) {
        return;
    }
    let target = release_target();
    run(Command::new("cargo-deb")
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target)
        .args(["-p", "gpu-agent", "--no-build", "--no-strip", "-o"])
        .arg(target.join("debian")));
    let deb = newest(&target.join("debian"), "deb");
    let files = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/gpu-agent",
        "./usr/bin/agentctl",
        "./usr/bin/vllm-sim",
        "./etc/gpu-agent/agent.toml",
        "/systemd/system/gpu-agent.service",
        "./usr/lib/tmpfiles.d/gpu-agent.conf",
    ] {
        assert!(files.contains(path), "deb lacks {path}:\n{files}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(dir.path()));
    let conffiles = std::fs::read_to_string(dir.path().join("conffiles")).expect("conffiles");
    assert!(conffiles.lines().any(|l| l == "/etc/gpu-agent/agent.toml"), "config kept on upgrade: {conffiles}");
    let postinst = std::fs::read_to_string(dir.path().join("postinst")).expect("postinst");
    assert!(postinst.contains("daemon-reload"), "postinst reloads systemd:\n{postinst}");
    assert!(!starts_service(&postinst), "never started on install:\n{postinst}");
    assert!(postinst.contains("/dev/nvidiactl"));
    let prerm = std::fs::read_to_string(dir.path().join("prerm")).expect("prerm");
    assert!(prerm.contains("gpu-agent"), "prerm stops the service:\n{prerm}");
}

#[test]
fn rpm_package_installs_binaries_config_unit_and_scripts() {
    if !tools_present(&[("cargo-generate-rpm", "--version"), ("rpm", "--version")]) {
        return;
    }
    let target = release_target();
    let out = target.join("gpu-agent.rpm");
    run(Command::new("cargo-generate-rpm")
        .current_dir(root())
        .args(["-p", "agent", "--target-dir"])
        .arg(target)
        .arg("-o")
        .arg(&out));
    let files = run(Command::new("rpm").arg("-qlp").arg(&out));
    for path in [
        "/usr/bin/gpu-agent",
        "/usr/bin/agentctl",
        "/etc/gpu-agent/agent.toml",
        "/usr/lib/systemd/system/gpu-agent.service",
        "/usr/lib/tmpfiles.d/gpu-agent.conf",
    ] {
        assert!(files.lines().any(|l| l == path), "rpm lacks {path}:\n{files}");
    }
    let config = run(Command::new("rpm").arg("-qcp").arg(&out));
    assert!(config.contains("/etc/gpu-agent/agent.toml"), "config marked %config:\n{config}");
    let scripts = run(Command::new("rpm").arg("-qp").arg("--scripts").arg(&out));
    assert!(scripts.contains("daemon-reload"), "{scripts}");
    assert!(!starts_service(&scripts), "never started on install:\n{scripts}");
}

#[test]
fn the_packaged_daemon_has_no_simulator_and_says_so() {
    let agent = release_target().join("release/gpu-agent");
    let out = Command::new(&agent).arg("--simulate").output().expect("run the packaged gpu-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--simulate needs a gpu-agent built with the `simulate` feature"), "{err}");
    assert_eq!(err.trim().lines().filter(|l| l.starts_with("gpu-agent:")).count(), 1, "one line: {err}");
    let help = run(Command::new(&agent).arg("--help"));
    assert!(!help.lines().any(|l| l.trim_start().starts_with("bench ")), "no lab in the packaged daemon:\n{help}");
    let out = Command::new(&agent).args(["gpus", "--simulate"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a gpu-agent built with the `simulate` feature"));
}
