//! `agentctl`: operate a running gpu-agent over its Unix socket.
//! Exit codes: 0 success, 1 refused or failed (the agent's message), 2 usage, 3 unreachable.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use proto::{
    AdviceReport, Client, ClientError, ModelCmd, Request, Response, StatusReport, TuneCmd, TuneProgress, TuneReply,
    TuneStart, DEFAULT_SOCKET,
};

#[derive(Parser)]
#[command(name = "agentctl", version, about = "Control a running gpu-agent")]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "AGENTCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// GPUs, clocks, mode, governor phase, last window, objectives, uptime.
    Status,
    /// Set the clock policy: slo, edp, observe or default.
    Mode {
        #[arg(value_parser = parse_mode)]
        mode: proto::Mode,
    },
    /// Lock the SM clock of the agent's GPUs at MHZ until `unpin`.
    Pin { mhz: u32 },
    /// Drop a pin and go back to the mode before it.
    Unpin,
    /// Change the latency objectives (seconds).
    Slo {
        #[arg(long)]
        ttft: Option<f64>,
        #[arg(long)]
        tpot: Option<f64>,
    },
    /// The governor's learnt model: reset, export FILE, import FILE.
    Model {
        #[command(subcommand)]
        cmd: ModelArg,
    },
    /// Re-read the agent's config file (as SIGHUP does).
    Reload,
    /// Live status, refreshed each decision cycle.
    Watch {
        /// Seconds between refreshes [default: the agent's decision period]
        #[arg(long)]
        interval: Option<f64>,
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Trial launcher: tune vLLM flags in the agent (start, status, stop, results).
    Tune {
        #[command(subcommand)]
        cmd: TuneArg,
    },
    /// Replica advice: demand, capacity, suggestion.
    Advice,
}

#[derive(Subcommand)]
enum TuneArg {
    /// Start (or resume) a study; with --wait, follow it with a progress bar to the end.
    Start {
        #[command(flatten)]
        study: TuneStart,
        /// Follow the study with a progress bar until it ends (exit 1 unless it finished).
        #[arg(long)]
        wait: bool,
    },
    /// Where the study stands; --follow shows a progress bar until it ends.
    Status {
        #[arg(long)]
        follow: bool,
    },
    /// Stop the study (its servers are stopped; start it again to resume).
    Stop,
    /// The finished study's result.json.
    Results,
}

#[derive(Subcommand)]
enum ModelArg {
    /// Forget what the governor learnt for this GPU and vLLM model.
    Reset,
    /// Save the learnt model as JSON to FILE (written by agentctl, as you), or to stdout.
    Export { file: Option<PathBuf> },
    /// Load a model saved by `export` (read by agentctl, as you).
    Import { file: PathBuf },
}

