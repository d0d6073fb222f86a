//! The agent's TOML configuration: every field has a default, is validated, and unknown
//! fields are rejected by name so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The `[advisor]` section is the advisor's own configuration.
pub use advisor::AdvisorConfig as AdvisorSection;
pub use objectives::Mode;

/// A configuration problem, always naming the field (or the TOML line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {msg}")]
    Syntax { path: PathBuf, msg: String },
    #[error("config field `{field}`: {msg}")]
    Invalid { field: &'static str, msg: String },
}

fn invalid(field: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, msg: msg.into() }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentSection,
    pub vllm: VllmSection,
    pub gpu: GpuSection,
    pub policy: PolicySection,
    pub control: ControlSection,
    pub advisor: AdvisorSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Address of the read-only HTTP server (`/metrics`, `/healthz`, `/readyz`).
    pub listen: SocketAddr,
    /// Seconds between decisions.
    pub period_seconds: f64,
    /// Where the governor keeps what it learnt (a sled database inside this directory).
    pub state_dir: PathBuf,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            period_seconds: 1.0,
            state_dir: PathBuf::from("/var/lib/gpu-agent"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VllmSection {
    /// vLLM's Prometheus endpoint.
    pub metrics_url: String,
    /// Scrape timeout; a slower answer counts as vLLM not answering.
    pub timeout_seconds: f64,
}

impl Default for VllmSection {
    fn default() -> Self {
        Self { metrics_url: "http://127.0.0.1:8000/metrics".into(), timeout_seconds: 0.5 }
    }
}

/// Who may do what on the control socket (checked with the peer's SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Unix socket `agentctl` talks to; created with mode 0660, removed on clean exit.
    pub socket: PathBuf,
    /// Whether root may always change state (set false to require it on the allow-lists too).
    pub allow_root: bool,
    /// Users (uids) besides root allowed to change state.
    pub allow_uids: Vec<u32>,
    /// Groups (gids) whose members may change state.
    pub allow_gids: Vec<u32>,
    /// Whether peers not allowed to change state may still read status (`status`, `watch`).
    pub others_may_read: bool,
    /// Group (gid) that owns the socket, so its members can connect at all (mode 0660).
    pub group: Option<u32>,
}

impl Default for ControlSection {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/gpu-agent/agent.sock"),
            allow_root: true,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            others_may_read: true,
            group: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackendKind {
    /// The real GPU through NVML (needs the NVIDIA driver; locking clocks needs root).
    Nvml,
    /// The built-in simulated H100.
    Sim,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSection {
    pub backend: GpuBackendKind,
    /// NVML indices of the GPUs the vLLM process uses (all of a tensor-parallel group).
    pub indices: Vec<u32>,
}

impl Default for GpuSection {
    fn default() -> Self {
        Self { backend: GpuBackendKind::Nvml, indices: vec![0] }
    }
}

/// The `[policy]` section. In the file the mode is `mode` plus, for `"pinned"`, `pin_mhz`; in
/// memory it is the agent's one [`Mode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile", into = "PolicyFile")]
pub struct PolicySection {
    pub mode: Mode,
    /// Time-to-first-token objective in seconds (mean over a window).
    pub ttft_slo_seconds: f64,
    /// Time-per-output-token (inter-token latency) objective in seconds.
    pub tpot_slo_seconds: f64,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self { mode: Mode::Slo, ttft_slo_seconds: 0.5, tpot_slo_seconds: 0.05 }
    }
}

/// `[policy]` as written in the file: the only place that maps `mode` and `pin_mhz` to a
/// [`Mode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicyFile {
    /// slo, edp, observe, default, pinned (with `pin_mhz`) or pinned:MHZ.
    mode: String,
    /// The clock for `mode = "pinned"`, in MHz; must be one the GPU supports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pin_mhz: Option<u32>,
    ttft_slo_seconds: f64,
    tpot_slo_seconds: f64,
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicySection::default().into()
    }
}

