//! The one virtual-time driver of the engine, shared by every in-process caller: the governor
//! bench and the advisor replay (`lab`) and the tuner's trial server ([`crate::tune`]). The HTTP
//! server ([`crate::server`]) runs the engine in wall-clock time instead and does not use it.
//!
//! A [`Driver`] owns the engine and a queue of arrivals and advances virtual time to where its
//! caller says ([`Until`]): it submits the arrivals that are due, steps the engine while there
//! is work, idles when there is none, and optionally follows every request to its outcome as a
//! load generator would see it ([`Driver::tracking_outcomes`]).
//!
//! An arrival is submitted once the engine's clock has reached it, i.e. one that falls inside a
//! step (5-60 ms) is submitted when the step ends; its latencies still count from its arrival
//! time. Every caller gets the same rule, so their figures agree with each other.

use std::collections::{HashMap, VecDeque};

use loadgen::{Arrival, RequestOutcome};

use crate::engine::{BlockHasher, Engine, FinishReason, RequestId, SimRequest, TokenEvent};

/// Prefix-cache group of the shared prompt prefix (as the HTTP load driver sends it).
pub const SHARED_PREFIX_ID: u64 = 1;

/// Where [`Driver::advance`] stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Until {
    /// A decision window's edge (bench, replay): run until virtual time reaches it; steps are
    /// not cut, so time ends at or just past it. With nothing to run the engine idles to the
    /// next arrival or the edge, whichever is first, and a step that moves no time (it only
    /// delivered events, or nothing fit) jumps to the edge, so a window always ends.
    Edge(f64),
    /// The end of a load run (tuner): run until nothing runs and no arrival is left, idling
    /// from one arrival to the next, or until virtual time is past `deadline_s`.
    Drained { deadline_s: f64 },
}

/// Why [`Driver::advance`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Virtual time reached the edge.
    Edge,
    /// Nothing runs and every arrival was submitted.
    Drained,
    /// Virtual time is past the deadline; requests may still be running.
    Deadline,
    /// Time could not move towards the edge (an edge that is not a number).
    Stuck,
}

/// A tracked request: when it arrived, what it got so far, when its last token came.
#[derive(Debug)]
struct Live {
    arrived_at: f64,
    outcome: RequestOutcome,
    last_token_at: f64,
}

/// Requests followed to their outcomes.
#[derive(Debug, Default)]
struct Outcomes {
    live: HashMap<RequestId, Live>,
    /// Finished requests, in the order they finished.
    done: Vec<RequestOutcome>,
}

/// The engine plus the arrivals still to submit; see the module docs.
#[derive(Debug)]
pub struct Driver {
    engine: Engine,
    /// Arrivals not yet submitted, in time order.
    queue: VecDeque<Arrival>,
    /// Prompt tokens every request shares (a prefix-cache group), at most its prompt less one.
    shared_prefix_tokens: u32,
    /// None: outcomes are not followed (the bench and the replay read the engine's metrics).
    outcomes: Option<Outcomes>,
}

impl Driver {
    pub fn new(engine: Engine) -> Driver {
        Driver { engine, queue: VecDeque::new(), shared_prefix_tokens: 0, outcomes: None }
    }

    /// Every request shares its first `tokens` prompt tokens with the others (0: none).
    pub fn with_shared_prefix(mut self, tokens: u32) -> Driver {
        self.shared_prefix_tokens = tokens;
        self
    }

    /// Follows every request submitted from now on to its outcome (see [`Driver::take_outcomes`]).
    pub fn tracking_outcomes(mut self) -> Driver {
        self.outcomes = Some(Outcomes::default());
        self
    }

    /// Queues arrivals, in time order and not before the last one queued.
    pub fn extend(&mut self, arrivals: impl IntoIterator<Item = Arrival>) {
        self.queue.extend(arrivals);
    }

