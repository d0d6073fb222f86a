//! Per-arm statistics and the rules that drop hopeless clocks, so exploration stops paying
//! for arms that cannot win. The same code serves the AGFT baseline (its extreme, historical
//! and cascade rules with its constants) and our governor (gentler constants, never the safe
//! maximum, a cascade only through clocks that already lost, and the historical rule on what
//! the reward models expect rather than on raw means, see [`prune_by_expectation`]).

use serde::{Deserialize, Serialize};

/// Why an arm was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PruneReason {
    /// Very bad mean reward early on.
    Extreme,
    /// Mean EDP clearly above the best arm's.
    Historical,
    /// A lower clock than an arm pruned below the cascade threshold.
    Cascade,
    /// Broke the SLO.
    Slo,
}

/// What is known about one clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmStats {
    pub mhz: u32,
    pub tries: u64,
    pub reward_sum: f64,
    /// Welford statistics of the normalised EDP (EDP / baseline) seen at this clock.
    pub edp_n: u64,
    pub edp_mean: f64,
    pub edp_m2: f64,
    pub violations: u32,
    pub pruned: Option<PruneReason>,
}

impl ArmStats {
    pub fn new(mhz: u32) -> Self {
        Self { mhz, tries: 0, reward_sum: 0.0, edp_n: 0, edp_mean: 0.0, edp_m2: 0.0, violations: 0, pruned: None }
    }

    pub fn record(&mut self, reward: f64, edp_ratio: Option<f64>) {
        self.tries += 1;
        self.reward_sum += reward;
        if let Some(e) = edp_ratio.filter(|e| e.is_finite()) {
            self.edp_n += 1;
            let d = e - self.edp_mean;
            self.edp_mean += d / self.edp_n as f64;
            self.edp_m2 += d * (e - self.edp_mean);
        }
    }

    pub fn mean_reward(&self) -> Option<f64> {
        (self.tries > 0).then(|| self.reward_sum / self.tries as f64)
    }

    /// Sample standard deviation of the normalised EDP.
    pub fn edp_sd(&self) -> Option<f64> {
        (self.edp_n > 1).then(|| (self.edp_m2 / (self.edp_n - 1) as f64).max(0.0).sqrt())
    }

    pub fn active(&self) -> bool {
        self.pruned.is_none()
    }
}

/// Constants of the pruning rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PruneRules {
    /// "Extreme": only during the first this many rounds ...
    pub extreme_rounds: u64,
    /// ... after at least this many tries ...
    pub extreme_min_tries: u64,
    /// ... an arm whose mean reward is at or below this is dropped.
    pub extreme_reward: f64,
    /// "Historical": mean EDP above best mean + `historical_sd` standard deviations (None:
    /// rule off) ...
    pub historical_sd: Option<f64>,
    /// ... with both arms tried at least this often ...
    pub historical_min_tries: u64,
    /// ... where the standard deviation is at least this share of the best mean (0 = none).
    pub historical_sd_floor: f64,
    /// "Cascade": an arm pruned below this share of the highest clock drops all lower ones.
    pub cascade_below: f64,
}

impl PruneRules {
    /// AGFT's constants (`contextual_bandit.py` in SusCom-Lab/AGFT; see docs/governor.md).
    pub fn agft() -> Self {
        Self {
            extreme_rounds: 60,
            extreme_min_tries: 3,
            extreme_reward: -1.2,
            historical_sd: Some(4.0),
            historical_min_tries: 3,
            historical_sd_floor: 0.0,
            cascade_below: 0.5,
        }
    }
}

