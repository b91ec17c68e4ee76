//! Active health checks: every backend's readiness endpoint is polled in
//! parallel each interval; its JSON report feeds routing and metrics.
//!
//! A check passes on 200 with a report that does not say `ready: false`.
//! An explicit not-ready answer (503, or `ready: false`) takes the backend
//! out of rotation at once, because the backend itself said so; network
//! failures and timeouts take it out after `fall` in a row. Either way it
//! returns only after `rise` consecutive passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use tokio::task::JoinSet;

use crate::config::{HealthSection, Readiness};
use crate::routing::{clock, Backend, Progress, Report};
use crate::shared::{Active, Shared};

/// Answers larger than this are cut off (and then fail to parse): vLLM's
/// `/metrics` runs to tens of KiB.
const MAX_REPORT_BYTES: usize = 1024 * 1024;

/// What one check found.
#[derive(Debug)]
pub enum Outcome {
    Pass(Option<Report>),
    /// The backend answered, but not ready (503 or `ready: false`).
    NotReady(Option<Report>, String),
    /// No usable answer: connect error, timeout, broken response.
    Fail(String),
}

/// Runs one check against `addr`, as its pool's `readiness` says.
pub async fn check(
    connector: &Connector,
    addr: SocketAddr,
    cfg: &HealthSection,
    kind: Readiness,
) -> Outcome {
    let checked = async {
        let (status, body) = fetch(connector, addr, health_path(kind, cfg), cfg.timeout).await?;
        Ok(match kind {
            Readiness::Switchyard => classify(status, &body),
            Readiness::Http if status == 200 => Outcome::Pass(None),
            Readiness::Tei | Readiness::Vllm if status == 200 => {
                queue_from_metrics(connector, addr, cfg.timeout, kind).await
            }
            _ => Outcome::NotReady(None, format!("status {status}")),
        })
    };
    match tokio::time::timeout(cfg.timeout, checked).await {
        Err(_) => Outcome::Fail(format!("no answer within {:?}", cfg.timeout)),
        Ok(Err(e)) => Outcome::Fail(e),
        Ok(Ok(outcome)) => outcome,
    }
}

fn health_path(kind: Readiness, cfg: &HealthSection) -> &str {
    match kind {
        Readiness::Switchyard | Readiness::Http => &cfg.path,
        Readiness::Tei | Readiness::Vllm => "/health",
    }
}

/// A healthy TEI or vLLM server's queue depth, read from its Prometheus
/// metrics (`te_queue_size`, `vllm:num_requests_waiting`, summed over
/// models). Healthy without it: the check passes with no report.
async fn queue_from_metrics(
    connector: &Connector,
    addr: SocketAddr,
    timeout: Duration,
    kind: Readiness,
) -> Outcome {
    let name = match kind {
        Readiness::Vllm => "vllm:num_requests_waiting",
        _ => "te_queue_size",
    };
    let depth = match fetch(connector, addr, "/metrics", timeout).await {
        Ok((200, body)) => prometheus_sum(&body, name),
        _ => None,
    };
    Outcome::Pass(depth.map(|d| Report {
        ready: Some(true),
        queue_depth: Some(d.min(f64::from(u32::MAX)) as u32),
        ..Report::default()
    }))
}

/// The sum of every sample of metric `name` in Prometheus text format.
fn prometheus_sum(body: &[u8], name: &str) -> Option<f64> {
    let text = std::str::from_utf8(body).ok()?;
    let samples = text.lines().filter_map(|line| {
        let rest = line.strip_prefix(name)?;
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => &labelled[labelled.find('}')? + 1..],
            None => rest.strip_prefix(' ')?,
        };
        rest.split_whitespace().next()?.parse::<f64>().ok()
    });
    samples.fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v.max(0.0)))
}

