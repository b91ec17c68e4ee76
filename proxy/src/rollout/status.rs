//! Where a rollout stands: its phase, step and canary weight, the windows
//! it has judged, and the moves between them. Persisted with the drains,
//! so a reload, a restart or an upgrade resumes at the same step; shared
//! with the other replicas through Redis with `[replicas]`.

use serde::{Deserialize, Serialize};

use super::judge::{Outcome, Verdict};
use crate::config::{Rollback, RolloutSpec};

/// Windows kept in the status for the admin API.
const RECENT: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    Paused,
    /// The last window was inconclusive: the weight holds.
    Holding,
    Promoted,
    RolledBack,
}

impl Phase {
    /// `switchyard_rollout_state`'s value.
    pub fn code(self) -> i64 {
        match self {
            Phase::Progressing => 0,
            Phase::Paused => 1,
            Phase::Holding => 2,
            Phase::Promoted => 3,
            Phase::RolledBack => 4,
        }
    }

    /// Windows are judged in this phase.
    pub fn judging(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Holding)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub phase: Phase,
    /// Index into `steps`.
    pub step: usize,
    /// The canary's weight in percent; the baseline has the rest.
    pub weight: u32,
    pub failed_in_row: u32,
    pub windows_judged: u32,
    #[serde(default)]
    pub recent: Vec<WindowRecord>,
    /// With `[replicas]`: the shared state's revision of this rollout that
    /// this copy came from (0: not shared). Kept beside the JSON in Redis.
    #[serde(skip)]
    pub revision: u64,
}

/// One judged window, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Unix seconds at the end of the window.
    pub at: f64,
    pub weight: u32,
    pub baseline_requests: u64,
    pub baseline_errors: u64,
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub outcome: Outcome,
    /// The checks that did not pass, with their figures.
    pub checks: Vec<String>,
}

impl WindowRecord {
    pub fn checks_of(verdict: &Verdict) -> Vec<String> {
        verdict
            .checks
            .iter()
            .filter(|c| c.outcome != Outcome::Pass)
            .map(|c| format!("{} {:?}: {}", c.name, c.outcome, c.detail))
            .collect()
    }
}

impl Rollout {
    /// A rollout at its first step.
    pub fn start(spec: &RolloutSpec) -> Self {
        Self {
            phase: Phase::Progressing,
            step: 0,
            weight: spec.steps[0],
            failed_in_row: 0,
            windows_judged: 0,
            recent: Vec::new(),
            revision: 0,
        }
    }

    /// Moves on from one judged window: a pass takes the next step (the
    /// last one promotes), an inconclusive window holds the weight, and
    /// `max_failed_checks` failures in a row roll back.
    pub fn after_window(&mut self, spec: &RolloutSpec, record: WindowRecord) {
        self.windows_judged += 1;
        match record.outcome {
            Outcome::Pass => {
                self.failed_in_row = 0;
                self.step = (self.step + 1).min(spec.steps.len() - 1);
                self.weight = spec.steps[self.step];
                self.phase = if self.weight == 100 {
                    Phase::Promoted
                } else {
                    Phase::Progressing
                };
            }
            Outcome::Inconclusive => self.phase = Phase::Holding,
            Outcome::Fail => {
                self.failed_in_row += 1;
                self.phase = Phase::Progressing;
                if self.failed_in_row >= spec.max_failed_checks {
                    self.roll_back(spec);
                }
            }
        }
        self.recent.push(record);
        let excess = self.recent.len().saturating_sub(RECENT);
        self.recent.drain(..excess);
    }

    /// To the baseline: at once, or (gradual) one step down now and one
    /// per interval after ([`Rollout::step_down`]).
    pub fn roll_back(&mut self, spec: &RolloutSpec) {
        self.phase = Phase::RolledBack;
        match spec.rollback {
            Rollback::Immediate => self.weight = 0,
            Rollback::Gradual => {
                self.step_down(spec);
            }
        }
    }

    /// One step lower on a gradual rollback; false once at 0.
    pub fn step_down(&mut self, spec: &RolloutSpec) -> bool {
        if self.weight == 0 {
            return false;
        }
        let lower = spec.steps.iter().rev().find(|w| **w < self.weight);
        self.weight = lower.copied().unwrap_or(0);
        true
    }

    pub fn promote(&mut self, spec: &RolloutSpec) {
        self.step = spec.steps.len() - 1;
        self.weight = 100;
        self.phase = Phase::Promoted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(rollback: Rollback) -> RolloutSpec {
        RolloutSpec {
            canary: "green".into(),
            steps: vec![5, 25, 50, 100],
            interval: Duration::from_secs(1),
            min_requests: 10,
            max_failed_checks: 2,
            max_error_rate: 0.01,
            max_latency_ratio: 1.5,
            significance: 0.01,
            rollback,
            compare: None,
            retry_on_baseline: true,
        }
    }

    fn window(outcome: Outcome) -> WindowRecord {
        WindowRecord {
            at: 0.0,
            weight: 0,
            baseline_requests: 0,
            baseline_errors: 0,
            canary_requests: 0,
            canary_errors: 0,
            outcome,
            checks: Vec::new(),
        }
    }

    #[test]
    fn passes_step_up_to_promotion_and_holds_wait() {
        let spec = spec(Rollback::Immediate);
        let mut r = Rollout::start(&spec);
        assert_eq!(r.weight, 5);
        r.after_window(&spec, window(Outcome::Inconclusive));
        assert_eq!((r.phase, r.weight), (Phase::Holding, 5));
        for want in [25, 50] {
            r.after_window(&spec, window(Outcome::Pass));
            assert_eq!((r.phase, r.weight), (Phase::Progressing, want));
        }
        r.after_window(&spec, window(Outcome::Pass));
        assert_eq!((r.phase, r.weight), (Phase::Promoted, 100));
    }

    #[test]
    fn failures_in_a_row_roll_back_at_once_or_step_by_step() {
        let spec_now = spec(Rollback::Immediate);
        let mut r = Rollout::start(&spec_now);
        r.after_window(&spec_now, window(Outcome::Pass));
        r.after_window(&spec_now, window(Outcome::Fail));
        r.after_window(&spec_now, window(Outcome::Pass));
        r.after_window(&spec_now, window(Outcome::Fail));
        assert_eq!(r.phase, Phase::Progressing, "failures were not in a row");
        r.after_window(&spec_now, window(Outcome::Fail));
        assert_eq!((r.phase, r.weight), (Phase::RolledBack, 0));

        let gradual = spec(Rollback::Gradual);
        let mut r = Rollout::start(&gradual);
        r.after_window(&gradual, window(Outcome::Pass));
        r.after_window(&gradual, window(Outcome::Pass));
        assert_eq!(r.weight, 50);
        r.after_window(&gradual, window(Outcome::Fail));
        r.after_window(&gradual, window(Outcome::Fail));
        assert_eq!((r.phase, r.weight), (Phase::RolledBack, 25));
        assert!(r.step_down(&gradual));
        assert!(r.step_down(&gradual));
        assert_eq!(r.weight, 0);
        assert!(!r.step_down(&gradual));
    }
}
