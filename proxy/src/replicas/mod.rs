//! Runtime state shared by proxy replicas through Redis (`[replicas]`):
//! a drain, an undrain or a rollout change on any replica takes effect on
//! all of them, and one replica at a time judges the rollouts from every
//! replica's traffic.
//!
//! Redis holds the drained addresses, each rollout's state (step, weight,
//! phase, recent verdicts) under a revision of its own, and a version that
//! every change increments; a change is one Lua script, so the state and
//! its version move together. A replica pushes its own changes, then pulls
//! the state whenever the version differs from the one it applied.
//! Pub/sub on the version is only a hint that makes that pull immediate:
//! messages are lost while a subscriber is disconnected, so every replica
//! also checks the version every `resync_interval`. Keyspace notifications
//! are not used (managed Redis services often turn them off).
//!
//! The judge holds a lease in Redis with an expiry (`judge_lease`), taken
//! with SET NX PX and renewed at every sync by a script that checks it is
//! still the holder's. Only the holder runs the rollout loop's decisions;
//! each is pushed on the revision it was decided from and refused if the
//! rollout moved meanwhile (an operator's call, or a judge that lost the
//! lease). Every replica, the judge included, adds its share of each
//! rollout window's traffic to Redis at every sync, and the judge sums the
//! shares when the window ends (`store`).
//!
//! The local state file stays the replica's own copy: it is what the
//! replica starts from, and what it keeps serving with while Redis is
//! unreachable. Changes made meanwhile wait in order and are pushed when
//! Redis answers again.

pub mod store;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::config::ReplicaSection;
use crate::rollout::Rollout;
use crate::shared::Shared;
use store::{Link, Op, Store};

const TARGET: &str = "switchyard::replicas";

/// Who changed a rollout. An operator's change applies whatever happened
/// meanwhile; the judge's only to the revision it was decided from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author {
    Operator,
    Judge,
}

/// What the admin API and the metrics show of the sync, and the changes
/// waiting for it.
pub struct SyncStatus {
    pub connected: AtomicBool,
    /// The Redis version last applied (0 before any).
    pub version: AtomicI64,
    /// This process's name in the judge lease: host, process id and a
    /// random part, so that an upgrade's new process is another replica.
    pub id: String,
    /// Changes made here that Redis has not taken yet, oldest first.
    pending: Mutex<Vec<Op>>,
    /// Wakes the loop when a change is waiting.
    changed: Notify,
    lease: Mutex<Lease>,
}

/// The judge lease as this replica last saw it.
#[derive(Default)]
struct Lease {
    /// Until when this replica holds it: the lease's expiry counted from
    /// before the call that took or renewed it, so never later than
    /// Redis's own.
    until: Option<Instant>,
    /// Who held it at the last sync (`None`: unknown, or nobody).
    holder: Option<String>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname");
        let host = host.as_deref().map_or("replica", str::trim);
        let tag = crate::routing::fastrand::below(1 << 16);
        Self {
            connected: AtomicBool::new(false),
            version: AtomicI64::new(0),
            id: format!("{host}/{}/{tag:04x}", std::process::id()),
            pending: Mutex::default(),
            changed: Notify::new(),
            lease: Mutex::default(),
        }
    }
}

impl SyncStatus {
    /// Queues a drain or undrain made on this replica for the other ones.
    pub fn push_drain(&self, addr: std::net::SocketAddr, drained: bool) {
        self.queue(Op::Drain(addr, drained));
    }

    /// Queues route `route`'s rollout as changed here (`None`: ended),
    /// decided from revision `base` when the judge decided it.
    pub fn push_rollout(&self, route: &str, state: Option<Rollout>, base: Option<u64>) {
        let route = route.to_string();
        self.queue(Op::Rollout { route, state, base });
    }

    fn queue(&self, op: Op) {
        self.pending_ops().push(op);
        self.changed.notify_one();
    }

    fn pending_ops(&self) -> std::sync::MutexGuard<'_, Vec<Op>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pending(&self) -> usize {
        self.pending_ops().len()
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this replica holds the judge lease now.
    pub fn is_judge(&self) -> bool {
        self.lease().until.is_some_and(|t| Instant::now() < t)
    }

