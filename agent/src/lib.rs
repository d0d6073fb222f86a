//! gpu-agent, the daemon: the decision loop that governs GPU clocks, the control socket, the
//! HTTP endpoints and the config. The bandit, the advisor and the tuner are crates of their own
//! (see docs/architecture.md).

pub mod backends;
pub mod config;
pub mod control;
pub mod daemon;
pub mod http;

/// An error and its causes on one line (`what failed: why: why`), for logs and the binaries'
/// last word. Errors keep their causes as `source`, so each appears once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
