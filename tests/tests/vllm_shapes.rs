//! vllm-sim answers in real vLLM's shapes: the requests `scripts/vllm-cpu/capture.sh` sent to a
//! real vLLM 0.32.0 go to the `vllm-sim` binary, configured like the captured server (the tiny
//! model's name, a 2048-token context); each answer must have the recorded status and shape
//! (`tests/fixtures/vllm-0.32.0/`). `real_vllm.rs` holds them against a live vLLM as well.

use std::net::SocketAddr;
use std::time::Duration;

use e2e_tests::shapes::{assert_alike, cases, fixtures, send, statuses};
use e2e_tests::{free_port, get, wait_for, Proc};

#[test]
fn vllm_sim_answers_have_the_shapes_of_real_vllm_answers() {
    let port = free_port();
    let _sim = Proc::start(
        "vllm-sim",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--served-model-name",
            "tiny-llama",
            "--max-model-len",
            "2048",
        ],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(20), "vllm-sim /health", || get(addr, "/health").ok().filter(|r| r.status == 200));
    let dir = fixtures();
    let statuses = statuses(&dir);
    let cases = cases();
    for (file, _) in &statuses {
        assert!(cases.iter().any(|c| c.file == file), "{file} was captured but has no case here");
    }
    for case in &cases {
        let path = dir.join(case.file);
        let recorded = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("missing vLLM capture {} ({e}); see its README.md", path.display()));
        let status = statuses.iter().find(|(f, _)| f == case.file).map(|&(_, s)| s);
        let status = status.unwrap_or_else(|| panic!("{}: no status in status.txt", case.file));
        let (got_status, got) = send(addr, "tiny-llama", case);
        assert_alike(case.file, (status, &recorded), (got_status, &got));
    }
}