/// Applies the rules once; `round` counts decisions since learning (re)started. Arms whose
/// clock is in `protect` are never pruned. Returns what was pruned now.
pub fn prune(arms: &mut [ArmStats], rules: &PruneRules, round: u64, protect: &[u32]) -> Vec<(u32, PruneReason)> {
    let mut out = Vec::new();
    let best = arms
        .iter()
        .filter(|a| a.active() && a.edp_n >= rules.historical_min_tries)
        .min_by(|a, b| a.edp_mean.total_cmp(&b.edp_mean))
        .map(|a| (a.mhz, a.edp_mean, a.edp_sd().unwrap_or(0.0)));
    for a in arms.iter_mut().filter(|a| a.active() && !protect.contains(&a.mhz)) {
        let extreme = round <= rules.extreme_rounds
            && a.tries >= rules.extreme_min_tries
            && a.mean_reward().is_some_and(|r| r <= rules.extreme_reward);
        let historical = best.zip(rules.historical_sd).is_some_and(|((mhz, mean, sd), k)| {
            let sd = sd.max(rules.historical_sd_floor * mean);
            mhz != a.mhz && a.edp_n >= rules.historical_min_tries && a.edp_mean > mean + k * sd
        });
        let reason = if extreme {
            Some(PruneReason::Extreme)
        } else if historical {
            Some(PruneReason::Historical)
        } else {
            None
        };
        if let Some(r) = reason {
            a.pruned = Some(r);
            out.push((a.mhz, r));
        }
    }
    let top = arms.iter().map(|a| a.mhz).max().unwrap_or(0);
    let threshold = f64::from(top) * rules.cascade_below;
    if let Some(cut) = arms.iter().filter(|a| a.pruned.is_some() && f64::from(a.mhz) < threshold).map(|a| a.mhz).max() {
        for a in arms.iter_mut().filter(|a| a.active() && a.mhz < cut && !protect.contains(&a.mhz)) {
            a.pruned = Some(PruneReason::Cascade);
            out.push((a.mhz, PruneReason::Cascade));
        }
    }
    out
}

/// The governor's historical rule: clocks compared by the reward the models expect of each in
/// one context (`expected`, one per arm), with the load held fixed (a clock's raw mean EDP
/// mixes whatever loads it happened to meet). An arm tried at least `min_tries` times
/// whose expected reward trails the best tried arm's by more than `gap` (log EDP: 0.15 is 16%
/// worse) is dropped.
pub fn prune_by_expectation(
    arms: &mut [ArmStats],
    expected: &[f64],
    gap: f64,
    min_tries: u64,
    protect: &[u32],
) -> Vec<(u32, PruneReason)> {
    let tried = |a: &ArmStats| a.active() && a.tries >= min_tries;
    let Some(best) =
        arms.iter().zip(expected).filter(|(a, e)| tried(a) && e.is_finite()).map(|(_, e)| *e).max_by(f64::total_cmp)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (a, e) in arms.iter_mut().zip(expected) {
        if tried(a) && !protect.contains(&a.mhz) && *e < best - gap {
            a.pruned = Some(PruneReason::Historical);
            out.push((a.mhz, PruneReason::Historical));
        }
    }
    out
}

