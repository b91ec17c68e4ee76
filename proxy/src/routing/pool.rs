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

use super::{clock, fastrand, Backend, Lease, Registry};
use crate::config::{BackendSpec, PoolSpec, Readiness};
use crate::metrics::{Metrics, PoolMetrics};

/// A backend as configured in one pool.
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// Requests in flight past which the member is full ([`NO_CAP`]: none).
    /// The count is the backend's, over every pool it serves; the cap is
    /// this configuration's, so a reload changes it and keeps the count.
    pub max_in_flight: u32,
    /// Connects in progress past which the member is full.
    pub max_connecting: u32,
    /// `switchyard_requests_total{pool, backend, code_class}` handles.
    pub requests: [IntCounter; 6],
    /// `switchyard_backend_full_skips_total{pool, backend}`.
    full_skips: IntCounter,
}

/// A cap no count reaches.
pub const NO_CAP: u32 = u32::MAX;

impl Member {
    /// At one of its caps; counted as a skip, since only a pick asks.
    #[inline]
    fn is_full(&self) -> bool {
        let full = self.at_cap();
        if full {
            self.full_skips.inc();
        }
        full
    }

    fn at_cap(&self) -> bool {
        self.backend.in_flight() >= self.max_in_flight
            || self.backend.connecting() >= self.max_connecting
    }
}

/// Pools up to this size are scanned on every pick.
pub const SCAN_MAX: usize = 32;
/// Picks per lease: each further one follows a claim that lost a capped
/// backend's last slot to a concurrent request.
const CLAIM_TRIES: usize = 4;
/// Members drawn per pick in a larger pool.
const CHOICES: usize = 2;
/// Draws allowed per pick before falling back to a scan (most of the pool
/// drained, unhealthy or already tried).
const DRAW_BUDGET: usize = 16;

pub struct Pool {
    pub name: String,
    pub members: Vec<Member>,
    pub metrics: PoolMetrics,
    /// How its backends are checked.
    pub readiness: Readiness,
    /// Some member has a cap: without one, picks skip the cap checks.
    capped: bool,
    report_ttl_ms: u64,
    /// Weighted draws for pools above [`SCAN_MAX`].
    sampler: Option<Alias>,
}

impl Pool {
    /// The pool `spec` describes, with the addresses `found` in DNS (those
    /// not listed already) as backends of weight 1.
    pub fn build(
        name: &str,
        spec: &PoolSpec,
        found: &[SocketAddr],
        registry: &Registry,
        metrics: &Metrics,
        report_ttl: Duration,
    ) -> Self {
        let listed = |a: &SocketAddr| spec.backends.iter().any(|b| b.socket == Some(*a));
        let extra = found.iter().filter(|a| !listed(a));
        let backends: Vec<BackendSpec> = (spec.backends.iter().cloned())
            .chain(extra.map(|a| BackendSpec::found(*a)))
            .collect();
        let members = backends
            .iter()
            .map(|b| {
                let backend = registry.get_or_create(b.socket_addr(), &b.address, metrics);
                Member {
                    weight: b.weight,
                    max_in_flight: b.max_in_flight.or(spec.max_in_flight).unwrap_or(NO_CAP),
                    max_connecting: b.max_connecting.or(spec.max_connecting).unwrap_or(NO_CAP),
                    requests: metrics.requests_by_class(name, &backend.name),
                    full_skips: metrics.full_skips(name, &backend.name),
                    backend,
                }
            })
            .collect::<Vec<Member>>();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Self {
            name: name.to_string(),
            capped: members
                .iter()
                .any(|m| m.max_in_flight != NO_CAP || m.max_connecting != NO_CAP),
            members,
            metrics: metrics.pool(name),
            readiness: spec.readiness,
            report_ttl_ms: u64::try_from(report_ttl.as_millis()).unwrap_or(u64::MAX),
            sampler: (weights.len() > SCAN_MAX).then(|| Alias::new(&weights)),
        }
    }

    /// A member for the next request, claimed (see [`Pool::pick`]): the
    /// lease counts the request in the backend's in-flight load, within
    /// its cap even when concurrent requests race for the last slot.
    pub fn lease(&self, tried: &[SocketAddr]) -> Option<(usize, Lease)> {
        for _ in 0..CLAIM_TRIES {
            let i = self.pick(tried)?;
            let m = &self.members[i];
            if let Some(lease) = Lease::claim(&m.backend, m.max_in_flight) {
                return Some((i, lease));
            }
        }
        None
    }

    /// A member for the next request, or `None` when none is eligible and
    /// below its caps. Returns the index into `members`.
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

    /// After a pick found nothing: whether that is because every member
    /// that could take the request is at its cap (the pool is busy, not
    /// broken), for the answer's message.
    pub fn all_full(&self, tried: &[SocketAddr]) -> bool {
        let open = self.members.iter().filter(|m| {
            m.weight > 0 && m.backend.is_eligible() && !tried.contains(&m.backend.addr)
        });
        let (mut any, mut all) = (false, true);
        for m in open {
            any = true;
            all &= m.at_cap();
        }
        self.capped && any && all
    }

