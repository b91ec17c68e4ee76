//! Runtime state of one upstream, keyed by socket address so that it
//! outlives any one configuration (in-flight counts, health, ejections and
//! drains carry across reloads).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::PassiveSection;
use crate::metrics::BackendMetrics;
use crate::upstream::{Conn, Idle};

use super::{clock, Progress};

/// Passes its active checks (rise/fall).
const HEALTHY: u8 = 1;
/// Its latest readiness report said `ready`.
const READY: u8 = 2;
/// Passive checks took it out; only an active check brings it back.
const EJECTED: u8 = 4;
/// An operator asked for no new requests.
const DRAINING: u8 = 8;

pub struct Backend {
    pub addr: SocketAddr,
    /// Label used in metrics, logs and response headers.
    pub name: String,
    /// HEALTHY | READY | EJECTED | DRAINING, read with one load per pick.
    flags: AtomicU8,
    in_flight: AtomicU32,
    /// Connects to it in progress (see [`Backend::connect`]).
    connecting: AtomicU32,
    queue_depth: AtomicU32,
    /// The queue capacity of the latest report (0 = not stated).
    queue_capacity: AtomicU32,
    /// When the queue depth was reported (clock ms; 0 = never).
    report_at_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    ejection: Mutex<Ejection>,
    /// Active-check bookkeeping, written only by the health checker.
    pub(crate) progress: Mutex<Progress>,
    /// Becomes true once `rise` checks have passed.
    seen_healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    pub metrics: BackendMetrics,
    /// Open connections waiting for the next HTTP/1.x request.
    pub idle: Idle,
}

/// Exponential-backoff bookkeeping for passive ejections.
#[derive(Default)]
struct Ejection {
    /// Ejections in the current streak; the next lasts base × 2^streak.
    streak: u32,
    until_ms: u64,
    returned_at_ms: u64,
}

impl Backend {
    pub fn new(addr: SocketAddr, name: String, metrics: BackendMetrics) -> Self {
        Self {
            addr,
            name,
            flags: AtomicU8::new(0),
            in_flight: AtomicU32::new(0),
            connecting: AtomicU32::new(0),
            queue_depth: AtomicU32::new(0),
            queue_capacity: AtomicU32::new(0),
            report_at_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejection: Mutex::new(Ejection::default()),
            progress: Mutex::new(Progress::default()),
            seen_healthy: AtomicBool::new(false),
            last_error: Mutex::new(None),
            metrics,
            idle: Idle::default(),
        }
    }

    /// Healthy, ready, not ejected and not draining.
    #[inline]
    pub fn is_eligible(&self) -> bool {
        self.flags.load(Relaxed) & (HEALTHY | READY | EJECTED | DRAINING) == HEALTHY | READY
    }

    /// Routing load: in-flight requests through this proxy plus the queue
    /// depth the backend reported, if that report is younger than `ttl_ms`.
    #[inline]
    pub fn load(&self, now_ms: u64, ttl_ms: u64) -> u64 {
        let in_flight = u64::from(self.in_flight.load(Relaxed));
        let at = self.report_at_ms.load(Relaxed);
        if at != 0 && now_ms.saturating_sub(at) < ttl_ms {
            in_flight + u64::from(self.queue_depth.load(Relaxed))
        } else {
            in_flight
        }
    }

    /// (Reported queue depth + requests in flight through this proxy) over
    /// the reported capacity; 1, saturated, without a report younger than
    /// `ttl_ms` that states a capacity: a backend that stopped reporting
    /// may be too busy to.
    pub fn saturation(&self, now_ms: u64, ttl_ms: u64) -> f64 {
        let at = self.report_at_ms.load(Relaxed);
        let capacity = self.queue_capacity.load(Relaxed);
        if at == 0 || now_ms.saturating_sub(at) >= ttl_ms || capacity == 0 {
            return 1.0;
        }
        let work = self.queue_depth.load(Relaxed) + self.in_flight.load(Relaxed);
        f64::from(work) / f64::from(capacity)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn connecting(&self) -> u32 {
        self.connecting.load(Relaxed)
    }

    /// Opens a connection for a request. It counts among the connects in
    /// progress until it is open or has failed, or until the attempt is
    /// dropped (a cancelled request), so the count cannot leak.
    pub async fn connect(&self, wait: Duration) -> io::Result<Conn> {
        let _pending = Pending::new(&self.connecting);
        Conn::open(self.addr, wait).await
    }

    /// A connect in progress without the connection, for selection tests.
    #[cfg(test)]
    pub(super) fn hold_connect(&self) -> impl Drop + '_ {
        Pending::new(&self.connecting)
    }

    pub fn is_healthy(&self) -> bool {
        self.flag(HEALTHY)
    }

    pub fn is_ready(&self) -> bool {
        self.flag(READY)
    }

    pub fn is_ejected(&self) -> bool {
        self.flag(EJECTED)
    }

    pub fn is_draining(&self) -> bool {
        self.flag(DRAINING)
    }

    /// False until the backend has passed `rise` checks once.
    pub fn has_been_healthy(&self) -> bool {
        self.seen_healthy.load(Relaxed)
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags.load(Relaxed) & bit != 0
    }

    /// Sets or clears `bit`; returns whether it changed.
    fn set_flag(&self, bit: u8, on: bool) -> bool {
        let old = if on {
            self.flags.fetch_or(bit, Relaxed)
        } else {
            self.flags.fetch_and(!bit, Relaxed)
        };
        (old & bit != 0) != on
    }

    pub fn set_healthy(&self, on: bool) -> bool {
        if on {
            self.seen_healthy.store(true, Relaxed);
        }
        self.metrics.up.set(i64::from(on));
        self.set_flag(HEALTHY, on)
    }

