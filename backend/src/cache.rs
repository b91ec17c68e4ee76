//! Redis cache of finished embeddings.
//!
//! A request looks up all of its inputs with one MGET before anything is
//! queued, so hits never wait behind inference; the misses are written back
//! in one pipeline that nobody waits for. The cache can only make a request
//! faster: every Redis call has a time budget, and any failure or timeout
//! counts as a miss plus an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// How long one connection attempt may take. Separate from the per-request
/// budget: reconnecting happens in the background.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the background task checks Redis, which is also how quickly
/// readiness notices that it came back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The span `cache_hit_rate` covers.
const HIT_WINDOW_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheStatus {
    Ok,
    Unavailable,
    Disabled,
}

pub struct CacheConfig {
    pub ttl: Duration,
    pub timeout: Duration,
}

pub struct Cache {
    redis: Option<Arc<Redis>>,
    hits: HitWindow,
    metrics: Arc<Metrics>,
}

struct Redis {
    conn: OnceLock<ConnectionManager>,
    healthy: AtomicBool,
    ttl_secs: u64,
    timeout: Duration,
}

/// `emb:{fingerprint}:{sha256 of the text}`; the fingerprint keeps vectors
/// from different models, truncation or pooling apart.
pub fn key(fingerprint: &str, text: &str) -> String {
    format!("emb:{fingerprint}:{}", hex::encode(Sha256::digest(text)))
}

impl Cache {
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Cache {
            redis: None,
            hits: HitWindow::new(),
            metrics,
        }
    }

    /// Parses the URL now but connects in the background, so a Redis that is
    /// down at start delays nothing.
    pub fn connect(url: &str, config: CacheConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let client = redis::Client::open(url).context("parsing --redis-url")?;
        let redis = Arc::new(Redis {
            conn: OnceLock::new(),
            healthy: AtomicBool::new(false),
            ttl_secs: config.ttl.as_secs().max(1),
            timeout: config.timeout,
        });
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(config.timeout)
            // One quick retry per reconnect; the probe loop keeps trying.
            .set_number_of_retries(1)
            .set_factor(100)
            .set_max_delay(1000);
        tokio::spawn(maintain(
            Arc::downgrade(&redis),
            client,
            manager_config,
            metrics.clone(),
        ));
        Ok(Cache {
            redis: Some(redis),
            hits: HitWindow::new(),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.redis.is_some()
    }

    pub fn status(&self) -> CacheStatus {
        match &self.redis {
            None => CacheStatus::Disabled,
            Some(r) if r.healthy.load(Ordering::Relaxed) => CacheStatus::Ok,
            Some(_) => CacheStatus::Unavailable,
        }
    }

    /// Hits over lookups in the last minute; None when nothing was looked up.
    pub fn hit_rate(&self) -> Option<f64> {
        self.hits.rate()
    }

    /// One MGET for all keys. Never fails: an unreachable or slow Redis
    /// yields all misses.
    pub async fn lookup(&self, keys: &[String], dimensions: usize) -> Vec<Option<Vec<f32>>> {
        let Some(redis) = &self.redis else {
            return vec![None; keys.len()];
        };
        let mget = redis::cmd("MGET").arg(keys).clone();
        let values: Option<Vec<Option<Vec<u8>>>> = redis
            .run(&self.metrics, move |mut conn| async move {
                mget.query_async(&mut conn).await
            })
            .await;
        let found: Vec<Option<Vec<f32>>> = match values {
            Some(values) => values
                .into_iter()
                .map(|v| v.and_then(|bytes| decode(&bytes, dimensions)))
                .collect(),
            None => vec![None; keys.len()],
        };
        let hits = found.iter().filter(|v| v.is_some()).count() as u64;
        let lookups = keys.len() as u64;
        self.metrics.cache_hits.inc_by(hits);
        self.metrics.cache_misses.inc_by(lookups - hits);
        self.hits.record(hits, lookups);
        found
    }

    /// Writes the entries back with one pipelined `SET .. EX`, without making
    /// the caller wait.
    pub fn store(&self, entries: Vec<(String, &[f32])>) {
        let Some(redis) = &self.redis else { return };
        if entries.is_empty() || redis.conn.get().is_none() {
            return;
        }
        let mut pipe = redis::pipe();
        for (key, vector) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(encode(vector))
                .arg("EX")
                .arg(redis.ttl_secs)
                .ignore();
        }
        let redis = redis.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _: Option<()> = redis
                .run(&metrics, move |mut conn| async move {
                    pipe.query_async(&mut conn).await
                })
                .await;
        });
    }
}

