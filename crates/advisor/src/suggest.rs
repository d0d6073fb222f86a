//! From demand to a replica count that does not flap: a tolerance band around the current
//! count (as the HPA's 10%), immediate scale-up, scale-down only to the highest count wanted
//! over the last `scale_down_delay` seconds, bounds, and never 0. When the data goes stale
//! the last good suggestion stays.

use std::collections::VecDeque;

use serde::Serialize;

/// The knobs, from `[advisor]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub tolerance: f64,
    pub scale_down_delay_s: f64,
}

/// Why the suggestion is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// The demand asks for this many.
    Demand,
    /// Within the tolerance band of the current count.
    WithinTolerance,
    /// Lower demand, but a higher count was wanted within the scale-down delay.
    ScaleDownDelay,
    /// Capped by min_replicas or max_replicas.
    Bounds,
    /// No usable data: the last good suggestion (or the current count) is kept.
    Stale,
    /// Nothing measured yet: the current count (or min_replicas) is kept.
    NoData,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Demand => "the demand asks for it",
            Why::WithinTolerance => "within the tolerance band of the current count",
            Why::ScaleDownDelay => "lower demand, held by the scale-down delay",
            Why::Bounds => "capped by min_replicas/max_replicas",
            Why::Stale => "data is stale: last good suggestion kept",
            Why::NoData => "no capacity estimate yet: current count kept",
        }
    }
}

/// One suggestion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Suggestion {
    /// ceil(fleet demand), before tolerance, delay and bounds.
    pub desired: Option<u32>,
    pub replicas: u32,
    pub why: Why,
}

/// Keeps the history the delay needs and the last good value.
#[derive(Debug, Clone, Default)]
pub struct Suggester {
    /// (time, count) wanted after the tolerance band, newest last.
    wanted: VecDeque<(f64, u32)>,
    last: Option<Suggestion>,
}

impl Suggester {
    /// A suggestion at time `now` (seconds) for a fleet demand of `fleet_demand` replicas
    /// (target utilisation included; None: no usable estimate) with `current` replicas running.
    pub fn suggest(&mut self, now: f64, fleet_demand: Option<f64>, current: u32, policy: &Policy) -> Suggestion {
        let current = current.max(1);
        let Some(demand) = fleet_demand.filter(|d| d.is_finite() && *d >= 0.0) else {
            let s = match self.last {
                Some(last) => Suggestion { why: Why::Stale, ..last },
                None => Suggestion {
                    desired: None,
                    replicas: current.clamp(policy.min_replicas.max(1), policy.max_replicas.max(1)),
                    why: Why::NoData,
                },
            };
            return s;
        };
        let exact = demand;
        // Clamped to u32's range first (NaN: 0).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let desired = exact.ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
        let (mut want, mut why) = (desired, Why::Demand);
        if desired != current && (exact / f64::from(current) - 1.0).abs() <= policy.tolerance {
            want = current;
            why = Why::WithinTolerance;
        }
        if policy.scale_down_delay_s <= 0.0 {
            self.wanted.clear();
        } else if self.last.is_none() {
            // Just started, nothing known about the past: the running count holds for one
            // delay, so a restart of the agent never scales down at once.
            self.wanted.push_back((now, current));
        }
        self.wanted.push_back((now, want));
        while self.wanted.front().is_some_and(|(t, _)| *t < now - policy.scale_down_delay_s) {
            self.wanted.pop_front();
        }
        let held = self.wanted.iter().map(|w| w.1).max().unwrap_or(want);
        if held > want {
            (want, why) = (held, Why::ScaleDownDelay);
        }
        let bounded = want.clamp(policy.min_replicas.max(1), policy.max_replicas.max(1));
        if bounded != want {
            why = Why::Bounds;
        }
        let s = Suggestion { desired: Some(desired), replicas: bounded, why };
        self.last = Some(s);
        s
    }

    pub fn last(&self) -> Option<Suggestion> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { min_replicas: 1, max_replicas: 10, tolerance: 0.1, scale_down_delay_s: 60.0 };

    #[test]
    fn scales_up_at_once_and_down_only_after_the_delay() {
        let mut s = Suggester::default();
        assert_eq!(s.suggest(0.0, Some(3.5), 2, &P).replicas, 4);
        // Demand drops at t=10: the 4 holds for the delay, then goes.
        let down = s.suggest(10.0, Some(1.5), 4, &P);
        assert_eq!((down.replicas, down.why, down.desired), (4, Why::ScaleDownDelay, Some(2)));
        assert_eq!(s.suggest(59.0, Some(1.5), 4, &P).replicas, 4);
        assert_eq!(s.suggest(61.0, Some(1.5), 4, &P).replicas, 2);
        // Up again immediately.
        assert_eq!(s.suggest(62.0, Some(5.2), 2, &P).replicas, 6);
    }

    #[test]
    fn small_changes_stay_within_the_tolerance_band() {
        let mut s = Suggester::default();
        let a = s.suggest(0.0, Some(4.3), 4, &P);
        assert_eq!((a.replicas, a.why, a.desired), (4, Why::WithinTolerance, Some(5)));
        assert_eq!(s.suggest(1.0, Some(4.5), 4, &P).replicas, 5);
    }

    #[test]
    fn bounds_and_never_zero() {
        let mut s = Suggester::default();
        let idle = s.suggest(0.0, Some(0.0), 3, &Policy { scale_down_delay_s: 0.0, ..P });
        assert_eq!((idle.replicas, idle.why), (1, Why::Bounds));
        assert_eq!(s.suggest(1.0, Some(50.0), 3, &P).replicas, 10);
    }

    #[test]
    fn missing_data_keeps_the_last_good_value_never_zero() {
        let mut s = Suggester::default();
        let none = s.suggest(0.0, None, 3, &P);
        assert_eq!((none.replicas, none.why), (3, Why::NoData));
        // The first estimate after a start does not scale down before the delay.
        let mut fresh = Suggester::default();
        assert_eq!(fresh.suggest(0.0, Some(1.0), 3, &P).replicas, 3);
        assert_eq!(fresh.suggest(61.0, Some(1.0), 3, &P).replicas, 1);
        assert_eq!(s.suggest(1.0, Some(6.6), 3, &P).replicas, 7);
        for t in 2..1000 {
            let st = s.suggest(f64::from(t), None, 3, &P);
            assert_eq!((st.replicas, st.why), (7, Why::Stale));
        }
        assert_eq!(s.suggest(1000.0, Some(f64::NAN), 0, &P).replicas, 7);
    }
}
