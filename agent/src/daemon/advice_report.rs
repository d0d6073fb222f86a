//! The advice as `agentctl advice` receives it: the advisor's [`Advice`] mapped to the wire.

use advisor::online::Limit;
use advisor::Advice;
use proto::{AdviceDemand, AdviceFit, AdviceOnline, AdviceProfile, AdviceReport, CapacityLimit};

pub fn advice_report(a: &Advice) -> AdviceReport {
    {
        let cap = a.capacity.as_ref();
        AdviceReport {
            model: a.model.clone(),
            clock_mhz: a.clock_mhz,
            ttft_slo_s: a.objectives.ttft_s,
            tpot_slo_s: a.objectives.tpot_s,
            demand: a.demand.zip(a.demand_replicas).map(|(d, replicas)| AdviceDemand {
                arrival_rate: d.arrival_rate,
                mean_prompt_tokens: d.mean_prompt_tokens,
                mean_output_tokens: d.mean_output_tokens,
                running: d.running,
                waiting: d.waiting,
                replicas,
            }),
            capacity_rate: cap.map(|c| c.max_rate),
            online: cap.and_then(|c| {
                c.online.map(|o| AdviceOnline {
                    max_rate: o.max_rate,
                    limit: capacity_limit(o.limit),
                    predicted_tpot_s: o.tpot_s,
                    predicted_ttft_s: o.ttft_s,
                    weight: c.online_weight,
                    observed_share: c.observed_share.unwrap_or(0.0),
                })
            }),
            profile: cap.and_then(|c| c.profile.as_ref()).map(|p| AdviceProfile {
                path: p.path.display().to_string(),
                bucket_prompt_tokens: p.bucket_prompt_tokens,
                bucket_output_tokens: p.bucket_output_tokens,
                measured_rate: p.measured_rate,
                measured_clock_mhz: p.measured_clock_mhz,
                max_rate: p.max_rate,
            }),
            fit: AdviceFit {
                alpha_s: a.fit.alpha_s,
                beta_s: a.fit.beta_s,
                delta_s: a.fit.delta_s,
                observations: a.fit.observations,
            },
            headroom_rate: a.headroom_rate,
            current_replicas: a.current_replicas,
            desired_replicas: a.suggestion.and_then(|s| s.desired),
            suggested_replicas: a.suggestion.map(|s| s.replicas),
            stale: a.stale,
            data_age_s: a.data_age_s,
            reason: a.reason.clone(),
        }
    }
}

fn capacity_limit(l: Limit) -> CapacityLimit {
    match l {
        Limit::Tpot => CapacityLimit::Tpot,
        Limit::Ttft => CapacityLimit::Ttft,
        Limit::Concurrency => CapacityLimit::Concurrency,
        Limit::Saturation => CapacityLimit::Saturation,
    }
}
