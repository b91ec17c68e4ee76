//! GCRA, the generic cell rate algorithm: one "theoretical arrival time"
//! (TAT) per key, the time at which the key's bucket is full again.
//!
//! Why not a fixed window: Envoy's ratelimit service counts per fixed window
//! and `pingora-limits`' `Rate::observe()` is a fixed window too, so a client
//! can spend a whole window's limit just before the window's edge and again
//! just after it: twice the limit within a few milliseconds. GCRA is rolling:
//! with burst `b` and rate `r`, any interval of length `d` passes at most
//! `b + r·d` units, and a key costs one timestamp, not a counter per window.
//!
//! Everything is integer nanoseconds and saturating, so no input (a clock at
//! `u64::MAX`, a TAT ahead of `now`, a cost of 0) can panic or wrap.

use std::time::Duration;

/// A rate and a burst, kept as integers for [`decide`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    rate: f64,
    burst: u32,
    /// Nanoseconds one unit takes to refill (at least 1).
    interval_ns: u64,
    /// How far the TAT may run ahead of now: `burst × interval_ns`.
    tolerance_ns: u64,
}

impl Quota {
    /// `burst` (at least 1) units a fresh key may spend at once, refilled at
    /// `rate_per_sec`; a rate that is not positive never refills.
    pub fn new(rate_per_sec: f64, burst: u32) -> Quota {
        let burst = burst.max(1);
        let interval_ns = if rate_per_sec > 0.0 {
            // `as` saturates: a tiny rate gives u64::MAX, a huge one 0.
            ((1e9 / rate_per_sec).round() as u64).max(1)
        } else {
            u64::MAX
        };
        Quota {
            rate: rate_per_sec,
            burst,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst)),
        }
    }

    /// The per-replica share of a quota that `divisor` replicas enforce
    /// together when they cannot share state (burst at least 1).
    pub fn scaled(&self, divisor: u32) -> Quota {
        let divisor = divisor.max(1);
        Quota::new(self.rate / f64::from(divisor), self.burst / divisor)
    }

    pub fn rate_per_sec(&self) -> f64 {
        self.rate
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Seconds an empty bucket takes to refill (the RateLimit-Policy window).
    pub fn window_secs(&self) -> f64 {
        f64::from(self.burst) / self.rate
    }

    pub(super) fn interval_ns(&self) -> u64 {
        self.interval_ns
    }
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Units that could still be spent right now, after this decision.
    pub remaining: u64,
    /// How long until this request would be allowed; zero when allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

/// Decides whether `cost` units may pass at `now` for a key whose stored TAT
/// is `tat` (0 for a key never seen; times in nanoseconds on one clock).
/// Returns the decision and the TAT to store: the new one when allowed, the
/// old one when refused.
///
/// A cost greater than the quota's burst can never fit and is always refused;
/// its `retry_after` is then the time the bucket would need to hold it.
pub fn decide(quota: &Quota, tat: u64, now: u64, cost: u64) -> (Decision, u64) {
    // A TAT in the past means a full bucket: it cannot hold more than burst.
    let new_tat = tat
        .max(now)
        .saturating_add(cost.saturating_mul(quota.interval_ns));
    let needed = new_tat - now; // new_tat >= now
    let allowed = cost <= u64::from(quota.burst) && needed <= quota.tolerance_ns;
    let stored = if allowed { new_tat } else { tat };
    let backlog = stored.saturating_sub(now);
    let retry_after = if allowed {
        0
    } else {
        needed.saturating_sub(quota.tolerance_ns)
    };
    let decision = Decision {
        allowed,
        remaining: quota.tolerance_ns.saturating_sub(backlog) / quota.interval_ns,
        retry_after: Duration::from_nanos(retry_after),
        reset: Duration::from_nanos(backlog),
    };
    (decision, stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// Runs `decide` at each time in `times` (cost 1), keeping the TAT;
    /// returns the times that were allowed.
    fn run(quota: &Quota, times: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut tat = 0;
        let mut allowed = Vec::new();
        for now in times {
            let (d, next) = decide(quota, tat, now, 1);
            tat = next;
            if d.allowed {
                allowed.push(now);
            }
        }
        allowed
    }

    #[test]
    fn a_burst_passes_then_the_next_waits_one_interval() {
        let q = Quota::new(10.0, 5);
        let now = 7 * SEC;
        let mut tat = 0;
        for left in (0..5).rev() {
            let (d, next) = decide(&q, tat, now, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            assert_eq!(d.retry_after, Duration::ZERO);
            tat = next;
        }
        let (d, kept) = decide(&q, tat, now, 1);
        assert!(!d.allowed);
        assert_eq!(kept, tat, "a refusal stores nothing new");
        assert_eq!(d.retry_after, Duration::from_millis(100));
        assert_eq!(d.reset, Duration::from_millis(500));
        // Exactly at retry_after it passes; a nanosecond before it does not.
        let later = now + 100_000_000;
        assert!(!decide(&q, tat, later - 1, 1).0.allowed);
        assert!(decide(&q, tat, later, 1).0.allowed);
    }

    #[test]
    fn steady_rate_at_the_limit_always_passes() {
        let q = Quota::new(100.0, 1);
        let step = SEC / 100;
        let allowed = run(&q, (1..=100_000).map(|i| i * step));
        assert_eq!(allowed.len(), 100_000);
    }

    #[test]
    fn steady_rate_above_the_limit_passes_the_limit() {
        // 10% too fast for 1000 s: 100 000 tries, 100 000 / 1.1 pass.
        let q = Quota::new(100.0, 5);
        let step = SEC / 110;
        let tries = 110_000;
        let allowed = run(&q, (1..=tries).map(|i| i * step)).len() as u64;
        let elapsed = tries * step - step;
        let most = 5 + elapsed / (SEC / 100);
        assert!(allowed <= most, "{allowed} > {most}");
        assert!(allowed + 2 >= most, "{allowed} far below {most}");
    }

    #[test]
    fn no_interval_passes_more_than_burst_plus_rate_times_length() {
        // 10/s with burst 10: a fixed one-second window would pass 10 at
        // 0.999 s and 10 more at 1.000 s. Here a client tries 20 times every
        // 0.5 ms for 5 s, starting just before what would be a window's edge.
        let q = Quota::new(10.0, 10);
        let start = SEC - SEC / 1000;
        let tries = (0..10_000).flat_map(|i| [start + i * SEC / 2000; 20]);
        let allowed = run(&q, tries);
        let around_edge = allowed.iter().filter(|&&t| t <= SEC + SEC / 1000).count();
        assert_eq!(
            around_edge, 10,
            "2 ms around the edge: the burst, not 2 × 10"
        );
        for lengths in [0, SEC / 1000, SEC / 2, SEC, 3 * SEC] {
            let most = 10 + lengths / q.interval_ns;
            for (i, &from) in allowed.iter().enumerate() {
                let n = allowed[i..].iter().take_while(|&&t| t <= from + lengths);
                let n = n.count() as u64;
                assert!(n <= most, "{n} in {lengths} ns from {from}");
            }
        }
    }

    #[test]
    fn costs_above_one_spend_several_units() {
        let q = Quota::new(1.0, 10);
        let now = SEC;
        let (d, tat) = decide(&q, 0, now, 4);
        assert!(d.allowed);
        assert_eq!((d.remaining, d.reset), (6, Duration::from_secs(4)));
        let (_, tat) = decide(&q, tat, now, 4);
        let (d, kept) = decide(&q, tat, now, 4);
        assert!(!d.allowed);
        assert_eq!(kept, tat);
        assert_eq!(d.remaining, 2);
        assert_eq!(d.retry_after, Duration::from_secs(2));
        let (d, tat) = decide(&q, tat, now, 2);
        assert!(d.allowed);
        assert_eq!((d.remaining, d.reset), (0, Duration::from_secs(10)));
        // A cost of 0 asks without spending.
        let (d, same) = decide(&q, tat, now + SEC, 0);
        assert!(d.allowed);
        assert_eq!((d.remaining, same), (1, tat));
    }

    #[test]
    fn a_cost_above_burst_is_refused_even_when_full() {
        let q = Quota::new(1.0, 10);
        let (d, tat) = decide(&q, 0, 100 * SEC, 11);
        assert!(!d.allowed);
        assert_eq!(tat, 0);
        assert_eq!(d.remaining, 10);
        assert_eq!(d.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn scaled_quota_divides_rate_and_burst() {
        let q = Quota::new(30.0, 9).scaled(3);
        assert_eq!((q.rate_per_sec(), q.burst()), (10.0, 3));
        assert_eq!(q.window_secs(), 0.3);
        assert_eq!(Quota::new(1.0, 2).scaled(5).burst(), 1);
        assert_eq!(Quota::new(1.0, 2).scaled(0), Quota::new(1.0, 2));
    }

    #[test]
    fn extreme_inputs_keep_the_invariants() {
        let quotas = [
            Quota::new(1e-12, 1),
            Quota::new(1e12, u32::MAX),
            Quota::new(0.0, 0),
            Quota::new(f64::NAN, 3),
            Quota::new(f64::INFINITY, 7),
        ];
        let values = [0, 1, 999, SEC, u64::MAX / 2, u64::MAX - 1, u64::MAX];
        for q in &quotas {
            for &tat in &values {
                for &now in &values {
                    for &cost in &values {
                        let (d, stored) = decide(q, tat, now, cost);
                        assert!(d.remaining <= u64::from(q.burst()), "{q:?}");
                        if d.allowed {
                            assert!(cost <= u64::from(q.burst()));
                            assert!(stored >= tat.max(now), "TAT wrapped: {q:?}");
                            assert_eq!(d.retry_after, Duration::ZERO);
                        } else {
                            assert_eq!(stored, tat);
                        }
                    }
                }
            }
        }
    }
}
