//! The rollout loop: every `interval` of each route under rollout, take
//! both arms' window, judge it, and move the canary's weight. A rollout
//! starts when its section appears in the file (or through the admin API)
//! and ends when the section goes; meanwhile it owns the route's split.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::Instant;

use super::judge::{self, Arm, Outcome, Policy};
use super::status::{Phase, Rollout, WindowRecord};
use crate::config::{Rollback, RolloutSpec};
use crate::routing::{ArmTraffic, Pool};
use crate::shared::Shared;

/// How often the loop looks for windows that are due.
const TICK: Duration = Duration::from_millis(100);

/// Windows a rollout is expected to judge, per step: the correction for
/// repeated looks assumes this many (docs/rollouts.md).
const LOOKS_PER_STEP: u32 = 4;

/// Log target of rollout decisions: one JSON line per judged window.
const TARGET: &str = "switchyard::rollout";

pub struct Controller {
    shared: Arc<Shared>,
}

/// What each arm's backends reported over a window, sampled every tick:
/// readiness flaps and queue depth, for the judge's report checks.
#[derive(Default, Clone, Copy)]
struct Reports {
    checks: u32,
    not_ready: u32,
    queue_depth_sum: u64,
}

impl Reports {
    fn sample(&mut self, pool: &Pool) {
        for member in &pool.members {
            let backend = &member.backend;
            self.checks += 1;
            self.not_ready += u32::from(!backend.is_ready());
            self.queue_depth_sum += u64::from(backend.queue_depth());
        }
    }

    fn queue_depth_mean(&self) -> f64 {
        self.queue_depth_sum as f64 / f64::from(self.checks.max(1))
    }
}

/// Per route under rollout: when its next window is due, and the reports
/// of its two arms so far.
struct Tracked {
    due: Instant,
    reports: [Reports; 2],
}

impl Controller {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Starts rollouts whose section appeared, judges the windows that are
    /// due, and ends rollouts whose section went.
    fn round(&self, tracked: &mut HashMap<String, Tracked>) {
        let active = self.shared.active();
        let now = Instant::now();
        let mut live = HashSet::new();
        for route in &active.config.routes {
            let (Some(name), Some(spec)) = (&route.name, &route.rollout) else {
                continue;
            };
            live.insert(name.clone());
            let track = tracked.entry(name.clone()).or_insert(Tracked {
                due: now + spec.interval,
                reports: Default::default(),
            });
            if let Some(windows) = self.shared.windows(name) {
                for (reports, pool) in track.reports.iter_mut().zip(&windows.pools) {
                    if let Some(pool) = active.pools.get(pool) {
                        reports.sample(pool);
                    }
                }
            }
            let Some(rollout) = self.shared.rollout(name) else {
                self.change(name, "started", |r| *r = Some(Rollout::start(spec)));
                track.due = now + spec.interval;
                continue;
            };
            if now >= track.due {
                track.due = now + spec.interval;
                let reports = std::mem::take(&mut track.reports);
                self.window(name, spec, &rollout, reports);
            }
        }
        tracked.retain(|name, _| live.contains(name));
        for name in self.shared.rollout_names() {
            if !live.contains(&name) {
                self.change(&name, "ended: its section is gone", |r| *r = None);
            }
        }
    }

    /// One window of route `name`: judged while the rollout progresses or
    /// holds; a gradual rollback steps down once per window.
    fn window(&self, name: &str, spec: &RolloutSpec, rollout: &Rollout, reports: [Reports; 2]) {
        let Some(windows) = self.shared.windows(name) else {
            return;
        };
        let [baseline, canary] = [windows.arms[0].take(), windows.arms[1].take()];
        let agreement = windows.take_agreement();
        let gradual = spec.rollback == Rollback::Gradual;
        if rollout.phase == Phase::RolledBack && gradual && rollout.weight > 0 {
            self.change(name, "stepped down", |r| {
                if let Some(r) = r {
                    r.step_down(spec);
                }
            });
            return;
        }
        if !rollout.phase.judging() {
            return;
        }
        let policy = Policy {
            min_requests: spec.min_requests,
            max_error_rate: spec.max_error_rate,
            max_latency_ratio: spec.max_latency_ratio,
            significance: spec.significance,
            looks: LOOKS_PER_STEP * spec.steps.len() as u32,
            min_cosine: spec.compare.as_ref().map(|c| c.min_cosine),
        };
        let verdict = judge::judge(
            &arm(&baseline, &reports[0]),
            &Arm {
                agreement_pairs: agreement.pairs,
                agreement_below: agreement.below,
                agreement_min: agreement.min,
                ..arm(&canary, &reports[1])
            },
            &policy,
        );
        for check in &verdict.checks {
            let result = outcome_name(check.outcome);
            self.shared
                .metrics
                .count_rollout_check(name, check.name, result);
        }
        let record = WindowRecord {
            at: crate::shared::unix_now(),
            weight: rollout.weight,
            baseline_requests: baseline.requests,
            baseline_errors: baseline.errors,
            canary_requests: canary.requests,
            canary_errors: canary.errors,
            outcome: verdict.outcome,
            checks: WindowRecord::checks_of(&verdict),
        };
        let what = format!("window {}", outcome_name(verdict.outcome));
        self.change(name, &what, |r| {
            if let Some(r) = r {
                r.after_window(spec, record);
            }
        });
    }

    /// Applies `change` to route `name`'s rollout, and logs and counts it.
    fn change(&self, name: &str, what: &str, change: impl FnOnce(&mut Option<Rollout>)) {
        let before = self.shared.rollout(name);
        if let Err(e) = self.shared.update_rollout(name, change) {
            tracing::error!(target: TARGET, route = name, error = %e, "could not persist the rollout state");
        }
        let after = self.shared.rollout(name);
        tracing::info!(
            target: TARGET,
            route = name,
            decision = what,
            weight_before = before.as_ref().map_or(0, |r| r.weight),
            weight = after.as_ref().map_or(0, |r| r.weight),
            phase = ?after.as_ref().map(|r| r.phase),
            failed_in_row = after.as_ref().map_or(0, |r| r.failed_in_row),
            "rollout"
        );
    }
}

fn arm(traffic: &ArmTraffic, reports: &Reports) -> Arm {
    Arm {
        requests: traffic.requests,
        errors: traffic.errors,
        durations_ms: traffic.durations_ms.clone(),
        readiness_checks: reports.checks,
        not_ready_checks: reports.not_ready,
        queue_depth_mean: reports.queue_depth_mean(),
        ..Arm::default()
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "pass",
        Outcome::Fail => "fail",
        Outcome::Inconclusive => "inconclusive",
    }
}

#[async_trait]
impl BackgroundService for Controller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tracked = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => self.round(&mut tracked),
                _ = shutdown.changed() => return,
            }
        }
    }
}
