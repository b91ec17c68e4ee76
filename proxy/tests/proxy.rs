//! The proxy against real upstreams over real sockets: least-connections,
//! weights, health, retries, limits, headers and metrics. The rules of a
//! single request run over each client protocol (see `common::matrix`).

mod common;

use std::time::{Duration, Instant};

use common::matrix::{assert_all_200, matrix};
use common::raw::{Backend, Reply};
use common::{metric, pool, ChildUpstream, Load, Proto, Proxy, Upstream, Via};

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

matrix!(
    least_connections_avoids_the_slow_backend,
    |proto| async move {
        let slow = Upstream::start("slow", 200).await;
        let fast1 = Upstream::start("fast1", 0).await;
        let fast2 = Upstream::start("fast2", 0).await;
        let body = pool("p", &[(slow.addr, 1), (fast1.addr, 1), (fast2.addr, 1)]) + &route("p");
        let proxy = proto.start(&body).await;

        let results = proxy.via(proto).load("/v1/embeddings", 16, 800).await;
        assert_all_200(&results);
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
);

matrix!(
    weights_three_to_one_split_within_five_points,
    |proto| async move {
        let heavy = Upstream::start("heavy", 0).await;
        let light = Upstream::start("light", 0).await;
        let body = pool("p", &[(heavy.addr, 3), (light.addr, 1)]) + &route("p");
        let proxy = proto.start(&body).await;

        // One request at a time: with every backend idle, least-connections
        // ties and the draw follows the weights. (Under concurrency it
        // balances in-flight per weight instead, which favours an idle light
        // backend: 69-74 % for the heavy one at 8 in flight.) Binomial(2000,
        // 0.75) has a standard deviation of 0.97 points: the window is ±5 sd.
        let results = proxy.via(proto).load("/", 1, 2000).await;
        assert_all_200(&results);
        let (h, l) = (heavy.control.requests(), light.control.requests());
        assert_eq!(h + l, 2000);
        let share = h as f64 / 2000.0 * 100.0;
        assert!(
            (70.0..=80.0).contains(&share),
            "weight-3 backend got {share:.1}%"
        );
    },
);

matrix!(
    not_ready_or_failing_backends_stop_getting_requests,
    |proto| async move {
        let a = Upstream::start("a", 1).await;
        let not_ready = Upstream::start("not-ready", 1).await;
        let broken = Upstream::start("broken", 1).await;
        let body = pool("p", &[(a.addr, 1), (not_ready.addr, 1), (broken.addr, 1)]) + &route("p");
        let proxy = proto.start(&body).await;
        let load = Load::over(&proxy, proto, 8);
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
);

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

/// POSTs `len` bytes to `/v1/embeddings` `times` times through a pool
/// where the backend named `ok` is the only one not overloaded; asserts
/// that each reached it whole. Returns the pool's retry count.
async fn post_past_overload(proxy: &Proxy, via: &Via, times: usize, len: usize) -> f64 {
    let payload = vec![b'x'; len];
    for _ in 0..times {
        let resp = via
            .send(via.post("/v1/embeddings").body(payload.clone()))
            .await;
        assert_eq!(resp.status(), 200);
        let echo: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(echo["instance"], "ok");
        assert_eq!(echo["body_bytes"], len, "the replayed body is complete");
    }
    let scrape = proxy.metrics().await;
    metric(&scrape, "switchyard_retries_total{pool=\"p\"}").unwrap_or(0.0)
}

matrix!(
    overloaded_503_is_retried_on_a_sibling_with_its_body,
    |proto| async move {
        // Two overloaded backends: some requests need all three attempts, and
        // the body must replay whole each time.
        let busy = Upstream::start("busy", 0).await;
        let busy2 = Upstream::start("busy2", 0).await;
        let ok = Upstream::start("ok", 0).await;
        busy.control.set(&busy.control.overloaded, true);
        busy2.control.set(&busy2.control.overloaded, true);
        let body = pool("p", &[(busy.addr, 1), (busy2.addr, 1), (ok.addr, 1)]) + &route("p");
        let proxy = proto.start(&body).await;

        let retries = post_past_overload(&proxy, &proxy.via(proto), 30, 40_000).await;
        let tried_busy = busy.control.requests() + busy2.control.requests();
        assert!(
            busy.control.requests() > 0 && busy2.control.requests() > 0,
            "the overloaded backends were tried"
        );
        assert_eq!(retries, tried_busy as f64, "one retry per 503");
        // Overload is load shedding, not a fault: no ejection.
        let ejections = format!(
            "switchyard_upstream_ejections_total{{backend=\"{}\"}}",
            busy.addr
        );
        assert_eq!(metric(&proxy.metrics().await, &ejections), Some(0.0));
    }
);

/// A replay buffer well past the 64 KiB Pingora's h2 path had capped it at.
const RETRY_BUFFER_MAX: usize = 256 * 1024;
/// The body replayed: larger than that old cap, within the buffer.
const REPLAYED_BODY: usize = 200 * 1024;

matrix!(
    a_body_filling_the_retry_buffer_is_replayed_whole,
    |proto| async move {
        let busy = Upstream::start("busy", 0).await;
        let ok = Upstream::start("ok", 0).await;
        busy.control.set(&busy.control.overloaded, true);
        // Weighted 9 to 1, nine requests in ten try the overloaded one first.
        let body = pool("p", &[(busy.addr, 9), (ok.addr, 1)])
            + &route("p")
            + &format!("[retry]\nbuffer_body_max = {RETRY_BUFFER_MAX}\n");
        let proxy = proto.start(&body).await;

        let retries = post_past_overload(&proxy, &proxy.via(proto), 8, REPLAYED_BODY).await;
        assert!(
            busy.control.requests() > 0,
            "the overloaded backend was tried"
        );
        assert_eq!(retries, busy.control.requests() as f64, "one retry per 503");
    }
);

matrix!(
    a_pool_without_eligible_backends_answers_503_fast,
    |proto| async move {
        let down = Upstream::start("down", 0).await;
        down.control.set(&down.control.not_ready, true);
        let body = pool("blue", &[(down.addr, 1)]) + &route("blue");
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);

        let started = Instant::now();
        let resp = via.send(via.get("/v1/embeddings")).await;
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(resp.status(), 503);
        let json: serde_json::Value = resp.json().await.expect("json body");
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "no healthy backend in pool 'blue'", "type": "no_backend"}})
        );
        assert_eq!(down.control.requests(), 0);
    }
);

