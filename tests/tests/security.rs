//! Security end to end: the HTTP side is read-only (no method but GET/HEAD does anything), and
//! the errors clients get back over HTTP or the control socket carry no secret and no path of
//! the agent's own (state dir, config file, socket). Who may change state on the socket is
//! tested in control.rs (`peers_outside_the_allow_list_may_read_but_not_change`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::{bin, free_port, get, http, wait_for, Proc};

/// `gpu-agent --simulate` with its config, state and socket under `dir`; a vLLM URL with a
/// query string that stands for a secret the agent must not echo.
fn start(dir: &Path) -> (Proc, SocketAddr) {
    let port = free_port();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nperiod_seconds = 0.25\nstate_dir = \"{}\"\n[vllm]\ntimeout_seconds = 0.2\n",
            dir.join("state").display()
        ),
    )
    .expect("config");
    let socket = dir.join("agent.sock");
    let listen = format!("127.0.0.1:{port}");
    let p = Proc::start(
        "gpu-agent",
        &[
            "--simulate",
            "--config",
            cfg.to_str().expect("path"),
            "--listen",
            &listen,
            "--socket",
            socket.to_str().expect("path"),
        ],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(30), "agent HTTP", || get(addr, "/healthz").ok().filter(|r| r.status == 200));
    wait_for(Duration::from_secs(30), "agent socket", || socket.exists().then_some(()));
    (p, addr)
}

fn agentctl(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(bin("agentctl"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .args(args)
        .output()
        .expect("agentctl");
    (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn http_is_read_only_and_errors_leak_no_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, addr) = start(dir.path());
    let mode = |d: &Path| {
        let (code, out) = agentctl(d, &["status", "--json"]);
        assert_eq!(code, Some(0), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("status JSON")["mode"].clone()
    };
    let before = mode(dir.path());

    let mut bodies = Vec::new();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/metrics", "/healthz", "/readyz", "/", "/pin", "/mode"] {
            let r = http(method, addr, path, Some(r#"{"mode":"default","pin_mhz":345}"#)).expect("answer");
            assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
            assert_eq!(r.body, "read-only: only GET is served\n");
            bodies.push(r.body);
        }
    }
    for path in ["/../../etc/passwd", "/state", "/metrics/x", "/%2e%2e/"] {
        let r = get(addr, path).expect("answer");
        assert_eq!(r.status, 404, "{path}");
        bodies.push(r.body);
    }
    assert_eq!(mode(dir.path()), before, "no HTTP request changed the mode");

    // Errors the socket returns for bad requests from an allowed peer.
    let mut errors = Vec::new();
    for args in [vec!["pin", "1001"], vec!["slo", "--ttft", "-1"], vec!["tune", "x"]] {
        let (code, out) = agentctl(dir.path(), &args);
        assert_ne!(code, Some(0), "{args:?} must fail: {out}");
        errors.push(out);
    }
    // The replica advisor answers (no profile configured: nothing in it names a path).
    let (code, out) = agentctl(dir.path(), &["advice"]);
    assert_eq!(code, Some(0), "{out}");
    errors.push(out);
    let own = dir.path().display().to_string();
    for text in bodies.iter().chain(&errors) {
        assert!(!text.contains(&own), "an error names the agent's own directory: {text}");
        assert!(!text.contains("/root") && !text.contains("/home/") && !text.contains("/etc/"), "{text}");
    }
    drop(agent);
}

#[test]
fn credentials_in_the_vllm_url_are_refused_without_echoing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[vllm]\nmetrics_url = \"http://scraper:hunter2@127.0.0.1:8000/metrics\"\n").expect("config");
    let o = Command::new(bin("gpu-agent")).arg("check-config").arg(&cfg).output().expect("check-config");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("vllm.metrics_url") && err.contains("credentials"), "{err}");
    assert!(!err.contains("hunter2"), "the password is not echoed: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
