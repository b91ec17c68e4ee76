//! The traffic of a route under rollout, per arm (baseline and canary):
//! counted as requests finish, taken whole by the rollout judge once per
//! analysis window. Routes without a rollout pay one `None` check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::fastrand;

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
}

#[derive(Default)]
struct Reservoir {
    seen: u64,
    durations_ms: Vec<f64>,
}

/// What an arm saw in one window.
pub struct ArmTraffic {
    pub requests: u64,
    pub errors: u64,
    pub durations_ms: Vec<f64>,
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

    /// The window so far, and a fresh one begun.
    pub fn take(&self) -> ArmTraffic {
        let durations_ms = std::mem::take(&mut *self.sample.lock().expect("window lock"));
        ArmTraffic {
            requests: self.requests.swap(0, Relaxed),
            errors: self.errors.swap(0, Relaxed),
            durations_ms: durations_ms.durations_ms,
        }
    }
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
#[derive(Clone, Copy)]
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
        let drawn = (fastrand::next() >> 11) as f64 / (1u64 << 53) as f64;
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

    /// The window's pairs so far, and a fresh tally begun.
    pub fn take_agreement(&self) -> Agreement {
        std::mem::take(&mut *self.agreement.lock().expect("agreement lock"))
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
}
