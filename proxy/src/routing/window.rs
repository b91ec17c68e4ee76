//! The traffic of a route under rollout, per arm (baseline and canary):
//! counted as requests finish, taken whole by the rollout judge once per
//! analysis window (or, with `[replicas]`, by the sync loop once per
//! resync, to be summed in Redis). Routes without a rollout pay one `None`
//! check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{fastrand, Pool};

/// Durations kept per arm per window: enough for a p99 and a rank test,
/// bounded whatever the traffic.
pub const SAMPLE: usize = 2000;

/// One arm's counters in the current window.
#[derive(Default)]
pub struct ArmWindow {
    requests: AtomicU64,
    errors: AtomicU64,
    /// A uniform reservoir sample of durations (Vitter's algorithm R).
    sample: Mutex<Reservoir>,
    /// The arm's backends' reports, sampled by the rollout loop.
    reports: Mutex<Reports>,
}

#[derive(Default)]
struct Reservoir {
    seen: u64,
    durations_ms: Vec<f64>,
}

/// What an arm's backends reported over a window, sampled every tick of
/// the rollout loop: readiness flaps and queue depth, for the judge's
/// report checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reports {
    pub checks: u32,
    pub not_ready: u32,
    pub queue_depth_sum: u64,
}

impl Reports {
    pub fn queue_depth_mean(&self) -> f64 {
        self.queue_depth_sum as f64 / f64::from(self.checks.max(1))
    }

    fn add(&mut self, other: &Reports) {
        self.checks += other.checks;
        self.not_ready += other.not_ready;
        self.queue_depth_sum += other.queue_depth_sum;
    }
}

/// What an arm saw in one window.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ArmTraffic {
    pub requests: u64,
    pub errors: u64,
    /// A uniform sample of the requests' durations.
    pub durations_ms: Vec<f64>,
    pub reports: Reports,
}

impl ArmWindow {
    /// Counts a finished request; `failed`: a 5xx reached the client.
    pub fn record(&self, failed: bool, elapsed_ms: f64) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
        let mut sample = self.sample.lock().expect("window lock");
        sample.seen += 1;
        if sample.durations_ms.len() < SAMPLE {
            sample.durations_ms.push(elapsed_ms);
        } else {
            let slot = fastrand::below(sample.seen) as usize;
            if slot < SAMPLE {
                sample.durations_ms[slot] = elapsed_ms;
            }
        }
    }

    /// Notes what `pool`'s backends report now.
    pub fn sample_reports(&self, pool: &Pool) {
        let mut reports = self.reports.lock().expect("window lock");
        for member in &pool.members {
            let backend = &member.backend;
            reports.checks += 1;
            reports.not_ready += u32::from(!backend.is_ready());
            reports.queue_depth_sum += u64::from(backend.queue_depth());
        }
    }

    /// The window so far, and a fresh one begun.
    pub fn take(&self) -> ArmTraffic {
        let durations_ms = std::mem::take(&mut *self.sample.lock().expect("window lock"));
        ArmTraffic {
            requests: self.requests.swap(0, Relaxed),
            errors: self.errors.swap(0, Relaxed),
            durations_ms: durations_ms.durations_ms,
            reports: std::mem::take(&mut *self.reports.lock().expect("window lock")),
        }
    }
}

/// Both arms' traffic and the output agreement of one window: what the
/// judge weighs, and what a replica adds to the shared window.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WindowCounts {
    /// [baseline, canary]
    pub arms: [ArmTraffic; 2],
    pub agreement: Agreement,
}

