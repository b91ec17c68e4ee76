//! The end of a request: its counters, its latency, its access-log line.

use std::io::Write;
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;

use crate::metrics::code_class;
use crate::routing::Pool;

/// A finished request, for its metrics and its access-log line.
pub struct Finished<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// 0 when no response was written.
    pub status: u16,
    pub pool: Option<&'a Pool>,
    /// The member that answered; `None` when the proxy answered itself.
    pub served_by: Option<usize>,
    pub backend: &'a str,
    pub elapsed: Duration,
    pub attempts: u32,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub error: Option<&'a str>,
    pub limited: Option<&'a str>,
    pub shadow_limited: Option<&'a str>,
}

impl Finished<'_> {
    /// Counts the request (`unrouted`: the counters for requests answered
    /// before a route matched) and writes its access line.
    pub fn record(&self, unrouted: &[IntCounter; 6]) {
        let class = code_class(self.status);
        match (self.pool, self.served_by) {
            (Some(pool), Some(i)) => pool.members[i].requests[class].inc(),
            (Some(pool), None) => pool.metrics.unserved[class].inc(),
            (None, _) => unrouted[class].inc(),
        }
        if let Some(pool) = self.pool {
            pool.metrics.duration.observe(self.elapsed.as_secs_f64());
        }
        self.log();
    }

    fn log(&self) {
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        let line = AccessLine {
            timestamp: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            level: "INFO",
            target: ACCESS_TARGET,
            request_id: self.request_id,
            method: self.method,
            path: self.path,
            status: self.status,
            pool: self.pool.map_or("", |p| p.name.as_str()),
            backend: self.backend,
            duration_ms: self.elapsed.as_secs_f64() * 1000.0,
            attempts: self.attempts,
            retries: self.attempts.saturating_sub(1),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            error: self.error,
            limited: self.limited,
            shadow_limited: self.shadow_limited,
        };
        let mut buf = Vec::with_capacity(320);
        if serde_json::to_writer(&mut buf, &line).is_ok() {
            buf.push(b'\n');
            // One write per line keeps lines whole when threads interleave.
            let _ = std::io::stderr().lock().write_all(&buf);
        }
    }
}

/// One access-log line. Written directly as JSON (same shape as the
/// other log lines): going through `tracing`'s JSON formatter cost about
/// 40 % of the proxy's throughput in a TLS keep-alive benchmark.
#[derive(Serialize)]
struct AccessLine<'a> {
    timestamp: String,
    level: &'static str,
    target: &'static str,
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    pool: &'a str,
    backend: &'a str,
    duration_ms: f64,
    attempts: u32,
    retries: u32,
    bytes_in: usize,
    bytes_out: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// The rate or concurrency rule that refused the request (429).
    #[serde(skip_serializing_if = "Option::is_none")]
    limited: Option<&'a str>,
    /// A shadow rule that would have refused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow_limited: Option<&'a str>,
}

/// Target of the access log; `RUST_LOG=info,switchyard::access=off` silences it.
const ACCESS_TARGET: &str = "switchyard::access";
