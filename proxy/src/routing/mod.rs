//! Where a request goes: route matching, the split between pools, and the
//! weighted least-connections choice inside a pool.

mod backend;
mod pool;
mod router;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use backend::{Backend, Lease};
pub use pool::{Member, Pool};
pub use router::{strip_port, HostMatch, Route, Router, Split, SplitEntry, BUCKETS};

use crate::metrics::Metrics;

/// Every backend the process knows, by socket address. Consulted only
/// when a configuration is installed, never per request.
#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
}

impl Registry {
    /// The state for `addr`, created (not yet healthy) on first sight.
    pub fn get_or_create(&self, addr: SocketAddr, name: &str, metrics: &Metrics) -> Arc<Backend> {
        let mut map = self.backends.lock().expect("registry lock");
        map.entry(addr)
            .or_insert_with(|| {
                Arc::new(Backend::new(addr, name.to_string(), metrics.backend(name)))
            })
            .clone()
    }

    pub fn get(&self, addr: &SocketAddr) -> Option<Arc<Backend>> {
        self.backends
            .lock()
            .expect("registry lock")
            .get(addr)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Backend>> {
        self.backends
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
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

    /// Uniform-enough value in `0..n` (`n > 0`).
    #[inline]
    pub fn below(n: u64) -> u64 {
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            // Multiply-shift maps the 64-bit value onto 0..n without division.
            ((u128::from(x) * u128::from(n)) >> 64) as u64
        })
    }
}
