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
