//! Shared limits: the GCRA state lives in Redis, so a limit holds across
//! all proxy replicas together.
//!
//! Each decision is one Lua script run (EVALSHA) that reads the key's TAT,
//! decides with Redis's own clock (`TIME`, so replicas' clocks do not
//! matter) and stores the new TAT with an expiry equal to the time to refill.
//! All decisions of a replica are pipelined on one multiplexed connection.
//!
//! When Redis is slow (past [`SharedOptions::timeout`]), failing or down, the
//! decision falls back to an in-process [`LocalStore`] with the quota divided
//! by the number of replicas, or to a refusal when `fail_closed`; after a
//! failure Redis is left alone for [`BACKOFF`] and then probed by one
//! request, so a dead Redis does not add the timeout to every request.
//!
//! Not built: a local token lease (taking a batch of units from Redis and
//! spending them locally). A decision already costs one pipelined round trip
//! on a connection that stays open, and a lease would let replicas overspend
//! by up to a batch each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::gcra::{Decision, Quota};
use super::local::LocalStore;

/// How long Redis is skipped after a failure before one request probes it;
/// also the `retry_after` of a fail-closed refusal.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// Keys the fallback store holds (about 2 MiB at most).
const FALLBACK_KEYS: usize = 65_536;

/// [`super::gcra::decide`] in Lua, on microseconds since the Unix epoch:
/// Lua numbers are doubles, exact up to 2^53, which holds microseconds
/// (~1.8e15) but not nanoseconds. ARGV: interval (µs), burst, cost.
/// Returns allowed (0/1), remaining, retry_after and reset (ms, rounded up).
const SCRIPT: &str = r"
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tolerance = burst * interval
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local new_tat = math.max(tat, now) + cost * interval
local allowed = cost <= burst and new_tat - now <= tolerance
local stored = tat
local retry = math.max(new_tat - now - tolerance, 0)
if allowed then
  stored, retry = new_tat, 0
end
local backlog = math.max(stored - now, 0)
if allowed and cost > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', stored), 'PX', math.ceil(backlog / 1000))
end
local remaining = math.floor(math.max(tolerance - backlog, 0) / interval)
-- A cost far above burst must not overflow Redis's integer reply.
return {allowed and 1 or 0, remaining, math.min(math.ceil(retry / 1000), 2^53), math.ceil(backlog / 1000)}
";

/// How a shared limiter behaves; the metrics are registered by the caller.
#[derive(Clone)]
pub struct SharedOptions {
    /// The longest a decision waits for Redis.
    pub timeout: Duration,
    /// Replicas sharing the limit: a fallback allows each 1/replicas of it.
    pub replicas: u32,
    /// Refuse instead of deciding locally while Redis is unavailable.
    pub fail_closed: bool,
    /// Seconds of each Redis round trip that answered.
    pub rtt: prometheus::Histogram,
    /// Decisions made without Redis (fallback or fail-closed).
    pub fallbacks: prometheus::IntCounter,
}

/// Who made a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Redis,
    /// The local store, with the quota divided by the replicas.
    Fallback,
    /// Refused because Redis is unavailable and the limiter fails closed.
    Closed,
}

/// A limiter whose state is shared through Redis.
pub struct SharedLimiter {
    client: redis::Client,
    link: Arc<Link>,
    script: redis::Script,
    /// 0 while Redis answers; else the time (`now` of [`Self::check`]) from
    /// which the next request may probe it.
    probe_at: AtomicU64,
    local: LocalStore,
    opts: SharedOptions,
}

/// The connection, made in the background by the first check.
#[derive(Default)]
struct Link {
    conn: OnceLock<ConnectionManager>,
    connecting: OnceLock<()>,
}

