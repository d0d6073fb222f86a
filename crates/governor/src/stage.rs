//! The governor's stage: where the search for the best clock stands, and the detours that
//! interrupt it. Every change of stage is a method here; the governor calls them and does
//! what goes with them (forgetting models, adding arms).
//!
//! ```text
//!            sweep done             choices settle
//! Sweeping ────────────► Learning ────────────────► Exploiting
//!    ▲                      ▲          relearn          │
//!    │                      └───────────────────────────┤ workload shift, EDP rise,
//!    └──────────────────────────────────────────────────┘ SLO violation at the clock
//!                       load far from the sweep's
//! ```
//!
//! An SLO violation (mode `slo`) detours to [`Stage::Fallback`] and an idle window to
//! [`Stage::Parked`]; both resume the search where they left it. Untried fine arms around the
//! refinement centre are tried first while learning and exploiting alike: that is a rule of
//! the choice, not a stage, as new fine arms appear on convergence and bans lift.

use std::collections::VecDeque;

/// Consecutive windows of EDP above expectation at the exploited clock that start relearning.
pub(crate) const EDP_RISE_WINDOWS: u32 = 5;

/// How far the search for the best clock has come.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Search {
    /// Sweeping the coarse grid, summing the load its windows met.
    Sweeping {
        /// The last refinement's centre, kept in case the sweep finds no best clock.
        center: Option<u32>,
        load_sum: f64,
        load_windows: u32,
    },
    /// The models choose, exploring less and less, fine arms around `center` first.
    Learning {
        center: Option<u32>,
        /// Mean load of the last sweep (what a later load is compared with).
        swept_load: f64,
        /// The last choices, to see them settle.
        recent: VecDeque<u32>,
    },
    /// Converged near `center`: greedy with hysteresis.
    Exploiting {
        center: u32,
        swept_load: f64,
        /// Consecutive windows whose EDP rose above what the models expect.
        edp_rise_streak: u32,
    },
}

impl Search {
    fn sweeping(center: Option<u32>) -> Self {
        Search::Sweeping { center, load_sum: 0.0, load_windows: 0 }
    }

    fn learning(center: Option<u32>, swept_load: f64) -> Self {
        Search::Learning { center, swept_load, recent: VecDeque::new() }
    }

    fn center(&self) -> Option<u32> {
        match self {
            Search::Sweeping { center, .. } | Search::Learning { center, .. } => *center,
            Search::Exploiting { center, .. } => Some(*center),
        }
    }
}

/// When the recent choices count as settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Convergence {
    /// Choices looked at (at least 1).
    pub window: usize,
    /// Share of them that must lie within `band_mhz` of their median.
    pub share: f64,
    pub band_mhz: u32,
}

/// What a busy window does, given the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusyWindow {
    /// Still falling back: stay at the maximum clock.
    HoldMaximum,
    /// Leaving the idle clock: the change is not rate-limited (the idle clock was no
    /// measurement).
    LeaveParking,
    /// Search on.
    Search,
}

/// The governor's stage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stage {
    Searching(Search),
    /// Held at the maximum clock for `windows_left` more busy windows after an SLO violation.
    Fallback {
        windows_left: u32,
        resume: Search,
    },
    /// Parked at the lowest clock for an idle window.
    Parked {
        resume: Search,
    },
}

impl Stage {
    /// A fresh governor sweeps.
    pub(crate) fn start() -> Self {
        Stage::Searching(Search::sweeping(None))
    }

    /// A restored governor resumes learning if its sweep was done (convergence is
    /// re-established under the current load), else sweeps.
    pub(crate) fn restored(sweep_done: bool) -> Self {
        Stage::Searching(if sweep_done { Search::learning(None, 0.0) } else { Search::sweeping(None) })
    }

    pub(crate) fn search(&self) -> &Search {
        match self {
            Stage::Searching(search) | Stage::Fallback { resume: search, .. } | Stage::Parked { resume: search } => {
                search
            }
        }
    }

