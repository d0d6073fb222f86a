//! The sidecar packaging: every YAML file under packaging/k8s parses, and the vLLM pod, its
//! ConfigMap and the PodMonitor carry what the agent needs as a native sidecar (and no more
//! privilege than that); the container image's Dockerfile ships both binaries and the config.
//! Docker cannot run on CI, so the Dockerfile is checked for structure only.
//!
//! Each check returns `Err(reason)` rather than panicking, so the tests below can also show
//! that a manifest missing the field is rejected.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

const AGENT: &str = "gpu-agent";
const VLLM: &str = "vllm";
const SOCKET_DIR: &str = "/run/gpu-agent";
const CONFIG_DIR: &str = "/etc/gpu-agent";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// One parsed YAML document and the file it came from.
struct Doc {
    file: PathBuf,
    value: Value,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
}

/// Parses one (possibly multi-document) YAML text; empty documents are skipped.
fn parse_docs(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| format!("document {}: {e}", i + 1))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Every document of every YAML file under packaging/k8s (subfolders included).
fn all_docs() -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&repo("packaging/k8s"), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let parsed = parse_docs(&text).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
        docs.extend(parsed.into_iter().map(|value| Doc { file: file.clone(), value }));
    }
    docs
}

/// The single document of this kind (and, when given, this name).
fn one(docs: &[Doc], kind: &str, name: Option<&str>) -> Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.value["kind"] == kind && name.iter().all(|n| d.value["metadata"]["name"] == *n))
        .collect();
    assert_eq!(found.len(), 1, "want exactly one {kind} {name:?} under packaging/k8s, found {}", found.len());
    found[0].value.clone()
}

fn deployment() -> Value {
    one(&all_docs(), "Deployment", Some(VLLM))
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| format!("{what} is missing or not a string"))
}

fn list<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>, String> {
    v.as_array().ok_or_else(|| format!("{what} is missing or not a list"))
}

fn pod_spec(deploy: &Value) -> &Value {
    &deploy["spec"]["template"]["spec"]
}

/// The container called `name` in `section` ("containers" or "initContainers").
fn container<'a>(deploy: &'a Value, section: &str, name: &str) -> Result<&'a Value, String> {
    list(&pod_spec(deploy)[section], &format!("spec.template.spec.{section}"))?
        .iter()
        .find(|c| c["name"] == name)
        .ok_or_else(|| format!("no container {name:?} in {section}"))
}

/// The volume name mounted at `path` in container `c`.
fn volume_at<'a>(c: &'a Value, path: &str) -> Result<&'a str, String> {
    let mounts = list(&c["volumeMounts"], "volumeMounts")?;
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == path)
        .ok_or_else(|| format!("container {} mounts nothing at {path}", c["name"]))?;
    str_of(&mount["name"], "volumeMounts[].name")
}

fn volume<'a>(deploy: &'a Value, name: &str) -> Result<&'a Value, String> {
    list(&pod_spec(deploy)["volumes"], "spec.template.spec.volumes")?
        .iter()
        .find(|v| v["name"] == name)
        .ok_or_else(|| format!("no volume {name:?} in the pod"))
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    list(v, what)?.iter().map(|s| str_of(s, what).map(str::to_owned)).collect()
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

fn check_native_sidecar(deploy: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    if agent["restartPolicy"] != "Always" {
        return Err(format!(
            "the agent's restartPolicy is {}, not Always (not a native sidecar)",
            agent["restartPolicy"]
        ));
    }
    if container(deploy, "containers", AGENT).is_ok() {
        return Err("the agent is also listed in containers".into());
    }
    let image = str_of(&agent["image"], "the agent's image")?;
    if !image.starts_with("gpu-agent:") {
        return Err(format!("the agent's image is {image}, not gpu-agent:<tag>"));
    }
    let args = strings(&agent["args"], "the agent's args")?;
    let want =
        ["--config", "/etc/gpu-agent/agent.toml", "--listen", "0.0.0.0:9400", "--socket", "/run/gpu-agent/agent.sock"];
    if args != want {
        return Err(format!("the agent's args are {args:?}, want {want:?}"));
    }
    let vllm = container(deploy, "containers", VLLM)?;
    if !str_of(&vllm["image"], "vllm's image")?.starts_with("vllm/vllm-openai") {
        return Err(format!("vllm's image is {}, not vllm/vllm-openai", vllm["image"]));
    }
    if !list(&vllm["ports"], "vllm's ports")?.iter().any(|p| p["containerPort"] == 8000) {
        return Err("vllm does not expose port 8000".into());
    }
    Ok(())
}

