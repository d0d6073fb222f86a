//! What each fuzz target checks, shared by the targets (fuzz/fuzz_targets/*.rs) and by the
//! corpus replay test that CI runs (agent/tests/fuzz_corpus.rs): any input may be rejected,
//! none may panic.

/// vLLM's /metrics text as the agent reads it: the strict parser, then the snapshot built from
/// it (histograms, quantiles), a window over it and the inspect report.
pub fn prom_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(exp) = vllm_metrics::parse(text) {
        let snap = vllm_metrics::Snapshot::from_exposition(&exp);
        let _ = vllm_metrics::Window::between(&snap, &snap, 1.0);
    }
    let _ = vllm_metrics::inspect_text(text);
}

/// The control socket's decoder, fed what a hostile peer could send: a 4-byte length prefix
/// and a bincode body, decoded as every message type the agent or agentctl reads. A value that
/// decodes must encode, and its encoding must decode to a value that encodes the same. (Not
/// the same bytes as the input: bincode's varints accept non-minimal forms, e.g. `fb 00 00`
/// for 0, which the first fuzz run found; harmless, they decode to the same value.)
pub fn ctl_frame(data: &[u8]) {
    if let Some(&[a, b, c, d]) = data.get(..4) {
        let _ = proto::frame_len([a, b, c, d]);
    }
    round_trip::<proto::Hello>(data);
    round_trip::<proto::Welcome>(data);
    round_trip::<proto::Request>(data);
    round_trip::<proto::Response>(data);
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(body: &[u8]) {
    if let Ok(v) = proto::decode_body::<T>(body) {
        let frame = proto::encode_frame(&v).expect("a decoded value encodes");
        let again: T = proto::decode_body(&frame[4..]).expect("our own encoding decodes");
        let frame2 = proto::encode_frame(&again).expect("encodes again");
        assert_eq!(frame, frame2, "encode, decode, encode is stable");
    }
}

/// The config file: TOML parsing and validation. A rejection is one line naming the fault.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = gpu_agent::config::Config::parse(text) {
        let msg = e.to_string();
        assert!(!msg.is_empty() && !msg.contains('\n'), "one-line error: {msg:?}");
    }
}
