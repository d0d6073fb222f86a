//! The control protocol between `gpu-agent` and `agentctl`, and a small blocking client.
//!
//! Frames are a 4-byte big-endian length followed by a bincode 2 (serde) body, at most
//! [`MAX_FRAME`] bytes. A connection starts with a [`Hello`] from the client, answered with a
//! [`Welcome`] or an error when the protocol versions differ; then requests and responses
//! alternate.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod client;
mod frame;

pub use client::{Client, ClientError};
pub use frame::{decode_body, encode_frame, frame_len, ProtoError};

/// 2: structured `tune` requests and answers, `advice` answers, model export/import by content.
/// 3: states are enums (study state and phase, governor phase, capacity limit) and the mode is
/// the agent's one `Mode` (pinned included).
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest frame body either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
pub const DEFAULT_SOCKET: &str = "/run/gpu-agent/agent.sock";

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub client: String,
}

/// The agent's answer to a compatible [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub agent_version: String,
}

/// The clock mode (`slo`, `edp`, `observe`, `default`, `pinned:MHZ`): the agent's one mode
/// type, shared with the config and the governor.
pub use objectives::{Mode, ModeError, Phase};

/// Where a study stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudyState {
    #[default]
    Idle,
    Running,
    Finished,
    Failed,
    Stopped,
}

impl std::fmt::Display for StudyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StudyState::Idle => "idle",
            StudyState::Running => "running",
            StudyState::Finished => "finished",
            StudyState::Failed => "failed",
            StudyState::Stopped => "stopped",
        })
    }
}

/// What a running study is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyPhase {
    #[default]
    Starting,
    MemorySearch,
    Trials,
    CapacityProfile,
    Reports,
    Done,
    Stopping,
}

impl std::fmt::Display for StudyPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StudyPhase::Starting => "starting",
            StudyPhase::MemorySearch => "memory search",
            StudyPhase::Trials => "trials",
            StudyPhase::CapacityProfile => "capacity profile",
            StudyPhase::Reports => "reports",
            StudyPhase::Done => "done",
            StudyPhase::Stopping => "stopping",
        })
    }
}

/// What caps the online model's capacity estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityLimit {
    Tpot,
    Ttft,
    Concurrency,
    Saturation,
}

impl std::fmt::Display for CapacityLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CapacityLimit::Tpot => "TPOT objective",
            CapacityLimit::Ttft => "TTFT objective",
            CapacityLimit::Concurrency => "max running requests (max_num_seqs or KV cache)",
            CapacityLimit::Saturation => "engine saturation",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelCmd {
    /// Forget what the governor learnt for this GPU and vLLM model.
    Reset,
    /// Send the learnt state (JSON) back; agentctl writes the file as the calling user, so the
    /// root agent never writes a path a client chose.
    Export,
    /// Load learnt state from the JSON text of an `Export` (agentctl reads the file).
    Import(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Status,
    SetMode(Mode),
    Pin(u32),
    Unpin,
    SetSlo {
        ttft_s: Option<f64>,
        tpot_s: Option<f64>,
    },
    Model(ModelCmd),
    Reload,
    /// Trial launcher commands (`agentctl tune ...`).
    Tune(TuneCmd),
    /// Replica advice (`agentctl advice`).
    Advice,
}

impl Request {
    /// Whether the request changes the agent's state (and so needs write access).
    pub fn changes_state(&self) -> bool {
        !matches!(self, Request::Status | Request::Advice)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peer may not do this.
    Refused,
    /// The agent tried and could not.
    Failed,
    /// The request made no sense (bad value, undecodable frame).
    BadRequest,
    /// Protocol versions differ.
    Version,
}

/// `agentctl tune start|status|stop|results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TuneCmd {
    Start(TuneStart),
    Status,
    Stop,
    Results,
}

/// A study to start: the request `agentctl tune start` sends and the flags it and
/// `gpu-agent tune` both take (one definition, so the two commands cannot drift apart). Paths
/// are as the agent sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TuneStart {
    /// Search space (TOML).
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub space: PathBuf,
    /// Server command template with `{flags}` (and optionally `{model}`, `{port}`), e.g.
    /// 'vllm serve {model} {flags}'; or `sim` to evaluate trials on the in-process simulator
    /// in virtual time.
    #[cfg_attr(feature = "clap", arg(long, value_name = "CMD"))]
    pub launch: String,
    /// Study directory: logs, results and the study store [default: tune/<study name>, under
    /// the working directory for `gpu-agent tune`, under the agent's state directory for
    /// `agentctl tune start`]
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub study_dir: Option<PathBuf>,
    /// grid | random | tpe (overrides the space's study.strategy).
    #[cfg_attr(feature = "clap", arg(long))]
    pub strategy: Option<String>,
    /// Most trials, baseline included (overrides study.trials).
    #[cfg_attr(feature = "clap", arg(long))]
    pub trials: Option<u32>,
    /// Discard an earlier study in the directory instead of resuming it.
    #[cfg_attr(feature = "clap", arg(long))]
    pub fresh: bool,
}