impl SharedLimiter {
    /// Parses `url`; connects later, in the background, on the first check,
    /// so an unreachable Redis never delays startup.
    pub fn new(url: &str, opts: SharedOptions) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
        Ok(SharedLimiter {
            client,
            link: Arc::default(),
            script: redis::Script::new(SCRIPT),
            probe_at: AtomicU64::new(0),
            local: LocalStore::new(FALLBACK_KEYS),
            opts,
        })
    }

    /// Decides one request of `cost` units: by Redis under `redis_key`
    /// ([`super::local::stable_key`]) when it answers in time, else locally
    /// under `local_key` at `now` ([`super::local::now_ns`]). Until the first
    /// connection is made (a round trip after the first check) decisions are
    /// local, or refusals when failing closed. Must run on a Tokio runtime.
    pub async fn check(
        &self,
        redis_key: &str,
        local_key: u64,
        quota: &Quota,
        cost: u64,
        now: u64,
    ) -> (Decision, Via) {
        let Some(conn) = self.connection() else {
            return self.fallback(local_key, quota, cost, now);
        };
        if self.may_ask_redis(now) {
            if let Some(decision) = self.ask_redis(conn, redis_key, quota, cost).await {
                self.probe_at.store(0, Ordering::Relaxed);
                return (decision, Via::Redis);
            }
            self.probe_at.store(next_probe(now), Ordering::Relaxed);
        }
        self.fallback(local_key, quota, cost, now)
    }

    /// Whether this request may use Redis: always while it answers; after a
    /// failure, only the one request that first claims the probe time.
    fn may_ask_redis(&self, now: u64) -> bool {
        let at = self.probe_at.load(Ordering::Relaxed);
        if at == 0 {
            return true;
        }
        now >= at
            && self
                .probe_at
                .compare_exchange(at, next_probe(now), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Redis's decision, or None when it failed or did not answer in time.
    async fn ask_redis(
        &self,
        mut conn: ConnectionManager,
        key: &str,
        quota: &Quota,
        cost: u64,
    ) -> Option<Decision> {
        let mut run = self.script.key(key);
        run.arg(quota.interval_ns().div_ceil(1000))
            .arg(quota.burst())
            .arg(cost);
        let started = Instant::now();
        let reply = tokio::time::timeout(self.opts.timeout, run.invoke_async(&mut conn)).await;
        let (allowed, remaining, retry_ms, reset_ms): (u8, u64, u64, u64) = reply.ok()?.ok()?;
        self.opts.rtt.observe(started.elapsed().as_secs_f64());
        Some(Decision {
            allowed: allowed == 1,
            remaining,
            retry_after: Duration::from_millis(retry_ms),
            reset: Duration::from_millis(reset_ms),
        })
    }

    /// The connection once made; the first call starts making it.
    fn connection(&self) -> Option<ConnectionManager> {
        if let Some(conn) = self.link.conn.get() {
            return Some(conn.clone());
        }
        self.link.connecting.get_or_init(|| {
            let link = Arc::downgrade(&self.link);
            tokio::spawn(connect(self.client.clone(), link));
        });
        None
    }

    fn fallback(&self, key: u64, quota: &Quota, cost: u64, now: u64) -> (Decision, Via) {
        self.opts.fallbacks.inc();
        if self.opts.fail_closed {
            let refusal = Decision {
                allowed: false,
                remaining: 0,
                retry_after: BACKOFF,
                reset: BACKOFF,
            };
            return (refusal, Via::Closed);
        }
        let share = quota.scaled(self.opts.replicas);
        (self.local.check(key, &share, cost, now), Via::Fallback)
    }
}

/// When Redis may be asked again after a failure at `now` (never 0, which
/// means "healthy").
fn next_probe(now: u64) -> u64 {
    let backoff = u64::try_from(BACKOFF.as_nanos()).unwrap_or(u64::MAX);
    now.saturating_add(backoff).max(1)
}

/// Connects until it succeeds or the limiter is dropped. Once connected the
/// manager reconnects by itself, one attempt each time a request finds the
/// connection broken; `probe_at` paces those requests, so no retry policy
/// of its own is wanted.
async fn connect(client: redis::Client, link: Weak<Link>) {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(BACKOFF);
    loop {
        let made = ConnectionManager::new_with_config(client.clone(), config.clone()).await;
        let Some(link) = link.upgrade() else { return };
        if let Ok(conn) = made {
            let _ = link.conn.set(conn);
            return;
        }
        drop(link);
        tokio::time::sleep(BACKOFF).await;
    }
}
