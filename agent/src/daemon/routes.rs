//! The daemon's HTTP routes: `/metrics`, `/healthz` (the loop is alive), `/readyz` (vLLM answers).

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use super::metrics::AgentMetrics;
use super::SharedStatus;
use crate::http::{Reply, Routes, PROMETHEUS_TEXT};

pub struct AgentRoutes {
    metrics: Arc<AgentMetrics>,
    status: SharedStatus,
}

impl AgentRoutes {
    pub fn new(metrics: Arc<AgentMetrics>, status: SharedStatus) -> Self {
        Self { metrics, status }
    }
}

impl Routes for AgentRoutes {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply {
                status: StatusCode::OK,
                content_type: PROMETHEUS_TEXT,
                body: self.metrics.render(),
            },
            "/healthz" => {
                let st = self.status.read().unwrap_or_else(|p| p.into_inner());
                // Alive while cycles keep coming; before the first cycle give it a grace period.
                let stale = Duration::from_secs_f64(st.period_seconds * 3.0 + 1.0);
                match st.last_cycle {
                    Some(t) if t.elapsed() > stale => Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("decision loop stalled: last cycle {:.1} s ago\n", t.elapsed().as_secs_f64()),
                    ),
                    _ => Reply::text(StatusCode::OK, "ok\n"),
                }
            }
            "/readyz" => {
                let st = self.status.read().unwrap_or_else(|p| p.into_inner());
                if st.vllm_up {
                    Reply::text(StatusCode::OK, "ready\n")
                } else if st.cycles == 0 {
                    Reply::text(StatusCode::SERVICE_UNAVAILABLE, "starting: no cycle yet\n")
                } else {
                    Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("vLLM not answering ({} failed scrapes)\n", st.vllm_failures),
                    )
                }
            }
            _ => Reply::text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n"),
        }
    }
}
