//! The daemon's HTTP routes: `/metrics`, `/healthz` (the loop is alive), `/readyz` (vLLM answers).

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use super::metrics::AgentMetrics;
use super::SharedStatus;
use crate::http::{Reply, Routes, PROMETHEUS_TEXT};

/// Where the AIBrix-compatible `GET /metrics/{namespace}/{deployment}` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct AibrixTarget {
    pub namespace: String,
    pub deployment: String,
    pub units_per_replica: u32,
}

impl AibrixTarget {
    pub fn from_config(cfg: &crate::config::AdvisorSection) -> Option<Self> {
        cfg.enabled.then(|| Self {
            namespace: cfg.namespace.clone(),
            deployment: cfg.deployment.clone(),
            units_per_replica: cfg.aibrix_units_per_replica,
        })
    }
}

/// `vllm:deployment_replicas` for AIBrix; the last good suggestion while data is stale, and
/// 503 (never 0) while there is none.
fn aibrix(st: &super::Status, namespace: &str, deployment: &str) -> Reply {
    let Some(t) = &st.aibrix else {
        return Reply::text(StatusCode::NOT_FOUND, "the replica advisor is disabled (advisor.enabled = false)\n");
    };
    if t.namespace != namespace || t.deployment != deployment {
        return Reply::text(
            StatusCode::NOT_FOUND,
            format!("no advice for {namespace}/{deployment}: this agent advises {}/{}\n", t.namespace, t.deployment),
        );
    }
    match st.advice.as_ref().and_then(|a| Some((a, a.suggestion?))) {
        Some((a, s)) if !a.model.is_empty() => Reply {
            status: StatusCode::OK,
            content_type: PROMETHEUS_TEXT,
            body: advisor::metrics::deployment_replicas_text(&a.model, s.replicas, t.units_per_replica),
        },
        _ => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no suggestion yet: {}\n",
                st.advice.as_ref().map_or("no advisor cycle has run", |a| a.reason.as_str())
            ),
        ),
    }
}

#[derive(Debug)]
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
            "/metrics" => Reply { status: StatusCode::OK, content_type: PROMETHEUS_TEXT, body: self.metrics.render() },
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
            other => match other.strip_prefix("/metrics/").and_then(|rest| rest.split_once('/')) {
                Some((namespace, deployment)) if !namespace.is_empty() && !deployment.contains('/') => {
                    let st = self.status.read().unwrap_or_else(|p| p.into_inner());
                    aibrix(&st, namespace, deployment)
                }
                _ => Reply::text(
                    StatusCode::NOT_FOUND,
                    "not found: try /metrics, /metrics/{namespace}/{deployment}, /healthz or /readyz\n",
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdvisorSection;
    use advisor::{Advisor, Context};

    fn status(replicas: Option<u32>) -> super::super::Status {
        let cfg = AdvisorSection { namespace: "ml".into(), deployment: "llama".into(), ..AdvisorSection::default() };
        let ctx = Context {
            now_s: 0.0,
            model: "m",
            gpu: "",
            clock_mhz: 1980.0,
            window_clock_mhz: 1980.0,
            max_clock_mhz: 1980.0,
            objectives: objectives::Objectives { ttft_s: 0.5, tpot_s: 0.05 },
            replicas,
        };
        super::super::Status {
            aibrix: AibrixTarget::from_config(&cfg),
            advice: Some(Advisor::new(cfg).observe(None, &ctx)),
            ..Default::default()
        }
    }

    #[test]
    fn aibrix_endpoint_answers_for_its_deployment_and_never_with_zero() {
        // Known replica count, no data yet: the current count, in hundredths.
        let r = aibrix(&status(Some(3)), "ml", "llama");
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.contains("vllm:deployment_replicas{model_name=\"m\"} 300\n"), "{}", r.body);
        // Unknown replica count: 503 with the reason, not a 0.
        let r = aibrix(&status(None), "ml", "llama");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.body.contains("replica count unknown"), "{}", r.body);
        assert_eq!(aibrix(&status(Some(3)), "ml", "other").status, StatusCode::NOT_FOUND);
        let off = super::super::Status::default();
        assert!(aibrix(&off, "ml", "llama").body.contains("disabled"));
    }
}
