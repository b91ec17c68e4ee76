//! Weighted least-connections inside one pool.

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

pub struct Pool {
    pub name: String,
    pub members: Vec<Member>,
    pub metrics: PoolMetrics,
    report_ttl_ms: u64,
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
        Self {
            name: name.to_string(),
            members,
            metrics: metrics.pool(name),
            report_ttl_ms: u64::try_from(report_ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The eligible member with the lowest load / weight, skipping backends
    /// in `tried`. Ties are drawn at random in proportion to weight, so
    /// idle backends share traffic by weight instead of herding onto the
    /// first one.
    /// Returns the index into `members`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<usize> {
        let now = clock::now_ms();
        let mut best: Option<usize> = None;
        let (mut best_load, mut best_weight, mut tied_weight) = (0u64, 1u64, 0u64);
        for (i, m) in self.members.iter().enumerate() {
            if m.weight == 0 || !m.backend.is_eligible() || tried.contains(&m.backend.addr) {
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

    /// `cargo test --release -p switchyard pick_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, run by hand"]
    fn pick_cost_with_300_backends() {
        let pool = pool_of(&[1; 300]);
        let rounds = 200_000;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(pool.pick(&[]));
        }
        println!(
            "pick over 300 backends: {:?} per call",
            start.elapsed() / rounds
        );
    }
}