/// `agentctl mode`: the modes that are not a pin (`agentctl pin MHZ` pins).
fn parse_mode(s: &str) -> Result<proto::Mode, String> {
    match s.parse::<proto::Mode>() {
        Ok(proto::Mode::Pinned(_)) => Err("use `agentctl pin MHZ` to pin a clock".into()),
        Ok(m) => Ok(m),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::Status | Command::Watch { .. } => Request::Status,
        Command::Mode { mode } => Request::SetMode(*mode),
        Command::Pin { mhz } => Request::Pin(*mhz),
        Command::Unpin => Request::Unpin,
        Command::Slo { ttft, tpot } => {
            if ttft.is_none() && tpot.is_none() {
                eprintln!("agentctl: slo needs --ttft and/or --tpot");
                return ExitCode::from(2);
            }
            Request::SetSlo { ttft_s: *ttft, tpot_s: *tpot }
        }
        Command::Model { cmd } => Request::Model(match cmd {
            ModelArg::Reset => ModelCmd::Reset,
            ModelArg::Export { .. } => ModelCmd::Export,
            // The client reads and writes model files as the calling user, never the root agent.
            ModelArg::Import { file } => match std::fs::read_to_string(file) {
                Ok(text) => ModelCmd::Import(text),
                Err(e) => {
                    eprintln!("agentctl: cannot read {}: {e}", file.display());
                    return ExitCode::from(1);
                }
            },
        }),
        Command::Reload => Request::Reload,
        Command::Tune { cmd } => Request::Tune(match cmd {
            TuneArg::Start { study, .. } => TuneCmd::Start(TuneStart {
                space: absolute(&study.space),
                study_dir: study.study_dir.as_deref().map(absolute),
                ..study.clone()
            }),
            TuneArg::Status { .. } => TuneCmd::Status,
            TuneArg::Stop => TuneCmd::Stop,
            TuneArg::Results => TuneCmd::Results,
        }),
        Command::Advice => Request::Advice,
    };
    let mut client = match Client::connect(&cli.socket) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Command::Watch { interval, count } = &cli.command {
        return watch(&mut client, *interval, *count, cli.json);
    }
    let follow = matches!(
        &cli.command,
        Command::Tune { cmd: TuneArg::Start { wait: true, .. } | TuneArg::Status { follow: true } }
    );
    // `model export FILE`: agentctl writes the file, as the calling user.
    let export_file = match &cli.command {
        Command::Model { cmd: ModelArg::Export { file: Some(file) } } => Some(file.as_path()),
        _ => None,
    };
    match client.call(&request) {
        Ok(resp @ Response::Tune(TuneReply::Progress(_))) if follow => follow_study(&mut client, &resp, cli.json),
        Ok(Response::ModelState(state)) => match export_file {
            Some(file) => save_model(file, &state, cli.json),
            None => show(&Response::ModelState(state), cli.json),
        },
        Ok(resp) => show(&resp, cli.json),
        Err(e) => fail(&e),
    }
}

/// Writes an exported model to `file` as the calling user.
fn save_model(file: &std::path::Path, state: &str, json: bool) -> ExitCode {
    if let Err(e) = std::fs::write(file, state) {
        eprintln!("agentctl: cannot write {}: {e}", file.display());
        return ExitCode::from(1);
    }
    show(&Response::Ok(format!("governor model written to {}", file.display())), json)
}

/// Polls the study with a progress bar (on a terminal) until it is no longer running; exit 0
/// when it finished, 1 when it failed or was stopped.
fn follow_study(client: &mut Client, first: &Response, json: bool) -> ExitCode {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} trials {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut resp = first.clone();
    loop {
        let Response::Tune(TuneReply::Progress(p)) = &resp else { return show(&resp, json) };
        bar.set_prefix(format!("{} ({})", p.study, p.phase));
        bar.set_length(u64::from(p.trials_total));
        bar.set_position(u64::from(p.trials_done));
        bar.set_message(match p.best_score {
            Some(b) => format!("best {b:.2} req/s, {} failed", p.trials_failed),
            None => format!("{} failed", p.trials_failed),
        });
        if p.state != proto::StudyState::Running {
            bar.finish_and_clear();
            let code = if p.state == proto::StudyState::Finished { ExitCode::SUCCESS } else { ExitCode::from(1) };
            let _ = show(&resp, json);
            return code;
        }
        std::thread::sleep(Duration::from_millis(300));
        resp = match client.call(&Request::Tune(TuneCmd::Status)) {
            Ok(r) => r,
            Err(e) => {
                bar.abandon();
                return fail(&e);
            }
        };
    }
}

/// The readable study progress.
fn tune_table(p: &TuneProgress) -> String {
    if p.study.is_empty() {
        return format!("study      none since the agent started ({})\n", p.state);
    }
    let mut o = format!("study      {} ({}), {}\n", p.study, p.state, p.phase);
    if !p.study_dir.is_empty() {
        o += &format!("directory  {}\n", p.study_dir);
        o += &format!(
            "trials     {}/{} done ({} failed, {} running), strategy {}\n",
            p.trials_done, p.trials_total, p.trials_failed, p.running, p.strategy
        );
        o += &format!(
            "throughput best {}, baseline {} (req/s within the limits)\n",
            opt(p.best_score, 1.0, "", 2),
            opt(p.baseline_score, 1.0, "", 2)
        );
        if !p.best_flags.is_empty() {
            let flags: Vec<String> = p.best_flags.iter().map(|(k, v)| format!("--{k} {v}")).collect();
            o += &format!("best flags {}\n", flags.join(" "));
        }
    }
    if let Some(m) = &p.message {
        o += &format!("note       {m}\n");
    }
    o
}