impl From<PolicySection> for PolicyFile {
    fn from(p: PolicySection) -> Self {
        let (mode, pin_mhz) = match p.mode {
            Mode::Pinned(mhz) => ("pinned".to_string(), Some(mhz)),
            other => (other.to_string(), None),
        };
        PolicyFile { mode, pin_mhz, ttft_slo_seconds: p.ttft_slo_seconds, tpot_slo_seconds: p.tpot_slo_seconds }
    }
}

impl TryFrom<PolicyFile> for PolicySection {
    type Error = String;
    fn try_from(f: PolicyFile) -> Result<Self, String> {
        let mode = match (f.mode.as_str(), f.pin_mhz) {
            (_, Some(0)) => return Err("field `policy.pin_mhz`: must be above 0".into()),
            ("pinned", Some(mhz)) => Mode::Pinned(mhz),
            ("pinned", None) => return Err("field `policy.pin_mhz`: mode \"pinned\" needs a clock in MHz".into()),
            (m, Some(_)) if m.starts_with("pinned:") => {
                return Err("field `policy.pin_mhz`: the mode already names the clock".into())
            }
            (m, _) => m.parse::<Mode>().map_err(|e| format!("field `policy.mode`: {e}"))?,
        };
        Ok(PolicySection { mode, ttft_slo_seconds: f.ttft_slo_seconds, tpot_slo_seconds: f.tpot_slo_seconds })
    }
}

/// True when the URL's authority (between `://` and the next `/`, `?` or `#`) has a userinfo
/// part, i.e. an `@`.
fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { msg, .. } => ConfigError::Syntax { path: path.to_owned(), msg },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: PathBuf::from("<text>"), msg: one_line_toml_error(&e, text) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.agent.period_seconds;
        if !(0.1..=60.0).contains(&p) {
            return Err(invalid("agent.period_seconds", format!("{p} is outside 0.1..=60")));
        }
        let url = &self.vllm.metrics_url;
        // Checked first, and the URL not echoed: the error reaches logs and `agentctl reload`.
        if url_has_credentials(url) {
            return Err(invalid(
                "vllm.metrics_url",
                "carries credentials (`user:password@`), which the agent never sends and would show in its status; remove them",
            ));
        }
        if !url.starts_with("http://") {
            return Err(invalid("vllm.metrics_url", format!("{url:?} must start with http:// (TLS is not supported)")));
        }
        let t = self.vllm.timeout_seconds;
        if !(t > 0.0 && t < p) {
            return Err(invalid(
                "vllm.timeout_seconds",
                format!("{t} must be > 0 and below agent.period_seconds ({p})"),
            ));
        }
        if self.gpu.indices.is_empty() {
            return Err(invalid("gpu.indices", "must name at least one GPU"));
        }
        let mut sorted = self.gpu.indices.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("gpu.indices", "lists a GPU twice"));
        }
        for (field, v) in [
            ("policy.ttft_slo_seconds", self.policy.ttft_slo_seconds),
            ("policy.tpot_slo_seconds", self.policy.tpot_slo_seconds),
        ] {
            if !(v > 0.0 && v <= 600.0) {
                return Err(invalid(field, format!("{v} must be > 0 and <= 600")));
            }
        }
        if self.control.socket.as_os_str().is_empty() {
            return Err(invalid("control.socket", "must be a path"));
        }
        self.advisor.validate().map_err(|e| invalid(e.field, e.msg))
    }
}

