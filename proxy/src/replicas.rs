//! Runtime state shared by proxy replicas through Redis (`[replicas]`): a
//! drain or undrain on any replica takes effect on all of them.
//!
//! Redis holds the drained addresses (a set) and a version that every
//! change increments; a change is one Lua script, so the set and its
//! version move together. A replica pushes its own changes, then pulls the
//! set whenever the version differs from the one it applied. Pub/sub on
//! the version is only a hint that makes that pull immediate: messages are
//! lost while a subscriber is disconnected, so every replica also checks
//! the version every `resync_interval`. Keyspace notifications are not
//! used (managed Redis services often turn them off).
//!
//! The local state file stays the replica's own copy: it is what the
//! replica starts from, and what it keeps serving with while Redis is
//! unreachable. Changes made meanwhile wait in order and are pushed when
//! Redis answers again. Rollout state is not shared yet: each replica runs
//! its own rollouts (docs/replicas.md).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::shared::Shared;

/// Longest wait for one Redis call; past it the replica counts as cut off.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Applies `ops` (address, drained) in order, bumps the version and
/// announces it; returns the new version.
const PUSH: &str = r"
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '1' then redis.call('SADD', KEYS[1], ARGV[i])
  else redis.call('SREM', KEYS[1], ARGV[i]) end
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], v)
return v
";

/// The version and the set, read together.
const PULL: &str = r"
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('SMEMBERS', KEYS[1])}
";

/// What the admin API and the metrics show of the sync.
#[derive(Default)]
pub struct SyncStatus {
    pub connected: AtomicBool,
    /// The Redis version last applied (0 before any).
    pub version: AtomicI64,
    /// Changes made here that Redis has not taken yet, oldest first.
    pending: Mutex<Vec<(SocketAddr, bool)>>,
    /// Wakes the loop when a change is waiting.
    changed: Notify,
}

impl SyncStatus {
    /// Queues a drain or undrain made on this replica for the other ones.
    pub fn push(&self, addr: SocketAddr, drained: bool) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, drained));
        self.changed.notify_one();
    }

    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

pub struct ReplicaSync {
    shared: Arc<Shared>,
}

impl ReplicaSync {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for ReplicaSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let settings = self.shared.active().config.replicas.clone();
        let Some(url) = settings.redis_url else {
            return;
        };
        let client = match redis::Client::open(url.as_str()) {
            Ok(client) => client,
            Err(e) => return tracing::error!(target: TARGET, %url, "{e}; drains stay local"),
        };
        let keys = Keys::new(&settings.key_prefix);
        let hint = Arc::new(Notify::new());
        tokio::spawn(listen(client.clone(), keys.channel.clone(), hint.clone()));
        let status = &self.shared.sync;
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            if conn.is_none() {
                conn = connect(&client).await;
            }
            if let Some(c) = conn.as_mut() {
                if let Err(e) = self.sync_once(c, &keys).await {
                    tracing::warn!(target: TARGET, error = %e, "cannot reach Redis; serving with the last state known");
                    conn = None;
                }
            }
            status.connected.store(conn.is_some(), Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(settings.resync_interval) => {}
                _ = hint.notified() => {}
                _ = status.changed.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

const TARGET: &str = "switchyard::replicas";

struct Keys {
    drained: String,
    version: String,
    channel: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            drained: format!("{prefix}:drained"),
            version: format!("{prefix}:version"),
            channel: format!("{prefix}:changed"),
        }
    }
}

async fn connect(client: &redis::Client) -> Option<MultiplexedConnection> {
    let connecting = client.get_multiplexed_async_connection();
    tokio::time::timeout(CALL_TIMEOUT, connecting)
        .await
        .ok()?
        .ok()
}

/// Wakes the loop on every announced version; reconnects after a loss.
async fn listen(client: redis::Client, channel: String, hint: Arc<Notify>) {
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            if pubsub.subscribe(&channel).await.is_ok() {
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    hint.notify_one();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl ReplicaSync {
    /// Pushes this replica's waiting changes (on a Redis that has never
    /// seen any, after this replica's whole set), then applies the set if
    /// its version moved.
    async fn sync_once(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
    ) -> redis::RedisResult<()> {
        let status = &self.shared.sync;
        let ops = std::mem::take(&mut *status.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let (version, set) = call(pull(conn, keys)).await?;
        // Before anything is applied, so that whoever sees the result sees
        // the link up too.
        status.connected.store(true, Ordering::Relaxed);
        let ops = if version == 0 {
            // A Redis that never saw a change (new, or restarted without
            // persistence) gets this replica's copy: never the only one.
            let mine = self
                .shared
                .registry
                .drained()
                .into_iter()
                .map(|a| (a, true));
            mine.chain(ops).collect()
        } else {
            ops
        };
        let (version, set) = if ops.is_empty() {
            (version, set)
        } else if let Err(e) = call(push(conn, keys, &ops)).await {
            // Not taken: they wait for the next try, before newer changes.
            let mut pending = status.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.splice(0..0, ops);
            return Err(e);
        } else {
            call(pull(conn, keys)).await?
        };
        if version != status.version.load(Ordering::Relaxed) {
            self.shared.apply_drains(&set, version);
        }
        Ok(())
    }
}

async fn call<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

async fn pull(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> redis::RedisResult<(i64, BTreeSet<SocketAddr>)> {
    let (version, members): (i64, Vec<String>) = redis::Script::new(PULL)
        .key(&keys.drained)
        .key(&keys.version)
        .invoke_async(conn)
        .await?;
    // An entry that is not an address was not written by a replica: skip it.
    let set = members.iter().filter_map(|m| m.parse().ok()).collect();
    Ok((version, set))
}

async fn push(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    ops: &[(SocketAddr, bool)],
) -> redis::RedisResult<i64> {
    let push = redis::Script::new(PUSH);
    let mut script = push.prepare_invoke();
    script
        .key(&keys.drained)
        .key(&keys.version)
        .key(&keys.channel);
    for (addr, drained) in ops {
        script
            .arg(addr.to_string())
            .arg(if *drained { "1" } else { "0" });
    }
    script.invoke_async(conn).await
}
