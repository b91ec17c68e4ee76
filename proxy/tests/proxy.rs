//! The proxy against real upstreams over real sockets: least-connections,
//! weights, health, retries, limits, headers and metrics.

mod common;

use std::time::{Duration, Instant};

use common::{load, metric, pool, ChildUpstream, Load, Proxy, Upstream};

fn route(pool: &str) -> String {
    format!("[[routes]]\npath_prefix = \"/\"\npool = \"{pool}\"\n")
}

/// Entry point of the child-process upstreams (see `ChildUpstream`), not a
/// test of its own: ignored, so it never counts as a passing test.
#[test]
#[ignore = "entry point of child-process upstreams"]
fn child_upstream() {
    common::serve_child_upstream_if_requested();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_connections_avoids_the_slow_backend() {
    let slow = Upstream::start("slow", 200).await;
    let fast1 = Upstream::start("fast1", 0).await;
    let fast2 = Upstream::start("fast2", 0).await;
    let body = pool("p", &[(slow.addr, 1), (fast1.addr, 1), (fast2.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;

    let results = load(&proxy.client(), &proxy.url("/v1/embeddings"), 16, 800).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|o| o.status == 200)));
    let (s, f) = (
        slow.control.requests(),
        fast1.control.requests() + fast2.control.requests(),
    );
    let fast_share = f as f64 / (s + f) as f64;
    assert!(
        fast_share >= 0.8,
        "fast backends got {:.1}% (slow {s}, fast {f})",
        fast_share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_three_to_one_split_within_five_points() {
    let heavy = Upstream::start("heavy", 0).await;
    let light = Upstream::start("light", 0).await;
    let body = pool("p", &[(heavy.addr, 3), (light.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;

    let results = load(&proxy.client(), &proxy.url("/"), 8, 2000).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|o| o.status == 200)));
    let (h, l) = (heavy.control.requests(), light.control.requests());
    assert_eq!(h + l, 2000);
    let share = h as f64 / 2000.0 * 100.0;
    assert!(
        (70.0..=80.0).contains(&share),
        "weight-3 backend got {share:.1}%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_or_failing_backends_stop_getting_requests() {
    let a = Upstream::start("a", 1).await;
    let not_ready = Upstream::start("not-ready", 1).await;
    let broken = Upstream::start("broken", 1).await;
    let body = pool("p", &[(a.addr, 1), (not_ready.addr, 1), (broken.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;
    let load = Load::start(&proxy, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(not_ready.control.requests() > 0 && broken.control.requests() > 0);

    not_ready.control.set(&not_ready.control.not_ready, true);
    broken.control.set(&broken.control.health_broken, true);
    // fall (2) × interval (100 ms), plus one check timeout (80 ms) and slack.
    tokio::time::sleep(Duration::from_millis(2 * 100 + 80 + 150)).await;
    let (nr, br) = (not_ready.control.requests(), broken.control.requests());
    tokio::time::sleep(Duration::from_millis(700)).await;
    load.finish().await;

    assert_eq!(
        not_ready.control.requests(),
        nr,
        "ready:false backend got requests"
    );
    assert_eq!(
        broken.control.requests(),
        br,
        "failing backend got requests"
    );
    let scrape = proxy.metrics().await;
    let up = |u: &Upstream| {
        metric(
            &scrape,
            &format!("switchyard_upstream_up{{backend=\"{}\"}}", u.addr),
        )
    };
    assert_eq!(up(&broken), Some(0.0));
    assert_eq!(up(&a), Some(1.0));
    let ready = format!(
        "switchyard_upstream_ready{{backend=\"{}\"}}",
        not_ready.addr
    );
    assert_eq!(metric(&scrape, &ready), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_backend_under_load_fails_no_request() {
    let mut victim = ChildUpstream::spawn("child_upstream", "victim", 20);
    let b = ChildUpstream::spawn("child_upstream", "b", 20);
    let c = ChildUpstream::spawn("child_upstream", "c", 20);
    let body = pool("p", &[(victim.addr, 1), (b.addr, 1), (c.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;

    let load = Load::start(&proxy, 12);
    tokio::time::sleep(Duration::from_millis(700)).await;
    victim.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = load.finish().await;
    assert!(sent > 100, "load ran ({sent} requests)");
    let scrape = proxy.metrics().await;
    let retries = metric(&scrape, "switchyard_retries_total{pool=\"p\"}").unwrap_or(0.0);
    assert!(
        retries >= 1.0,
        "in-flight requests on the victim were retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overloaded_503_is_retried_on_a_sibling_with_its_body() {
    // Two overloaded backends: some requests need all three attempts, and
    // the body must replay whole each time.
    let busy = Upstream::start("busy", 0).await;
    let busy2 = Upstream::start("busy2", 0).await;
    let ok = Upstream::start("ok", 0).await;
    busy.control.set(&busy.control.overloaded, true);
    busy2.control.set(&busy2.control.overloaded, true);
    let body = pool("p", &[(busy.addr, 1), (busy2.addr, 1), (ok.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();

    let payload = "x".repeat(40_000);
    for _ in 0..30 {
        let resp = client
            .post(proxy.url("/v1/embeddings"))
            .body(payload.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        let echo: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(echo["instance"], "ok");
        assert_eq!(echo["body_bytes"], 40_000, "the replayed body is complete");
    }
    let tried_busy = busy.control.requests() + busy2.control.requests();
    assert!(
        busy.control.requests() > 0 && busy2.control.requests() > 0,
        "the overloaded backends were tried"
    );
    let scrape = proxy.metrics().await;
    let retries = metric(&scrape, "switchyard_retries_total{pool=\"p\"}").unwrap_or(0.0);
    assert_eq!(retries, tried_busy as f64, "one retry per 503");
    // Overload is load shedding, not a fault: no ejection.
    let ejections = format!(
        "switchyard_upstream_ejections_total{{backend=\"{}\"}}",
        busy.addr
    );
    assert_eq!(metric(&scrape, &ejections), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_without_eligible_backends_answers_503_fast() {
    let down = Upstream::start("down", 0).await;
    down.control.set(&down.control.not_ready, true);
    let body = pool("blue", &[(down.addr, 1)]) + &route("blue");
    let proxy = Proxy::start(&body).await;

    let started = Instant::now();
    let resp = proxy
        .client()
        .get(proxy.url("/v1/embeddings"))
        .send()
        .await
        .expect("request");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(resp.status(), 503);
    let json: serde_json::Value = resp.json().await.expect("json body");
    assert_eq!(
        json,
        serde_json::json!({"error": {"message": "no healthy backend in pool 'blue'", "type": "no_backend"}})
    );
    assert_eq!(down.control.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_5xx_ejects_a_backend() {
    let bad = Upstream::start("bad", 0).await;
    let good = Upstream::start("good", 0).await;
    bad.control.set(&bad.control.failing, true);
    let body = pool("p", &[(bad.addr, 1), (good.addr, 1)])
        + &route("p")
        + "[passive]\nfailures = 3\nejection_base = \"5s\"\n";
    let proxy = Proxy::start(&body).await;

    let results = load(&proxy.client(), &proxy.url("/"), 1, 60).await;
    let errors = results
        .iter()
        .filter(|r| r.as_ref().map_or(true, |o| o.status != 200))
        .count();
    assert_eq!(
        bad.control.requests(),
        3,
        "ejected after exactly 3 failures"
    );
    assert_eq!(
        errors, 3,
        "the three 500s reached the client (500 is not retried)"
    );
    let scrape = proxy.metrics().await;
    let ejections = format!(
        "switchyard_upstream_ejections_total{{backend=\"{}\"}}",
        bad.addr
    );
    assert_eq!(metric(&scrape, &ejections), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ejected_backend_returns_after_its_ejection_once_checks_pass() {
    let flaky = Upstream::start("flaky", 0).await;
    let good = Upstream::start("good", 0).await;
    flaky.control.set(&flaky.control.failing, true);
    let body = pool("p", &[(flaky.addr, 1), (good.addr, 1)])
        + &route("p")
        + "[passive]\nfailures = 2\nejection_base = \"400ms\"\nejection_max = \"2s\"\n";
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();
    load(&client, &proxy.url("/"), 1, 20).await;
    assert_eq!(flaky.control.requests(), 2, "ejected after 2 failures");

    flaky.control.set(&flaky.control.failing, false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let results = load(&client, &proxy.url("/"), 2, 60).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|o| o.status == 200)));
    assert!(
        flaky.control.requests() > 2,
        "back in rotation after the ejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_and_forwarding_headers() {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)])
        + &route("p")
        + "[limits]\nmax_body_bytes = 1000\nmax_header_bytes = 4096\n";
    let proxy = Proxy::start(&body).await;
    let client = proxy.client_h1();
    let url = proxy.url("/v1/embeddings");

    let resp = client
        .post(&url)
        .body("x".repeat(1001))
        .send()
        .await
        .expect("413 request");
    assert_eq!(resp.status(), 413);
    let json: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(json["error"]["type"], "body_too_large");

    // A chunked body has no Content-Length: it is counted as it streams.
    assert_eq!(curl_chunked_post(&proxy, &url, 1200), "413");

    let resp = client
        .get(&url)
        .header("x-big", "y".repeat(5000))
        .send()
        .await
        .expect("431 request");
    assert_eq!(resp.status(), 431);

    let resp = client
        .get(&url)
        .header("x-request-id", "req-123")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    assert_eq!(resp.headers()["x-switchyard-pool"], "p");
    assert_eq!(
        resp.headers()["x-switchyard-backend"],
        up.addr.to_string().as_str()
    );
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(echo["x-request-id"], "req-123");
    assert_eq!(echo["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echo["x-forwarded-proto"], "https");

    // The access log is one JSON line per request.
    let line = access_line(&proxy, "req-123").await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["pool"], "p");
    assert_eq!(line["backend"], up.addr.to_string().as_str());
    assert_eq!(line["retries"], 0);
    assert!(line["duration_ms"].is_number() && line["bytes_out"].as_u64() > Some(0));

    let resp = client.get(&url).send().await.expect("request");
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(id.len(), 32, "a generated id");
    assert_eq!(echo["x-request-id"], id.as_str());
}

/// The access-log entry of request `id`, once the proxy has written it.
async fn access_line(proxy: &Proxy, id: &str) -> serde_json::Value {
    for _ in 0..100 {
        let found = proxy.log().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["target"] == "switchyard::access" && v["request_id"] == id).then_some(v)
        });
        if let Some(v) = found {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access log line for {id}; log:\n{}", proxy.log());
}

/// POSTs `size` bytes with `Transfer-Encoding: chunked` through curl;
/// returns the status code curl saw.
fn curl_chunked_post(proxy: &Proxy, url: &str, size: usize) -> String {
    let file = proxy.dir.path().join("chunked-body");
    std::fs::write(&file, vec![b'x'; size]).expect("write body");
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--http1.1"])
        .args(["-H", "transfer-encoding: chunked", "--max-time", "10"])
        .arg("--cacert")
        .arg(&proxy.certs.ca)
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", proxy.https.port()))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(url)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identifying_headers_can_be_switched_off() {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)])
        + &route("p")
        + "[response_headers]\npool = false\nbackend = false\n";
    let proxy = Proxy::start(&body).await;
    let resp = proxy
        .client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-switchyard-pool").is_none());
    assert!(resp.headers().get("x-switchyard-backend").is_none());
    assert_eq!(
        resp.headers()["x-switchyard-instance"],
        "up",
        "backend headers pass through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_cover_requests_health_and_reports() {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;
    let results = load(&proxy.client(), &proxy.url("/"), 4, 20).await;
    assert_eq!(results.len(), 20);
    let b = up.addr.to_string();
    let expected = [
        (
            format!("switchyard_requests_total{{backend=\"{b}\",code_class=\"2xx\",pool=\"p\"}}"),
            20.0,
        ),
        (
            "switchyard_request_duration_seconds_count{pool=\"p\"}".to_string(),
            20.0,
        ),
        (
            format!("switchyard_upstream_in_flight_requests{{backend=\"{b}\"}}"),
            0.0,
        ),
        (format!("switchyard_upstream_up{{backend=\"{b}\"}}"), 1.0),
        (format!("switchyard_upstream_ready{{backend=\"{b}\"}}"), 1.0),
        (
            format!("switchyard_upstream_queue_depth{{backend=\"{b}\"}}"),
            0.0,
        ),
        (
            format!("switchyard_upstream_cache_hit_ratio{{backend=\"{b}\"}}"),
            0.5,
        ),
        ("switchyard_retries_total{pool=\"p\"}".to_string(), 0.0),
        (
            format!("switchyard_upstream_ejections_total{{backend=\"{b}\"}}"),
            0.0,
        ),
    ];
    // The access log and counters run just after the response is sent, so
    // the last requests may take a moment to show.
    let mut scrape = String::new();
    for _ in 0..50 {
        scrape = proxy.metrics().await;
        if expected.iter().all(|(s, v)| metric(&scrape, s) == Some(*v)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (sample, value) in &expected {
        assert_eq!(metric(&scrape, sample), Some(*value), "{sample}");
    }
    let checks = format!("switchyard_health_checks_total{{backend=\"{b}\",result=\"pass\"}}");
    assert!(metric(&scrape, &checks).unwrap_or(0.0) >= 2.0);
}
