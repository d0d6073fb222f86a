//! vLLM's server flags as the simulator reads them: the one mapping from flags to the engine's
//! config, used by `vllm-sim` (from its command line) and by `tune --launch sim` (from a trial's
//! flags), so the same flags always build the same engine. A flag the simulator does not model
//! is an error, as vLLM's parser would make it; flags that change nothing in a simulation are
//! accepted so launch templates run unchanged.

use std::collections::BTreeMap;

use crate::engine::EngineConfig;

/// vLLM flags accepted and without effect in the simulator.
pub const IGNORED: &[&str] = &[
    "dtype",
    "kv-cache-dtype",
    "seed",
    "swap-space",
    "enforce-eager",
    "served-model-name",
    "trust-remote-code",
    "disable-log-requests",
    "disable-log-stats",
];

/// A flag the simulator cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("argument --{name}: invalid value `{value}`")]
    Invalid { name: String, value: String },
    #[error("vllm-sim: error: unrecognized arguments: --{0}")]
    Unknown(String),
}

/// Flags (name with `-` or `_`, without dashes -> value) to the engine config for `model`, plus
/// the simulated clock lock (`--sim-sm-clock`), if any.
pub fn engine_config(model: &str, flags: &BTreeMap<String, String>) -> Result<(EngineConfig, Option<u32>), FlagError> {
    let mut c = EngineConfig { model_name: model.to_string(), ..EngineConfig::default() };
    let mut clock = None;
    for (name, value) in flags {
        let name = name.replace('_', "-");
        let bad = || FlagError::Invalid { name: name.clone(), value: value.clone() };
        let num = || value.parse::<f64>().map_err(|_| bad());
        let int = || value.parse::<u32>().map_err(|_| bad());
        match name.as_str() {
            "max-num-seqs" => c.max_num_seqs = int()?,
            "max-num-batched-tokens" => c.max_num_batched_tokens = int()?,
            "gpu-memory-utilization" => c.gpu_memory_utilization = num()?,
            "block-size" => c.block_size = int()?,
            "max-model-len" => c.max_model_len = int()?,
            "tensor-parallel-size" => c.tensor_parallel_size = int()?,
            "enable-prefix-caching" => c.enable_prefix_caching = value.parse::<bool>().map_err(|_| bad())?,
            "sim-other-used-gib" => c.other_used_gib = num()?,
            "sim-sm-clock" => clock = Some(int()?),
            other if IGNORED.contains(&other) => {}
            other => return Err(FlagError::Unknown(other.to_string())),
        }
    }
    Ok((c, clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_modelled_flag_reaches_the_engine() {
        let (c, clock) = engine_config(
            "m",
            &flags(&[
                ("max-num-seqs", "64"),
                ("max_num_batched_tokens", "4096"),
                ("gpu-memory-utilization", "0.8"),
                ("block-size", "32"),
                ("max-model-len", "4096"),
                ("tensor-parallel-size", "2"),
                ("enable-prefix-caching", "false"),
                ("sim-other-used-gib", "3"),
                ("sim-sm-clock", "1200"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            (c.model_name.as_str(), c.max_num_seqs, c.max_num_batched_tokens, c.block_size, c.max_model_len),
            ("m", 64, 4096, 32, 4096)
        );
        assert_eq!((c.tensor_parallel_size, c.enable_prefix_caching, clock), (2, false, Some(1200)));
        assert!((c.gpu_memory_utilization - 0.8).abs() < 1e-12 && (c.other_used_gib - 3.0).abs() < 1e-12);
    }

    #[test]
    fn ignored_flags_are_accepted_and_unknown_ones_refused() {
        let all: Vec<(&str, &str)> = IGNORED.iter().map(|f| (*f, "true")).collect();
        assert_eq!(
            engine_config("m", &flags(&all)).expect("accepted").0,
            EngineConfig { model_name: "m".into(), ..EngineConfig::default() }
        );
        assert_eq!(
            engine_config("m", &flags(&[("quantization", "fp8")])),
            Err(FlagError::Unknown("quantization".into()))
        );
        let e = engine_config("m", &flags(&[("max-num-seqs", "many")])).expect_err("not a number");
        assert_eq!(e.to_string(), "argument --max-num-seqs: invalid value `many`");
    }
}