fn check_shared_socket(deploy: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    let vllm = container(deploy, "containers", VLLM)?;
    let in_agent = volume_at(agent, SOCKET_DIR)?;
    let in_vllm = volume_at(vllm, SOCKET_DIR)?;
    if in_agent != in_vllm {
        return Err(format!("the socket dir is volume {in_agent} in the agent but {in_vllm} in vllm"));
    }
    if !volume(deploy, in_agent)?["emptyDir"].is_object() {
        return Err(format!("the socket volume {in_agent} is not an emptyDir"));
    }
    Ok(())
}

fn check_security_context(deploy: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    let sc = &agent["securityContext"];
    let caps = &sc["capabilities"];
    let add = strings(&caps["add"], "capabilities.add")?;
    if add != ["SYS_ADMIN"] {
        return Err(format!("capabilities.add is {add:?}, want exactly [SYS_ADMIN]"));
    }
    let drop = strings(&caps["drop"], "capabilities.drop")?;
    if drop != ["ALL"] {
        return Err(format!("capabilities.drop is {drop:?}, want [ALL]"));
    }
    for (field, want) in [
        ("privileged", Value::Bool(false)),
        ("allowPrivilegeEscalation", Value::Bool(false)),
        ("readOnlyRootFilesystem", Value::Bool(true)),
        ("runAsUser", Value::from(0)),
    ] {
        if sc[field] != want {
            return Err(format!("securityContext.{field} is {}, want {want}", sc[field]));
        }
    }
    if pod_spec(deploy)["hostPID"] == true || pod_spec(deploy)["hostNetwork"] == true {
        return Err("the pod shares the host's PID or network namespace".into());
    }
    Ok(())
}

/// The agent's container port behind `port` (a name or a number).
fn port_number(agent: &Value, port: &Value) -> Result<i64, String> {
    if let Some(n) = port.as_i64() {
        return Ok(n);
    }
    let name = str_of(port, "probe port")?;
    list(&agent["ports"], "the agent's ports")?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64())
        .ok_or_else(|| format!("the agent has no port named {name}"))
}

fn check_probes(deploy: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        if get["path"] != path {
            return Err(format!("the agent's {probe} is {}, want httpGet {path}", agent[probe]));
        }
        let port = port_number(agent, &get["port"])?;
        if port != 9400 {
            return Err(format!("the agent's {probe} checks port {port}, not 9400"));
        }
    }
    let named = list(&agent["ports"], "the agent's ports")?
        .iter()
        .any(|p| p["name"] == "agent-metrics" && p["containerPort"] == 9400);
    if !named {
        return Err("the agent has no port agent-metrics = 9400".into());
    }
    Ok(())
}

fn check_gpu(deploy: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    let vllm = container(deploy, "containers", VLLM)?;
    if vllm["resources"]["limits"]["nvidia.com/gpu"].is_null() {
        return Err("vllm requests no nvidia.com/gpu".into());
    }
    for section in ["limits", "requests"] {
        if !agent["resources"][section]["nvidia.com/gpu"].is_null() {
            return Err(format!("the agent {section} nvidia.com/gpu: it would get a GPU of its own, not vLLM's"));
        }
    }
    if env_value(agent, "NVIDIA_DRIVER_CAPABILITIES") != Some("utility") {
        return Err("the agent's NVIDIA_DRIVER_CAPABILITIES is not utility".into());
    }
    if !matches!(env_value(agent, "NVIDIA_VISIBLE_DEVICES"), Some(v) if !v.is_empty()) {
        return Err("the agent sets no NVIDIA_VISIBLE_DEVICES".into());
    }
    Ok(())
}

