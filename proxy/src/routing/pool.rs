//! Weighted least-connections inside one pool.
//!
//! Up to [`SCAN_MAX`] members every pick scans the pool and takes the
//! least loaded (load / weight). Larger pools draw [`CHOICES`] members at
//! random in proportion to weight and take the least loaded of those (the
//! "power of d choices"), so a pick costs the same at 300 members as at
//! 30: a scan had made selection grow with the pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;

use super::{clock, fastrand, Backend, Registry};
use crate::config::PoolSpec;
use crate::metrics::{Metrics, PoolMetrics};

/// A backend as configured in one pool.
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// `switchyard_requests_total{pool, backend, code_class}` handles.
    pub requests: [IntCounter; 6],
}

/// Pools up to this size are scanned on every pick.
pub const SCAN_MAX: usize = 32;
/// Members drawn per pick in a larger pool.
const CHOICES: usize = 2;
/// Draws allowed per pick before falling back to a scan (most of the pool
/// drained, unhealthy or already tried).
const DRAW_BUDGET: usize = 16;

pub struct Pool {
    pub name: String,
    pub members: Vec<Member>,
    pub metrics: PoolMetrics,
    report_ttl_ms: u64,
    /// Weighted draws for pools above [`SCAN_MAX`].
    sampler: Option<Alias>,
}

impl Pool {
    pub fn build(
        name: &str,
        spec: &PoolSpec,
        registry: &Registry,
        metrics: &Metrics,
        report_ttl: Duration,
    ) -> Self {
        let members = spec
            .backends
            .iter()
            .map(|b| {
                let backend = registry.get_or_create(b.socket_addr(), &b.address, metrics);
                let requests = metrics.requests_by_class(name, &backend.name);
                Member {
                    backend,
                    weight: b.weight,
                    requests,
                }
            })
            .collect();
        let weights: Vec<u32> = spec.backends.iter().map(|b| b.weight).collect();
        Self {
            name: name.to_string(),
            members,
            metrics: metrics.pool(name),
            report_ttl_ms: u64::try_from(report_ttl.as_millis()).unwrap_or(u64::MAX),
            sampler: (weights.len() > SCAN_MAX).then(|| Alias::new(&weights)),
        }
    }

    /// A member for the next request, or `None` when none is eligible.
    /// Returns the index into `members`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<usize> {
        let now = clock::now_ms();
        self.sampler
            .as_ref()
            .and_then(|alias| self.draw(alias, tried, now))
            .or_else(|| self.scan(tried, now))
    }

    /// The sum of the eligible members' saturations, and their count.
    pub fn saturation(&self, now_ms: u64) -> (f64, usize) {
        let eligible = self.members.iter().filter(|m| self.usable(m, &[]));
        eligible.fold((0.0, 0), |(sum, n), m| {
            (
                sum + m.backend.saturation(now_ms, self.report_ttl_ms),
                n + 1,
            )
        })
    }

    fn usable(&self, m: &Member, tried: &[SocketAddr]) -> bool {
        m.weight > 0 && m.backend.is_eligible() && !tried.contains(&m.backend.addr)
    }

    /// The least loaded of [`CHOICES`] eligible members drawn by weight;
    /// `None` if the draw budget runs out before that many are found.
    fn draw(&self, alias: &Alias, tried: &[SocketAddr], now: u64) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None;
        let mut found = 0;
        for _ in 0..DRAW_BUDGET {
            let i = alias.draw();
            let m = &self.members[i];
            if !self.usable(m, tried) {
                continue;
            }
            let (load, weight) = (m.backend.load(now, self.report_ttl_ms), u64::from(m.weight));
            // load/weight < best's, without division.
            if best.is_none_or(|(_, l, w)| load * w < l * weight) {
                best = Some((i, load, weight));
            }
            found += 1;
            if found == CHOICES {
                return best.map(|(i, _, _)| i);
            }
        }
        None
    }

    /// The eligible member with the lowest load / weight, skipping backends
    /// in `tried`. Ties are drawn at random in proportion to weight, so
    /// idle backends share traffic by weight instead of herding onto the
    /// first one.
    fn scan(&self, tried: &[SocketAddr], now: u64) -> Option<usize> {
        let mut best: Option<usize> = None;
        let (mut best_load, mut best_weight, mut tied_weight) = (0u64, 1u64, 0u64);
        for (i, m) in self.members.iter().enumerate() {
            if !self.usable(m, tried) {
                continue;
            }
            let load = m.backend.load(now, self.report_ttl_ms);
            let weight = u64::from(m.weight);
            // load/weight < best_load/best_weight, without division.
            let (lhs, rhs) = (load * best_weight, best_load * weight);
            if best.is_none() || lhs < rhs {
                best = Some(i);
                (best_load, best_weight, tied_weight) = (load, weight, weight);
            } else if lhs == rhs {
                tied_weight += weight;
                if fastrand::below(tied_weight) < weight {
                    best = Some(i);
                    (best_load, best_weight) = (load, weight);
                }
            }
        }
        best
    }
}

