//! What routing knows of a backend's own view of itself: its latest
//! readiness report, and the health checker's tally of passes and failures.
//! The types live here, not with the checker, so that routing depends on
//! no module that feeds it.

use serde::{Deserialize, Serialize};

/// The readiness report (see the backend contract). Unknown fields are
/// accepted: the contract may grow optional fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Report {
    pub status: Option<String>,
    pub ready: Option<bool>,
    pub version: Option<String>,
    pub model: Option<String>,
    pub queue_depth: Option<u32>,
    pub queue_capacity: Option<u32>,
    pub in_flight: Option<u32>,
    pub cache_hit_rate: Option<f64>,
    pub cache: Option<String>,
    pub uptime_s: Option<f64>,
}

/// Per-backend check bookkeeping, owned by the health checker.
#[derive(Debug, Default)]
pub struct Progress {
    pub(crate) passes: u32,
    pub(crate) failures: u32,
    /// The latest report received, with the clock time it arrived.
    pub last_report: Option<(Report, u64)>,
    /// Why the latest check did not pass, if it did not.
    pub last_error: Option<String>,
}
