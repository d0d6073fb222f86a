//! A real Prometheus server (Debian's `prometheus` package) scrapes `gpu-agent --simulate` on
//! loopback, and PromQL queries through its HTTP API return the agent's metrics: what an
//! operator's monitoring sees, not just what our own parser reads.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{free_port, get, metric, wait_for, Proc};
use serde_json::Value;

/// Decision period of the agent under test; the cycle counter's rate must come out near 1/period.
const PERIOD_SECONDS: f64 = 0.5;

/// The Prometheus server from $PROMETHEUS or PATH. CI provides it (see .ci/run); elsewhere
/// the test is skipped with a message rather than failing on a missing tool.
fn prometheus() -> Option<String> {
    let candidate = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Some(candidate);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide prometheus (set PROMETHEUS)");
    eprintln!("skipped: prometheus not found (set PROMETHEUS)");
    None
}

/// Our own Prometheus process, logging to a file (a pipe nobody reads would fill and stall
/// it), killed when the test ends however it ends.
struct Server {
    child: Child,
    log: std::path::PathBuf,
}

impl Server {
    fn start(exe: &str, dir: &Path, port: u16) -> Server {
        let log = dir.join("prometheus.log");
        let out = File::create(&log).expect("prometheus log");
        let err = out.try_clone().expect("prometheus log");
        let child = Command::new(exe)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
        Server { child, log }
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a PromQL expression for a query string (unreserved characters pass).
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One instant query; the samples of the resulting vector as (labels, value), or an error
/// text saying what came back instead.
fn query(addr: SocketAddr, promql: &str) -> Result<Vec<(Value, f64)>, String> {
    let r = get(addr, &format!("/api/v1/query?query={}", encode(promql))).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("HTTP {}: {e}: {:.200}", r.status, r.body))?;
    if r.status != 200 || v["status"] != "success" || v["data"]["resultType"] != "vector" {
        return Err(format!("HTTP {}: {:.300}", r.status, r.body));
    }
    let result = v["data"]["result"].as_array().ok_or("no result array")?;
    result
        .iter()
        .map(|s| {
            // A sample is [unix_time, "value"]; the value is a string in Prometheus' API.
            let value =
                s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()).ok_or_else(|| format!("bad sample {s}"))?;
            Ok((s["metric"].clone(), value))
        })
        .collect()
}

/// The single sample a query must return.
fn one(addr: SocketAddr, promql: &str) -> Result<(Value, f64), String> {
    let mut samples = query(addr, promql)?;
    match samples.len() {
        1 => Ok(samples.remove(0)),
        n => Err(format!("{n} samples: {samples:?}")),
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_promql_returns_its_metrics() {
    let Some(exe) = prometheus() else { return };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");

    // The agent, on the simulated GPU and vLLM, with a short period so a rate shows quickly.
    let agent_port = free_port();
    let agent_addr = SocketAddr::from(([127, 0, 0, 1], agent_port));
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nperiod_seconds = {PERIOD_SECONDS}\nstate_dir = \"{}\"\n[vllm]\ntimeout_seconds = 0.2\n",
            dir.path().join("state").display()
        ),
    )
    .expect("agent config");
    let socket = dir.path().join("agent.sock");
    let _agent = Proc::start(
        "gpu-agent",
        &[
            "--simulate",
            "--config",
            cfg.to_str().expect("path"),
            "--listen",
            &agent_addr.to_string(),
            "--socket",
            socket.to_str().expect("path"),
        ],
    );
    wait_for(Duration::from_secs(20), "agent HTTP", || get(agent_addr, "/healthz").ok().filter(|r| r.status == 200));

    // Prometheus, loopback only, scraping the agent every second.
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gpu-agent\n    static_configs:\n      - targets: ['{agent_addr}']\n"
        ),
    )
    .expect("prometheus config");
    let prom_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Server::start(&exe, dir.path(), prom_addr.port());
    let ready = Instant::now() + Duration::from_secs(15);
    loop {
        if get(prom_addr, "/-/ready").is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < ready, "prometheus not ready within 15 s; log:\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready_after = started.elapsed();

    // Poll until every query answers as it should; on timeout, say what each last returned.
    // rate() over a window the series only partly covers comes out low (Prometheus does not
    // extrapolate past a series' start), so the rate is judged only once the window holds a
    // sample for every scrape; then it is a real measurement of the decision period.
    let rate_expr = "rate(gpu_agent_cycles_total{job=\"gpu-agent\"}[5s])";
    let count_expr = "count_over_time(gpu_agent_cycles_total{job=\"gpu-agent\"}[5s])";
    let expected_rate = 1.0 / PERIOD_SECONDS;
    let deadline = Instant::now() + Duration::from_secs(40);
    let (up, vllm_up, energy, rate) = loop {
        let up = one(prom_addr, "up{job=\"gpu-agent\"}");
        let vllm_up = one(prom_addr, "gpu_agent_vllm_up");
        let energy = one(prom_addr, "gpu_agent_gpu_energy_joules_total{gpu=\"0\"}");
        let rate = one(prom_addr, rate_expr);
        let count = one(prom_addr, count_expr);
        let last = [
            format!("up: {up:?}"),
            format!("vllm_up: {vllm_up:?}"),
            format!("energy: {energy:?}"),
            format!("rate: {rate:?}"),
            format!("samples in window: {count:?}"),
        ];
        if let (Ok(up), Ok(vllm_up), Ok(energy), Ok(rate), Ok(count)) = (up, vllm_up, energy, rate, count) {
            let done = up.1 == 1.0
                && vllm_up.1 == 1.0
                && energy.1 > 0.0
                && count.1 >= 5.0
                && (rate.1 - expected_rate).abs() <= 0.25 * expected_rate;
            if done {
                break (up, vllm_up, energy, rate);
            }
        }
        assert!(
            Instant::now() < deadline,
            "PromQL answers not as expected within 40 s:\n{}\nprometheus log:\n{}",
            last.join("\n"),
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    };

    // The series carry the scrape's target labels, so they are the agent's, scraped by this server.
    let instance = agent_addr.to_string();
    for (what, labels) in [("up", &up.0), ("vllm_up", &vllm_up.0), ("energy", &energy.0), ("rate", &rate.0)] {
        assert_eq!(labels["job"], "gpu-agent", "{what}: {labels}");
        assert_eq!(labels["instance"], instance.as_str(), "{what}: {labels}");
    }
    assert_eq!(energy.0["gpu"], "0");
    assert_eq!(energy.0["__name__"], "gpu_agent_gpu_energy_joules_total");

    // A counter Prometheus stored is never ahead of the agent's own reading taken afterwards.
    let direct = get(agent_addr, "/metrics").expect("agent metrics").body;
    let now = metric(&direct, "gpu_agent_gpu_energy_joules_total", &[("gpu", "0")]).expect("energy in /metrics");
    assert!(energy.1 <= now, "prometheus has {} J, agent now {now} J", energy.1);

    eprintln!(
        "prometheus ready after {:.1} s; queries answered after {:.1} s; up={} vllm_up={} energy={:.1} J cycle rate={:.2}/s (expected {expected_rate:.2}/s)",
        ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        up.1,
        vllm_up.1,
        energy.1,
        rate.1
    );
}