    fn search_mut(&mut self) -> &mut Search {
        match self {
            Stage::Searching(search) | Stage::Fallback { resume: search, .. } | Stage::Parked { resume: search } => {
                search
            }
        }
    }

    /// Replaces the search by `next(old search)`, keeping any detour.
    fn move_search(&mut self, next: impl FnOnce(Search) -> Search) {
        let search = self.search_mut();
        let old = std::mem::replace(search, Search::sweeping(None));
        *search = next(old);
    }

    /// Replaces the stage by `next(old stage)`.
    fn move_stage(&mut self, next: impl FnOnce(Stage) -> Stage) {
        let old = std::mem::replace(self, Stage::start());
        *self = next(old);
    }

    fn into_search(self) -> Search {
        match self {
            Stage::Searching(search) | Stage::Fallback { resume: search, .. } | Stage::Parked { resume: search } => {
                search
            }
        }
    }

    pub(crate) fn sweep_done(&self) -> bool {
        !matches!(self.search(), Search::Sweeping { .. })
    }

    pub(crate) fn converged(&self) -> bool {
        matches!(self.search(), Search::Exploiting { .. })
    }

    /// The clock whose fine arms are tried first.
    pub(crate) fn refine_center(&self) -> Option<u32> {
        self.search().center()
    }

    /// Mean load of the last sweep; None while sweeping.
    pub(crate) fn swept_load(&self) -> Option<f64> {
        match self.search() {
            Search::Sweeping { .. } => None,
            Search::Learning { swept_load, .. } | Search::Exploiting { swept_load, .. } => Some(*swept_load),
        }
    }

    /// Counts a window's load towards the sweep's (only while sweeping).
    pub(crate) fn add_sweep_load(&mut self, rate: f64) {
        if let Search::Sweeping { load_sum, load_windows, .. } = self.search_mut() {
            *load_sum += rate;
            *load_windows += 1;
        }
    }

    /// Sweeping -> learning, refining around `best` (or the previous centre).
    pub(crate) fn finish_sweep(&mut self, best: Option<u32>) {
        self.move_search(|search| match search {
            Search::Sweeping { center, load_sum, load_windows } => {
                Search::learning(best.or(center), load_sum / f64::from(load_windows.max(1)))
            }
            other => other,
        });
    }

    /// Notes the clock just chosen; learning -> exploiting when the recent choices settle.
    /// Returns the clock converged on (their median).
    pub(crate) fn note_choice(&mut self, mhz: u32, rule: Convergence) -> Option<u32> {
        let Search::Learning { recent, swept_load, .. } = self.search_mut() else { return None };
        recent.push_back(mhz);
        while recent.len() > rule.window {
            recent.pop_front();
        }
        if recent.len() < rule.window {
            return None;
        }
        let mut sorted: Vec<u32> = recent.iter().copied().collect();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let inside = sorted.iter().filter(|m| m.abs_diff(median) <= rule.band_mhz).count();
        if (inside as f64) < rule.share * sorted.len() as f64 {
            return None;
        }
        let swept_load = *swept_load;
        *self.search_mut() = Search::Exploiting { center: median, swept_load, edp_rise_streak: 0 };
        Some(median)
    }

    /// Notes whether the exploited clock's EDP rose above expectation; true once it did for
    /// [`EDP_RISE_WINDOWS`] windows in a row (time to relearn). Only counts while exploiting.
    pub(crate) fn note_edp_rise(&mut self, rose: bool) -> bool {
        let Search::Exploiting { edp_rise_streak, .. } = self.search_mut() else { return false };
        *edp_rise_streak = if rose { *edp_rise_streak + 1 } else { 0 };
        *edp_rise_streak >= EDP_RISE_WINDOWS
    }

