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

/// (queue depth, queue capacity) from an in-band load report: the
/// `endpoint-load-metrics` header in ORCA's text format, e.g.
/// `TEXT named_metrics.queue_depth=3, named_metrics.queue_capacity=256`.
/// `None` without a queue depth; capacity 0 when not stated.
pub fn parse_load_report(value: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(value).ok()?.strip_prefix("TEXT ")?;
    let (mut depth, mut capacity) = (None, 0);
    for pair in text.split(',') {
        let Some((name, number)) = pair.trim().split_once('=') else {
            continue;
        };
        // ORCA values are doubles; queue figures are whole numbers.
        let number = number.trim().parse::<f64>().ok().filter(|n| *n >= 0.0);
        match (name, number) {
            ("named_metrics.queue_depth", Some(n)) => depth = Some(n.min(u32::MAX as f64) as u32),
            ("named_metrics.queue_capacity", Some(n)) => capacity = n.min(u32::MAX as f64) as u32,
            _ => {}
        }
    }
    Some((depth?, capacity))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reports_in_orca_text_format() {
        let v = b"TEXT named_metrics.queue_depth=3, named_metrics.queue_capacity=256, named_metrics.in_flight=1";
        assert_eq!(parse_load_report(v), Some((3, 256)));
        assert_eq!(
            parse_load_report(b"TEXT named_metrics.queue_depth=7.0"),
            Some((7, 0))
        );
        assert_eq!(parse_load_report(b"TEXT cpu_utilization=0.3"), None);
        assert_eq!(parse_load_report(b"JSON {}"), None);
        assert_eq!(
            parse_load_report(b"TEXT named_metrics.queue_depth=-4"),
            None
        );
    }
}
