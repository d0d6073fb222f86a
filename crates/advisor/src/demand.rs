//! Demand from vLLM windows: the arrival rate (finished requests plus what the queue and the
//! batch grew by), the mean prompt and output lengths (from the `request_prompt_tokens` /
//! `request_generation_tokens` histograms) and the queue, smoothed exponentially.

use serde::Serialize;

use vllm_metrics::Window;

/// A surge (see [`Ewma::update_fast_rise`]) is smoothed this many times faster.
pub const RISE_FACTOR: f64 = 4.0;
/// A window's rate this far above the average (as a share of it) counts as a surge.
pub const SURGE: f64 = 0.5;

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

    /// As [`Ewma::update`], but a value more than `SURGE` above the average moves it with a
    /// time constant `tau / rise_factor`: a surge in load shows within seconds, while the
    /// ordinary window-to-window noise (which a faster rise on every uptick would turn into an
    /// upward bias) is averaged with the full time constant.
    pub fn update_fast_rise(&mut self, x: f64, dt: f64, tau: f64, rise_factor: f64) -> f64 {
        let surge = self.value.is_some_and(|v| x > v * (1.0 + SURGE) && x > v + 1.0);
        self.update(x, dt, if surge { tau / rise_factor } else { tau })
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }

    pub fn scale(&mut self, factor: f64) {
        if let Some(v) = &mut self.value {
            *v *= factor;
        }
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
        let arrival_rate = self.rate.update_fast_rise(raw, dt, tau, RISE_FACTOR);
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

    /// The fleet went from `from` to `to` replicas: with the load split evenly, this replica's
    /// arrival rate changes by `from / to` at once; waiting for the smoothing to find out would
    /// leave the estimate wrong for a time constant after every scaling.
    pub fn replicas_changed(&mut self, from: u32, to: u32) {
        if from > 0 && to > 0 && from != to {
            self.rate.scale(f64::from(from) / f64::from(to));
        }
    }

    /// The last demand computed.
    pub fn last(&self) -> Option<Demand> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(seconds: f64, finished: f64, running: f64, waiting: f64, prompt: f64, output: f64) -> Window {
        let w = crate::testutil::served(finished, prompt, output, 0.01, 0.05, running);
        Window { seconds, num_requests_waiting: Some(waiting), ..w }
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
    fn smoothing_follows_a_step_with_its_time_constant_faster_up() {
        let step = |from: f64, to: f64, secs: u32| {
            let mut t = DemandTracker::default();
            t.observe(&window(1.0, from, 5.0, 0.0, 500.0, 200.0), 10.0).expect("demand");
            let mut last = 0.0;
            for _ in 0..secs {
                last = t.observe(&window(1.0, to, 5.0, 0.0, 500.0, 200.0), 10.0).expect("demand").arrival_rate;
            }
            last
        };
        // After one time constant, 1 - 1/e of the step: 10 s down, 2.5 s up while the step
        // is a surge (more than 50% above the average), then 10 s again.
        let share = 1.0 - (-1.0f64).exp();
        let down = step(20.0, 10.0, 10);
        assert!((down - (20.0 - 10.0 * share)).abs() < 1e-9, "{down}");
        let up = step(10.0, 20.0, 10);
        assert!(up > 10.0 + 10.0 * share + 1.0, "{up}");
        // A rise within the noise band is averaged at the ordinary pace.
        let small = step(10.0, 12.0, 10);
        assert!((small - (10.0 + 2.0 * share)).abs() < 1e-9, "{small}");
    }

    #[test]
    fn scaling_the_fleet_moves_the_per_replica_rate_at_once() {
        let mut t = DemandTracker::default();
        t.observe(&window(1.0, 30.0, 5.0, 0.0, 500.0, 200.0), 100.0).expect("demand");
        t.replicas_changed(2, 3);
        let d = t.observe(&window(1.0, 20.0, 5.0, 0.0, 500.0, 200.0), 100.0).expect("demand");
        assert!((d.arrival_rate - 20.0).abs() < 1e-9, "{}", d.arrival_rate);
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
