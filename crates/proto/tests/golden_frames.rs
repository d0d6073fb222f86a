//! The protocol's encoding, pinned byte for byte: one frame of every request and response
//! shape, in hex, in `tests/golden/frames.txt`. Reordering a variant, adding a field in the
//! middle or changing a type changes these bytes, so an incompatible change cannot pass
//! unnoticed: bump `PROTOCOL_VERSION` and regenerate with `GOLDEN_UPDATE=1 cargo test -p proto`.

use std::fmt::Write as _;
use std::path::PathBuf;

use proto::*;

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let frame = |v: &dyn Fn() -> Result<Vec<u8>, ProtoError>| v().expect("encodes");
    let progress = TuneProgress {
        state: StudyState::Running,
        study: "chat".into(),
        study_dir: "/var/lib/gpu-agent/tune/chat".into(),
        strategy: "tpe".into(),
        phase: StudyPhase::Trials,
        trials_done: 3,
        trials_total: 20,
        trials_failed: 1,
        running: 1,
        best_score: Some(31.5),
        best_flags: vec![("max-num-seqs".into(), "128".into())],
        baseline_score: Some(25.0),
        gpu_memory_utilization: Some(0.9),
        message: None,
    };
    let status = StatusReport {
        agent_version: "0.1.0".into(),
        uptime_s: 12.5,
        period_s: 1.0,
        cycles: 12,
        mode: Mode::Pinned(1200),
        phase: Some(Phase::Exploit),
        locked_mhz: Some(1200),
        vllm_url: "http://127.0.0.1:8000/metrics".into(),
        vllm_up: true,
        gpus: vec![GpuStatus {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            min_mhz: 345,
            max_mhz: 1980,
            sm_clock_mhz: Some(1200),
            power_w: Some(350.0),
            energy_j: Some(1e6),
        }],
        window: Some(WindowSummary { seconds: Some(1.0), request_rate: Some(4.0), ..WindowSummary::default() }),
        ttft_slo_s: 0.5,
        tpot_slo_s: 0.05,
        governor: Some(GovernorSummary {
            decisions: 12,
            converged_after: None,
            reward: Some(0.5),
            edp_per_token: None,
        }),
        last_error: None,
    };
    let advice = AdviceReport {
        model: "m".into(),
        clock_mhz: 1410.0,
        ttft_slo_s: 0.5,
        tpot_slo_s: 0.05,
        demand: Some(AdviceDemand {
            arrival_rate: 12.5,
            mean_prompt_tokens: 500.0,
            mean_output_tokens: 200.0,
            running: 30.0,
            waiting: 1.0,
            replicas: 0.4,
        }),
        capacity_rate: Some(31.0),
        online: Some(AdviceOnline {
            max_rate: 30.0,
            limit: CapacityLimit::Concurrency,
            predicted_tpot_s: 0.05,
            predicted_ttft_s: 0.2,
            weight: 0.8,
            observed_share: 0.6,
        }),
        profile: Some(AdviceProfile {
            path: "/etc/gpu-agent/profile.json".into(),
            bucket_prompt_tokens: 512,
            bucket_output_tokens: 128,
            measured_rate: 30.0,
            measured_clock_mhz: Some(1980),
            max_rate: 28.0,
        }),
        fit: AdviceFit { alpha_s: 0.008, beta_s: 1e-5, delta_s: 2e-5, observations: 40.0 },
        headroom_rate: Some(18.5),
        current_replicas: Some(3),
        desired_replicas: Some(2),
        suggested_replicas: Some(3),
        stale: false,
        data_age_s: 0.0,
        reason: "why".into(),
    };
    let start = TuneStart {
        space: "/etc/gpu-agent/search-space.toml".into(),
        launch: "vllm serve {model} {flags}".into(),
        study_dir: None,
        strategy: Some("tpe".into()),
        trials: Some(20),
        fresh: true,
    };
    vec![
        ("hello", frame(&|| encode_frame(&Hello { version: PROTOCOL_VERSION, client: "agentctl 0.1.0".into() }))),
        ("welcome", frame(&|| encode_frame(&Welcome { version: PROTOCOL_VERSION, agent_version: "0.1.0".into() }))),
        ("request status", frame(&|| encode_frame(&Request::Status))),
        ("request set-mode edp", frame(&|| encode_frame(&Request::SetMode(Mode::Edp)))),
        ("request set-mode default", frame(&|| encode_frame(&Request::SetMode(Mode::Default)))),
        ("request set-mode pinned", frame(&|| encode_frame(&Request::SetMode(Mode::Pinned(1200))))),
        ("request pin", frame(&|| encode_frame(&Request::Pin(1410)))),
        ("request unpin", frame(&|| encode_frame(&Request::Unpin))),
        ("request set-slo", frame(&|| encode_frame(&Request::SetSlo { ttft_s: Some(0.3), tpot_s: None }))),
        ("request model reset", frame(&|| encode_frame(&Request::Model(ModelCmd::Reset)))),
        ("request model export", frame(&|| encode_frame(&Request::Model(ModelCmd::Export)))),
        ("request model import", frame(&|| encode_frame(&Request::Model(ModelCmd::Import("{}".into()))))),
        ("request reload", frame(&|| encode_frame(&Request::Reload))),
        ("request tune start", frame(&|| encode_frame(&Request::Tune(TuneCmd::Start(start.clone()))))),
        ("request tune status", frame(&|| encode_frame(&Request::Tune(TuneCmd::Status)))),
        ("request tune stop", frame(&|| encode_frame(&Request::Tune(TuneCmd::Stop)))),
        ("request tune results", frame(&|| encode_frame(&Request::Tune(TuneCmd::Results)))),
        ("request advice", frame(&|| encode_frame(&Request::Advice))),
        ("response ok", frame(&|| encode_frame(&Response::Ok("mode slo".into())))),
        ("response status", frame(&|| encode_frame(&Response::Status(Box::new(status.clone()))))),
        (
            "response error",
            frame(&|| encode_frame(&Response::Error { kind: ErrorKind::Refused, message: "read-only peer".into() })),
        ),
        (
            "response error version",
            frame(&|| encode_frame(&Response::Error { kind: ErrorKind::Version, message: String::new() })),
        ),
        (
            "response tune progress",
            frame(&|| encode_frame(&Response::Tune(TuneReply::Progress(Box::new(progress.clone()))))),
        ),
        ("response tune results", frame(&|| encode_frame(&Response::Tune(TuneReply::Results("{}".into()))))),
        ("response model state", frame(&|| encode_frame(&Response::ModelState("{}".into())))),
        ("response advice", frame(&|| encode_frame(&Response::Advice(Box::new(advice.clone()))))),
    ]
}