matrix!(repeated_5xx_ejects_a_backend, |proto| async move {
    let bad = Upstream::start("bad", 0).await;
    let good = Upstream::start("good", 0).await;
    bad.control.set(&bad.control.failing, true);
    let body = pool("p", &[(bad.addr, 1), (good.addr, 1)])
        + &route("p")
        + "[passive]\nfailures = 3\nejection_base = \"5s\"\n";
    let proxy = proto.start(&body).await;

    let results = proxy.via(proto).load("/", 1, 60).await;
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
});

matrix!(
    an_ejected_backend_returns_after_its_ejection_once_checks_pass,
    |proto| async move {
        let flaky = Upstream::start("flaky", 0).await;
        let good = Upstream::start("good", 0).await;
        flaky.control.set(&flaky.control.failing, true);
        let body = pool("p", &[(flaky.addr, 1), (good.addr, 1)])
            + &route("p")
            + "[passive]\nfailures = 2\nejection_base = \"400ms\"\nejection_max = \"2s\"\n";
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);
        via.load("/", 1, 20).await;
        assert_eq!(flaky.control.requests(), 2, "ejected after 2 failures");

        flaky.control.set(&flaky.control.failing, false);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_all_200(&via.load("/", 2, 60).await);
        assert!(
            flaky.control.requests() > 2,
            "back in rotation after the ejection"
        );
    }
);

