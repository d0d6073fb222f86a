//! systemd integration (`Type=notify`): readiness, reload and stop notices, and the watchdog,
//! fed from the decision loop so that a stalled loop gets the service restarted.
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::debug;

#[derive(Debug)]
pub struct Systemd {
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Systemd {
    pub fn new() -> Systemd {
        Systemd { watchdog: sd_notify::watchdog_enabled(), last_ping: None }
    }

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        Self::send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => Self::send(&[NotifyState::Reloading, now]),
            Err(_) => Self::send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        Self::send(&[NotifyState::Stopping]);
    }

    /// Called once per decision cycle: pings at least twice per watchdog interval.
    pub fn cycle_done(&mut self) {
        let Some(interval) = self.watchdog else { return };
        if self.last_ping.is_none_or(|t| t.elapsed() >= interval / 2) {
            Self::send(&[NotifyState::Watchdog]);
            self.last_ping = Some(Instant::now());
        }
    }
}

impl Default for Systemd {
    fn default() -> Self {
        Self::new()
    }
}