/// Where a study stands (also the standalone tuner's progress).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TuneProgress {
    pub state: StudyState,
    pub study: String,
    pub study_dir: String,
    pub strategy: String,
    /// What it is doing now.
    pub phase: StudyPhase,
    pub trials_done: u32,
    pub trials_total: u32,
    pub trials_failed: u32,
    pub running: u32,
    /// Best request throughput so far (req/s) and its flags.
    pub best_score: Option<f64>,
    pub best_flags: Vec<(String, String)>,
    pub baseline_score: Option<f64>,
    pub gpu_memory_utilization: Option<f64>,
    /// The error of a failed study, or a note.
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TuneReply {
    Progress(Box<TuneProgress>),
    /// The finished study's result.json.
    Results(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok(String),
    Status(Box<StatusReport>),
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// Added after `Error`, whose index older clients decode in the hello answer.
    Tune(TuneReply),
    /// Answer to `model export`: the governor's state as JSON.
    ModelState(String),
    /// Answer to [`Request::Advice`].
    Advice(Box<AdviceReport>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub min_mhz: u32,
    pub max_mhz: u32,
    pub sm_clock_mhz: Option<u32>,
    pub power_w: Option<f64>,
    pub energy_j: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WindowSummary {
    pub seconds: Option<f64>,
    pub request_rate: Option<f64>,
    pub generation_tokens_rate: Option<f64>,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_cache_usage: Option<f64>,
    pub ttft_mean_s: Option<f64>,
    pub itl_mean_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorSummary {
    pub decisions: u64,
    pub converged_after: Option<u64>,
    pub reward: Option<f64>,
    pub edp_per_token: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_version: String,
    pub uptime_s: f64,
    pub period_s: f64,
    pub cycles: u64,
    pub mode: Mode,
    pub phase: Option<Phase>,
    pub locked_mhz: Option<u32>,
    pub vllm_url: String,
    pub vllm_up: bool,
    pub gpus: Vec<GpuStatus>,
    pub window: Option<WindowSummary>,
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    pub governor: Option<GovernorSummary>,
    pub last_error: Option<String>,
}

/// What the replica advisor sees arriving at this replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdviceDemand {
    /// Requests per second (smoothed).
    pub arrival_rate: f64,
    pub mean_prompt_tokens: f64,
    pub mean_output_tokens: f64,
    pub running: f64,
    pub waiting: f64,
    /// This replica's demand in replicas (summed over pods: the replicas the load needs).
    pub replicas: f64,
}

/// The online model's estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdviceOnline {
    pub max_rate: f64,
    /// Which limit caps it.
    pub limit: CapacityLimit,
    pub predicted_tpot_s: f64,
    pub predicted_ttft_s: f64,
    /// Weight of this estimate in the combined capacity, 0..1.
    pub weight: f64,
    /// Highest recent load as a share of this estimate (below 0.5: an extrapolation).
    pub observed_share: f64,
}

/// The capacity profile's estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdviceProfile {
    pub path: String,
    pub bucket_prompt_tokens: u32,
    pub bucket_output_tokens: u32,
    pub measured_rate: f64,
    pub measured_clock_mhz: Option<u32>,
    /// Scaled to the current clock.
    pub max_rate: f64,
}

/// Step-time fit of the online model at the current clock (seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdviceFit {
    pub alpha_s: f64,
    pub beta_s: f64,
    pub delta_s: f64,
    pub observations: f64,
}

