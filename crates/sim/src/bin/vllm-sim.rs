//! `vllm-sim`: a simulated vLLM OpenAI server on simulated H100s. Takes vLLM's flag names so a
//! launch template written for `vllm serve MODEL {flags}` can start it unchanged.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use std::collections::BTreeMap;

use clap::Parser;
use gpu::GpuBackend;
use sim::engine::EngineConfig;
use sim::flags::engine_config;
use sim::gpu::SimGpu;
use sim::server::{ServerError, SimServer};
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version, about = "Simulated vLLM OpenAI-compatible server (no GPU needed)")]
struct Args {
    /// `[serve] [MODEL]`, as in `vllm serve MODEL`.
    #[arg(value_name = "MODEL", num_args = 0..=2)]
    positional: Vec<String>,
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long)]
    model: Option<String>,
    /// Names clients may use; the first is served (vLLM accepts several).
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    #[arg(long)]
    max_num_seqs: Option<u32>,
    #[arg(long)]
    max_num_batched_tokens: Option<u32>,
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    #[arg(long)]
    block_size: Option<u32>,
    #[arg(long)]
    max_model_len: Option<u32>,
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    #[arg(long, overrides_with = "enable_prefix_caching")]
    no_enable_prefix_caching: bool,
    /// Number of simulated GPUs.
    #[arg(long, short = 't', default_value_t = 1)]
    tensor_parallel_size: u32,
    /// Simulator only: GiB of GPU memory other processes hold at startup.
    #[arg(long)]
    sim_other_used_gib: Option<f64>,
    /// Simulator only: lock the simulated SM clock (MHz) on every GPU.
    #[arg(long, value_name = "MHZ")]
    sim_sm_clock: Option<u32>,
    // vLLM flags that change nothing in the simulator, accepted so templates run unchanged.
    #[arg(long, hide = true)]
    dtype: Option<String>,
    #[arg(long, hide = true)]
    kv_cache_dtype: Option<String>,
    #[arg(long, hide = true)]
    seed: Option<u64>,
    #[arg(long, hide = true)]
    swap_space: Option<f64>,
    #[arg(long, hide = true)]
    enforce_eager: bool,
    #[arg(long, hide = true)]
    trust_remote_code: bool,
    #[arg(long, hide = true)]
    disable_log_requests: bool,
    #[arg(long, hide = true)]
    disable_log_stats: bool,
}

/// vLLM's parser accepts `--max_num_seqs` as well as `--max-num-seqs`; so do we.
fn normalize(arg: String) -> String {
    match arg.strip_prefix("--") {
        Some(rest) => {
            let (name, value) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (rest, None),
            };
            let name = name.replace('_', "-");
            match value {
                Some(v) => format!("--{name}={v}"),
                None => format!("--{name}"),
            }
        }
        None => arg,
    }
}

impl Args {
    /// The model named by `--model`, a positional, or the default.
    fn model(&self) -> Result<String, String> {
        let mut pos: &[String] = &self.positional;
        if pos.first().map(String::as_str) == Some("serve") {
            pos = &pos[1..];
        }
        match (pos, &self.model) {
            ([], None) => Ok(EngineConfig::default().model_name),
            ([], Some(m)) | ([_], Some(m)) => Ok(m.clone()),
            ([m], None) => Ok(m.clone()),
            _ => Err(format!("unexpected arguments: {}", pos.join(" "))),
        }
    }