/// Walker's alias table: a draw in proportion to weight in O(1).
struct Alias {
    /// Per slot: keep the slot itself if a 32-bit draw is below this.
    keep: Vec<u64>,
    other: Vec<usize>,
}

impl Alias {
    /// Weights of 0 are never drawn; at least one weight is positive.
    fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        // Each slot's share scaled so that the mean slot holds exactly 2^32.
        let mut share: Vec<u128> = weights
            .iter()
            .map(|w| (u128::from(*w) * n as u128) << 32)
            .map(|s| s / u128::from(total.max(1)))
            .collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| share[i] < 1 << 32);
        let mut keep = vec![1u64 << 32; n];
        let mut other: Vec<usize> = (0..n).collect();
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = share[s] as u64;
            other[s] = l;
            share[l] -= (1 << 32) - share[s];
            if share[l] < 1 << 32 {
                large.pop();
                small.push(l);
            }
        }
        // Rounding can leave slots unpaired; one of weight 0 must still
        // never be drawn.
        let heaviest = (0..n).max_by_key(|&i| weights[i]).unwrap_or(0);
        for s in small.into_iter().filter(|&s| weights[s] == 0) {
            keep[s] = 0;
            other[s] = heaviest;
        }
        Self { keep, other }
    }

    fn draw(&self) -> usize {
        let bits = fastrand::next();
        let slot = ((u128::from(bits >> 32) * self.keep.len() as u128) >> 32) as usize;
        if bits & 0xffff_ffff < self.keep[slot] {
            slot
        } else {
            self.other[slot]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;
    use crate::routing::Lease;

    fn pool_of(weights: &[u32]) -> Pool {
        let spec = PoolSpec {
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr: SocketAddr =
                        format!("127.0.0.1:{}", 10_000 + i).parse().expect("addr");
                    BackendSpec {
                        address: addr.to_string(),
                        weight: *w,
                        socket: Some(addr),
                    }
                })
                .collect(),
        };
        let pool = Pool::build(
            "p",
            &spec,
            &Registry::default(),
            &Metrics::new(),
            Duration::from_secs(3),
        );
        for m in &pool.members {
            m.backend.set_healthy(true);
            m.backend.set_ready(true);
        }
        pool
    }

    #[test]
    fn lowest_load_per_weight_wins() {
        let pool = pool_of(&[1, 2]);
        let _busy = [Lease::new(pool.members[0].backend.clone())];
        // Member 0: 1/1; member 1: 0/2.
        assert_eq!(pool.pick(&[]), Some(1));
        let _more = [
            Lease::new(pool.members[1].backend.clone()),
            Lease::new(pool.members[1].backend.clone()),
            Lease::new(pool.members[1].backend.clone()),
        ];
        // Member 0: 1/1 = 1; member 1: 3/2 = 1.5.
        assert_eq!(pool.pick(&[]), Some(0));
    }

    #[test]
    fn skips_tried_ineligible_and_zero_weight_members() {
        let pool = pool_of(&[1, 1, 0, 1]);
        pool.members[0].backend.set_draining(true);
        let tried = [pool.members[1].backend.addr];
        assert_eq!(pool.pick(&tried), Some(3));
        pool.members[3].backend.set_ready(false);
        assert_eq!(pool.pick(&tried), None);
    }

    #[test]
    fn idle_ties_split_by_weight() {
        let pool = pool_of(&[3, 1]);
        let heavy = (0..20_000).filter(|_| pool.pick(&[]) == Some(0)).count();
        let share = heavy as f64 / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{share}");
    }

    #[test]
    fn alias_draws_follow_the_weights() {
        let alias = Alias::new(&[1, 0, 3, 4]);
        let mut counts = [0u32; 4];
        for _ in 0..80_000 {
            counts[alias.draw()] += 1;
        }
        assert_eq!(counts[1], 0, "weight 0 is never drawn");
        for (i, want) in [(0, 0.125), (2, 0.375), (3, 0.5)] {
            let got = f64::from(counts[i]) / 80_000.0;
            assert!((got - want).abs() < 0.01, "member {i}: {got} vs {want}");
        }
    }

    #[test]
    fn large_pools_pick_by_sampling_and_avoid_loaded_members() {
        let pool = pool_of(&[1; 300]);
        assert!(pool.sampler.is_some());
        // A third of the pool busy: two choices land on a busy member
        // only when both draws do (1/9 of picks).
        let _busy: Vec<Lease> = pool.members[..100]
            .iter()
            .map(|m| Lease::new(m.backend.clone()))
            .collect();
        let busy = (0..9_000)
            .filter(|_| pool.pick(&[]).is_some_and(|i| i < 100))
            .count();
        assert!(busy < 1_500, "{busy} of 9000 picks on busy members");
    }

    #[test]
    fn large_pools_fall_back_to_a_scan_when_few_members_are_eligible() {
        let pool = pool_of(&[1; 100]);
        for m in &pool.members[1..] {
            m.backend.set_draining(true);
        }
        assert_eq!(pool.pick(&[]), Some(0));
        assert_eq!(pool.pick(&[pool.members[0].backend.addr]), None);
    }
}
