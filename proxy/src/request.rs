//! What both request engines share: the HTTP/1.x engine ([`crate::h1`])
//! and Pingora's `ProxyHttp` path ([`crate::proxy`], used for h2).
//!
//! Request ids, forwarding values, the retry rule, passive health from an
//! answer's status, error bodies, and the metrics and access log written
//! when a request ends. One place each, so both protocols behave alike.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::code_class;
use crate::routing::{fastrand, Backend, Pool};

/// Longest client-supplied request id that is propagated as is.
const MAX_REQUEST_ID: usize = 128;

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoBackend,
    TimeBudget,
}

impl Refusal {
    /// Status, error type and message of the answer.
    pub fn describe(self, pool: &str) -> (u16, &'static str, String) {
        match self {
            Refusal::NoBackend => (
                503,
                "no_backend",
                format!("no healthy backend in pool '{pool}'"),
            ),
            Refusal::TimeBudget => (
                504,
                "upstream_timeout",
                "request time budget spent".to_string(),
            ),
        }
    }
}

/// The client's request id if it is sane, else a fresh random one.
pub fn request_id(given: Option<&[u8]>) -> String {
    let given = given
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && is_visible_ascii(v));
    match given {
        Some(id) => id.to_string(),
        None => random_id(),
    }
}

/// A header value that can be copied into a response unchanged.
fn is_visible_ascii(v: &str) -> bool {
    v.bytes()
        .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

/// 32 lowercase hex digits from the per-thread generator: an id needs to
/// be unique in the logs, not unpredictable, and `format!("{:032x}")`
/// over `rand::random` cost several times the instructions.
fn random_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 32];
    for half in digits.chunks_mut(16) {
        let n = fastrand::next();
        for (i, d) in half.iter_mut().enumerate() {
            *d = HEX[(n >> (i * 4)) as usize & 0xf];
        }
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// Appends the X-Forwarded-For value to `out`: earlier hops (every value
/// given), then the client.
pub fn forwarded_for<'a>(
    out: &mut Vec<u8>,
    previous: impl Iterator<Item = &'a [u8]>,
    client: IpAddr,
) {
    for prev in previous {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    push_ip(out, client);
}

/// An address as `Display` writes it; IPv4 by hand because `Display`'s
/// padding-aware formatting was about 1 % of a request's instructions.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, n) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if n >= 100 {
            out.push(b'0' + n / 100);
        }
        if n >= 10 {
            out.push(b'0' + n / 10 % 10);
        }
        out.push(b'0' + n % 10);
    }
}

/// The OpenAI-shaped JSON body of an answer the proxy gives itself.
pub fn error_body(kind: &str, message: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": kind } }).to_string()
}

/// Passive health from a backend's answer. An overload 503 (with
/// Retry-After) is load shedding, not a fault: ejecting for it would push
/// more load onto the siblings.
pub fn record_answer(backend: &Backend, config: &Config, status: u16, retry_after: bool) {
    let overloaded = status == 503 && retry_after;
    if status >= 500 && !overloaded {
        backend.record_failure(&config.passive, format!("answered {status}"));
    } else {
        backend.record_success();
    }
}

/// Where a request stands in its attempts.
pub struct Attempts<'a> {
    pub config: &'a Config,
    pub pool: &'a Pool,
    pub start: Instant,
    pub attempts: u32,
    pub tried: &'a [SocketAddr],
    /// The body is small enough to replay (`retry.buffer_body_max`).
    pub replayable: bool,
}

impl Attempts<'_> {
    /// Whether another attempt is allowed: retries left, time left, the
    /// body replayable, and an untried eligible backend exists.
    pub fn may_retry(&self) -> bool {
        self.attempts <= self.config.retry.retries
            && self.start.elapsed() < self.config.timeouts.total
            && self.replayable
            && self.pool.pick(self.tried).is_some()
    }
}

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
    pub error: Option<String>,
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
            error: self.error.as_deref(),
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
}

/// Target of the access log; `RUST_LOG=info,switchyard::access=off` silences it.
const ACCESS_TARGET: &str = "switchyard::access";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_id_is_32_lowercase_hex_digits() {
        let id = random_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(id, random_id());
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.100.255", "::1", "fe80::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        assert_eq!(request_id(Some(b"")).len(), 32);
        assert_eq!(request_id(Some(&[b'x'; 129])).len(), 32);
        assert_eq!(request_id(Some(b"a\x01b")).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let value = |earlier: &[&[u8]]| {
            let mut out = Vec::new();
            forwarded_for(&mut out, earlier.iter().copied(), ip);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(value(&[]), "10.0.0.7");
        assert_eq!(
            value(&[b"1.2.3.4", b"5.6.7.8"]),
            "1.2.3.4, 5.6.7.8, 10.0.0.7"
        );
    }
}