    pub fn push(&mut self, arrival: Arrival) {
        self.queue.push_back(arrival);
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's virtual time.
    pub fn now(&self) -> f64 {
        self.engine.now()
    }

    /// Runs the engine in virtual time until `until`; see [`Until`] for the rules.
    pub fn advance(&mut self, until: Until) -> Stop {
        loop {
            self.submit_due();
            let now = self.engine.now();
            match until {
                Until::Edge(edge) if now >= edge => return Stop::Edge,
                Until::Drained { deadline_s } if now > deadline_s => return Stop::Deadline,
                _ => {}
            }
            let next_arrival = self.queue.front().map(|a| a.at_s);
            match self.engine.step() {
                Some(step) => self.record(step.events),
                None => match (until, next_arrival) {
                    (Until::Edge(edge), _) => self.engine.idle_until(next_arrival.unwrap_or(f64::INFINITY).min(edge)),
                    (Until::Drained { .. }, Some(at)) => self.engine.idle_until(at),
                    (Until::Drained { .. }, None) => return Stop::Drained,
                },
            }
            if let Until::Edge(edge) = until {
                if self.engine.now() <= now {
                    // Nothing could run and time did not move: jump to the edge.
                    self.engine.idle_until(edge);
                    if self.engine.now() <= now {
                        return Stop::Stuck;
                    }
                }
            }
        }
    }

    /// The tracked requests' outcomes, taken: the finished ones in the order they finished,
    /// then each one still unfinished as failed with `unfinished` (by submission order).
    /// Empty when outcomes are not tracked.
    pub fn take_outcomes(&mut self, unfinished: &str) -> Vec<RequestOutcome> {
        let Some(t) = self.outcomes.as_mut() else { return Vec::new() };
        let mut open: Vec<(RequestId, Live)> = t.live.drain().collect();
        open.sort_by_key(|(id, _)| *id);
        let mut out = std::mem::take(&mut t.done);
        out.extend(open.into_iter().map(|(_, l)| RequestOutcome::failed(l.outcome.prompt_tokens, unfinished)));
        out
    }

    /// Submits every queued arrival the engine's clock has reached.
    fn submit_due(&mut self) {
        while let Some(a) = self.queue.front().copied() {
            if a.at_s > self.engine.now() {
                break;
            }
            self.queue.pop_front();
            let shared = self.shared_prefix_tokens.min(a.prompt_tokens.saturating_sub(1));
            let block_size = self.engine.config().block_size;
            let block_hashes = BlockHasher::with_prefix_group(block_size, SHARED_PREFIX_ID, shared).finish();
            let id = self.engine.submit(SimRequest {
                prompt_tokens: a.prompt_tokens,
                max_tokens: a.max_tokens,
                block_hashes,
            });
            if let Some(t) = self.outcomes.as_mut() {
                let outcome = RequestOutcome { prompt_tokens: a.prompt_tokens, ..Default::default() };
                t.live.insert(id, Live { arrived_at: a.at_s, outcome, last_token_at: a.at_s });
            }
        }
    }

    /// Books one step's token events, which all happened at the step's end (now).
    fn record(&mut self, events: Vec<TokenEvent>) {
        let Some(t) = self.outcomes.as_mut() else { return };
        let now = self.engine.now();
        for ev in events {
            match ev {
                TokenEvent::First { id } => {
                    if let Some(l) = t.live.get_mut(&id) {
                        l.outcome.ttft = now - l.arrived_at;
                        l.outcome.output_tokens = 1;
                        l.last_token_at = now;
                    }
                }
                TokenEvent::Token { id } => {
                    if let Some(l) = t.live.get_mut(&id) {
                        l.outcome.itl.push(now - l.last_token_at);
                        l.outcome.output_tokens += 1;
                        l.last_token_at = now;
                    }
                }
                TokenEvent::Finished { id, reason } => {
                    if let Some(l) = t.live.remove(&id) {
                        let mut o = l.outcome;
                        if reason == FinishReason::Length {
                            o.e2el = now - l.arrived_at;
                            o.success = true;
                        } else {
                            // The engine aborts only requests longer than max_model_len here,
                            // which vLLM's HTTP server refuses with a 400.
                            o = RequestOutcome::failed(o.prompt_tokens, "HTTP 400: prompt longer than max_model_len");
                        }
                        t.done.push(o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::gpu::SimGpu;
    use std::sync::Arc;

    fn driver(cfg: EngineConfig) -> Driver {
        Driver::new(Engine::new(cfg, Arc::new(SimGpu::h100(1))).expect("fits"))
    }

    fn at(t: f64, prompt: u32, out: u32) -> Arrival {
        Arrival { at_s: t, prompt_tokens: prompt, max_tokens: out }
    }

    #[test]
    fn an_edge_is_reached_idle_or_busy_and_later_arrivals_wait() {
        let mut d = driver(EngineConfig::default());
        d.extend([at(0.5, 100, 400), at(3.5, 100, 4)]);
        assert_eq!(d.advance(Until::Edge(1.0)), Stop::Edge);
        // Busy at the edge: the step that crosses it is not cut.
        assert!(d.now() >= 1.0 && d.now() < 1.1, "{}", d.now());
        assert_eq!(d.engine().stats().running, 1);
        assert_eq!(d.advance(Until::Edge(10.0)), Stop::Edge);
        assert_eq!(d.now(), 10.0, "idle time ends exactly at the edge");
        assert_eq!(d.engine().stats().running + d.engine().stats().waiting, 0);
        assert_eq!(d.advance(Until::Edge(f64::NAN)), Stop::Stuck);
    }

    #[test]
    fn a_window_with_only_an_abort_still_ends_at_its_edge() {
        let mut d = driver(EngineConfig { max_model_len: 1024, ..Default::default() });
        d.push(at(0.0, 2000, 10));
        assert_eq!(d.advance(Until::Edge(2.0)), Stop::Edge);
        assert_eq!(d.now(), 2.0);
        assert!(!d.engine().has_work());
    }

    #[test]
    fn a_drained_run_reports_every_request_like_a_load_generator() {
        let mut d = driver(EngineConfig { max_model_len: 1024, ..Default::default() }).tracking_outcomes();
        d.extend([at(0.0, 200, 8), at(0.0, 2000, 8), at(5.0, 200, 8)]);
        assert_eq!(d.advance(Until::Drained { deadline_s: 100.0 }), Stop::Drained);
        assert!(d.now() > 5.0 && d.now() < 6.0, "idles to the last arrival, then drains: {}", d.now());
        let o = d.take_outcomes("cut");
        assert_eq!(o.len(), 3);
        assert_eq!(o.iter().filter(|o| o.success).count(), 2);
        assert!(o.iter().any(|o| o.error.as_deref().is_some_and(|e| e.contains("max_model_len"))));
        let ok = o.iter().find(|o| o.success).expect("one finished");
        assert_eq!((ok.output_tokens, ok.itl.len()), (8, 7));
        assert!(ok.ttft > 0.0 && ok.e2el > ok.ttft);
        assert!(d.take_outcomes("cut").is_empty(), "taken");
    }

    #[test]
    fn a_deadline_cuts_a_run_and_counts_the_unfinished_as_failed() {
        let mut d = driver(EngineConfig::default()).with_shared_prefix(64).tracking_outcomes();
        d.extend([at(0.0, 300, 5000), at(0.0, 300, 2)]);
        assert_eq!(d.advance(Until::Drained { deadline_s: 1.0 }), Stop::Deadline);
        assert!(d.now() > 1.0);
        let o = d.take_outcomes("cut at the deadline");
        assert_eq!(o.len(), 2);
        assert!(o[0].success && !o[1].success, "finished first, then the unfinished: {o:?}");
        assert_eq!(o[1].error.as_deref(), Some("cut at the deadline"));
        assert!(d.engine().metrics_text().contains("vllm:prefix_cache_queries_total"));
    }
}