    fn usable(&self, m: &Member, tried: &[SocketAddr]) -> bool {
        m.weight > 0
            && m.backend.is_eligible()
            && !tried.contains(&m.backend.addr)
            && !(self.capped && m.is_full())
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

    /// The address of test backend `i`.
    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
    }

    fn spec_of(weights: &[u32]) -> PoolSpec {
        PoolSpec {
            readiness: Default::default(),
            max_in_flight: None,
            max_connecting: None,
            dns: None,
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| BackendSpec {
                    weight: *w,
                    ..BackendSpec::found(addr(i))
                })
                .collect(),
        }
    }

    /// The pool of `spec`, every member healthy and ready.
    fn built(spec: &PoolSpec) -> Pool {
        let pool = Pool::build(
            "p",
            spec,
            &[],
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

    fn pool_of(weights: &[u32]) -> Pool {
        built(&spec_of(weights))
    }

    fn busy(m: &Member) -> Lease {
        Lease::claim(&m.backend, NO_CAP).expect("uncapped")
    }

    #[test]
    fn addresses_from_dns_join_as_weight_one_without_doubling_a_listed_one() {
        let registry = Registry::default();
        let metrics = Metrics::new();
        let found = [addr(1), addr(7)];
        let pool = Pool::build(
            "p",
            &spec_of(&[3, 5]),
            &found,
            &registry,
            &metrics,
            Duration::ZERO,
        );
        let members: Vec<(SocketAddr, u32)> = pool
            .members
            .iter()
            .map(|m| (m.backend.addr, m.weight))
            .collect();
        assert_eq!(members, [(addr(0), 3), (addr(1), 5), (addr(7), 1)]);
        assert!(
            !pool.members[2].backend.has_been_healthy(),
            "a new address starts unchecked"
        );
    }

    #[test]
    fn lowest_load_per_weight_wins() {
        let pool = pool_of(&[1, 2]);
        let _busy = [busy(&pool.members[0])];
        // Member 0: 1/1; member 1: 0/2.
        assert_eq!(pool.pick(&[]), Some(1));
        let _more = [
            busy(&pool.members[1]),
            busy(&pool.members[1]),
            busy(&pool.members[1]),
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
        let _busy: Vec<Lease> = pool.members[..100].iter().map(busy).collect();
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

    #[test]
    fn a_backend_cap_overrides_the_pool_cap() {
        let mut spec = spec_of(&[1, 1]);
        spec.max_in_flight = Some(4);
        spec.backends[1].max_in_flight = Some(2);
        spec.backends[1].max_connecting = Some(1);
        let caps: Vec<(u32, u32)> = built(&spec)
            .members
            .iter()
            .map(|m| (m.max_in_flight, m.max_connecting))
            .collect();
        assert_eq!(caps, [(4, NO_CAP), (2, 1)]);
    }

    #[test]
    fn full_members_are_skipped_even_when_least_loaded() {
        let mut spec = spec_of(&[10, 1]);
        spec.backends[0].max_in_flight = Some(1);
        spec.backends[1].max_connecting = Some(1);
        let pool = built(&spec);
        let (a, b) = (&pool.members[0], &pool.members[1]);
        let _leases = [busy(a), busy(b)];
        // Load per weight: a 1/10, b 1/1; a would win but is full.
        assert_eq!(pool.pick(&[]), Some(1));
        assert_eq!((a.full_skips.get(), b.full_skips.get()), (1, 0));

        let connecting = b.backend.hold_connect();
        assert_eq!(pool.pick(&[]), None, "every member at a cap");
        assert_eq!(pool.lease(&[]).map(|(i, _)| i), None);
        drop(connecting);
        assert_eq!(pool.pick(&[]), Some(1));
    }

    #[test]
    fn a_claim_at_the_cap_is_refused_and_leaves_the_count() {
        let pool = pool_of(&[1]);
        let b = &pool.members[0].backend;
        let held = [Lease::claim(b, 2), Lease::claim(b, 2)];
        assert!(held.iter().all(Option::is_some));
        assert!(Lease::claim(b, 2).is_none());
        assert_eq!(b.in_flight(), 2);
        drop(held);
        assert!(Lease::claim(b, 2).is_some());
    }

    /// Threads race for one slot; the claim, not the pick, keeps them out.
    #[test]
    fn concurrent_leases_never_pass_the_cap() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let mut spec = spec_of(&[1]);
        spec.max_in_flight = Some(1);
        let pool = built(&spec);
        // Leases held, counted only while one is held.
        let (held, peak) = (AtomicU32::new(0), AtomicU32::new(0));
        let until = std::time::Instant::now() + Duration::from_millis(500);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    while std::time::Instant::now() < until && peak.load(SeqCst) <= 1 {
                        if let Some((_, lease)) = pool.lease(&[]) {
                            peak.fetch_max(held.fetch_add(1, SeqCst) + 1, SeqCst);
                            held.fetch_sub(1, SeqCst);
                            drop(lease);
                        }
                    }
                });
            }
        });
        assert_eq!(peak.into_inner(), 1, "peak of leases held at once");
        assert_eq!(pool.members[0].backend.in_flight(), 0, "all released");
    }
}
