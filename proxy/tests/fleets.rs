//! Fleets that are not Switchyard's own: TEI and vLLM readiness (their
//! `/health` and Prometheus queue gauges), plain HTTP status checks, a 429
//! retried on a sibling as a 503 is, and in-band load reports
//! (`endpoint-load-metrics` on every answer) steering the next pick.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use common::{metric, pool, Proxy, Upstream, FAST_HEALTH};

/// A fake TEI or vLLM server: `/health` and `/metrics` with its queue gauge.
struct Fake {
    addr: std::net::SocketAddr,
    healthy: Arc<AtomicBool>,
    queue: Arc<AtomicU64>,
}

async fn fake(gauge: &'static str) -> Fake {
    let (healthy, queue) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    let state = (healthy.clone(), queue.clone(), gauge);
    type S = (Arc<AtomicBool>, Arc<AtomicU64>, &'static str);
    let app = Router::new()
        .route(
            "/health",
            get(|State(s): State<S>| async move {
                if s.0.load(SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<S>| async move {
                format!(
                    "# TYPE {g} gauge\n{g}{{model_name=\"m\"}} {}\nother_metric 5\n",
                    s.1.load(SeqCst),
                    g = s.2
                )
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    Fake {
        addr,
        healthy,
        queue,
    }
}

/// One pool of `addr` checked as `kind`, fast health, one route.
fn fleet(kind: &str, addr: std::net::SocketAddr) -> String {
    format!("[pools.p]\nreadiness = \"{kind}\"\nbackends = [{{ address = \"{addr}\" }}]\n")
        + FAST_HEALTH
        + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n"
}

/// Polls `addr`'s `/admin/backends` entry until `done` holds (3 s at
/// most); the last entry seen.
async fn entry_until(
    proxy: &Proxy,
    addr: std::net::SocketAddr,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..60 {
        last = entry(proxy, addr).await;
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// The `/admin/backends` entry of `addr`.
async fn entry(proxy: &Proxy, addr: std::net::SocketAddr) -> serde_json::Value {
    let (_, list) = proxy.admin("GET", "/admin/backends").await;
    let found = list["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["address"] == addr.to_string()));
    found
        .cloned()
        .unwrap_or_else(|| panic!("{addr} not listed: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tei_and_vllm_readiness_follow_their_health_and_queue_gauges() {
    for (kind, gauge) in [
        ("tei", "te_queue_size"),
        ("vllm", "vllm:num_requests_waiting"),
    ] {
        let server = fake(gauge).await;
        server.queue.store(7, SeqCst);
        let body = fleet(kind, server.addr);
        let proxy = Proxy::start(&body).await;
        let scrape = format!(
            "switchyard_upstream_queue_depth{{backend=\"{}\"}}",
            server.addr
        );
        let seen = entry_until(&proxy, server.addr, |e| e["report"]["queue_depth"] == 7).await;
        let seen =
            metric(&proxy.metrics().await, &scrape).filter(|_| seen["report"]["queue_depth"] == 7);
        assert_eq!(seen, Some(7.0), "{kind}: the queue gauge reached routing");
        assert_eq!(
            entry(&proxy, server.addr).await["state"],
            "healthy",
            "{kind}"
        );
        server.healthy.store(false, SeqCst);
        let state =
            entry_until(&proxy, server.addr, |e| e["state"] == "unhealthy").await["state"].clone();
        assert_eq!(state, "unhealthy", "{kind}: /health 503 takes it out");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_readiness_checks_the_status_alone() {
    let up = Upstream::start("up", 0).await;
    let body = fleet("http", up.addr);
    let proxy = Proxy::start(&body).await;
    let resp = proxy
        .client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    // A 503 on the health path takes it out, report or not.
    up.control.set(&up.control.not_ready, true);
    let last = entry_until(&proxy, up.addr, |e| e["state"] != "healthy").await;
    assert_ne!(last["state"], "healthy", "{last}");
    assert!(
        last["report"]["queue_depth"].is_null(),
        "no report is read: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_is_retried_on_a_sibling() {
    let busy = Upstream::start("busy", 0).await;
    let ok = Upstream::start("ok", 0).await;
    busy.control.set(&busy.control.throttled, true);
    let body = pool("p", &[(busy.addr, 1), (ok.addr, 1)])
        + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n";
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();
    for _ in 0..20 {
        let resp = client
            .post(proxy.url("/v1/embeddings"))
            .body("{}")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
    }
    assert!(
        busy.control.requests() > 0,
        "the throttled backend was tried"
    );
    let retries = metric(
        &proxy.metrics().await,
        "switchyard_retries_total{pool=\"p\"}",
    );
    assert_eq!(
        retries,
        Some(busy.control.requests() as f64),
        "one retry per 429"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_band_load_report_steers_the_next_pick_and_stays_inside() {
    let a = Upstream::start("a", 0).await;
    let b = Upstream::start("b", 0).await;
    // Health reports say both queues are empty; only a's answers say 50.
    let deep = "TEXT named_metrics.queue_depth=50, named_metrics.queue_capacity=256";
    *a.control.load_report.lock().expect("lock") = Some(deep.into());
    *b.control.load_report.lock().expect("lock") = Some("TEXT named_metrics.queue_depth=0".into());
    let body =
        pool("p", &[(a.addr, 1), (b.addr, 1)]) + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n";
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();
    let mut saw_header = false;
    for _ in 0..30 {
        let resp = client.get(proxy.url("/")).send().await.expect("sent");
        saw_header |= resp.headers().contains_key("endpoint-load-metrics");
    }
    assert!(a.control.requests() > 0, "a was picked before its report");
    let a_before = a.control.requests();
    for _ in 0..30 {
        client.get(proxy.url("/")).send().await.expect("sent");
    }
    // A readiness poll (every second, saying 0) may let one through.
    let to_a = a.control.requests() - a_before;
    assert!(to_a <= 1, "a reported a deep queue, yet got {to_a} of 30");
    assert!(!saw_header, "the report is for the proxy, not the client");
}