/// toml's errors span several lines with a source excerpt; keep one line with the position.
fn one_line_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).expect_err("should fail").to_string()
    }

    #[test]
    fn empty_text_gives_defaults() {
        let cfg = Config::parse("").expect("defaults");
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.agent.listen.to_string(), "127.0.0.1:9400");
        assert_eq!(cfg.agent.period_seconds, 1.0);
    }

    #[test]
    fn example_config_is_valid_and_documents_every_field() {
        let text = include_str!("../../config/agent.toml");
        let cfg = Config::parse(text).expect("example config parses");
        assert_eq!(cfg.gpu.backend, GpuBackendKind::Nvml);
        // Every field of the defaults appears in the example, so the example documents them all.
        let defaults = toml::to_string(&Config::default()).expect("serialise");
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap_or_default();
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(&format!("{key} ="))),
                "config/agent.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e = err("[agent]\nperiod_seconds = 1.0\nperiod_secs = 2.0\n");
        assert!(e.contains("period_secs"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = err("[governor]\nx = 1\n");
        assert!(e.contains("governor"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_name_the_field() {
        let e = err("[agent]\nperiod_seconds = \"fast\"\n");
        assert!(e.contains("line 2"), "{e}");
        assert!(err("[agent]\nperiod_seconds = 0.0\n").contains("agent.period_seconds"));
        assert!(err("[agent]\nlisten = \"nowhere\"\n").contains("line 2"));
        assert!(err("[vllm]\nmetrics_url = \"https://x/metrics\"\n").contains("vllm.metrics_url"));
        for url in ["http://user:s3cret@127.0.0.1:8000/metrics", "https://:s3cret@x/metrics", "http://tok@x"] {
            let e = err(&format!("[vllm]\nmetrics_url = \"{url}\"\n"));
            assert!(e.contains("vllm.metrics_url") && e.contains("credentials"), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("tok@"), "the secret is not echoed: {e}");
        }
        assert!(
            Config::parse("[vllm]\nmetrics_url = \"http://127.0.0.1:8000/metrics?a=b@c\"\n").is_ok(),
            "an @ after the host is not userinfo"
        );
        assert!(err("[vllm]\ntimeout_seconds = 2.0\n").contains("vllm.timeout_seconds"));
        assert!(err("[gpu]\nindices = []\n").contains("gpu.indices"));
        assert!(err("[gpu]\nindices = [1, 1]\n").contains("gpu.indices"));
        assert!(err("[gpu]\nbackend = \"cuda\"\n").contains("line 2"));
        assert!(err("[policy]\nttft_slo_seconds = -1\n").contains("policy.ttft_slo_seconds"));
        assert!(err("[policy]\nmode = \"turbo\"\n").contains("policy.mode"));
        let short = Config::parse("[policy]\nmode = \"pinned:1200\"\n").expect("the one-field form");
        assert_eq!(short.policy.mode, Mode::Pinned(1200));
        assert!(err("[policy]\nmode = \"pinned:1200\"\npin_mhz = 900\n").contains("policy.pin_mhz"));
        assert!(err("[policy]\nmode = \"pinned\"\n").contains("policy.pin_mhz"));
        assert!(err("[advisor]\nmin_replicas = 0\n").contains("advisor.min_replicas"));
        assert!(err("[advisor]\nmax_replicas = 0\n").contains("advisor.max_replicas"));
        assert!(err("[advisor]\ntarget_utilization = 1.5\n").contains("advisor.target_utilization"));
        assert!(err("[advisor]\ntolerance = -0.1\n").contains("advisor.tolerance"));
        assert!(err("[advisor]\nstale_after_seconds = 0\n").contains("advisor.stale_after_seconds"));
        assert!(err("[advisor]\ndeployment = \"a/b\"\n").contains("advisor.deployment"));
        assert!(err("[advisor]\naibrix_units_per_replica = 10\n").contains("advisor.aibrix_units_per_replica"));
        assert!(err("[advisor]\nreplica = 2\n").contains("replica"));
        let pinned = Config::parse("[policy]\nmode = \"pinned\"\npin_mhz = 1200\n").expect("valid");
        assert_eq!(pinned.policy.mode, Mode::Pinned(1200));
    }

    #[test]
    fn load_names_the_missing_file() {
        let e = Config::load(Path::new("/nonexistent/agent.toml")).expect_err("missing").to_string();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
    }
}