    pub fn set_ready(&self, on: bool) -> bool {
        self.metrics.ready.set(i64::from(on));
        self.set_flag(READY, on)
    }

    pub fn set_draining(&self, on: bool) -> bool {
        self.set_flag(DRAINING, on)
    }

    /// Forgets health knowledge so the backend must pass `rise` checks again
    /// (a backend re-added by a reload may have changed while unwatched).
    pub fn reset_health(&self) {
        self.set_healthy(false);
        self.set_ready(false);
        *self.progress.lock().expect("progress lock") = Progress::default();
    }

    /// The most recent failure seen in traffic, for the admin API.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last_error lock").clone()
    }

    fn note_error(&self, error: String) {
        *self.last_error.lock().expect("last_error lock") = Some(error);
    }

    /// Queue depth of the latest readiness report.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth.load(Relaxed)
    }

    /// Records the queue of a fresh readiness report.
    pub fn set_queue(&self, depth: u32, capacity: u32, now_ms: u64) {
        self.queue_depth.store(depth, Relaxed);
        self.queue_capacity.store(capacity, Relaxed);
        self.report_at_ms.store(now_ms.max(1), Relaxed);
        self.metrics.queue_depth.set(i64::from(depth));
    }

    /// A response below 500 (or an overload 503) ends a failure streak.
    #[inline]
    pub fn record_success(&self) {
        // Read first: writing on every request would bounce the cache line
        // between cores for no reason.
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// A connect failure or 5xx, described by `what`. Returns true when
    /// this ejected the backend.
    pub fn record_failure(&self, policy: &PassiveSection, what: String) -> bool {
        self.note_error(what);
        if policy.failures == 0 {
            return false;
        }
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        n >= policy.failures && self.eject(policy)
    }

    fn eject(&self, policy: &PassiveSection) -> bool {
        if !self.set_flag(EJECTED, true) {
            return false;
        }
        let now = clock::now_ms();
        let mut e = self.ejection.lock().expect("ejection lock");
        // A backend that stayed in service longer than the longest ejection
        // starts a new streak at the base duration.
        let max_ms = duration_ms(policy.ejection_max);
        if e.returned_at_ms != 0 && now.saturating_sub(e.returned_at_ms) > max_ms {
            e.streak = 0;
        }
        let backoff = duration_ms(policy.ejection_base).saturating_mul(1u64 << e.streak.min(20));
        e.until_ms = now + backoff.min(max_ms);
        e.streak = e.streak.saturating_add(1);
        self.consecutive_failures.store(0, Relaxed);
        self.metrics.ejections.inc();
        tracing::warn!(
            backend = %self.name,
            ejected_for_ms = e.until_ms - now,
            streak = e.streak,
            "backend ejected after {} consecutive failures",
            policy.failures
        );
        true
    }

    /// Called after a passing active check: ends an ejection whose period
    /// is over. Returns true when the backend came back.
    pub fn end_ejection_if_due(&self, now_ms: u64) -> bool {
        if !self.is_ejected() {
            return false;
        }
        let mut e = self.ejection.lock().expect("ejection lock");
        if now_ms < e.until_ms {
            return false;
        }
        e.returned_at_ms = now_ms;
        self.set_flag(EJECTED, false);
        tracing::info!(backend = %self.name, "ejection over, backend passed its check");
        true
    }

    /// Copies the in-flight count into its gauge (done at scrape time, so
    /// requests do not pay for a gauge update).
    pub fn publish_in_flight(&self) {
        self.metrics.in_flight.set(i64::from(self.in_flight()));
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One connect in progress, uncounted when dropped.
struct Pending<'a>(&'a AtomicU32);

impl<'a> Pending<'a> {
    fn new(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Relaxed);
        Self(count)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// One request's claim on a backend: counted in its in-flight load while
/// alive. Held in the request context, replaced on retry and dropped when
/// the request ends or is cancelled, so the count cannot leak.
pub struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    /// Counts a request on `backend` unless `cap` are already in flight
    /// ([`super::NO_CAP`]: no cap). Claiming by add-then-check keeps the uncapped
    /// claim one atomic add, as cheap as an unconditional count; a refused
    /// claim overstates the count for an instant, which can only make a
    /// concurrent claim more careful, never let one past the cap.
    pub fn claim(backend: &Arc<Backend>, cap: u32) -> Option<Self> {
        if backend.in_flight.fetch_add(1, Relaxed) >= cap {
            backend.in_flight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Self {
            backend: backend.clone(),
        })
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::time::Duration;

    #[test]
    fn ejections_double_from_the_base_up_to_the_cap() {
        let policy = PassiveSection {
            failures: 2,
            ejection_base: Duration::from_secs(5),
            ejection_max: Duration::from_secs(60),
        };
        let backend = Backend::new(
            "127.0.0.1:9".parse().expect("addr"),
            "b".into(),
            Metrics::new().backend("b"),
        );
        let mut lengths_s = Vec::new();
        for _ in 0..6 {
            assert!(!backend.record_failure(&policy, "first".into()));
            let before = clock::now_ms();
            assert!(backend.record_failure(&policy, "second".into()));
            assert!(backend.is_ejected());
            let until = backend.ejection.lock().expect("lock").until_ms;
            lengths_s.push((until - before + 500) / 1000);
            assert!(
                !backend.end_ejection_if_due(until - 1),
                "not before it is due"
            );
            assert!(backend.end_ejection_if_due(until));
            assert!(!backend.is_ejected());
        }
        assert_eq!(lengths_s, [5, 10, 20, 40, 60, 60]);
    }
}
