//! Where a request goes: route matching, the split between pools, and the
//! weighted least-connections choice inside a pool, from each backend's
//! readiness report, and shedding by priority when the fleet saturates.

mod backend;
mod pool;
mod readiness;
mod router;
mod shed;
mod window;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use backend::{Backend, Lease};
pub use pool::{Member, Pool, NO_CAP};
pub use readiness::{parse_load_report, Progress, Report};
pub use router::{
    bucket_of, key_value, strip_port, ForceRule, HostMatch, RequestHeaders, Route, Router, Split,
    SplitEntry, StickyKey, BUCKETS,
};
pub use shed::{saturation, ShedRule};
pub use window::{
    Agreement, ArmTraffic, ArmWindow, MirrorSlot, Overrides, Reports, RouteWindows, WindowCounts,
    SAMPLE,
};

use crate::metrics::Metrics;

/// Every backend the process knows, by socket address, and the set of
/// drained addresses (kept even for backends not configured right now, so
/// a drain holds when the backend comes back). Consulted when a
/// configuration is installed and by the admin API, never per request.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    backends: HashMap<SocketAddr, Arc<Backend>>,
    drained: BTreeSet<SocketAddr>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().expect("registry lock")
    }

    /// The state for `addr`, created (not yet healthy) on first sight.
    pub fn get_or_create(&self, addr: SocketAddr, name: &str, metrics: &Metrics) -> Arc<Backend> {
        let mut inner = self.lock();
        let drained = inner.drained.contains(&addr);
        inner
            .backends
            .entry(addr)
            .or_insert_with(|| {
                let backend = Backend::new(addr, name.to_string(), metrics.backend(name));
                backend.set_draining(drained);
                Arc::new(backend)
            })
            .clone()
    }

    pub fn get(&self, addr: &SocketAddr) -> Option<Arc<Backend>> {
        self.lock().backends.get(addr).cloned()
    }

    /// Drops the state of `addr` (its drain, if any, is kept).
    pub fn forget(&self, addr: &SocketAddr) {
        self.lock().backends.remove(addr);
    }

    pub fn all(&self) -> Vec<Arc<Backend>> {
        self.lock().backends.values().cloned().collect()
    }

    /// Drains or undrains a known backend; `None` if the address is unknown.
    pub fn set_drained(&self, addr: &SocketAddr, on: bool) -> Option<Arc<Backend>> {
        let mut inner = self.lock();
        let backend = inner.backends.get(addr).cloned()?;
        backend.set_draining(on);
        if on {
            inner.drained.insert(*addr);
        } else {
            inner.drained.remove(addr);
        }
        Some(backend)
    }

    /// Re-applies drains persisted by an earlier run.
    pub fn restore_drains(&self, addrs: &[SocketAddr]) {
        let mut inner = self.lock();
        for addr in addrs {
            inner.drained.insert(*addr);
            if let Some(b) = inner.backends.get(addr) {
                b.set_draining(true);
            }
        }
    }

    /// Makes `set` the drained addresses (another replica's word):
    /// backends leaving it take traffic again, those entering it drain.
    pub fn replace_drains(&self, set: &BTreeSet<SocketAddr>) {
        let mut inner = self.lock();
        for addr in inner.drained.difference(set) {
            if let Some(b) = inner.backends.get(addr) {
                b.set_draining(false);
            }
        }
        for addr in set {
            if let Some(b) = inner.backends.get(addr) {
                b.set_draining(true);
            }
        }
        inner.drained = set.clone();
    }

    pub fn drained(&self) -> Vec<SocketAddr> {
        self.lock().drained.iter().copied().collect()
    }
}

/// A monotonic millisecond clock shared by health reports and ejections.
pub mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    static START: OnceLock<Instant> = OnceLock::new();

    /// Milliseconds since the first call in this process, plus one so that
    /// 0 can mean "never".
    pub fn now_ms() -> u64 {
        let start = *START.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }
}

/// A per-thread xorshift generator: tie-breaks and split draws need speed,
/// not cryptographic quality.
pub mod fastrand {
    use std::cell::Cell;

    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next() -> u64 {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    }

    /// Uniform-enough value in `0..n` (`n > 0`).
    #[inline]
    pub fn below(n: u64) -> u64 {
        // Multiply-shift maps the 64-bit value onto 0..n without division.
        ((u128::from(next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform value in `[0, 1)`: the top 53 bits as an `f64` fraction.
    #[inline]
    pub fn unit() -> f64 {
        (next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