fn check_pod_monitor(deploy: &Value, monitor: &Value) -> Result<(), String> {
    if monitor["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err(format!("the PodMonitor's apiVersion is {}", monitor["apiVersion"]));
    }
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .ok_or("the PodMonitor has no spec.selector.matchLabels")?;
    if selector.is_empty() {
        return Err("the PodMonitor's selector is empty (it would scrape every pod)".into());
    }
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (key, want) in selector {
        if &labels[key] != want {
            return Err(format!("the PodMonitor selects {key}={want} but the pod has {key}={}", labels[key]));
        }
    }
    let endpoints = list(&monitor["spec"]["podMetricsEndpoints"], "podMetricsEndpoints")?;
    let agent = container(deploy, "initContainers", AGENT)?;
    let scrape = endpoints
        .iter()
        .find(|e| e["port"] == "agent-metrics")
        .ok_or("no podMetricsEndpoints entry scrapes port agent-metrics")?;
    if port_number(agent, &scrape["port"])? != 9400 {
        return Err("port agent-metrics is not the agent's 9400".into());
    }
    if scrape["path"] != "/metrics" || scrape["interval"] != "15s" {
        return Err(format!(
            "the agent endpoint scrapes {} every {}, want /metrics every 15s",
            scrape["path"], scrape["interval"]
        ));
    }
    Ok(())
}

/// The ConfigMap's agent.toml parses with the agent's own parser and agrees with the pod.
fn check_config(deploy: &Value, config_map: &Value) -> Result<(), String> {
    let agent = container(deploy, "initContainers", AGENT)?;
    let text = str_of(&config_map["data"]["agent.toml"], "the ConfigMap's data.agent.toml")?;
    let cfg = gpu_agent::config::Config::parse(text).map_err(|e| format!("agent.toml: {e}"))?;
    if cfg.vllm.metrics_url != "http://127.0.0.1:8000/metrics" {
        return Err(format!("vllm.metrics_url is {}, not vLLM in the same pod", cfg.vllm.metrics_url));
    }
    if cfg.agent.listen.port() != 9400 || !cfg.agent.listen.ip().is_unspecified() {
        return Err(format!("agent.listen is {}, want 0.0.0.0:9400", cfg.agent.listen));
    }
    // The root filesystem is read-only: the state dir must be a volume.
    let state = cfg.agent.state_dir.to_str().ok_or("agent.state_dir is not UTF-8")?;
    if state != "/var/lib/gpu-agent" {
        return Err(format!("agent.state_dir is {state}, want /var/lib/gpu-agent"));
    }
    let state_volume = volume(deploy, volume_at(agent, state)?)?;
    if !state_volume["emptyDir"].is_object() && !state_volume["persistentVolumeClaim"].is_object() {
        return Err(format!("the state dir {state} is neither an emptyDir nor a PVC"));
    }
    if cfg.control.socket.parent() != Some(Path::new(SOCKET_DIR)) {
        return Err(format!("control.socket {} is not in the shared {SOCKET_DIR}", cfg.control.socket.display()));
    }
    let config_volume = volume(deploy, volume_at(agent, CONFIG_DIR)?)?;
    if config_volume["configMap"]["name"] != config_map["metadata"]["name"] {
        return Err(format!("{CONFIG_DIR} mounts {}, not this ConfigMap", config_volume["configMap"]));
    }
    Ok(())
}

fn config_map() -> Value {
    one(&all_docs(), "ConfigMap", Some("gpu-agent-config"))
}

fn pod_monitor() -> Value {
    one(&all_docs(), "PodMonitor", None)
}

#[test]
fn every_yaml_file_under_packaging_k8s_parses() {
    let docs = all_docs();
    for doc in &docs {
        for field in ["apiVersion", "kind"] {
            assert!(doc.value[field].is_string(), "{}: a document has no {field}", doc.file.display());
        }
        assert!(
            doc.value["metadata"]["name"].is_string(),
            "{}: a {} has no metadata.name",
            doc.file.display(),
            doc.value["kind"]
        );
    }
    for kind in ["Deployment", "ConfigMap", "PodMonitor"] {
        assert!(docs.iter().any(|d| d.value["kind"] == kind), "no {kind} under packaging/k8s");
    }
    assert!(parse_docs("a: [1, 2\nb: }").is_err(), "broken YAML must be rejected");
    assert_eq!(
        parse_docs("---\na: 1\n---\nb: 2\n---\n").map(|d| d.len()),
        Ok(2),
        "every document of a multi-document file is read"
    );
}

#[test]
fn agent_is_a_native_sidecar() {
    let deploy = deployment();
    assert_eq!(check_native_sidecar(&deploy), Ok(()));
    let mut broken = deploy.clone();
    broken["spec"]["template"]["spec"]["initContainers"][0]
        .as_object_mut()
        .expect("agent container")
        .remove("restartPolicy");
    assert!(check_native_sidecar(&broken).is_err(), "an init container without restartPolicy: Always must be rejected");
}