async fn fetch(
    connector: &Connector,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, BytesMut), String> {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let (mut session, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut req =
        RequestHeader::build("GET", path.as_bytes(), Some(3)).map_err(|e| e.to_string())?;
    let host = addr.to_string();
    for (name, value) in [
        ("host", host.as_str()),
        ("user-agent", "switchyard-health"),
        ("connection", "close"),
    ] {
        req.insert_header(name, value).map_err(|e| e.to_string())?;
    }
    let io = |e: Box<pingora::Error>| format!("request: {e}");
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(io)?;
    session.finish_request_body().await.map_err(io)?;
    session.read_response_header().await.map_err(io)?;
    let status = session
        .response_header()
        .map(|r| r.status.as_u16())
        .ok_or("no response header")?;
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_response_body().await.map_err(io)? {
        if body.len() + chunk.len() > MAX_REPORT_BYTES {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

fn classify(status: u16, body: &[u8]) -> Outcome {
    // A backend without a JSON report still passes on 200; it just gives
    // routing nothing beyond its in-flight count.
    let report = serde_json::from_slice::<Report>(body).ok();
    match (status, report) {
        (200, Some(r)) if r.ready == Some(false) => {
            Outcome::NotReady(Some(r), "report says ready: false".to_string())
        }
        (200, report) => Outcome::Pass(report),
        (code, report) => {
            let state = report
                .as_ref()
                .and_then(|r| r.status.clone())
                .unwrap_or_else(|| "no report".to_string());
            Outcome::NotReady(report, format!("status {code} ({state})"))
        }
    }
}

/// Applies one outcome to `backend`'s state, metrics and logs.
pub fn apply(backend: &Backend, outcome: Outcome, cfg: &HealthSection) {
    let now = clock::now_ms();
    let mut p = backend.progress.lock().expect("progress lock");
    let (report, error) = match outcome {
        Outcome::Pass(report) => {
            backend.metrics.checks_pass.inc();
            p.failures = 0;
            p.passes = p.passes.saturating_add(1);
            backend.set_ready(true);
            if p.passes >= cfg.rise && backend.set_healthy(true) {
                tracing::info!(backend = %backend.name, "backend healthy after {} passing checks", p.passes);
            }
            if backend.is_healthy() {
                backend.end_ejection_if_due(now);
            }
            (report, None)
        }
        Outcome::NotReady(report, why) => {
            backend.metrics.checks_not_ready.inc();
            if backend.set_ready(false) {
                tracing::info!(backend = %backend.name, reason = %why, "backend not ready");
            }
            fail(backend, &mut p, cfg, &why);
            (report, Some(why))
        }
        Outcome::Fail(why) => {
            backend.metrics.checks_fail.inc();
            fail(backend, &mut p, cfg, &why);
            (None, Some(why))
        }
    };
    if let Some(r) = report {
        record_report(backend, &r, now);
        p.last_report = Some((r, now));
    }
    p.last_error = error;
}

fn fail(backend: &Backend, p: &mut Progress, cfg: &HealthSection, why: &str) {
    p.passes = 0;
    p.failures = p.failures.saturating_add(1);
    if p.failures >= cfg.fall && backend.set_healthy(false) {
        tracing::warn!(backend = %backend.name, reason = %why, "backend unhealthy after {} failed checks", p.failures);
    }
}

fn record_report(backend: &Backend, r: &Report, now: u64) {
    backend.set_queue(
        r.queue_depth.unwrap_or(0),
        r.queue_capacity.unwrap_or(0),
        now,
    );
    if let Some(rate) = r.cache_hit_rate {
        backend.metrics.cache_hit_ratio.set(rate);
    }
}

/// Checks every backend once, in parallel, and applies the results.
pub async fn round(
    connector: &Arc<Connector>,
    backends: Vec<(Arc<Backend>, Readiness)>,
    cfg: &HealthSection,
) {
    let mut tasks = JoinSet::new();
    for (backend, kind) in backends {
        let (connector, cfg) = (connector.clone(), cfg.clone());
        tasks.spawn(async move {
            let outcome = check(&connector, backend.addr, &cfg, kind).await;
            apply(&backend, outcome, &cfg);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Each backend with the readiness kind of the first pool holding it
/// (statically or through DNS).
fn with_kinds(active: &Active) -> Vec<(Arc<Backend>, Readiness)> {
    let kind_of = |b: &Backend| {
        let mut holding = active
            .pools
            .values()
            .filter(|p| p.members.iter().any(|m| m.backend.addr == b.addr));
        holding
            .next()
            .map_or(Readiness::Switchyard, |p| p.readiness)
    };
    active
        .backends
        .iter()
        .map(|b| (b.clone(), kind_of(b)))
        .collect()
}

/// Runs `rise` rounds before the listeners open, so a fresh process (or
/// one taking over in a graceful upgrade) starts with known-good backends
/// instead of answering 503 until the checker catches up.
pub fn warm_up(shared: &Shared) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    rt.block_on(async {
        let connector = Arc::new(Connector::new(None));
        let active = shared.active();
        let cfg = &active.config.health;
        for i in 0..cfg.rise {
            if i > 0 {
                tokio::time::sleep(cfg.interval).await;
            }
            round(&connector, with_kinds(&active), cfg).await;
        }
    });
}

/// The background service that keeps checking while the proxy runs.
pub struct Checker {
    shared: Arc<Shared>,
}

impl Checker {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for Checker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        loop {
            // Re-read each round: a reload may change backends or interval.
            let active = self.shared.active();
            let cfg = active.config.health.clone();
            let next = tokio::time::Instant::now() + cfg.interval;
            round(&connector, with_kinds(&active), &cfg).await;
            let max_idle = active.config.timeouts.upstream_idle;
            for backend in self.shared.registry.all() {
                backend.idle.prune(max_idle);
            }
            drop(active);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples_are_summed_over_labels() {
        let text = b"# HELP vllm:num_requests_waiting waiting\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"a\"} 3.0\nvllm:num_requests_waiting{model_name=\"b\"} 2\nvllm:num_requests_waiting_total 99\n";
        assert_eq!(prometheus_sum(text, "vllm:num_requests_waiting"), Some(5.0));
        assert_eq!(
            prometheus_sum(b"te_queue_size 7 1700000000\n", "te_queue_size"),
            Some(7.0)
        );
        assert_eq!(prometheus_sum(b"other 1\n", "te_queue_size"), None);
    }
}
