//! The daemon's life: start (config, GPU backend or simulation, HTTP server, control socket,
//! systemd readiness), the loop that runs a decision cycle each period and answers control
//! requests and signals, config reloads, and the way out (the clocks reset on every path).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use std::sync::Arc;

use gpu::GpuBackend;

use super::{routes, systemd, Agent, DaemonError, Options};
use crate::backends;
use crate::config::{Config, ConfigError, GpuBackendKind};

/// Runs the daemon until SIGTERM/SIGINT. Clocks are reset on every way out.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let mut cfg = match &opts.config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(addr) = opts.listen {
        cfg.agent.listen = addr;
    }
    if let Some(sock) = &opts.socket {
        cfg.control.socket = sock.clone();
    }

    // The simulation owns the simulated GPU, vLLM and load; it lives as long as the daemon.
    let (gpu, _sim): (Arc<dyn GpuBackend>, Option<backends::Simulation>) = if opts.simulate {
        let sim = backends::start_simulation(cfg.gpu.indices.len()).await?;
        cfg.gpu.backend = GpuBackendKind::Sim;
        cfg.gpu.indices = (0..u32::try_from(cfg.gpu.indices.len()).unwrap_or(u32::MAX)).collect();
        cfg.vllm.metrics_url = sim.metrics_url();
        if opts.config_path.is_none() {
            // No root needed to try it: state and socket in the temp dir.
            cfg.agent.state_dir = std::env::temp_dir().join("gpu-agent-simulate");
            if opts.socket.is_none() {
                cfg.control.socket = std::env::temp_dir().join("gpu-agent-simulate/agent.sock");
            }
        }
        info!(url = %sim.base_url(), "simulated vLLM serving a built-in varying load");
        (sim.gpu(), Some(sim))
    } else {
        (backends::open_gpu(cfg.gpu.backend, &cfg.gpu.indices)?, None)
    };

    let listener = crate::http::bind(cfg.agent.listen)
        .await
        .map_err(|source| DaemonError::Listen { addr: cfg.agent.listen, source })?;
    let control = match crate::control::ControlSocket::bind(&cfg.control.socket) {
        Ok(c) => Some(c),
        // A second simulation on one laptop still runs, just without agentctl.
        Err(e) if opts.simulate => {
            warn!(error = %crate::error_chain(&e), "running without a control socket");
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(c), Some(gid)) = (&control, cfg.control.group) {
        c.set_group(gid)?;
    }
    let mut agent = Agent::new(cfg.clone(), gpu)?;
    agent.clocks.take_over();
    if opts.reset_model {
        agent.steering.reset_on_start();
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let routes = Arc::new(routes::AgentRoutes::new(agent.metrics.clone(), agent.status.clone()));
    let server = tokio::spawn(crate::http::serve(listener, routes, stop_rx.clone()));
    let (control_tx, mut control_rx) = mpsc::channel::<crate::control::ControlCall>(64);
    if let Some(c) = control {
        info!(socket = %c.path().display(), "agentctl --socket {} status", c.path().display());
        let policy = crate::control::AccessPolicy::from_config(&cfg.control);
        tokio::spawn(c.serve(policy, control_tx, stop_rx));
    }
    let mut signals = signal_channel().map_err(DaemonError::Signals)?;
    info!(listen = %cfg.agent.listen, vllm = %cfg.vllm.metrics_url, gpu = agent.gpu.kind(), "gpu-agent running");

    let mut ticker = tokio::time::interval(Duration::from_secs_f64(cfg.agent.period_seconds));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sd = systemd::Systemd::new();
    let mut ready = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                agent.cycle().await;
                if !ready {
                    // Ready once the HTTP server, the socket and one full cycle are up.
                    sd.ready(&format!("serving on {}", cfg.agent.listen));
                    ready = true;
                }
                sd.cycle_done();
            }
            Some(call) = control_rx.recv() => {
                let response = match call.request {
                    proto::Request::Reload => match reload(&mut agent, &opts, &mut ticker) {
                        Ok(msg) => proto::Response::Ok(msg),
                        Err(e) => crate::control::error(proto::ErrorKind::Failed, crate::error_chain(&e)),
                    },
                    request => agent.handle_control(request),
                };
                tracing::debug!(uid = call.peer.uid, pid = call.peer.pid, "control request answered");
                let _ = call.reply.send(response);
            }
            sig = signals.recv() => match sig {
                Some(Signal::Reload) => {
                    sd.reloading();
                    match reload(&mut agent, &opts, &mut ticker) {
                        Ok(msg) => info!("{msg}"),
                        Err(e) => error!("{}", crate::error_chain(&e)),
                    }
                    sd.ready("config reloaded");
                }
                Some(Signal::Stop) | None => break,
            }
        }
    }
    sd.stopping();
    agent.tuner.shutdown().await;
    agent.steering.save();
    info!("shutting down: resetting clocks");
    if let Err(e) = agent.clocks.reset_all() {
        error!(error = %e, "could not reset clocks on exit");
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no --config file to reload")]
    NoConfigFile,
    #[error("config reload failed; keeping the old config")]
    Load(#[source] ConfigError),
    #[error("config reload rejected; keeping the old config")]
    Rejected(#[source] DaemonError),
}

/// Re-reads the config file (SIGHUP, `agentctl reload`). A bad file changes nothing.
fn reload(agent: &mut Agent, opts: &Options, ticker: &mut tokio::time::Interval) -> Result<String, ReloadError> {
    let Some(path) = &opts.config_path else {
        return Err(ReloadError::NoConfigFile);
    };
    let mut new = Config::load(path).map_err(ReloadError::Load)?;
    if opts.simulate {
        new.gpu = agent.cfg.gpu.clone();
        new.vllm.metrics_url = agent.cfg.vllm.metrics_url.clone();
    }
    if new.agent.listen != agent.cfg.agent.listen {
        warn!("agent.listen changed: restart the agent to move the HTTP server");
        new.agent.listen = agent.cfg.agent.listen;
    }
    if new.control != agent.cfg.control {
        warn!("[control] changed: restart the agent to apply it");
        new.control = agent.cfg.control.clone();
    }
    if new.agent.state_dir != agent.cfg.agent.state_dir {
        warn!("agent.state_dir changed: restart the agent to move the store");
        new.agent.state_dir = agent.cfg.agent.state_dir.clone();
    }
    let period_changed = new.agent.period_seconds != agent.cfg.agent.period_seconds;
    let period = new.agent.period_seconds;
    agent.reconfigure(new).map_err(ReloadError::Rejected)?;
    if period_changed {
        *ticker = tokio::time::interval(Duration::from_secs_f64(period));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    Ok(format!("config reloaded from {}", path.display()))
}

enum Signal {
    Stop,
    Reload,
}

/// Forwards SIGTERM/SIGINT/SIGHUP (via signal-hook, on its own thread) into the async loop.
fn signal_channel() -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            let msg = if sig == SIGHUP { Signal::Reload } else { Signal::Stop };
            if tx.send(msg).is_err() {
                break;
            }
        }
    })?;
    Ok(rx)
}
