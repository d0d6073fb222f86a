//! `gpu-agent`: the daemon, plus one-shot subcommands for operators.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use gpu::GpuBackend;
use gpu_agent::backends;
use gpu_agent::config::{Config, GpuBackendKind};
use gpu_agent::daemon;

#[derive(Parser)]
#[command(name = "gpu-agent", version, about = "Sidecar for vLLM: GPU clock governor, flag tuner and replica advisor")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML); see config/agent.toml. SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the HTTP server (/metrics, /healthz, /readyz) [default: 127.0.0.1:9400]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Run on a simulated H100 with an in-process simulated vLLM and a varying load.
    #[arg(long)]
    simulate: bool,
    /// Control socket for agentctl [default: /run/gpu-agent/agent.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Forget what the clock governor learnt for this GPU and vLLM model, and learn afresh.
    #[arg(long)]
    reset_model: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Print, as JSON, what the agent reads from one vLLM /metrics response.
    Inspect {
        /// A saved /metrics response.
        #[arg(long, value_name = "FILE", conflicts_with = "url", required_unless_present = "url")]
        metrics_file: Option<PathBuf>,
        /// A live vLLM metrics endpoint, e.g. http://127.0.0.1:8000/metrics
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// List the GPUs with their supported clocks and current counters.
    Gpus {
        #[command(flatten)]
        backend: BackendArgs,
        /// Lock every listed GPU at MHZ, read the clock back, then reset it (needs root).
        #[arg(long, value_name = "MHZ")]
        try_lock: Option<u32>,
    },
    /// Give the SM clocks of the configured GPUs back to the driver (for ExecStopPost=).
    ResetClocks {
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Check a config file and exit (0 when valid).
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Replay a workload trace on the simulated H100 and vLLM, faster than real time, under a
    /// clock policy, and print energy, latency and EDP figures.
    #[cfg(feature = "lab")]
    Bench(BenchArgs),
    /// Drive an OpenAI-compatible server (vLLM or vllm-sim) with a load trace and print a
    /// `vllm bench serve`-style JSON report.
    Loadgen(LoadgenArgs),
    /// Tune vLLM server flags: launch trials from a search space and find the most throughput
    /// within the latency limits (resumable; see config/search-space.toml).
    Tune(TuneArgs),
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    study: proto::TuneStart,
    /// A GPU set (CUDA_VISIBLE_DEVICES value); repeat to run trials in parallel (overrides study.gpu_sets).
    #[arg(long = "gpu-set", value_name = "IDS")]
    gpu_sets: Vec<String>,
    /// Print the result summary as JSON.
    #[arg(long)]
    json: bool,
    /// Print the study's progress as one JSON line per change instead of a summary (how the
    /// daemon runs `agentctl tune start` studies and follows them).
    #[arg(long, hide = true)]
    progress_json: bool,
}

#[derive(Args)]
struct BackendArgs {
    /// Config file naming the backend and GPU indices.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Use the simulated GPU instead of NVML.
    #[arg(long)]
    simulate: bool,
}

#[cfg(feature = "lab")]
#[derive(Args)]
struct BenchArgs {
    /// CSV trace: seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens
    #[arg(long, value_name = "FILE")]
    trace: PathBuf,
    /// default | static:MHZ | oracle | agft | governor
    #[arg(long, default_value = "governor")]
    policy: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Mean time-to-first-token objective, seconds.
    #[arg(long, default_value_t = 0.5)]
    ttft_slo: f64,
    /// Mean time-per-output-token objective, seconds.
    #[arg(long, default_value_t = 0.05)]
    tpot_slo: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("load").required(true).args(["trace", "num_prompts"])))]
