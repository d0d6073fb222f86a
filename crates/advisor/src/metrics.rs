//! The advisor's Prometheus gauges (registered in the agent's registry). Per-model series
//! appear with the first estimate and keep their last good value while data is missing, so an
//! autoscaler never reads a missing estimate as 0; `gpu_agent_advisor_stale` says when.

use prometheus::{Gauge, GaugeVec, Opts, Registry};

use super::Advice;

#[derive(Debug)]
pub struct AdvisorMetrics {
    demand: GaugeVec,
    arrival: GaugeVec,
    prompt: GaugeVec,
    output: GaugeVec,
    capacity: GaugeVec,
    headroom: GaugeVec,
    current: GaugeVec,
    suggested: GaugeVec,
    stale: Gauge,
    age: Gauge,
}

fn vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, prometheus::Error> {
    let g = GaugeVec::new(Opts::new(name, help).namespace("gpu_agent"), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn one(r: &Registry, name: &str, help: &str) -> Result<Gauge, prometheus::Error> {
    let g = Gauge::with_opts(Opts::new(name, help).namespace("gpu_agent"))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl AdvisorMetrics {
    pub fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let m = &["model_name"];
        let stale = one(r, "advisor_stale", "1 while the advisor has had no usable vLLM window for advisor.stale_after_seconds (values are the last good ones).")?;
        stale.set(1.0);
        Ok(Self {
            demand: vec(r, "advisor_demand_replicas", "This replica's demand in replicas (arrivals over capacity); summed over pods, the replicas the load needs.", m)?,
            arrival: vec(r, "advisor_arrival_rate_requests_per_second", "Requests per second arriving at this replica (smoothed).", m)?,
            prompt: vec(r, "advisor_mean_prompt_tokens", "Mean prompt length of the requests (smoothed).", m)?,
            output: vec(r, "advisor_mean_output_tokens", "Mean output length of the requests (smoothed).", m)?,
            capacity: vec(
                r,
                "advisor_capacity_requests_per_second",
                "Requests per second one replica sustains within the latency objectives, by source (online, profile, combined).",
                &["model_name", "source"],
            )?,
            headroom: vec(r, "advisor_headroom_requests_per_second", "Capacity minus arrivals on this replica.", m)?,
            current: vec(r, "advisor_current_replicas", "The Deployment's replica count the advisor was told.", m)?,
            suggested: vec(r, "advisor_suggested_replicas", "Replicas the advisor suggests for the Deployment (smoothed, never 0).", m)?,
            stale,
            age: one(r, "advisor_data_age_seconds", "Seconds since the advisor's last usable vLLM window.")?,
        })
    }

    /// Records one cycle's advice.
    pub fn record(&self, a: &Advice) {
        self.stale.set(if a.stale { 1.0 } else { 0.0 });
        self.age.set(a.data_age_s);
        if a.model.is_empty() {
            return;
        }
        let m = [a.model.as_str()];
        let set = |g: &GaugeVec, v: Option<f64>| {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                g.with_label_values(&m).set(v);
            }
        };
        set(&self.demand, a.demand_replicas);
        set(&self.arrival, a.demand.map(|d| d.arrival_rate));
        set(&self.prompt, a.demand.map(|d| d.mean_prompt_tokens));
        set(&self.output, a.demand.map(|d| d.mean_output_tokens));
        set(&self.headroom, a.headroom_rate);
        set(&self.current, a.current_replicas.map(f64::from));
        set(&self.suggested, a.suggestion.map(|s| f64::from(s.replicas)));
        if let Some(c) = &a.capacity {
            let sources = [
                ("online", c.online.map(|o| o.max_rate)),
                ("profile", c.profile.as_ref().map(|p| p.max_rate)),
                ("combined", Some(c.max_rate)),
            ];
            for (source, v) in sources {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    self.capacity.with_label_values(&[a.model.as_str(), source]).set(v);
                }
            }
        }
    }
}

/// The AIBrix-compatible answer for `GET /metrics/{namespace}/{deployment}`:
/// `vllm:deployment_replicas{model_name="..."} N`, N in `units_per_replica` (100: hundredths).
pub fn deployment_replicas_text(model: &str, replicas: u32, units_per_replica: u32) -> String {
    format!(
        "# HELP vllm:deployment_replicas Replicas the gpu-agent advisor suggests for the deployment.\n\
         # TYPE vllm:deployment_replicas gauge\n\
         vllm:deployment_replicas{{model_name=\"{model}\"}} {}\n",
        u64::from(replicas) * u64::from(units_per_replica)
    )
}
