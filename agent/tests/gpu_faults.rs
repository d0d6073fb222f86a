//! NVML faults through the GPU backend trait: the daemon's decision loop (`Agent::cycle`) on a
//! simulated H100 whose calls are made to fail with `SimGpu::inject` (clock changes fail, reads
//! fail, GPU lost). vLLM is an in-process simulated vLLM that always answers, so every clock
//! change the agent makes comes from the policy, not from vLLM going away.
//! The daemon has no way to inject faults from outside, hence a library-level test; the faults
//! that can be made from outside are in the e2e crate's `tests/faults.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use gpu::GpuBackend;
use gpu_agent::config::{Config, GpuBackendKind, Mode};
use gpu_agent::daemon::Agent;
use sim::engine::EngineConfig;
use sim::gpu::{Fault, SimGpu};
use sim::server::SimServer;

const PIN: u32 = 1200;

/// The simulator's clock when nothing is locked (the driver boosts to the maximum).
fn unlocked_mhz() -> u32 {
    *SimGpu::clocks().last().expect("clocks")
}

struct Rig {
    gpu: Arc<SimGpu>,
    agent: Agent,
    cfg: Config,
    _server: SimServer,
    _state: tempfile::TempDir,
}

impl Rig {
    /// An agent pinned at [`PIN`] MHz on one simulated H100, scraping a simulated vLLM that runs
    /// on the same GPU.
    async fn pinned() -> Rig {
        let gpu = Arc::new(SimGpu::h100(1));
        let server = SimServer::start(EngineConfig::default(), gpu.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("simulated vLLM");
        let state = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.agent.state_dir = state.path().join("state");
        cfg.vllm.metrics_url = format!("http://{}/metrics", server.local_addr());
        cfg.gpu.backend = GpuBackendKind::Sim;
        cfg.gpu.indices = vec![0];
        cfg.policy.mode = Mode::Pinned(PIN);
        let backend: Arc<dyn GpuBackend> = gpu.clone();
        let agent = Agent::new(cfg.clone(), backend).expect("agent");
        Rig { gpu, agent, cfg, _server: server, _state: state }
    }

    async fn cycles(&mut self, n: usize) {
        for _ in 0..n {
            self.agent.cycle().await;
        }
    }

    /// Switches the policy as SIGHUP or `agentctl mode` would.
    fn mode(&mut self, mode: Mode) {
        self.cfg.policy.mode = mode;
        self.agent.reconfigure(self.cfg.clone()).expect("reconfigure");
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric(&self.agent.metrics.render(), name, labels)
    }

    fn errors(&self, op: &str) -> f64 {
        self.metric("gpu_agent_gpu_errors_total", &[("gpu", "0"), ("op", op)]).unwrap_or(0.0)
    }

    fn target_mhz(&self) -> f64 {
        self.metric("gpu_agent_clock_target_hertz", &[]).expect("clock target") / 1e6
    }

    fn cycles_total(&self) -> f64 {
        self.metric("gpu_agent_cycles_total", &[]).expect("cycles")
    }

    fn last_error(&self) -> String {
        self.agent.status.read().map(|s| s.last_error.clone().unwrap_or_default()).unwrap_or_default()
    }

    /// What the GPU itself runs at, read outside the agent.
    fn gpu_mhz(&self) -> u32 {
        self.gpu.clock_mhz()
    }

    /// Locked at the pin, as the agent and the GPU both say.
    async fn assert_pinned(&mut self) {
        assert_eq!(self.gpu_mhz(), PIN, "the GPU runs at the pinned clock");
        assert_eq!(self.target_mhz(), f64::from(PIN), "the agent reports the pinned clock");
        let sm = self.metric("gpu_agent_gpu_sm_clock_hertz", &[("gpu", "0")]);
        assert_eq!(sm, Some(f64::from(PIN) * 1e6), "the agent read the pinned clock back");
        assert_eq!(self.metric("gpu_agent_vllm_up", &[]), Some(1.0), "vLLM answers throughout");
    }
}

/// Value of the first sample of `name` carrying every `labels` pair, from Prometheus text.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let rest = rest.trim_end_matches('}');
        let all = labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        (n == name && all).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_fails_is_counted_retried_and_recovered_from() {
    let mut rig = Rig::pinned().await;
    rig.cycles(2).await;
    rig.assert_pinned().await;

    rig.gpu.inject(Fault::SetFails);
    // Nothing to change: a refusing GPU goes unnoticed while the clock stays where it is.
    rig.cycles(2).await;
    rig.assert_pinned().await;
    assert_eq!(rig.errors("set_clock"), 0.0);

    // The policy now wants the driver's clocks: every cycle tries the reset, and it fails.
    rig.mode(Mode::Default);
    let before = rig.cycles_total();
    rig.cycles(3).await;
    assert_eq!(rig.cycles_total() - before, 3.0, "every cycle completes");
    assert_eq!(rig.errors("set_clock"), 3.0, "each failed reset is counted");
    assert!(rig.last_error().contains("injected fault SetFails"), "status says why: {:?}", rig.last_error());
    assert_eq!(rig.gpu_mhz(), PIN, "the GPU refused the reset");
    assert_eq!(rig.target_mhz(), f64::from(PIN), "the agent does not pretend the clock was reset");

    // The GPU accepts calls again: the next cycle resets.
    rig.gpu.inject(Fault::None);
    rig.cycles(1).await;
    assert_eq!(rig.gpu_mhz(), unlocked_mhz(), "reset once the GPU accepts it");
    assert_eq!(rig.target_mhz(), 0.0);
    assert_eq!(rig.errors("set_clock"), 3.0);
    assert!(rig.last_error().is_empty(), "{:?}", rig.last_error());

    rig.mode(Mode::Pinned(PIN));
    rig.cycles(2).await; // locks in the first, reads the clock back in the second
    rig.assert_pinned().await;

    // Dropping the agent (any way out of the daemon) gives the clock back.
    let gpu = rig.gpu.clone();
    drop(rig);
    assert_eq!(gpu.clock_mhz(), unlocked_mhz(), "dropping the agent resets the clock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_fails_skip_the_samples_but_the_cycle_completes() {
    let mut rig = Rig::pinned().await;
    rig.cycles(2).await;
    rig.assert_pinned().await;
    let energy0 = rig.metric("gpu_agent_gpu_energy_joules_total", &[("gpu", "0")]).expect("energy");

    rig.gpu.inject(Fault::ReadFails);
    let before = rig.cycles_total();
    rig.cycles(3).await;
    assert_eq!(rig.cycles_total() - before, 3.0, "every cycle completes");
    assert_eq!(rig.errors("sample"), 3.0, "each failed read is counted");
    assert!(rig.agent.status.read().expect("status").samples.is_empty(), "no sample this cycle");
    assert_eq!(rig.metric("gpu_agent_vllm_up", &[]), Some(1.0));
    assert_eq!(rig.gpu_mhz(), PIN, "reads failing is no reason to move the clock");
    assert_eq!(rig.target_mhz(), f64::from(PIN));
    assert_eq!(rig.errors("set_clock"), 0.0);

    rig.gpu.inject(Fault::None);
    rig.cycles(1).await;
    rig.assert_pinned().await;
    assert_eq!(rig.agent.status.read().expect("status").samples.len(), 1, "samples are back");
    assert_eq!(rig.errors("sample"), 3.0);
    let energy1 = rig.metric("gpu_agent_gpu_energy_joules_total", &[("gpu", "0")]).expect("energy");
    assert!(energy1 >= energy0, "the energy counter never goes back: {energy0} -> {energy1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_gpu_fails_every_call_without_a_panic() {
    let mut rig = Rig::pinned().await;
    rig.cycles(2).await;
    rig.assert_pinned().await;

    rig.gpu.inject(Fault::Lost);
    rig.cycles(2).await;
    assert_eq!(rig.errors("sample"), 2.0, "reads fail");
    assert_eq!(rig.metric("gpu_agent_vllm_up", &[]), Some(1.0), "vLLM is still read");
    // A reset is tried (the policy changed) and fails too.
    rig.mode(Mode::Default);
    let before = rig.cycles_total();
    rig.cycles(2).await;
    assert_eq!(rig.cycles_total() - before, 2.0, "every cycle completes");
    assert_eq!(rig.errors("set_clock"), 2.0, "clock changes fail");
    assert_eq!(rig.errors("sample"), 4.0);
    assert!(rig.last_error().contains("is lost"), "status says the GPU is lost: {:?}", rig.last_error());

    // The GPU is back: the pending reset goes through, and pinning locks again.
    rig.gpu.inject(Fault::None);
    rig.cycles(1).await;
    assert_eq!(rig.gpu_mhz(), unlocked_mhz());
    assert_eq!(rig.target_mhz(), 0.0);
    rig.mode(Mode::Pinned(PIN));
    rig.cycles(2).await; // locks in the first, reads the clock back in the second
    rig.assert_pinned().await;
    assert_eq!(rig.errors("set_clock"), 2.0);
}

/// Finding F1 (docs/reliability.md, fixed): when locking fails and the reset that follows fails
/// too, the keeper used to record the clock it wanted as applied, so once the GPU recovered the
/// agent never locked it and reported a clock the GPU did not run at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_first_lock_is_retried_once_the_gpu_recovers() {
    let mut rig = Rig::pinned().await;
    rig.gpu.inject(Fault::SetFails);
    rig.cycles(2).await;
    assert!(rig.errors("set_clock") >= 1.0, "the lock failed");
    assert_eq!(rig.gpu_mhz(), unlocked_mhz(), "nothing was locked");
    assert_eq!(rig.target_mhz(), 0.0, "the agent must not report a clock it did not set");

    rig.gpu.inject(Fault::None);
    rig.cycles(2).await;
    rig.assert_pinned().await;
}

/// Finding F2 (docs/reliability.md, fixed): the agent did not compare the clock it reads back
/// with the one it locked, so a GPU that came back from a reset at default clocks (or a clock
/// reset by another tool) stayed unpinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_clock_is_reapplied_after_the_gpu_was_reset() {
    let mut rig = Rig::pinned().await;
    rig.cycles(2).await;
    rig.assert_pinned().await;

    rig.gpu.inject(Fault::Lost);
    rig.cycles(2).await;
    // The GPU comes back from a reset with driver-managed clocks.
    rig.gpu.inject(Fault::None);
    rig.gpu.reset_sm_clock(0).expect("reset");
    rig.cycles(3).await;
    rig.assert_pinned().await;
}