struct LoadgenArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8000
    #[arg(long)]
    url: String,
    /// Model name to send (default: the first model the server lists at /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// CSV trace: seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens
    #[arg(long, value_name = "FILE", conflicts_with = "num_prompts")]
    trace: Option<PathBuf>,
    /// Send exactly this many requests (as `vllm bench serve --num-prompts`).
    #[arg(long, value_name = "N")]
    num_prompts: Option<u32>,
    /// Mean request rate for --num-prompts, requests per second, or `inf` for all at once.
    #[arg(long, default_value = "inf", requires = "num_prompts", value_parser = parse_rate)]
    request_rate: f64,
    /// Shape of the gamma-distributed gaps: 1 is Poisson, below 1 burstier, `inf` evenly spaced.
    #[arg(long, default_value_t = 1.0, requires = "num_prompts")]
    burstiness: f64,
    /// Prompt tokens of every --num-prompts request.
    #[arg(long, default_value_t = 1024, requires = "num_prompts")]
    random_input_len: u32,
    /// Output tokens of every --num-prompts request.
    #[arg(long, default_value_t = 128, requires = "num_prompts")]
    random_output_len: u32,
    /// At most this many requests in flight.
    #[arg(long, value_name = "N")]
    max_concurrency: Option<usize>,
    /// Every prompt starts with the same this many tokens (prefix-cache sharing).
    #[arg(long, default_value_t = 0)]
    shared_prefix_tokens: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A request rate: a positive number or `inf`.
fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("`{s}` is not a number or `inf`"))?;
    if r.is_nan() || r <= 0.0 {
        return Err(format!("{s} must be > 0"));
    }
    Ok(r)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpu-agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        None => report(runtime.block_on(async {
            daemon::run(daemon::Options {
                config_path: cli.run.config,
                listen: cli.run.listen,
                simulate: cli.run.simulate,
                reset_model: cli.run.reset_model,
                socket: cli.run.socket,
            })
            .await
            .map_err(anyhow::Error::from)
        })),
        Some(Command::Inspect { metrics_file, url }) => runtime.block_on(inspect(metrics_file, url)),
        Some(Command::Gpus { backend, try_lock }) => report(gpus(&backend, try_lock)),
        Some(Command::ResetClocks { backend }) => report(reset_clocks(&backend)),
        Some(Command::CheckConfig { file }) => {
            report(Config::load(&file).map(|_| println!("{}: ok", file.display())).map_err(Into::into))
        }
        Some(Command::Loadgen(args)) => report(runtime.block_on(loadgen(args))),
        #[cfg(feature = "lab")]
        Some(Command::Bench(args)) => report(bench(&args)),
        Some(Command::Tune(args)) => runtime.block_on(tune(args)),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Prints an error chain on one line and maps it to exit code 1.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-agent: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line (`gpu_agent::error_chain`; anyhow's contexts are
/// sources too).
fn one_line(e: &anyhow::Error) -> String {
    gpu_agent::error_chain(e.as_ref())
}

/// Exit 2 on malformed input (one line naming the line number), 1 when it cannot be read.
async fn inspect(file: Option<PathBuf>, url: Option<String>) -> ExitCode {
    let text = match (file, url) {
        (Some(path), _) => match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("gpu-agent: cannot read {}: {e}", path.display());
                return ExitCode::from(1);
            }
        },
        (None, Some(url)) => match vllm_metrics::Scraper::new().fetch_text(&url, Duration::from_secs(5)).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("gpu-agent: {}", gpu_agent::error_chain(&e));
                return ExitCode::from(1);
            }
        },
        (None, None) => unreachable!("clap requires one of --metrics-file and --url"),
    };
    match vllm_metrics::inspect_text(&text) {
        Ok(json) => {
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu-agent: malformed metrics: {e}");
            ExitCode::from(2)
        }
    }
}

fn backend(args: &BackendArgs) -> anyhow::Result<(Arc<dyn GpuBackend>, Vec<u32>)> {
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let kind = if args.simulate { GpuBackendKind::Sim } else { cfg.gpu.backend };
    let indices = cfg.gpu.indices.clone();
    // Without a config file, NVML shows every GPU there is.
    let wanted = if args.config.is_some() || kind == GpuBackendKind::Sim { indices.clone() } else { Vec::new() };
    let backend = backends::open_gpu(kind, &wanted)?;
    let indices = if args.config.is_some() { indices } else { backend.devices().iter().map(|d| d.index).collect() };
    Ok((backend, indices))
}