impl WindowCounts {
    /// The counts of several replicas (or several moments) as one window:
    /// counts add up, and each arm's samples become one uniform sample of
    /// the union of at most about `cap` durations.
    pub fn sum(parts: &[WindowCounts], cap: usize) -> WindowCounts {
        let mut total = WindowCounts::default();
        for (i, arm) in total.arms.iter_mut().enumerate() {
            for part in parts.iter().map(|p| &p.arms[i]) {
                arm.requests += part.requests;
                arm.errors += part.errors;
                arm.reports.add(&part.reports);
            }
            let samples: Vec<(u64, &[f64])> = parts
                .iter()
                .map(|p| (p.arms[i].requests, p.arms[i].durations_ms.as_slice()))
                .collect();
            arm.durations_ms = merge_samples(&samples, cap);
        }
        for part in parts {
            let (a, b) = (&mut total.agreement, &part.agreement);
            a.pairs += b.pairs;
            a.below += b.below;
            a.min = a.min.min(b.min);
        }
        total
    }
}

/// One uniform sample of the union of several sets, from a uniform sample
/// of each (`(set size, its sample)`). Poisson sampling: every request of
/// the union is kept with the same probability `rate`, so a value of a
/// sample that stands for `n / k` requests is kept with probability
/// `rate · n / k`. `rate` is at most `cap` over the union's size, and at
/// most the sparsest sample's own rate (a sample cannot be made denser).
fn merge_samples(parts: &[(u64, &[f64])], cap: usize) -> Vec<f64> {
    let sampled = parts.iter().filter(|(n, s)| *n > 0 && !s.is_empty());
    let union: u64 = sampled.clone().map(|(n, _)| n).sum();
    let sparsest = sampled
        .clone()
        .map(|(n, s)| s.len() as f64 / *n as f64)
        .fold(1.0, f64::min);
    let rate = (cap as f64 / union.max(1) as f64).min(sparsest);
    let mut out = Vec::new();
    for (n, sample) in sampled {
        let keep = rate * *n as f64 / sample.len() as f64;
        out.extend(sample.iter().filter(|_| fastrand::unit() < keep));
    }
    out
}

/// Both arms of one route.
pub struct RouteWindows {
    /// [baseline, canary]
    pub pools: [String; 2],
    pub arms: [ArmWindow; 2],
    /// Output agreement: (share of requests mirrored, lowest cosine).
    pub compare: Option<(f64, f64)>,
    /// `rollout.retry_on_baseline`.
    pub retry_on_baseline: bool,
    agreement: Mutex<Agreement>,
    /// Mirrors in flight right now, capped by [`MAX_MIRRORS`].
    mirrors: AtomicU64,
}

/// Mirrored requests in flight at once, per route: the cap on what output
/// agreement adds to the fleet's load whatever the traffic.
pub const MAX_MIRRORS: u64 = 4;

/// Mirrored pairs compared in the current window.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Agreement {
    pub pairs: u32,
    pub below: u32,
    pub min: f64,
}

impl Default for Agreement {
    fn default() -> Self {
        Self {
            pairs: 0,
            below: 0,
            min: 1.0,
        }
    }
}

/// A claim on one of the route's mirror slots, given back when dropped.
pub struct MirrorSlot(Arc<RouteWindows>);

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.0.mirrors.fetch_sub(1, Relaxed);
    }
}

impl RouteWindows {
    pub fn new(
        baseline: &str,
        canary: &str,
        compare: Option<(f64, f64)>,
        retry_on_baseline: bool,
    ) -> Self {
        Self {
            pools: [baseline.to_string(), canary.to_string()],
            arms: Default::default(),
            compare,
            retry_on_baseline,
            agreement: Mutex::default(),
            mirrors: AtomicU64::new(0),
        }
    }

    /// A mirror slot for this request: drawn at the `compare` sample rate,
    /// and only while fewer than [`MAX_MIRRORS`] are in flight.
    pub fn mirror_slot(self: &Arc<Self>) -> Option<MirrorSlot> {
        let (sample, _) = self.compare?;
        let drawn = fastrand::unit();
        if drawn >= sample || self.mirrors.fetch_add(1, Relaxed) >= MAX_MIRRORS {
            if drawn < sample {
                self.mirrors.fetch_sub(1, Relaxed);
            }
            return None;
        }
        Some(MirrorSlot(self.clone()))
    }