matrix!(
    total_time_budget_answers_504_when_the_backend_never_answers,
    |proto| async move {
        let backend = Backend::start(|_| Reply::Hang).await;
        let body = pool("p", &[(backend.addr, 1)])
            + &route("p")
            + "[timeouts]\ntotal = \"1s\"\nread = \"10s\"\n";
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);

        let started = Instant::now();
        let resp = via.send(via.get("/slow")).await;
        let took = started.elapsed();

        assert_eq!(resp.status(), 504, "{resp:?}");
        let json: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(json["error"]["type"], "upstream_timeout", "{json}");
        assert!(
            (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
            "the 1 s budget ended the request after {took:?}"
        );
        assert_eq!(backend.only_request().path(), "/slow");
    }
);

/// `len` bytes with no declared length: chunked on HTTP/1.1, DATA frames
/// without content-length on h2.
fn unsized_body(len: usize) -> reqwest::Body {
    let stream = axum::body::Body::from(vec![b'x'; len]).into_data_stream();
    reqwest::Body::wrap_stream(stream)
}

matrix!(
    a_body_over_max_body_bytes_gets_413_declared_or_streamed,
    |proto| async move {
        let up = Upstream::start("up", 0).await;
        let body = pool("p", &[(up.addr, 1)]) + &route("p") + "[limits]\nmax_body_bytes = 1000\n";
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);

        for (len, declared) in [(1000, true), (1001, true), (1000, false), (1001, false)] {
            let body = match declared {
                true => reqwest::Body::from(vec![b'x'; len]),
                false => unsized_body(len),
            };
            let case = format!("{len} bytes, declared: {declared}");
            let resp = via.send(via.post("/v1/embeddings").body(body)).await;
            let status = resp.status();
            let json: serde_json::Value = resp.json().await.expect("json");
            if len <= 1000 {
                assert_eq!(status, 200, "{case}: {json}");
                assert_eq!(json["body_bytes"], len, "{case}");
            } else {
                assert_eq!(status, 413, "{case}: {json}");
                assert_eq!(json["error"]["type"], "body_too_large", "{case}");
            }
        }
        assert_eq!(up.control.requests(), 2, "only the bodies within the limit");
    }
);

matrix!(header_limit_and_forwarding_headers, |proto| async move {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)]) + &route("p") + "[limits]\nmax_header_bytes = 4096\n";
    let proxy = proto.start(&body).await;
    let via = proxy.via(proto);
    let path = "/v1/embeddings";

    let resp = via
        .send(via.get(path).header("x-big", "y".repeat(5000)))
        .await;
    assert_eq!(resp.status(), 431);

    let resp = via
        .send(via.get(path).header("x-request-id", "req-123"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    assert_eq!(resp.headers()["x-switchyard-pool"], "p");
    assert!(
        resp.headers().get("x-switchyard-backend").is_none(),
        "backend addresses are not shown by default"
    );
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(echo["x-request-id"], "req-123");
    assert_eq!(echo["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echo["x-forwarded-proto"], proto.scheme());

    // The access log is one JSON line per request.
    let line = access_line(&proxy, "req-123").await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["pool"], "p");
    assert_eq!(line["backend"], up.addr.to_string().as_str());
    assert_eq!(line["retries"], 0);
    assert!(line["duration_ms"].is_number() && line["bytes_out"].as_u64() > Some(0));

    let resp = via.send(via.get(path)).await;
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(id.len(), 32, "a generated id");
    assert_eq!(echo["x-request-id"], id.as_str());
});

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

matrix!(identifying_headers_follow_the_config, |proto| async move {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)])
        + &route("p")
        + "[response_headers]\npool = false\nbackend = true\n";
    let proxy = proto.start(&body).await;
    let via = proxy.via(proto);
    let resp = via.send(via.get("/")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-switchyard-pool").is_none());
    assert_eq!(
        resp.headers()["x-switchyard-backend"],
        up.addr.to_string().as_str()
    );
    assert_eq!(
        resp.headers()["x-switchyard-instance"],
        "up",
        "backend headers pass through"
    );
});

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_cover_requests_health_and_reports() {
    let up = Upstream::start("up", 0).await;
    let body = pool("p", &[(up.addr, 1)]) + &route("p");
    let proxy = Proxy::start(&body).await;
    let results = proxy.via(Proto::H2).load("/", 4, 20).await;
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