    /// Exploiting -> learning, around the clock it converged on.
    pub(crate) fn relearn(&mut self) {
        self.move_search(|search| match search {
            Search::Exploiting { center, swept_load, .. } => Search::learning(Some(center), swept_load),
            Search::Learning { center, swept_load, .. } => Search::learning(center, swept_load),
            sweeping => sweeping,
        });
    }

    /// Back to sweeping, with the load summed afresh.
    pub(crate) fn resweep(&mut self) {
        self.move_search(|search| Search::sweeping(search.center()));
    }

    /// An SLO violation: held at the maximum for `windows` busy windows. With none to hold
    /// the jump itself is the whole fallback and the stage stays as it was.
    pub(crate) fn fall_back(&mut self, windows: u32) {
        if windows > 0 {
            self.move_stage(|stage| Stage::Fallback { windows_left: windows, resume: stage.into_search() });
        }
    }

    /// An idle window, which `parked` the clock or not (rate limiting may hold it). A fallback
    /// goes on through idle windows.
    pub(crate) fn idle(&mut self, parked: bool) {
        if matches!(self, Stage::Fallback { .. }) {
            return;
        }
        self.move_stage(|stage| {
            let search = stage.into_search();
            if parked {
                Stage::Parked { resume: search }
            } else {
                Stage::Searching(search)
            }
        });
    }