fn gpus(args: &BackendArgs, try_lock: Option<u32>) -> anyhow::Result<()> {
    let (backend, indices) = backend(args)?;
    print!("{}", gpu::list_report(backend.as_ref()));
    if let Some(mhz) = try_lock {
        for i in indices {
            let before = backend.sample(i)?.sm_clock_mhz;
            let got = backend.lock_sm_clock(i, mhz).with_context(|| format!("locking GPU {i} at {mhz} MHz"));
            let reset = backend.reset_sm_clock(i);
            let got = got?;
            reset.with_context(|| format!("resetting GPU {i}"))?;
            let after = backend.sample(i)?.sm_clock_mhz;
            println!("GPU {i}: clock {before} MHz -> locked {mhz} MHz, read back {got} MHz -> reset, now {after} MHz");
        }
    }
    Ok(())
}

fn reset_clocks(args: &BackendArgs) -> anyhow::Result<()> {
    let (backend, indices) = backend(args)?;
    let mut failed = Vec::new();
    for i in &indices {
        if let Err(e) = backend.reset_sm_clock(*i) {
            eprintln!("gpu-agent: GPU {i}: {e}");
            failed.push(*i);
        }
    }
    if failed.is_empty() {
        println!("reset SM clocks of GPU {indices:?}");
        Ok(())
    } else {
        anyhow::bail!("could not reset GPU {failed:?}")
    }
}

async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    use loadgen::{LengthDist, Schedule};
    let schedule = match (&args.trace, args.num_prompts) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Schedule::from_csv(&text).with_context(|| format!("trace {}", path.display()))?
        }
        (None, Some(n)) => {
            let (prompt, output) =
                (LengthDist::Fixed(args.random_input_len), LengthDist::Fixed(args.random_output_len));
            for (name, v) in
                [("--random-input-len", args.random_input_len), ("--random-output-len", args.random_output_len)]
            {
                anyhow::ensure!(v > 0, "{name} must be at least 1");
            }
            if args.request_rate.is_infinite() {
                Schedule::infinite_rate(n, prompt, output)
            } else {
                Schedule::counted(n, args.request_rate, args.burstiness, prompt, output).context("--burstiness")?
            }
        }
        (None, None) => anyhow::bail!("give --trace FILE or --num-prompts N"),
    };
    let model = match args.model {
        Some(m) => m,
        None => loadgen::served_model(&args.url).await.context("--model not given")?,
    };
    let opts = loadgen::LoadOptions {
        max_concurrency: args.max_concurrency,
        shared_prefix_tokens: args.shared_prefix_tokens,
        ..Default::default()
    };
    let report = loadgen::run_http(&args.url, &model, &schedule, args.seed, &opts).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(feature = "lab")]
fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    use lab::bench::{run_bench, BenchOptions, BenchPolicy};
    let trace = lab::trace::Trace::load(&args.trace)?;
    let policy: BenchPolicy = args.policy.parse().map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
    let opts = BenchOptions {
        ttft_slo_s: args.ttft_slo,
        tpot_slo_s: args.tpot_slo,
        seed: args.seed,
        ..BenchOptions::default()
    };
    let r = run_bench(&trace, policy, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let v = serde_json::to_value(&r)?;
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                println!("{k:<24} {v}");
            }
        }
    }
    Ok(())
}