/// AGFT's SLO rule: every clock at or below the violating one is dropped.
pub fn prune_at_or_below(arms: &mut [ArmStats], mhz: u32, protect: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    for a in arms.iter_mut().filter(|a| a.active() && a.mhz <= mhz && !protect.contains(&a.mhz)) {
        a.pruned = Some(PruneReason::Slo);
        out.push(a.mhz);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(mhz: u32, rewards: &[f64], edps: &[f64]) -> ArmStats {
        let mut a = ArmStats::new(mhz);
        for (i, r) in rewards.iter().enumerate() {
            a.record(*r, edps.get(i).copied());
        }
        a
    }

    #[test]
    fn welford_statistics() {
        let a = arm(1000, &[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!(a.mean_reward(), Some(2.0));
        assert!((a.edp_mean - 2.0).abs() < 1e-12);
        assert!((a.edp_sd().expect("3 samples") - 1.0).abs() < 1e-12);
        assert_eq!(ArmStats::new(1).edp_sd(), None);
    }

    #[test]
    fn extreme_rule_only_early_and_after_enough_tries() {
        let rules = PruneRules::agft();
        let mut arms = vec![arm(1980, &[0.0; 3], &[]), arm(900, &[-1.5, -1.5], &[]), arm(1000, &[-1.5; 3], &[])];
        let got = prune(&mut arms, &rules, 10, &[]);
        assert_eq!(got, vec![(1000, PruneReason::Extreme)]);
        assert!(arms[1].active(), "two tries are not enough");
        let mut late = vec![arm(1000, &[-1.5; 3], &[])];
        assert!(prune(&mut late, &rules, 61, &[]).is_empty());
    }

    #[test]
    fn historical_rule_needs_a_clear_gap() {
        let rules = PruneRules::agft();
        let best = arm(1200, &[0.0; 4], &[1.0, 1.02, 0.98, 1.0]);
        let close = arm(1300, &[0.0; 3], &[1.03, 1.04, 1.05]);
        let far = arm(1980, &[0.0; 3], &[1.5, 1.6, 1.55]);
        let mut arms = vec![best, close, far];
        let got = prune(&mut arms, &rules, 100, &[]);
        assert_eq!(got, vec![(1980, PruneReason::Historical)]);
        // Protected arms survive anything.
        arms[2].pruned = None;
        assert!(prune(&mut arms, &rules, 100, &[1980]).is_empty());
    }

    #[test]
    fn historical_rule_can_be_off() {
        let rules = PruneRules { historical_sd: None, ..PruneRules::agft() };
        let mut arms = vec![arm(1200, &[0.0; 4], &[1.0; 4]), arm(1980, &[0.0; 3], &[1.5, 1.6, 1.55])];
        assert!(prune(&mut arms, &rules, 100, &[]).is_empty());
    }

    #[test]
    fn expectation_rule_drops_clear_losers_among_tried_arms() {
        let mut arms = vec![
            arm(900, &[0.0; 3], &[]),
            arm(1200, &[0.0; 3], &[]),
            arm(1500, &[0.0; 3], &[]),
            arm(1980, &[0.0; 1], &[]),
        ];
        let expected = [-0.30, 0.0, -0.10, -0.50];
        let got = prune_by_expectation(&mut arms, &expected, 0.15, 3, &[]);
        assert_eq!(got, vec![(900, PruneReason::Historical)], "1500 is within the gap, 1980 untried enough");
        assert!(arms[2].active() && arms[3].active());
        // Protected arms survive; no tried arm, nothing to compare with.
        let mut arms = vec![arm(900, &[0.0; 3], &[]), arm(1200, &[0.0; 3], &[])];
        assert!(prune_by_expectation(&mut arms, &[-1.0, 0.0], 0.15, 3, &[900]).is_empty());
        let mut fresh = vec![ArmStats::new(900), ArmStats::new(1200)];
        assert!(prune_by_expectation(&mut fresh, &[-1.0, 0.0], 0.15, 3, &[]).is_empty());
    }

    #[test]
    fn cascade_drops_clocks_below_a_low_pruned_one() {
        let rules = PruneRules::agft();
        let mut arms: Vec<ArmStats> = [600, 700, 800, 1200, 1980].iter().map(|&m| ArmStats::new(m)).collect();
        arms[2].pruned = Some(PruneReason::Extreme); // 800 < 990
        let got = prune(&mut arms, &rules, 5, &[]);
        assert_eq!(got, vec![(600, PruneReason::Cascade), (700, PruneReason::Cascade)]);
        assert!(arms[3].active() && arms[4].active());
        // An arm pruned above the threshold does not cascade.
        let mut arms: Vec<ArmStats> = [800, 1200, 1980].iter().map(|&m| ArmStats::new(m)).collect();
        arms[1].pruned = Some(PruneReason::Historical);
        assert!(prune(&mut arms, &rules, 5, &[]).is_empty());
    }

    #[test]
    fn slo_rule_drops_everything_at_or_below() {
        let mut arms: Vec<ArmStats> = [900, 1000, 1100, 1980].iter().map(|&m| ArmStats::new(m)).collect();
        assert_eq!(prune_at_or_below(&mut arms, 1000, &[900]), vec![1000]);
        assert!(arms[0].active() && !arms[1].active() && arms[2].active());
    }
}
