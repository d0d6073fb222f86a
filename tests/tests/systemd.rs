//! The systemd side: the unit passes `systemd-analyze verify`, and the daemon speaks the
//! `Type=notify` protocol (READY, WATCHDOG from the decision loop, STOPPING) on NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{bin, free_port, Proc};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must provide systemd-analyze");
        eprintln!("skipped: systemd-analyze not found");
        return;
    }
    let unit = std::fs::read_to_string(repo("systemd/gpu-agent.service")).expect("unit");
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=gpu-agent",
        "RuntimeDirectory=gpu-agent",
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
        "DeviceAllow=char-nvidia* rw",
        "PrivateDevices=no",
        "ExecStopPost=/usr/bin/gpu-agent reset-clocks",
        "ConditionPathExists=/dev/nvidiactl",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    // verify checks that the commands exist: point them at the built binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu-agent.service");
    std::fs::write(&path, unit.replace("/usr/bin/gpu-agent", bin("gpu-agent").to_str().expect("path"))).expect("write");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "systemd-analyze verify:\n{report}");
}

#[test]
fn tmpfiles_cover_state_and_socket_dirs() {
    let t = std::fs::read_to_string(repo("systemd/gpu-agent.tmpfiles")).expect("tmpfiles");
    let lines: Vec<&str> = t.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert!(lines.contains(&"d /var/lib/gpu-agent 0750 root root -"), "{lines:?}");
    assert!(lines.contains(&"d /run/gpu-agent 0750 root root -"), "{lines:?}");
}

#[test]
fn daemon_notifies_ready_feeds_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&sock).expect("bind notify socket");
    listener.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let child = Command::new(bin("gpu-agent"))
        .args(["--simulate", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    let agent = Proc { child, name: "gpu-agent".into() };

    let mut seen = Vec::new();
    let recv_until = |want: &str, timeout: Duration, seen: &mut Vec<String>| {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = listener.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == want) {
                    return true;
                }
            }
        }
        false
    };
    assert!(recv_until("READY=1", Duration::from_secs(20), &mut seen), "no READY=1: {seen:?}");
    let mut pings = 0;
    for _ in 0..2 {
        if recv_until("WATCHDOG=1", Duration::from_secs(3), &mut seen) {
            pings += 1;
        }
    }
    assert_eq!(pings, 2, "the loop feeds the watchdog at least every 300 ms: {seen:?}");
    agent.signal("TERM");
    assert!(recv_until("STOPPING=1", Duration::from_secs(10), &mut seen), "no STOPPING=1: {seen:?}");
    let (code, err) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}
