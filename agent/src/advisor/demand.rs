//! Demand from vLLM windows: the arrival rate (finished requests plus what the queue and the
//! batch grew by), the mean prompt and output lengths (from the `request_prompt_tokens` /
//! `request_generation_tokens` histograms) and the queue, smoothed exponentially.

use serde::Serialize;

use crate::vllm::Window;

/// What this replica is asked to serve, smoothed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Demand {
    /// Requests per second arriving at this replica.
    pub arrival_rate: f64,
    /// Mean prompt length of the requests, tokens (0 until a request finished).
    pub mean_prompt_tokens: f64,
    /// Mean output length of the requests, tokens (0 until a request finished).
    pub mean_output_tokens: f64,
    /// Requests running and waiting at the end of the last window.
    pub running: f64,
    pub waiting: f64,
}

/// Exponential smoothing with a time constant; the first value is taken as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    pub fn update(&mut self, x: f64, dt: f64, tau: f64) -> f64 {
        let v = match self.value {
            Some(v) if tau > 0.0 => v + (1.0 - (-dt / tau).exp()) * (x - v),
            _ => x,
        };
        self.value = Some(v);
        v
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// Turns windows into [`Demand`].
#[derive(Debug, Clone, Default)]
pub struct DemandTracker {
    rate: Ewma,
    prompt: Ewma,
    output: Ewma,
    /// running + waiting at the end of the previous window.
    in_system: Option<f64>,
    last: Option<Demand>,
}

/// One window's raw demand, before smoothing; None when the window cannot say.
pub fn arrivals_per_second(w: &Window, in_system_before: Option<f64>) -> Option<f64> {
    if w.counter_reset || !(w.seconds.is_finite() && w.seconds > 0.0) {
        return None;
    }
    let finished = w.request_rate?;
    let now = w.num_requests_running? + w.num_requests_waiting.unwrap_or(0.0);
    // Requests that arrived = finished + growth of what is in the system (running + waiting).
    let growth = in_system_before.map_or(0.0, |before| (now - before) / w.seconds);
    Some((finished + growth).max(0.0))
}

impl DemandTracker {
    /// Feeds one window; returns the smoothed demand, or None when the window was unusable
    /// (counter reset, missing series).
    pub fn observe(&mut self, w: &Window, tau: f64) -> Option<Demand> {
        let now_in_system = w.num_requests_running.map(|r| r + w.num_requests_waiting.unwrap_or(0.0));
        let raw = arrivals_per_second(w, self.in_system);
        self.in_system = now_in_system;
        let raw = raw?;
        let dt = w.seconds;
        let arrival_rate = self.rate.update(raw, dt, tau);
        // Lengths are means of the requests finished in the window: keep the old ones when none did.
        if let Some(p) = w.mean_prompt_tokens.filter(|p| p.is_finite() && *p > 0.0) {
            self.prompt.update(p, dt, tau);
        }
        if let Some(o) = w.mean_generation_tokens.filter(|o| o.is_finite() && *o > 0.0) {
            self.output.update(o, dt, tau);
        }
        let d = Demand {
            arrival_rate,
            mean_prompt_tokens: self.prompt.get().unwrap_or(0.0),
            mean_output_tokens: self.output.get().unwrap_or(0.0),
            running: w.num_requests_running.unwrap_or(0.0),
            waiting: w.num_requests_waiting.unwrap_or(0.0),
        };
        self.last = Some(d);
        Some(d)
    }

    /// The last demand computed.
    pub fn last(&self) -> Option<Demand> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn window(seconds: f64, finished: f64, running: f64, waiting: f64, prompt: f64, output: f64) -> Window {
        Window {
            seconds,
            counter_reset: false,
            num_requests_running: Some(running),
            num_requests_waiting: Some(waiting),
            kv_cache_usage: Some(0.1),
            request_rate: Some(finished),
            prompt_tokens_rate: Some(finished * prompt),
            generation_tokens_rate: Some(finished * output),
            prefix_hit_ratio: None,
            preemptions: Some(0.0),
            tokens_per_iteration: None,
            mean_prompt_tokens: Some(prompt),
            mean_generation_tokens: Some(output),
            ttft: None,
            itl: None,
            e2e: None,
        }
    }

    #[test]
    fn arrivals_count_the_growth_of_the_queue() {
        let w = window(2.0, 10.0, 30.0, 10.0, 500.0, 200.0);
        assert_eq!(arrivals_per_second(&w, None), Some(10.0));
        // 20 more in the system over 2 s: 10 more per second arrived than finished.
        assert_eq!(arrivals_per_second(&w, Some(20.0)), Some(20.0));
        // A draining queue never makes a negative rate.
        assert_eq!(arrivals_per_second(&w, Some(200.0)), Some(0.0));
        let mut reset = w.clone();
        reset.counter_reset = true;
        assert_eq!(arrivals_per_second(&reset, None), None);
    }

    #[test]
    fn smoothing_follows_a_step_with_its_time_constant() {
        let mut t = DemandTracker::default();
        t.observe(&window(1.0, 10.0, 5.0, 0.0, 500.0, 200.0), 10.0).expect("demand");
        let mut last = 0.0;
        for _ in 0..10 {
            last = t.observe(&window(1.0, 20.0, 5.0, 0.0, 500.0, 200.0), 10.0).expect("demand").arrival_rate;
        }
        // After one time constant, 1 - 1/e of the step.
        assert!((last - (10.0 + 10.0 * (1.0 - (-1.0f64).exp()))).abs() < 1e-9, "{last}");
    }

    #[test]
    fn an_idle_window_keeps_the_lengths() {
        let mut t = DemandTracker::default();
        t.observe(&window(1.0, 4.0, 2.0, 0.0, 800.0, 100.0), 0.0).expect("demand");
        let mut idle = window(1.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        idle.mean_prompt_tokens = None;
        idle.mean_generation_tokens = None;
        let d = t.observe(&idle, 0.0).expect("demand");
        assert_eq!((d.arrival_rate, d.mean_prompt_tokens, d.mean_output_tokens), (0.0, 800.0, 100.0));
    }
}