    /// Counts one compared pair.
    pub fn record_agreement(&self, cosine: f64) {
        let Some((_, bound)) = self.compare else {
            return;
        };
        let mut a = self.agreement.lock().expect("agreement lock");
        a.pairs += 1;
        a.below += u32::from(cosine < bound);
        a.min = a.min.min(cosine);
    }

    /// Both arms' window so far, and a fresh one begun.
    pub fn take(&self) -> WindowCounts {
        let agreement = std::mem::take(&mut *self.agreement.lock().expect("agreement lock"));
        WindowCounts {
            arms: [self.arms[0].take(), self.arms[1].take()],
            agreement,
        }
    }

    /// The arm of `pool`, if it is one of the two.
    pub fn arm(&self, pool: &str) -> Option<usize> {
        self.pools.iter().position(|p| p == pool)
    }
}

/// What rollouts change in the routes built from a configuration: the
/// canary weight each one set, and the windows its traffic is counted in.
#[derive(Default, Clone)]
pub struct Overrides {
    /// Route name to canary weight in percent.
    pub weights: BTreeMap<String, u32>,
    /// Route name to its windows, kept across rebuilds of the routes.
    pub windows: BTreeMap<String, Arc<RouteWindows>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_and_samples_boundedly_then_starts_afresh() {
        let arm = ArmWindow::default();
        for i in 0..5000 {
            arm.record(i % 10 == 0, f64::from(i));
        }
        let seen = arm.take();
        assert_eq!((seen.requests, seen.errors), (5000, 500));
        assert_eq!(seen.durations_ms.len(), SAMPLE);
        // A uniform sample of 0..5000 has a mean near 2500.
        let mean = seen.durations_ms.iter().sum::<f64>() / SAMPLE as f64;
        assert!((2300.0..2700.0).contains(&mean), "{mean}");
        let next = arm.take();
        assert_eq!(
            (next.requests, next.errors, next.durations_ms.len()),
            (0, 0, 0)
        );
    }

    fn part(requests: u64, errors: u64, sample: usize, value: f64, min: f64) -> WindowCounts {
        let arm = ArmTraffic {
            requests,
            errors,
            durations_ms: vec![value; sample],
            reports: Reports {
                checks: 10,
                not_ready: 1,
                queue_depth_sum: 30,
            },
        };
        WindowCounts {
            arms: [arm.clone(), arm],
            agreement: Agreement {
                pairs: 2,
                below: 1,
                min,
            },
        }
    }

    /// A busy replica's sample of 2,000 stands for 10,000 requests, a quiet
    /// one's 1,000 for 1,000: in the sum, the quiet one's durations must be
    /// about 1/11 of the sample, not the 1/3 a concatenation would give.
    #[test]
    fn sums_add_counts_and_keep_the_sample_uniform() {
        let parts = [
            part(10_000, 50, 2000, 1.0, 0.9),
            part(1000, 5, 1000, 2.0, 0.5),
        ];
        let sum = WindowCounts::sum(&parts, SAMPLE);
        let arm = &sum.arms[1];
        assert_eq!((arm.requests, arm.errors), (11_000, 55));
        assert_eq!(
            arm.reports,
            Reports {
                checks: 20,
                not_ready: 2,
                queue_depth_sum: 60
            }
        );
        let a = &sum.agreement;
        assert_eq!((a.pairs, a.below, a.min), (4, 2, 0.5));
        let n = arm.durations_ms.len();
        let quiet = arm.durations_ms.iter().filter(|d| **d == 2.0).count();
        let share = quiet as f64 / n as f64;
        assert!((1850..=2150).contains(&n), "{n}");
        assert!((0.07..0.115).contains(&share), "{share}");
        // A sample cannot be made denser than the sparsest part's.
        let sparse = WindowCounts::sum(&[part(10_000, 0, 100, 1.0, 1.0)], SAMPLE);
        assert_eq!(sparse.arms[0].durations_ms.len(), 100);
        let thinned = WindowCounts::sum(&[part(1000, 0, 1000, 1.0, 1.0)], 100);
        let n = thinned.arms[0].durations_ms.len();
        assert!((60..=140).contains(&n), "{n}");
    }
}