    /// The lease's holder at the last sync.
    pub fn judge(&self) -> Option<String> {
        self.lease().holder.clone()
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
        let Some(mut link) = Link::open(&settings) else {
            return;
        };
        let hint = Arc::new(Notify::new());
        let channel = link.store.channel.clone();
        tokio::spawn(listen(link.client.clone(), channel, hint.clone()));
        let status = &self.shared.sync;
        // Whether the last sync worked: a loss is logged once.
        let mut up = true;
        loop {
            let synced = match link.conn().await {
                Some(mut conn) => self.sync_once(&mut conn, &link.store, &settings).await,
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into()),
            };
            if let Err(e) = synced {
                if std::mem::replace(&mut up, false) {
                    tracing::warn!(target: TARGET, error = %e, "cannot reach Redis; serving with the last state known");
                }
                status.connected.store(false, Ordering::Relaxed);
                link.lost();
                status.lease().holder = None;
                self.drop_windows();
            } else {
                up = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(settings.resync_interval) => {}
                _ = hint.notified() => {}
                _ = status.changed.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Hand the lease over now rather than after its expiry.
        if status.is_judge() {
            status.lease().until = None;
            if let Some(mut conn) = link.conn().await {
                let _ = link.store.release_lease(&mut conn, &status.id).await;
            }
        }
    }
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
    /// seen any, after this replica's whole state), applies the state if
    /// its version moved or a change of the judge's was refused, holds or
    /// seeks the judge lease, and adds this replica's window counts.
    async fn sync_once(
        &self,
        conn: &mut MultiplexedConnection,
        store: &Store,
        settings: &ReplicaSection,
    ) -> redis::RedisResult<()> {
        let status = &self.shared.sync;
        let ops = std::mem::take(&mut *status.pending_ops());
        let snapshot = store.pull(conn).await?;
        // Before anything is applied, so that whoever sees the result sees
        // the link up too.
        status.connected.store(true, Ordering::Relaxed);
        let ops = if snapshot.version == 0 {
            // A Redis that never saw a change (new, or restarted without
            // persistence) gets this replica's copy: never the only one.
            self.shared.whole_state().into_iter().chain(ops).collect()
        } else {
            ops
        };
        let (snapshot, refused) = if ops.is_empty() {
            (snapshot, 0)
        } else {
            match store.push(conn, &ops).await {
                // Not taken: they wait for the next try, before newer changes.
                Err(e) => {
                    status.pending_ops().splice(0..0, ops);
                    return Err(e);
                }
                Ok((_, refused)) => (store.pull(conn).await?, refused),
            }
        };
        if refused > 0 {
            tracing::info!(target: TARGET, refused, "a judge's decision was refused: the rollout had moved since");
        }
        if refused > 0 || snapshot.version != status.version.load(Ordering::Relaxed) {
            self.shared.apply_shared(snapshot);
        }
        self.hold_lease(conn, store, settings.judge_lease).await?;
        self.contribute(conn, store).await
    }

    async fn hold_lease(
        &self,
        conn: &mut MultiplexedConnection,
        store: &Store,
        ttl: Duration,
    ) -> redis::RedisResult<()> {
        let status = &self.shared.sync;
        let asked = Instant::now();
        let holder = store.hold_lease(conn, &status.id, ttl).await?;
        let was = status.is_judge();
        let mut lease = status.lease();
        let mine = holder == status.id;
        lease.until = mine.then_some(asked + ttl);
        lease.holder = Some(holder);
        drop(lease);
        if mine && !was {
            self.shared.metrics.replica.judge_acquired.inc();
            tracing::info!(target: TARGET, id = %status.id, "this replica now judges the rollouts");
        } else if was && !mine {
            tracing::warn!(target: TARGET, id = %status.id, "this replica lost the judge lease");
        }
        Ok(())
    }

    /// Adds what this replica served since its last sync to each rollout
    /// window in Redis. Counts whose call fails are dropped: the windows
    /// must not fill up with traffic from long ago.
    async fn contribute(
        &self,
        conn: &mut MultiplexedConnection,
        store: &Store,
    ) -> redis::RedisResult<()> {
        for (route, interval) in self.rollout_routes() {
            let Some(windows) = self.shared.windows(&route) else {
                continue;
            };
            // Kept for two windows: a judge takes it within one.
            store
                .contribute(conn, &route, windows.take(), 2 * interval)
                .await?;
        }
        Ok(())
    }

    /// Traffic served while cut off from Redis is not judged.
    fn drop_windows(&self) {
        for (route, _) in self.rollout_routes() {
            if let Some(windows) = self.shared.windows(&route) {
                windows.take();
            }
        }
    }

    /// The routes of the configuration with a rollout, with its interval.
    fn rollout_routes(&self) -> Vec<(String, Duration)> {
        let active = self.shared.active();
        active
            .config
            .routes
            .iter()
            .filter_map(|r| Some((r.name.clone()?, r.rollout.as_ref()?.interval)))
            .collect()
    }
}
