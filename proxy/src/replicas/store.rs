//! The Redis side of the replicas' sharing: the keys, the Lua scripts
//! (each built once: a `Script` hashes its text, and runs by EVALSHA), and
//! one function per exchange, each bounded by [`CALL_TIMEOUT`].
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<prefix>:drained` | set | drained addresses |
//! | `<prefix>:rollouts` | hash | route → `<revision> <rollout JSON>` |
//! | `<prefix>:version` | string | bumped by every change of the two above |
//! | `<prefix>:changed` | channel | the new version, a hint to pull |
//! | `<prefix>:judge` | string, with expiry | the replica that judges rollouts |
//! | `<prefix>:window:<route>` | list, with expiry | the replicas' counts of the route's window |

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Script};

use crate::config::ReplicaSection;
use crate::rollout::Rollout;
use crate::routing::{WindowCounts, SAMPLE};

/// Longest wait for one Redis call; past it the replica counts as cut off.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Contributions kept per route between two judged windows (the oldest go
/// first): 4,096 is e.g. 10 replicas for a 6-minute window at the default
/// 1 s resync.
const MAX_CONTRIBUTIONS: usize = 4096;

/// Durations per arm in one contribution: a sample of what the replica
/// served since its last one, enough for the judge's sample of
/// [`SAMPLE`] from a few dozen contributions, small enough that a window's
/// list stays small.
const SAMPLE_PER_CONTRIBUTION: usize = 200;

/// Applies ops (kind, base revision or '', key, value) in order and bumps
/// the version; returns it and how many ops were refused. A rollout op
/// with a base applies only while the route's revision is still that base
/// (what the judge decided from); an empty value deletes the entry.
const PUSH: &str = r"
local refused = 0
for i = 1, #ARGV, 4 do
  local kind, base, key, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'd' then
    if value == '1' then redis.call('SADD', KEYS[1], key)
    else redis.call('SREM', KEYS[1], key) end
  else
    local cur = redis.call('HGET', KEYS[3], key)
    local rev = cur and tonumber(string.match(cur, '^%d+')) or 0
    if base ~= '' and tonumber(base) ~= rev then refused = refused + 1
    elseif value == '' then redis.call('HDEL', KEYS[3], key)
    else redis.call('HSET', KEYS[3], key, (rev + 1) .. ' ' .. value) end
  end
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[4], v)
return {v, refused}
";

/// The version, the drained set and the rollouts, read together.
const PULL: &str = r"
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('SMEMBERS', KEYS[1]),
        redis.call('HGETALL', KEYS[3])}
";

/// Takes the judge lease if it is free, renews it if this replica (ARGV[1])
/// holds it; returns the holder.
const LEASE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return holder
";

/// Gives the lease up, if this replica still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";

/// Adds one replica's counts to a route's window.
const CONTRIBUTE: &str = r"
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
";

/// Takes a route's window whole: what every replica added since.
const COLLECT: &str = r"
local all = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return all
";

/// One change for the shared state.
#[derive(Debug, Clone)]
pub enum Op {
    Drain(SocketAddr, bool),
    /// A route's rollout (`None`: it ended). `base`: the revision the
    /// change was decided from, for the judge's changes; an operator's
    /// apply whatever the revision.
    Rollout {
        route: String,
        state: Option<Rollout>,
        base: Option<u64>,
    },
}

/// The shared state as Redis holds it.
pub struct Snapshot {
    pub version: i64,
    pub drained: BTreeSet<SocketAddr>,
    /// By route, each with its revision.
    pub rollouts: BTreeMap<String, Rollout>,
}

pub struct Store {
    drained: String,
    version: String,
    rollouts: String,
    pub channel: String,
    judge: String,
    prefix: String,
    push: Script,
    pull: Script,
    lease: Script,
    release: Script,
    contribute: Script,
    collect: Script,
}

impl Store {
    pub fn new(prefix: &str) -> Self {
        Self {
            drained: format!("{prefix}:drained"),
            version: format!("{prefix}:version"),
            rollouts: format!("{prefix}:rollouts"),
            channel: format!("{prefix}:changed"),
            judge: format!("{prefix}:judge"),
            prefix: prefix.to_string(),
            push: Script::new(PUSH),
            pull: Script::new(PULL),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
            contribute: Script::new(CONTRIBUTE),
            collect: Script::new(COLLECT),
        }
    }

    fn window(&self, route: &str) -> String {
        format!("{}:window:{route}", self.prefix)
    }

    pub async fn pull(&self, conn: &mut MultiplexedConnection) -> RedisResult<Snapshot> {
        let mut call = self.pull.prepare_invoke();
        call.key(&self.drained)
            .key(&self.version)
            .key(&self.rollouts);
        let (version, members, rollouts): (i64, Vec<String>, Vec<String>) =
            timed(call.invoke_async(conn)).await?;
        // Entries a replica did not write are skipped.
        let drained = members.iter().filter_map(|m| m.parse().ok()).collect();
        let rollouts = rollouts
            .chunks_exact(2)
            .filter_map(|kv| Some((kv[0].clone(), parse_rollout(&kv[1])?)))
            .collect();
        Ok(Snapshot {
            version,
            drained,
            rollouts,
        })
    }

    /// Applies `ops` in order; returns the new version and how many of the
    /// judge's changes were refused (decided from an outdated revision).
    pub async fn push(
        &self,
        conn: &mut MultiplexedConnection,
        ops: &[Op],
    ) -> RedisResult<(i64, u64)> {
        let mut call = self.push.prepare_invoke();
        call.key(&self.drained)
            .key(&self.version)
            .key(&self.rollouts)
            .key(&self.channel);
        for op in ops {
            let [kind, base, key, value] = match op {
                Op::Drain(addr, on) => [
                    "d".into(),
                    String::new(),
                    addr.to_string(),
                    u8::from(*on).to_string(),
                ],
                Op::Rollout { route, state, base } => [
                    "r".into(),
                    base.map(|b| b.to_string()).unwrap_or_default(),
                    route.clone(),
                    state
                        .as_ref()
                        .map(|r| serde_json::to_string(r).expect("a rollout serializes"))
                        .unwrap_or_default(),
                ],
            };
            call.arg(kind).arg(base).arg(key).arg(value);
        }
        timed(call.invoke_async(conn)).await
    }

    /// Takes or renews the judge lease for `id`, for `ttl`; returns the
    /// lease's holder.
    pub async fn hold_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        ttl: Duration,
    ) -> RedisResult<String> {
        let mut call = self.lease.prepare_invoke();
        call.key(&self.judge).arg(id).arg(millis(ttl));
        timed(call.invoke_async(conn)).await
    }

    pub async fn release_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
    ) -> RedisResult<()> {
        let mut call = self.release.prepare_invoke();
        call.key(&self.judge).arg(id);
        timed(call.invoke_async(conn)).await
    }

    /// Adds `counts` (with each arm's sample thinned) to `route`'s window;
    /// the window is dropped if no judge takes it within `ttl`.
    pub async fn contribute(
        &self,
        conn: &mut MultiplexedConnection,
        route: &str,
        counts: WindowCounts,
        ttl: Duration,
    ) -> RedisResult<()> {
        let thinned = WindowCounts::sum(&[counts], SAMPLE_PER_CONTRIBUTION);
        let blob = serde_json::to_string(&thinned).expect("counts serialize");
        let mut call = self.contribute.prepare_invoke();
        call.key(self.window(route))
            .arg(blob)
            .arg(millis(ttl))
            .arg(MAX_CONTRIBUTIONS);
        timed(call.invoke_async(conn)).await
    }

    /// `route`'s window as every replica counted it, taken whole.
    pub async fn collect(
        &self,
        conn: &mut MultiplexedConnection,
        route: &str,
    ) -> RedisResult<WindowCounts> {
        let mut call = self.collect.prepare_invoke();
        call.key(self.window(route));
        let blobs: Vec<String> = timed(call.invoke_async(conn)).await?;
        let parts: Vec<WindowCounts> = blobs
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect();
        Ok(WindowCounts::sum(&parts, SAMPLE))
    }
}

/// `<revision> <JSON>`, as [`PUSH`] writes it.
fn parse_rollout(entry: &str) -> Option<Rollout> {
    let (revision, json) = entry.split_once(' ')?;
    let mut rollout: Rollout = serde_json::from_str(json).ok()?;
    rollout.revision = revision.parse().ok()?;
    Some(rollout)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

async fn timed<T>(f: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

/// A Redis client with one connection, made when first needed and again
/// after a failure.
pub struct Link {
    pub client: redis::Client,
    conn: Option<MultiplexedConnection>,
    pub store: Store,
}

impl Link {
    /// `None` without `redis_url`; an unusable URL is logged.
    pub fn open(settings: &ReplicaSection) -> Option<Self> {
        let url = settings.redis_url.as_deref()?;
        match redis::Client::open(url) {
            Ok(client) => Some(Self {
                client,
                conn: None,
                store: Store::new(&settings.key_prefix),
            }),
            Err(e) => {
                tracing::error!(target: super::TARGET, %url, "{e}; state stays local");
                None
            }
        }
    }

    /// The connection (a cheap handle), connecting first if need be.
    pub async fn conn(&mut self) -> Option<MultiplexedConnection> {
        if self.conn.is_none() {
            let connecting = self.client.get_multiplexed_async_connection();
            self.conn = tokio::time::timeout(CALL_TIMEOUT, connecting)
                .await
                .ok()
                .and_then(Result::ok);
        }
        self.conn.clone()
    }

    /// Forgets the connection after a failed call.
    pub fn lost(&mut self) {
        self.conn = None;
    }
}
