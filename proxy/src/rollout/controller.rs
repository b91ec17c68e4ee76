//! The rollout loop: every `interval` of each route under rollout, take
//! both arms' window, judge it, and move the canary's weight. A rollout
//! starts when its section appears in the file (or through the admin API)
//! and ends when the section goes; meanwhile it owns the route's split.
//!
//! With `[replicas]`, only the replica holding the judge lease decides
//! (`crate::replicas`): it judges the window every replica added to Redis,
//! and its decisions reach the others as shared state. The others only
//! sample their backends' reports into their windows.

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
use crate::replicas::store::Link;
use crate::replicas::Author;
use crate::routing::{ArmTraffic, WindowCounts};
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

/// When each route's next window is due, on the replica that judges.
type Due = HashMap<String, Instant>;

impl Controller {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Samples the backends' reports into every rollout window; then, on
    /// the replica that judges, starts rollouts whose section appeared,
    /// judges the windows that are due, and ends rollouts whose section
    /// went. `link`: the shared windows, with `[replicas]`.
    async fn round(&self, due: &mut Due, mut link: Option<&mut Link>) {
        let active = self.shared.active();
        let rollouts = active
            .config
            .routes
            .iter()
            .filter_map(|r| Some((r.name.as_ref()?, r.rollout.as_ref()?)));
        for (name, _) in rollouts.clone() {
            let Some(windows) = self.shared.windows(name) else {
                continue;
            };
            for (arm, pool) in windows.arms.iter().zip(&windows.pools) {
                if let Some(pool) = active.pools.get(pool) {
                    arm.sample_reports(pool);
                }
            }
        }
        if link.is_some() && !self.shared.sync.is_judge() {
            // A judge-to-be starts every window afresh.
            due.clear();
            return;
        }
        let now = Instant::now();
        let mut live = HashSet::new();
        for (name, spec) in rollouts {
            live.insert(name.clone());
            if !due.contains_key(name) {
                due.insert(name.clone(), now + spec.interval);
                if let Some(link) = link.as_deref_mut() {
                    // Counted before this replica judged: another judge's
                    // window, or none.
                    collect(link, name).await;
                }
            }
            let Some(rollout) = self.shared.rollout(name) else {
                self.change(name, "started", |r| *r = Some(Rollout::start(spec)));
                due.insert(name.clone(), now + spec.interval);
                continue;
            };
            if now < due[name] {
                continue;
            }
            due.insert(name.clone(), now + spec.interval);
            let counts = match link.as_deref_mut() {
                None => self.shared.windows(name).map(|w| w.take()),
                Some(link) => collect(link, name).await,
            };
            if let Some(counts) = counts {
                self.window(name, spec, &rollout, counts);
            }
        }
        due.retain(|name, _| live.contains(name));
        for name in self.shared.rollout_names() {
            if !live.contains(&name) {
                self.change(&name, "ended: its section is gone", |r| *r = None);
            }
        }
    }

    /// One window of route `name`: judged while the rollout progresses or
    /// holds; a gradual rollback steps down once per window.
    fn window(&self, name: &str, spec: &RolloutSpec, rollout: &Rollout, counts: WindowCounts) {
        let WindowCounts {
            arms: [baseline, canary],
            agreement,
        } = counts;
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
            &arm(&baseline),
            &Arm {
                agreement_pairs: agreement.pairs,
                agreement_below: agreement.below,
                agreement_min: agreement.min,
                ..arm(&canary)
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
        if let Err(e) = self.shared.update_rollout(name, Author::Judge, change) {
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

fn arm(traffic: &ArmTraffic) -> Arm {
    let reports = &traffic.reports;
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

/// `name`'s window as every replica counted it; `None` (the window is
/// skipped) while Redis does not answer.
async fn collect(link: &mut Link, name: &str) -> Option<WindowCounts> {
    let mut conn = link.conn().await?;
    match link.store.collect(&mut conn, name).await {
        Ok(counts) => Some(counts),
        Err(e) => {
            tracing::warn!(target: TARGET, route = name, error = %e, "cannot take the shared window; skipped");
            link.lost();
            None
        }
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
        let mut due = Due::new();
        let mut link = Link::open(&self.shared.active().config.replicas);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => self.round(&mut due, link.as_mut()).await,
                _ = shutdown.changed() => return,
            }
        }
    }
}
