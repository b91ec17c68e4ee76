//! A small upstream that honours the readiness contract, for tests.
//!
//! `GET /health/ready` answers the JSON report (200 ready, 503 not ready,
//! or a hang past the checker's timeout when told to "break"); every other
//! request is counted (and how many run at once), delayed as configured and
//! answered with a JSON echo of the headers and body size it received, or
//! with an overload 503.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;

/// Live controls and counters of one upstream.
#[derive(Default)]
pub struct Control {
    pub name: String,
    /// Added to every non-health request, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Reported in the readiness report; false answers 503.
    pub not_ready: AtomicBool,
    /// Health checks hang (the checker times out) instead of answering.
    pub health_broken: AtomicBool,
    /// Requests get 503 + Retry-After, as a backend with a full queue does.
    pub overloaded: AtomicBool,
    /// Requests get a plain 500.
    pub failing: AtomicBool,
    /// Requests get 429, as TEI answers when its queue is full.
    pub throttled: AtomicBool,
    /// Sent as the `endpoint-load-metrics` header of every answer.
    pub load_report: std::sync::Mutex<Option<String>>,
    /// Non-health requests received.
    pub requests: AtomicU64,
    /// Reported as `queue_depth` (of a capacity of 256).
    pub queue_depth: AtomicU64,
    /// Non-health requests being served right now, and the most at once.
    serving: AtomicU64,
    peak_serving: AtomicU64,
    /// When set, requests get an OpenAI-shaped embeddings answer with this
    /// vector (`data[0].embedding`) instead of the echo.
    pub embedding: std::sync::Mutex<Option<Vec<f64>>>,
}

impl Control {
    pub fn requests(&self) -> u64 {
        self.requests.load(SeqCst)
    }

    pub fn set(&self, flag: &AtomicBool, on: bool) {
        flag.store(on, SeqCst);
    }

    /// The most non-health requests this upstream has served at once.
    pub fn peak_concurrency(&self) -> u64 {
        self.peak_serving.load(SeqCst)
    }
}

/// One request being served, until dropped (also when its handler is
/// cancelled because the proxy went away).
struct Serving<'a>(&'a Control);

impl<'a> Serving<'a> {
    fn new(c: &'a Control) -> Self {
        let now = c.serving.fetch_add(1, SeqCst) + 1;
        c.peak_serving.fetch_max(now, SeqCst);
        Self(c)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, SeqCst);
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub control: Arc<Control>,
}

impl Upstream {
    /// Starts an upstream on 127.0.0.1:0 on the current tokio runtime.
    pub async fn start(name: &str, delay_ms: u64) -> Upstream {
        let control = Arc::new(Control {
            name: name.to_string(),
            delay_ms: AtomicU64::new(delay_ms),
            ..Control::default()
        });
        let app = Router::new()
            .route("/health/ready", get(health))
            .fallback(any(serve))
            .with_state(control.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test upstream");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("test upstream serves");
        });
        Upstream { addr, control }
    }
}

async fn health(State(c): State<Arc<Control>>) -> Response {
    if c.health_broken.load(SeqCst) {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let ready = !c.not_ready.load(SeqCst);
    let report = json!({
        "status": if ready { "ready" } else { "draining" },
        "ready": ready,
        "version": format!("{}-v1", c.name),
        "model": "test",
        "queue_depth": c.queue_depth.load(SeqCst),
        "queue_capacity": 256,
        "in_flight": 0,
        "cache_hit_rate": 0.5,
        "cache": "ok",
        "uptime_s": 1.0,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn serve(State(c): State<Arc<Control>>, headers: HeaderMap, body: Bytes) -> Response {
    let report = c.load_report.lock().expect("load_report lock").clone();
    let mut resp = answer(c, headers, body).await;
    if let Some(report) = report {
        let value = report.parse().expect("a valid header value");
        resp.headers_mut().insert("endpoint-load-metrics", value);
    }
    resp
}

async fn answer(c: Arc<Control>, headers: HeaderMap, body: Bytes) -> Response {
    c.requests.fetch_add(1, SeqCst);
    let _serving = Serving::new(&c);
    let delay = c.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let instance = [("x-switchyard-instance", c.name.clone())];
    if c.overloaded.load(SeqCst) {
        let err = json!({"error": {"message": "queue full", "type": "overloaded"}});
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, instance, Json(err)).into_response();
        resp.headers_mut()
            .insert("retry-after", "1".parse().expect("valid header"));
        return resp;
    }
    if c.throttled.load(SeqCst) {
        return (StatusCode::TOO_MANY_REQUESTS, instance, "queue full").into_response();
    }
    if c.failing.load(SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, instance, "broken").into_response();
    }
    if let Some(vector) = c.embedding.lock().expect("embedding lock").clone() {
        let data = json!([{"object": "embedding", "index": 0, "embedding": vector}]);
        return (
            StatusCode::OK,
            instance,
            Json(json!({"object": "list", "data": data})),
        )
            .into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let echo = json!({
        "instance": c.name,
        "body_bytes": body.len(),
        "x-forwarded-for": header("x-forwarded-for"),
        "x-forwarded-proto": header("x-forwarded-proto"),
        "x-request-id": header("x-request-id"),
        "header_names": headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    (StatusCode::OK, instance, Json(echo)).into_response()
}