/// `gpu-agent tune`: exit 0 with the best flags, 2 on a bad space or command, 1 when the study
/// fails, 130 when stopped by SIGINT/SIGTERM (every server stopped; rerun to resume).
async fn tune(args: TuneArgs) -> ExitCode {
    let mut cfg = match tuner::study_config(&args.study, std::path::Path::new("tune"), backends::in_process_servers()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu-agent: {}", gpu_agent::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if !args.gpu_sets.is_empty() {
        if args.gpu_sets.iter().any(|g| g.trim().is_empty()) {
            eprintln!("gpu-agent: --gpu-set: empty GPU set");
            return ExitCode::from(2);
        }
        cfg.space.study.gpu_sets = args.gpu_sets;
    }
    let progress = tuner::study::SharedProgress::default();
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let mut study = tokio::spawn(tuner::run_study(cfg, progress.clone(), cancel_rx));
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        tracing::warn!("stopping the study: stopping its servers");
        let _ = cancel_tx.send(true);
    });
    if args.progress_json {
        let end = StudyEnd::of(relay_progress(&mut study, &progress).await);
        let mut last = progress.lock().map(|p| p.clone()).unwrap_or_default();
        last.running = 0;
        match &end {
            StudyEnd::Done(_) => {}
            StudyEnd::Stopped => {
                last.state = proto::StudyState::Stopped;
                last.message = Some("stopped; servers stopped; start it again to resume".into());
            }
            StudyEnd::Failed(why) => {
                last.state = proto::StudyState::Failed;
                last.message = Some(why.clone());
            }
        }
        print_progress(&last);
        return end.exit_code();
    }
    let end = StudyEnd::of(study.await);
    match &end {
        StudyEnd::Done(summary) => {
            let text = if args.json {
                serde_json::to_string_pretty(summary).unwrap_or_default() + "\n"
            } else {
                summary.text()
            };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = write!(std::io::stdout(), "{text}");
        }
        StudyEnd::Stopped => {
            eprintln!("gpu-agent: tune stopped; servers stopped; run the same command again to resume")
        }
        StudyEnd::Failed(why) => eprintln!("gpu-agent: tune: {why}"),
    }
    end.exit_code()
}

type StudyTask = tokio::task::JoinHandle<Result<tuner::report::StudySummary, tuner::TuneError>>;

/// How a study ended, whoever it is reported to.
enum StudyEnd {
    Done(Box<tuner::report::StudySummary>),
    Stopped,
    Failed(String),
}

impl StudyEnd {
    fn of(result: Result<Result<tuner::report::StudySummary, tuner::TuneError>, tokio::task::JoinError>) -> Self {
        match result {
            Ok(Ok(summary)) => StudyEnd::Done(Box::new(summary)),
            Ok(Err(tuner::TuneError::Stopped)) => StudyEnd::Stopped,
            Ok(Err(e)) => StudyEnd::Failed(gpu_agent::error_chain(&e)),
            Err(e) => StudyEnd::Failed(format!("the study task failed: {e}")),
        }
    }

    /// 0 with a result, 130 when stopped by SIGINT/SIGTERM, 1 when the study failed (also
    /// when it wrote its outputs but could not run a trial: a failed memory search).
    fn exit_code(&self) -> ExitCode {
        match self {
            StudyEnd::Done(s) if s.failure.is_some() => ExitCode::from(1),
            StudyEnd::Done(_) => ExitCode::SUCCESS,
            StudyEnd::Stopped => ExitCode::from(130),
            StudyEnd::Failed(_) => ExitCode::from(1),
        }
    }
}

/// One progress line on stdout (`tune --progress-json`).
fn print_progress(p: &proto::TuneProgress) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, p);
    let _ = writeln!(out);
    let _ = out.flush();
}

/// `tune --progress-json`: prints the study's progress whenever it changes until the study
/// ends, and returns how it ended.
async fn relay_progress(
    study: &mut StudyTask,
    progress: &tuner::study::SharedProgress,
) -> Result<Result<tuner::report::StudySummary, tuner::TuneError>, tokio::task::JoinError> {
    let snapshot = || progress.lock().map(|p| p.clone()).unwrap_or_default();
    let mut last = snapshot();
    print_progress(&last);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = &mut *study => return r,
            _ = tick.tick() => {
                let now = snapshot();
                if now != last {
                    print_progress(&now);
                    last = now;
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "lab")]
    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = lab::trace::Trace::load(std::path::Path::new("/nonexistent/t.csv")).expect_err("missing");
        let e = anyhow::Error::new(e).context("bench");
        assert_eq!(one_line(&e), "bench: cannot read trace /nonexistent/t.csv: No such file or directory (os error 2)");
        let plain = anyhow::Error::new(io).context("reading x");
        assert_eq!(one_line(&plain), "reading x: No such file or directory");
    }
}