#[test]
fn socket_dir_is_an_emptydir_shared_by_both_containers() {
    let deploy = deployment();
    assert_eq!(check_shared_socket(&deploy), Ok(()));
    let mut broken = deploy.clone();
    let vllm = broken["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .and_then(|cs| cs.iter_mut().find(|c| c["name"] == VLLM))
        .expect("vllm container");
    vllm["volumeMounts"].as_array_mut().expect("mounts").retain(|m| m["mountPath"] != SOCKET_DIR);
    assert!(check_shared_socket(&broken).is_err(), "a socket dir mounted in the agent only must be rejected");
}

#[test]
fn agent_security_context_is_sys_admin_and_nothing_more() {
    let deploy = deployment();
    assert_eq!(check_security_context(&deploy), Ok(()));
    for (path, value) in [
        ("privileged", Value::Bool(true)),
        ("allowPrivilegeEscalation", Value::Bool(true)),
        ("capabilities", serde_json::json!({"add": ["SYS_ADMIN", "NET_ADMIN"], "drop": ["ALL"]})),
        ("capabilities", serde_json::json!({"add": ["SYS_ADMIN"]})),
    ] {
        let mut broken = deploy.clone();
        broken["spec"]["template"]["spec"]["initContainers"][0]["securityContext"][path] = value.clone();
        assert!(check_security_context(&broken).is_err(), "securityContext.{path} = {value} must be rejected");
    }
}

#[test]
fn agent_probes_healthz_and_readyz_on_9400() {
    let deploy = deployment();
    assert_eq!(check_probes(&deploy), Ok(()));
    let mut broken = deploy.clone();
    broken["spec"]["template"]["spec"]["initContainers"][0]["readinessProbe"]["httpGet"]["path"] = "/healthz".into();
    assert!(check_probes(&broken).is_err(), "a readiness probe on /healthz must be rejected");
}

#[test]
fn vllm_holds_the_gpu_and_the_agent_sees_it_through_the_runtime() {
    let deploy = deployment();
    assert_eq!(check_gpu(&deploy), Ok(()));
    let mut broken = deploy.clone();
    broken["spec"]["template"]["spec"]["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1.into();
    assert!(check_gpu(&broken).is_err(), "an agent requesting its own GPU must be rejected");
}

#[test]
fn podmonitor_selects_the_pod_and_scrapes_agent_metrics() {
    let deploy = deployment();
    let monitor = pod_monitor();
    assert_eq!(check_pod_monitor(&deploy, &monitor), Ok(()));
    let mut broken = monitor.clone();
    broken["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "something-else".into();
    assert!(check_pod_monitor(&deploy, &broken).is_err(), "a selector that misses the pod must be rejected");
    let mut broken = monitor;
    broken["spec"]["podMetricsEndpoints"][0]["port"] = "http".into();
    assert!(check_pod_monitor(&deploy, &broken).is_err(), "scraping another port must be rejected");
}

#[test]
fn configmap_agent_toml_parses_and_points_at_vllm_in_the_pod() {
    let deploy = deployment();
    let cm = config_map();
    assert_eq!(check_config(&deploy, &cm), Ok(()));
    let text = cm["data"]["agent.toml"].as_str().expect("agent.toml").to_owned();
    let mut broken = cm.clone();
    broken["data"]["agent.toml"] = text.replace("127.0.0.1:8000", "127.0.0.1:8001").into();
    assert!(check_config(&deploy, &broken).is_err(), "a metrics_url off vLLM's port must be rejected");
    let mut broken = cm;
    broken["data"]["agent.toml"] = text.replace("[vllm]", "[vllm]\nmetrics_ur = \"x\"").into();
    let err = check_config(&deploy, &broken).expect_err("an unknown field must be rejected by the agent's parser");
    assert!(err.contains("metrics_ur"), "the parser's error names the field: {err}");
}

/// Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let full = std::mem::take(&mut current);
        if let Some((kw, rest)) = full.trim().split_once(char::is_whitespace) {
            out.push((kw.to_ascii_uppercase(), rest.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
    }
    out
}

fn check_dockerfile(text: &str) -> Result<(), String> {
    let ins = instructions(text);
    let froms: Vec<&str> = ins.iter().filter(|(k, _)| k == "FROM").map(|(_, a)| a.as_str()).collect();
    let [build, runtime] = froms.as_slice() else {
        return Err(format!("want two stages (build, runtime), found FROM {froms:?}"));
    };
    let stage = build
        .strip_prefix("rust:1-bookworm AS ")
        .ok_or_else(|| format!("the build stage is FROM {build}, want rust:1-bookworm AS <name>"))?;
    if !["debian:bookworm-slim", "gcr.io/distroless/cc-debian12"].iter().any(|r| runtime.starts_with(r)) {
        return Err(format!("the runtime stage is FROM {runtime}, want debian:bookworm-slim or distroless cc"));
    }
    let runtime_at = ins.iter().rposition(|(k, _)| k == "FROM").unwrap_or_default();
    let (build_ins, runtime_ins) = ins.split_at(runtime_at);
    let builds = build_ins.iter().any(|(k, a)| {
        k == "RUN"
            && a.contains("cargo build --release")
            && a.contains("--bin gpu-agent")
            && a.contains("--bin agentctl")
    });
    if !builds {
        return Err("the build stage does not run cargo build --release --bin gpu-agent --bin agentctl".into());
    }
    let has = |kw: &str, args: &str| runtime_ins.iter().any(|(k, a)| k == kw && a == args);
    for bin in ["gpu-agent", "agentctl"] {
        let copy = format!("--from={stage} /src/target/release/{bin} /usr/bin/{bin}");
        if !has("COPY", &copy) {
            return Err(format!("the runtime stage lacks COPY {copy}"));
        }
    }
    if !has("COPY", "config/agent.toml /etc/gpu-agent/agent.toml") {
        return Err("the runtime stage does not copy config/agent.toml to /etc/gpu-agent/agent.toml".into());
    }
    for (kw, args) in [
        ("ENTRYPOINT", r#"["/usr/bin/gpu-agent"]"#),
        ("CMD", r#"["--config", "/etc/gpu-agent/agent.toml"]"#),
        ("EXPOSE", "9400"),
    ] {
        if !has(kw, args) {
            return Err(format!("the runtime stage lacks {kw} {args}"));
        }
    }
    Ok(())
}

#[test]
fn dockerfile_ships_both_binaries_and_the_config() {
    let text = std::fs::read_to_string(repo("packaging/container/Dockerfile")).expect("packaging/container/Dockerfile");
    assert_eq!(check_dockerfile(&text), Ok(()));
    assert!(repo("config/agent.toml").is_file(), "the Dockerfile copies config/agent.toml, which must exist");
    let broken = text.replace(r#"ENTRYPOINT ["/usr/bin/gpu-agent"]"#, r#"ENTRYPOINT ["/bin/sh"]"#);
    assert!(check_dockerfile(&broken).is_err(), "another ENTRYPOINT must be rejected");
    let broken = text.replace("/usr/bin/agentctl", "/usr/local/bin/agentctl");
    assert!(check_dockerfile(&broken).is_err(), "agentctl outside /usr/bin must be rejected");

    let ignore = std::fs::read_to_string(repo(".dockerignore")).expect(".dockerignore at the repository root");
    assert!(
        ignore.lines().map(str::trim).any(|l| matches!(l, "target" | "target/" | "/target" | "/target/")),
        ".dockerignore does not exclude target/"
    );
}

/// What the agent really exports with the ConfigMap's `[advisor]` section: `gpu-agent
/// --simulate` (replica count given, since no kubelet writes the annotation here) scraped
/// until the advisor's gauges appear. Returns the metric families' names, the advisor config
/// and the AIBrix endpoint's answer.
fn agent_output() -> (Vec<String>, gpu_agent::config::AdvisorSection, String) {
    use e2e_tests::{free_port, get, metric, wait_for, Proc};
    use std::net::SocketAddr;
    use std::time::Duration;

    let text = str_of(&config_map()["data"]["agent.toml"], "agent.toml").expect("agent.toml").to_string();
    let advisor = gpu_agent::config::Config::parse(&text).expect("agent.toml parses").advisor;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nperiod_seconds = 1.0\nstate_dir = \"{}\"\n[control]\nsocket = \"{}\"\n\
             [advisor]\nreplicas = 2\nnamespace = \"{}\"\ndeployment = \"{}\"\naibrix_units_per_replica = {}\n",
            dir.path().join("state").display(),
            dir.path().join("agent.sock").display(),
            advisor.namespace,
            advisor.deployment,
            advisor.aibrix_units_per_replica,
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = Proc::start(
        "gpu-agent",
        &["--simulate", "--config", cfg.to_str().expect("path"), "--listen", &addr.to_string()],
    );
    let metrics = wait_for(Duration::from_secs(40), "the advisor's suggestion on /metrics", || {
        let m = get(addr, "/metrics").ok()?.body;
        let suggested = m.lines().find(|l| l.starts_with("gpu_agent_advisor_suggested_replicas{"))?;
        let demand = m.lines().find(|l| l.starts_with("gpu_agent_advisor_demand_replicas{"))?;
        (!suggested.is_empty() && !demand.is_empty()).then_some(m)
    });
    assert!(metric(&metrics, "gpu_agent_advisor_stale", &[]).is_some());
    let path = format!("/metrics/{}/{}", advisor.namespace, advisor.deployment);
    let aibrix = get(addr, &path).expect("AIBrix endpoint");
    assert_eq!(aibrix.status, 200, "{path}: {}", aibrix.body);
    drop(agent);
    let names = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    (names, advisor, aibrix.body)
}

/// `gpu_agent_*` metric names a PromQL expression or a series query uses.
fn agent_metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("gpu_agent_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn check_target(doc: &Value, what: &str, deploy: &Value) -> Result<(), String> {
    let target = &doc["spec"]["scaleTargetRef"];
    if target["name"] != deploy["metadata"]["name"] {
        return Err(format!("{what} scales {}, not the vLLM Deployment", target["name"]));
    }
    if !target["kind"].is_null() && target["kind"] != "Deployment" {
        return Err(format!("{what} scales a {}", target["kind"]));
    }
    Ok(())
}

fn check_hpa(hpa: &Value, adapter: &Value, exported: &[String], deploy: &Value) -> Result<(), String> {
    check_target(hpa, "the HPA", deploy)?;
    let metric = &list(&hpa["spec"]["metrics"], "HPA spec.metrics")?[0];
    let name = str_of(&metric["pods"]["metric"]["name"], "HPA pods metric name")?;
    if metric["pods"]["target"]["type"] != "AverageValue" || metric["pods"]["target"]["averageValue"] != "1" {
        return Err(format!(
            "the HPA target must be AverageValue 1 (the demand is in replicas): {}",
            metric["pods"]["target"]
        ));
    }
    let rules_text = str_of(&adapter["data"]["config.yaml"], "prometheus-adapter config.yaml")?;
    let rules = parse_docs(rules_text)?.into_iter().next().ok_or("empty adapter config")?;
    let rule = list(&rules["rules"], "adapter rules")?
        .iter()
        .find(|r| r["name"]["as"] == name)
        .ok_or(format!("no prometheus-adapter rule exposes {name}"))?;
    let series = agent_metric_names(str_of(&rule["seriesQuery"], "seriesQuery")?);
    if series.is_empty() || series.iter().any(|s| !exported.contains(s)) {
        return Err(format!("adapter rule reads {series:?}, the agent exports {exported:?}"));
    }
    Ok(())
}

fn check_keda(so: &Value, exported: &[String], deploy: &Value) -> Result<(), String> {
    check_target(so, "the ScaledObject", deploy)?;
    let trigger = &list(&so["spec"]["triggers"], "ScaledObject triggers")?[0];
    if trigger["type"] != "prometheus"
        || trigger["metricType"] != "AverageValue"
        || trigger["metadata"]["threshold"] != "1"
    {
        return Err(format!("want a prometheus trigger, AverageValue, threshold 1: {trigger}"));
    }
    let names = agent_metric_names(str_of(&trigger["metadata"]["query"], "trigger query")?);
    if names.is_empty() || names.iter().any(|n| !exported.contains(n)) {
        return Err(format!("the query reads {names:?}, the agent exports {exported:?}"));
    }
    Ok(())
}

fn check_aibrix(
    pa: &Value,
    service: &Value,
    advisor: &gpu_agent::config::AdvisorSection,
    answer: &str,
    deploy: &Value,
) -> Result<(), String> {
    check_target(pa, "the PodAutoscaler", deploy)?;
    let src = &list(&pa["spec"]["metricsSources"], "metricsSources")?[0];
    let want_path = format!("/metrics/{}/{}", advisor.namespace, advisor.deployment);
    if src["path"] != want_path.as_str() {
        return Err(format!("path {} is not the agent's {want_path}", src["path"]));
    }
    let metric = str_of(&src["targetMetric"], "targetMetric")?;
    if !answer.lines().any(|l| l.starts_with(&format!("{metric}{{model_name="))) {
        return Err(format!("the agent's answer has no {metric}{{model_name=...}}: {answer}"));
    }
    if src["targetValue"] != advisor.aibrix_units_per_replica.to_string().as_str() {
        return Err(format!(
            "targetValue {} is not one replica in the agent's units ({})",
            src["targetValue"], advisor.aibrix_units_per_replica
        ));
    }
    let svc = str_of(&service["metadata"]["name"], "Service name")?;
    let endpoint = str_of(&src["endpoint"], "endpoint")?;
    let port = service["spec"]["ports"][0]["port"].as_i64().ok_or("Service port")?;
    if !endpoint.starts_with(&format!("{svc}."))
        || !endpoint.ends_with(&format!(":{port}"))
        || service["spec"]["ports"][0]["targetPort"] != 9400
    {
        return Err(format!("endpoint {endpoint} is not the Service {svc}:{port} in front of the agents' port 9400"));
    }
    if service["spec"]["selector"] != deploy["spec"]["selector"]["matchLabels"] {
        return Err("the Service does not select the vLLM pods".into());
    }
    Ok(())
}

#[test]
fn autoscalers_consume_what_the_agent_exports() {
    let docs = all_docs();
    let deploy = one(&docs, "Deployment", Some(VLLM));
    let hpa = one(&docs, "HorizontalPodAutoscaler", None);
    let adapter = one(&docs, "ConfigMap", Some("prometheus-adapter-gpu-agent"));
    let keda = one(&docs, "ScaledObject", None);
    let pa = one(&docs, "PodAutoscaler", None);
    let service = one(&docs, "Service", Some("vllm-gpu-agent"));
    let (exported, advisor, answer) = agent_output();
    check_hpa(&hpa, &adapter, &exported, &deploy).expect("HPA");
    check_keda(&keda, &exported, &deploy).expect("KEDA");
    check_aibrix(&pa, &service, &advisor, &answer, &deploy).expect("AIBrix");

    // The checks can fail: a renamed metric, another target, other units.
    let mut bad = hpa.clone();
    bad["spec"]["metrics"][0]["pods"]["metric"]["name"] = "gpu_agent_advisor_demand".into();
    assert!(check_hpa(&bad, &adapter, &exported, &deploy).is_err());
    let mut bad = keda.clone();
    bad["spec"]["triggers"][0]["metadata"]["query"] = "sum(gpu_agent_advisor_replicas_needed)".into();
    assert!(check_keda(&bad, &exported, &deploy)
        .expect_err("unknown metric")
        .contains("gpu_agent_advisor_replicas_needed"));
    let mut bad = pa.clone();
    bad["spec"]["metricsSources"][0]["targetValue"] = "1".into();
    assert!(check_aibrix(&bad, &service, &advisor, &answer, &deploy).is_err());
    let mut bad = pa;
    bad["spec"]["scaleTargetRef"]["name"] = "other".into();
    assert!(check_aibrix(&bad, &service, &advisor, &answer, &deploy).is_err());
}

#[test]
fn the_pod_gets_its_annotations_for_the_replica_count() {
    let deploy = deployment();
    let text = str_of(&config_map()["data"]["agent.toml"], "agent.toml").expect("agent.toml").to_string();
    let cfg = gpu_agent::config::Config::parse(&text).expect("agent.toml parses");
    let file = cfg.advisor.replicas_file.expect("advisor.replicas_file");
    let agent = container(&deploy, "initContainers", AGENT).expect("agent");
    let dir = file.parent().and_then(Path::to_str).expect("dir");
    let vol = volume(&deploy, volume_at(agent, dir).expect("mounted")).expect("volume");
    let item = &vol["downwardAPI"]["items"][0];
    assert_eq!(item["fieldRef"]["fieldPath"], "metadata.annotations");
    assert_eq!(Some(item["path"].as_str().expect("path")), file.file_name().and_then(|f| f.to_str()));
}
