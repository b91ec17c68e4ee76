//! What every handler shares.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::batcher::{Batcher, Class, Loaded};
use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    WarmingUp,
    Ready,
    Draining,
}

/// Moves only forward: warming up, ready, draining.
pub struct Lifecycle(AtomicU8);

impl Lifecycle {
    fn new() -> Self {
        Lifecycle(AtomicU8::new(Phase::WarmingUp as u8))
    }

    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::WarmingUp,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Returns false when draining began first, which must win.
    pub fn mark_ready(&self) -> bool {
        self.0
            .compare_exchange(
                Phase::WarmingUp as u8,
                Phase::Ready as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    pub fn begin_draining(&self) {
        self.0.store(Phase::Draining as u8, Ordering::Release);
    }
}

pub struct AppState {
    pub config: Config,
    /// The resolved instance name (the bound address unless --instance).
    pub instance: String,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    pub cache: Cache,
    pub batcher: Batcher,
    /// Set once the model is loaded and warm.
    pub loaded: OnceLock<Loaded>,
    pub started: Instant,
    /// Seconds since the Unix epoch at start, the `created` of /v1/models.
    pub started_unix: u64,
}

impl AppState {
    pub fn new(
        config: Config,
        instance: String,
        metrics: Arc<Metrics>,
        cache: Cache,
        batcher: Batcher,
    ) -> Self {
        metrics.queue_capacity.set(batcher.capacity() as i64);
        // Both classes show in /metrics from the start, at zero.
        for class in Class::ALL {
            let class = [class.name()];
            metrics.class_queue_depth.with_label_values(&class);
            metrics.class_requests.with_label_values(&class);
            metrics.queue_wait.with_label_values(&class);
        }
        AppState {
            config,
            instance,
            lifecycle: Lifecycle::new(),
            metrics,
            cache,
            batcher,
            loaded: OnceLock::new(),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}