    /// The engine flags given, as `tune --launch sim` passes a trial's flags.
    fn flags(&self) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        let mut put = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                f.insert(name.to_string(), v);
            }
        };
        put("max-num-seqs", self.max_num_seqs.map(|v| v.to_string()));
        put("max-num-batched-tokens", self.max_num_batched_tokens.map(|v| v.to_string()));
        put("gpu-memory-utilization", self.gpu_memory_utilization.map(|v| v.to_string()));
        put("block-size", self.block_size.map(|v| v.to_string()));
        put("max-model-len", self.max_model_len.map(|v| v.to_string()));
        put("tensor-parallel-size", Some(self.tensor_parallel_size.to_string()));
        let caching =
            if self.no_enable_prefix_caching { Some(false) } else { self.enable_prefix_caching.then_some(true) };
        put("enable-prefix-caching", caching.map(|v| v.to_string()));
        put("sim-other-used-gib", self.sim_other_used_gib.map(|v| v.to_string()));
        put("sim-sm-clock", self.sim_sm_clock.map(|v| v.to_string()));
        f
    }

    /// The engine config and clock lock through the simulator's one flag mapping.
    fn engine_config(&self) -> Result<(EngineConfig, Option<u32>), String> {
        let model = self.model()?;
        let name = self.served_model_name.first().cloned().unwrap_or(model);
        engine_config(&name, &self.flags()).map_err(|e| e.to_string())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse_from(std::env::args().map(normalize));
    let (cfg, clock) = match args.engine_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.tensor_parallel_size == 0 {
        eprintln!("ValueError: tensor_parallel_size must be at least 1");
        return ExitCode::from(1);
    }
    let gpu = Arc::new(SimGpu::h100(cfg.tensor_parallel_size));
    if let Some(mhz) = clock {
        for i in 0..cfg.tensor_parallel_size {
            if let Err(e) = gpu.lock_sm_clock(i, mhz) {
                eprintln!("ValueError: --sim-sm-clock: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match cfg.memory_plan() {
        Ok(plan) => info!(
            weights_gib = plan.weights_gib,
            kv_cache_gib = plan.kv_cache_gib,
            "GPU KV cache size: {} tokens",
            u64::from(plan.num_gpu_blocks) * u64::from(cfg.block_size)
        ),
        Err(e) => {
            eprintln!("{}", value_error(&e.to_string()));
            return ExitCode::from(1);
        }
    }
    let addr = match tokio::net::lookup_host((args.host.as_str(), args.port)).await.map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) | Err(_) => {
            eprintln!("OSError: cannot resolve host `{}`", args.host);
            return ExitCode::from(1);
        }
    };
    info!(model = %cfg.model_name, tensor_parallel_size = cfg.tensor_parallel_size, "starting simulated vLLM API server");
    let server = match SimServer::start(cfg, gpu, addr).await {
        Ok(s) => s,
        Err(ServerError::Engine(e)) => {
            eprintln!("{}", value_error(&e.to_string()));
            return ExitCode::from(1);
        }
        Err(ServerError::Bind { addr, source }) => {
            eprintln!("OSError: cannot bind {addr}: {source}");
            return ExitCode::from(1);
        }
    };
    let bound: SocketAddr = server.local_addr();
    info!("Uvicorn running on http://{}:{} (Press CTRL+C to quit)", args.host, bound.port());
    wait_for_signal().await;
    info!("Shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

/// The one stderr line vLLM ends with on a bad configuration.
fn value_error(msg: &str) -> String {
    if msg.starts_with("ValueError") {
        msg.to_string()
    } else {
        format!("ValueError: {msg}")
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        Args::try_parse_from(argv.iter().map(|s| normalize(s.to_string()))).expect("parses")
    }

    #[test]
    fn accepts_vllm_style_command_lines() {
        let a =
            parse(&["vllm-sim", "serve", "org/m", "--max_num_seqs=64", "--port", "9000", "--no-enable-prefix-caching"]);
        let (cfg, _) = a.engine_config().expect("config");
        assert_eq!((cfg.model_name.as_str(), cfg.max_num_seqs, a.port), ("org/m", 64, 9000));
        assert!(!cfg.enable_prefix_caching);
        let a = parse(&["vllm-sim", "--model", "x", "--served-model-name", "alias", "--enforce-eager", "-t", "2"]);
        let (cfg, _) = a.engine_config().expect("config");
        assert_eq!(cfg.model_name, "alias");
        assert_eq!(cfg.tensor_parallel_size, 2, "the engine is built for the GPUs it runs on");
        let a = parse(&["vllm-sim"]);
        assert_eq!(a.engine_config().expect("config").0.model_name, EngineConfig::default().model_name);
        assert_eq!(a.host, "0.0.0.0");
        assert!(parse(&["vllm-sim", "a", "b"]).model().is_err());
    }

    #[test]
    fn the_same_flags_build_the_same_engine_as_launch_sim() {
        let a = parse(&[
            "vllm-sim",
            "m",
            "-t",
            "2",
            "--max-num-seqs",
            "32",
            "--enable-prefix-caching",
            "--sim-sm-clock",
            "1200",
            "--trust-remote-code",
            "--disable-log-stats",
        ]);
        let trial: BTreeMap<String, String> = [
            ("tensor_parallel_size", "2"),
            ("max_num_seqs", "32"),
            ("enable_prefix_caching", "true"),
            ("sim_sm_clock", "1200"),
            ("trust_remote_code", "true"),
            ("disable_log_stats", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(a.engine_config().expect("vllm-sim"), engine_config("m", &trial).expect("launch sim"));
        let (tp2, _) = a.engine_config().expect("config");
        let (tp1, _) = parse(&["vllm-sim", "m", "--max-num-seqs", "32"]).engine_config().expect("config");
        let (p2, p1) = (tp2.memory_plan().expect("fits"), tp1.memory_plan().expect("fits"));
        assert!(
            p2.kv_cache_gib > p1.kv_cache_gib,
            "two GPUs hold more KV cache: {} vs {}",
            p2.kv_cache_gib,
            p1.kv_cache_gib
        );
    }
}