/// `agentctl advice`: demand, capacity from both sources, the suggestion and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdviceReport {
    pub model: String,
    /// SM clock the capacity is computed for, MHz.
    pub clock_mhz: f64,
    pub ttft_slo_s: f64,
    pub tpot_slo_s: f64,
    pub demand: Option<AdviceDemand>,
    /// Combined capacity per replica, requests per second.
    pub capacity_rate: Option<f64>,
    pub online: Option<AdviceOnline>,
    pub profile: Option<AdviceProfile>,
    pub fit: AdviceFit,
    /// Capacity minus arrivals, requests per second.
    pub headroom_rate: Option<f64>,
    pub current_replicas: Option<u32>,
    /// ceil(fleet demand) before tolerance, delay and bounds.
    pub desired_replicas: Option<u32>,
    pub suggested_replicas: Option<u32>,
    pub stale: bool,
    /// Seconds since the last usable vLLM window.
    pub data_age_s: f64,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::frame::read_frame;
    use super::*;

    #[test]
    fn frames_round_trip() {
        let reqs = [
            Request::Status,
            Request::SetMode(Mode::Edp),
            Request::Pin(1410),
            Request::SetSlo { ttft_s: Some(0.3), tpot_s: None },
            Request::Model(ModelCmd::Export),
            Request::Model(ModelCmd::Import("{}".into())),
            Request::Tune(TuneCmd::Start(TuneStart {
                space: "/etc/gpu-agent/search-space.toml".into(),
                launch: "vllm serve m {flags}".into(),
                study_dir: None,
                strategy: Some("tpe".into()),
                trials: Some(20),
                fresh: false,
            })),
            Request::Tune(TuneCmd::Status),
        ];
        for r in reqs {
            let f = encode_frame(&r).expect("encode");
            let len = frame_len([f[0], f[1], f[2], f[3]]).expect("len");
            assert_eq!(len, f.len() - 4);
            assert_eq!(decode_body::<Request>(&f[4..]).expect("decode"), r);
        }
    }

    #[test]
    fn oversized_garbage_and_trailing_bytes_are_errors() {
        assert!(matches!(frame_len(u32::MAX.to_be_bytes()), Err(ProtoError::TooLarge(_))));
        assert!(matches!(decode_body::<Request>(&[0xff, 0xff, 0xff]), Err(ProtoError::Decode(_))));
        let mut f = encode_frame(&Request::Unpin).expect("encode");
        f.push(7);
        assert!(matches!(decode_body::<Request>(&f[4..]), Err(ProtoError::Decode(_))));
        // A huge declared string length inside a small frame is refused by the byte limit.
        let bogus = [7u8, 0xfc, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode_body::<Request>(&bogus).is_err());
    }

    #[test]
    fn only_status_and_advice_are_read_only() {
        assert!(!Request::Status.changes_state());
        assert!(!Request::Advice.changes_state());
        assert!(Request::Pin(1200).changes_state());
        assert!(Request::Reload.changes_state());
        assert!(Request::Tune(TuneCmd::Stop).changes_state());
    }

    /// A one-connection fake agent that reads the hello and answers `answer`.
    fn fake_agent(answer: Result<Welcome, Response>) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Hello>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let hello: Hello = read_frame(&mut s).expect("hello");
            s.write_all(&encode_frame(&answer).expect("encode")).expect("answer");
            hello
        });
        (dir, path, t)
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let message = format!("protocol version {PROTOCOL_VERSION} is not supported; this agent speaks 7");
        let (_dir, path, t) = fake_agent(Err(Response::Error { kind: ErrorKind::Version, message }));
        let e = Client::connect(&path).expect_err("mismatch");
        assert_eq!(t.join().expect("fake agent").version, PROTOCOL_VERSION);
        assert!(matches!(e, ClientError::Version { ours: PROTOCOL_VERSION, theirs: 7, .. }), "{e:?}");
        assert!(e.to_string().contains("speaks protocol 7"), "{e}");
    }

    #[test]
    fn welcome_carries_the_agent_version() {
        let (_dir, path, t) = fake_agent(Ok(Welcome { version: PROTOCOL_VERSION, agent_version: "9.9.9".into() }));
        let c = Client::connect(&path).expect("connect");
        assert!(t.join().expect("fake agent").client.starts_with("agentctl "));
        assert_eq!(c.agent_version, "9.9.9");
    }

    #[test]
    fn unreachable_socket_names_the_path() {
        let e = Client::connect(Path::new("/nonexistent/agent.sock")).expect_err("no agent").to_string();
        assert!(e.contains("/nonexistent/agent.sock"), "{e}");
    }
}