/// The agent may run in another directory: send it absolute paths.
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn fail(e: &ClientError) -> ExitCode {
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        line = format!("{line}: {c}");
        cause = c.source();
    }
    eprintln!("agentctl: {line}");
    match e {
        ClientError::Unreachable { .. } => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

/// Prints a report as pretty JSON for scripts, or as its readable table.
fn json_or_table<T: serde::Serialize>(report: &T, json: bool, table: fn(&T) -> String) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
    } else {
        print!("{}", table(report));
    }
    ExitCode::SUCCESS
}

fn show(resp: &Response, json: bool) -> ExitCode {
    match resp {
        Response::ModelState(text) | Response::Tune(TuneReply::Results(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Response::Ok(msg) => {
            if json {
                println!("{}", serde_json::json!({ "ok": true, "message": msg }));
            } else {
                println!("{msg}");
            }
            ExitCode::SUCCESS
        }
        Response::Status(s) => json_or_table(s.as_ref(), json, table),
        Response::Tune(TuneReply::Progress(p)) => json_or_table(p.as_ref(), json, tune_table),
        Response::Advice(a) => json_or_table(a.as_ref(), json, advice_table),
        Response::Error { kind, message } => {
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": format!("{kind:?}"), "message": message }));
            }
            eprintln!("agentctl: {message}");
            ExitCode::from(1)
        }
    }
}

fn watch(client: &mut Client, interval: Option<f64>, count: Option<u64>, json: bool) -> ExitCode {
    let clear = std::io::stdout().is_terminal() && !json;
    let mut shown = 0u64;
    loop {
        let resp = match client.call(&Request::Status) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let Response::Status(s) = &resp else { return show(&resp, json) };
        let mut frame = String::new();
        if clear {
            frame += "\x1b[2J\x1b[H";
        }
        if json {
            frame += &serde_json::to_string(s).unwrap_or_default();
            frame += "\n";
        } else {
            frame += &table(s);
            frame += "\n";
        }
        // `agentctl watch | head` closes the pipe: stop quietly instead of panicking in print!.
        let mut stdout = std::io::stdout().lock();
        if stdout.write_all(frame.as_bytes()).and_then(|()| stdout.flush()).is_err() {
            return ExitCode::SUCCESS;
        }
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return ExitCode::SUCCESS;
        }
        let secs = interval.unwrap_or(s.period_s).clamp(0.05, 3600.0);
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

fn opt(v: Option<f64>, scale: f64, unit: &str, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.*}{unit}", digits, v * scale))
}

/// The readable status table.
fn table(s: &StatusReport) -> String {
    let mut o = String::new();
    let clock = s.locked_mhz.map_or("driver-managed".to_string(), |m| format!("locked at {m} MHz"));
    o += &format!(
        "agent      gpu-agent {}, up {:.0} s, {} cycles of {} s\n",
        s.agent_version, s.uptime_s, s.cycles, s.period_s
    );
    o += &format!(
        "mode       {} (phase {}), clock {clock}\n",
        s.mode,
        s.phase.map_or_else(|| "-".to_string(), |p| p.to_string())
    );
    o += &format!("objectives TTFT {:.0} ms, TPOT {:.0} ms\n", s.ttft_slo_s * 1e3, s.tpot_slo_s * 1e3);
    o += &format!("vllm       {} ({})\n", s.vllm_url, if s.vllm_up { "up" } else { "NOT ANSWERING" });
    if let Some(w) = &s.window {
        o += &format!(
            "window     {} req/s, {} tok/s out, running {}, waiting {}, KV {}, TTFT {}, ITL {}\n",
            opt(w.request_rate, 1.0, "", 1),
            opt(w.generation_tokens_rate, 1.0, "", 0),
            opt(w.running, 1.0, "", 0),
            opt(w.waiting, 1.0, "", 0),
            opt(w.kv_cache_usage, 100.0, "%", 0),
            opt(w.ttft_mean_s, 1e3, " ms", 1),
            opt(w.itl_mean_s, 1e3, " ms", 1),
        );
    }
    if let Some(g) = &s.governor {
        o += &format!(
            "governor   {} decisions, converged {}, reward {}, EDP/token {}\n",
            g.decisions,
            g.converged_after.map_or("no".to_string(), |n| format!("after {n}")),
            opt(g.reward, 1.0, "", 3),
            opt(g.edp_per_token, 1e3, " mJ*s", 4),
        );
    }
    o += "GPU  NAME                                 CLOCKS (MHz)  SM (MHz)  POWER (W)  ENERGY (J)\n";
    for g in &s.gpus {
        o += &format!(
            "{:<4} {:<36} {:>5}..{:<5}  {:>8}  {:>9}  {:>10}\n",
            g.index,
            g.name,
            g.min_mhz,
            g.max_mhz,
            g.sm_clock_mhz.map_or("-".into(), |v| v.to_string()),
            opt(g.power_w, 1.0, "", 1),
            opt(g.energy_j, 1.0, "", 0),
        );
    }
    if let Some(e) = &s.last_error {
        o += &format!("last error {e}\n");
    }
    o
}

/// The readable `agentctl advice` report.
fn advice_table(a: &AdviceReport) -> String {
    let mut o = String::new();
    let model = if a.model.is_empty() { "-" } else { a.model.as_str() };
    o += &format!(
        "advice     {model} at {:.0} MHz, objectives TTFT {:.0} ms, TPOT {:.0} ms{}\n",
        a.clock_mhz,
        a.ttft_slo_s * 1e3,
        a.tpot_slo_s * 1e3,
        if a.stale { format!(", STALE (no usable data for {:.0} s)", a.data_age_s) } else { String::new() }
    );
    match &a.demand {
        Some(d) => {
            o += &format!(
                "demand     {:.2} req/s, {:.0} prompt / {:.0} output tokens, running {:.0}, waiting {:.0}: {:.2} replicas\n",
                d.arrival_rate, d.mean_prompt_tokens, d.mean_output_tokens, d.running, d.waiting, d.replicas
            );
        }
        None => o += "demand     -\n",
    }
    o += &format!(
        "online     {}, fit alpha {:.2} ms + beta {:.3} ms/request + delta {:.4} ms/prompt token ({:.0} windows)\n",
        a.online.as_ref().map_or("-".into(), |c| format!(
            "{:.2} req/s (weight {:.0}%, limited by the {}; TPOT {:.0} ms, TTFT {:.0} ms there; load seen up to {:.0}% of it)",
            c.max_rate,
            c.weight * 100.0,
            c.limit,
            c.predicted_tpot_s * 1e3,
            c.predicted_ttft_s * 1e3,
            c.observed_share * 100.0
        )),
        a.fit.alpha_s * 1e3,
        a.fit.beta_s * 1e3,
        a.fit.delta_s * 1e3,
        a.fit.observations,
    );
    o += &format!(
        "profile    {}\n",
        a.profile.as_ref().map_or("-".into(), |p| format!(
            "{:.2} req/s ({:.2} measured at {} for {}/{} tokens, {})",
            p.max_rate,
            p.measured_rate,
            p.measured_clock_mhz.map_or("driver clocks".into(), |m| format!("{m} MHz")),
            p.bucket_prompt_tokens,
            p.bucket_output_tokens,
            p.path
        ))
    );
    o += &format!(
        "capacity   {} per replica, headroom {}\n",
        opt(a.capacity_rate, 1.0, " req/s", 2),
        opt(a.headroom_rate, 1.0, " req/s", 2)
    );
    let n = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    o += &format!(
        "replicas   current {}, desired {}, suggested {}\n",
        n(a.current_replicas),
        n(a.desired_replicas),
        n(a.suggested_replicas)
    );
    o += &format!("why        {}\n", a.reason);
    o
}
