//! `gpu-agent inspect --metrics-file FILE`: what the agent reads from a saved `/metrics` text.

use super::parse::ParseError;
use super::snapshot::Snapshot;

/// The whole [`Snapshot`] of `text` as JSON (missing metrics are `null`; an infinite bucket
/// bound is the string "+Inf").
pub fn inspect_text(text: &str) -> Result<serde_json::Value, ParseError> {
    let snap = Snapshot::from_text(text)?;
    // Cannot fail: the snapshot has no maps, and serde_json writes non-finite floats as null.
    Ok(serde_json::to_value(&snap).expect("a Snapshot always serializes"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testdata::{v1_without_gaps, V0, V1};

    #[test]
    fn v0_fixture_numbers() {
        let v = inspect_text(V0).expect("inspects");
        assert_eq!(v["version"], "v0");
        assert_eq!(v["model_names"], json!(["facebook/opt-125m"]));
        assert_eq!(v["engines"], 1);
        assert_eq!(v["num_requests_running"], 0.0);
        assert_eq!(v["num_requests_waiting"], 0.0);
        assert_eq!(v["kv_cache_usage"], 0.0);
        assert_eq!(v["prompt_tokens_total"], 5.0);
        assert_eq!(v["generation_tokens_total"], 7.0);
        assert_eq!(v["request_success_total"], 1.0);
        assert_eq!(v["prefix_cache_hits_total"], json!(null));
        assert_eq!(v["ttft_seconds"]["count"], 1.0);
        assert_eq!(v["ttft_seconds"]["sum"], 0.31326723098754883);
        assert_eq!(v["itl_seconds"]["count"], 6.0);
        assert_eq!(v["itl_seconds"]["sum"], 0.19016313552856445);
        assert_eq!(v["itl_seconds"]["buckets"][13], json!(["+Inf", 6.0]));
        assert_eq!(v["e2e_seconds"]["sum"], 0.5034303665161133);
        assert_eq!(v["iteration_tokens"], json!(null));
    }

    #[test]
    fn v1_excerpt_numbers() {
        let v = inspect_text(&v1_without_gaps()).expect("inspects");
        assert_eq!(v["num_requests_running"], 8.0);
        assert_eq!(v["num_requests_waiting"], json!(null));
        assert_eq!(v["kv_cache_usage"], json!(null));
        assert_eq!(v["prompt_tokens_total"], json!(null));
        assert_eq!(v["generation_tokens_total"], 27453.0);
        assert_eq!(v["request_success_total"], 132.0);
        assert_eq!(v["ttft_seconds"]["count"], 140.0);
        assert_eq!(v["ttft_seconds"]["sum"], json!(null));
        assert_eq!(v["ttft_seconds"]["buckets"][3], json!([0.02, 13.0]));
        assert_eq!(v["itl_seconds"], json!(null));
        assert_eq!(v["model_names"], json!(["meta-llama/Llama-3.1-8B-Instruct"]));
    }

    #[test]
    fn the_raw_excerpt_is_rejected_at_its_first_gap() {
        let e = inspect_text(V1).expect_err("`...` is not exposition text");
        assert_eq!(e.line, 4);
    }
}