impl Redis {
    /// Runs one command or pipeline within the time budget, keeping the
    /// health flag and error counter up to date.
    async fn run<T, F>(
        &self,
        metrics: &Metrics,
        call: impl FnOnce(ConnectionManager) -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.conn.get() else {
            metrics.cache_errors.inc();
            return None;
        };
        let outcome = tokio::time::timeout(self.timeout, call(conn.clone())).await;
        match outcome {
            Ok(Ok(value)) => {
                self.healthy.store(true, Ordering::Relaxed);
                Some(value)
            }
            Ok(Err(e)) => {
                self.mark_failed(metrics, &e);
                None
            }
            Err(_) => {
                self.mark_failed(metrics, &"timed out");
                None
            }
        }
    }

    fn mark_failed(&self, metrics: &Metrics, error: &dyn std::fmt::Display) {
        metrics.cache_errors.inc();
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %error, "redis cache unavailable");
        }
    }
}

/// Connects (retrying until it works), then probes once a second so the
/// status reflects Redis even when no requests come in, and so the
/// connection manager notices a restart and reconnects. Ends with the cache.
async fn maintain(
    redis: std::sync::Weak<Redis>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    metrics: Arc<Metrics>,
) {
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => {
                let Some(redis) = redis.upgrade() else { return };
                let _ = redis.conn.set(conn);
                tracing::info!("redis cache connected");
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis not reachable yet");
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        }
        if redis.strong_count() == 0 {
            return;
        }
    }
    loop {
        let Some(redis) = redis.upgrade() else { return };
        let was_healthy = redis.healthy.load(Ordering::Relaxed);
        let pong: Option<String> = redis
            .run(&metrics, |mut conn| async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await;
        if pong.is_some() && !was_healthy {
            tracing::info!("redis cache available");
        }
        drop(redis);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

fn encode(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A value of the wrong length (another writer, a truncated write) is a miss.
fn decode(bytes: &[u8], dimensions: usize) -> Option<Vec<f32>> {
    (bytes.len() == dimensions * 4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Hits and lookups in one-second buckets over the last minute.
struct HitWindow {
    start: Instant,
    buckets: Mutex<Vec<Bucket>>,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    second: u64,
    hits: u64,
    lookups: u64,
}

impl HitWindow {
    fn new() -> Self {
        HitWindow {
            start: Instant::now(),
            buckets: Mutex::new(vec![Bucket::default(); HIT_WINDOW_SECS as usize]),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn record(&self, hits: u64, lookups: u64) {
        let second = self.now();
        let mut buckets = self.buckets.lock().expect("hit window lock");
        let bucket = &mut buckets[(second % HIT_WINDOW_SECS) as usize];
        if bucket.second != second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        bucket.hits += hits;
        bucket.lookups += lookups;
    }

    fn rate(&self) -> Option<f64> {
        let now = self.now();
        let buckets = self.buckets.lock().expect("hit window lock");
        let (hits, lookups) = buckets
            .iter()
            .filter(|b| now - b.second < HIT_WINDOW_SECS)
            .fold((0, 0), |(h, l), b| (h + b.hits, l + b.lookups));
        (lookups > 0).then(|| hits as f64 / lookups as f64)
    }
}