fn render() -> String {
    let mut out = String::new();
    for (name, bytes) in samples() {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(out, "{name}: {hex}");
    }
    out
}

#[test]
fn the_encoding_matches_the_golden_frames() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/frames.txt");
    let now = render();
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::write(&path, &now).expect("write golden file");
        return;
    }
    let golden = std::fs::read_to_string(&path).expect("tests/golden/frames.txt (GOLDEN_UPDATE=1 writes it)");
    for (want, got) in golden.lines().zip(now.lines()) {
        assert_eq!(
            got, want,
            "the protocol's encoding changed: bump PROTOCOL_VERSION and regenerate with GOLDEN_UPDATE=1"
        );
    }
    assert_eq!(golden.lines().count(), now.lines().count(), "frames added or removed: regenerate with GOLDEN_UPDATE=1");
}

#[test]
fn every_golden_frame_decodes_to_what_encoded_it() {
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(body: &[u8]) -> Vec<u8> {
        encode_frame(&decode_body::<T>(body).expect("decodes")).expect("encodes")
    }
    for (name, bytes) in samples() {
        let len = frame_len([bytes[0], bytes[1], bytes[2], bytes[3]]).expect("length prefix");
        assert_eq!(len, bytes.len() - 4, "{name}");
        let body = &bytes[4..];
        // Decoding and encoding again gives the same bytes: nothing is lost on the way.
        let round = if name.starts_with("request") {
            again::<Request>(body)
        } else if name.starts_with("response") {
            again::<Response>(body)
        } else if name == "hello" {
            again::<Hello>(body)
        } else {
            again::<Welcome>(body)
        };
        assert_eq!(round, bytes, "{name} round-trips");
    }
}