    /// A busy window ends a detour (a fallback after its last window).
    pub(crate) fn busy(&mut self) -> BusyWindow {
        let mut what = BusyWindow::Search;
        self.move_stage(|stage| match stage {
            Stage::Fallback { windows_left, resume } => {
                what = BusyWindow::HoldMaximum;
                if windows_left > 1 {
                    Stage::Fallback { windows_left: windows_left - 1, resume }
                } else {
                    Stage::Searching(resume)
                }
            }
            Stage::Parked { resume } => {
                what = BusyWindow::LeaveParking;
                Stage::Searching(resume)
            }
            searching => searching,
        });
        what
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Convergence = Convergence { window: 4, share: 0.75, band_mhz: 90 };

    /// A stage that swept at a mean load of 1500 and refined around 1320 MHz.
    fn learning() -> Stage {
        let mut stage = Stage::start();
        stage.add_sweep_load(1000.0);
        stage.add_sweep_load(2000.0);
        stage.finish_sweep(Some(1320));
        stage
    }

    fn exploiting() -> Stage {
        let mut stage = learning();
        for mhz in [1320, 1320, 1335, 1320] {
            stage.note_choice(mhz, RULE);
        }
        assert!(stage.converged());
        stage
    }

    #[test]
    fn a_sweep_ends_in_learning_around_the_best_clock() {
        let mut stage = Stage::start();
        assert!(!stage.sweep_done() && !stage.converged());
        assert_eq!(stage.swept_load(), None);
        assert_eq!(stage.note_choice(1980, RULE), None, "choices during the sweep do not converge");
        stage.add_sweep_load(1000.0);
        stage.add_sweep_load(2000.0);
        stage.finish_sweep(Some(1320));
        assert!(stage.sweep_done() && !stage.converged());
        assert_eq!(stage.refine_center(), Some(1320));
        assert_eq!(stage.swept_load(), Some(1500.0));
        stage.add_sweep_load(9000.0);
        assert_eq!(stage.swept_load(), Some(1500.0), "only the sweep's windows count");
        // A sweep with nothing to refine around keeps the previous centre.
        stage.resweep();
        stage.finish_sweep(None);
        assert_eq!(stage.refine_center(), Some(1320));
        assert_eq!(stage.swept_load(), Some(0.0), "no window was summed");
    }

    #[test]
    fn settled_choices_converge_and_scattered_ones_do_not() {
        let mut stage = learning();
        for mhz in [1980, 1320, 1080] {
            assert_eq!(stage.note_choice(mhz, RULE), None);
        }
        assert_eq!(stage.note_choice(1320, RULE), None, "two of four within a step of the median");
        assert!(!stage.converged());
        // The oldest choice leaves the window: 1320 1080 1320 1335.
        assert_eq!(stage.note_choice(1335, RULE), Some(1320));
        assert!(stage.converged());
        assert_eq!(stage.refine_center(), Some(1320));
        assert_eq!(stage.swept_load(), Some(1500.0));
        assert_eq!(stage.note_choice(900, RULE), None, "converged once");
    }

    #[test]
    fn exploiting_relearns_or_sweeps_again_around_its_clock() {
        let mut stage = exploiting();
        stage.relearn();
        assert!(stage.sweep_done() && !stage.converged());
        assert_eq!(stage.refine_center(), Some(1320));
        assert_eq!(stage.swept_load(), Some(1500.0));
        assert_eq!(stage.note_choice(1320, RULE), None, "the recent choices start afresh");

        let mut stage = exploiting();
        stage.relearn();
        stage.resweep();
        assert!(!stage.sweep_done());
        assert_eq!(stage.refine_center(), Some(1320));
        stage.add_sweep_load(4000.0);
        stage.finish_sweep(Some(1500));
        assert_eq!((stage.refine_center(), stage.swept_load()), (Some(1500), Some(4000.0)));
    }

    #[test]
    fn rising_edp_relearns_only_after_enough_windows_in_a_row() {
        let mut stage = learning();
        assert!(!stage.note_edp_rise(true), "only counted while exploiting");
        let mut stage = exploiting();
        for _ in 1..EDP_RISE_WINDOWS {
            assert!(!stage.note_edp_rise(true));
        }
        assert!(!stage.note_edp_rise(false), "one window as expected starts the count again");
        for _ in 1..EDP_RISE_WINDOWS {
            assert!(!stage.note_edp_rise(true));
        }
        assert!(stage.note_edp_rise(true));
    }

    #[test]
    fn a_violation_falls_back_for_its_windows_then_resumes_the_search() {
        let mut stage = exploiting();
        stage.fall_back(2);
        assert!(matches!(stage, Stage::Fallback { windows_left: 2, .. }));
        assert!(stage.converged(), "the search is where it was");
        stage.idle(true);
        assert!(matches!(stage, Stage::Fallback { windows_left: 2, .. }), "idle windows do not count");
        assert_eq!(stage.busy(), BusyWindow::HoldMaximum);
        assert_eq!(stage.busy(), BusyWindow::HoldMaximum);
        assert_eq!(stage, exploiting(), "left after its windows");
        assert_eq!(stage.busy(), BusyWindow::Search);
        // The search can move while falling back (a relearn at the violating clock).
        stage.fall_back(1);
        stage.relearn();
        assert_eq!(stage.busy(), BusyWindow::HoldMaximum);
        assert!(matches!(stage, Stage::Searching(Search::Learning { center: Some(1320), .. })));
    }

    #[test]
    fn without_fallback_windows_a_violation_keeps_the_stage() {
        let mut stage = learning();
        stage.idle(true);
        stage.fall_back(0);
        assert!(matches!(stage, Stage::Parked { .. }));
        assert_eq!(stage.busy(), BusyWindow::LeaveParking);
    }

    #[test]
    fn an_idle_window_parks_until_the_next_busy_one() {
        let mut stage = learning();
        stage.idle(false);
        assert_eq!(stage, learning(), "rate limiting held the clock: not parked");
        stage.idle(true);
        assert!(matches!(stage, Stage::Parked { .. }));
        assert!(stage.sweep_done());
        assert_eq!(stage.busy(), BusyWindow::LeaveParking);
        assert_eq!(stage, learning());
        assert_eq!(stage.busy(), BusyWindow::Search);
    }

    #[test]
    fn a_restored_stage_learns_if_its_sweep_was_done() {
        assert!(Stage::restored(true).sweep_done() && !Stage::restored(true).converged());
        assert_eq!(Stage::restored(false), Stage::start());
    }
}
