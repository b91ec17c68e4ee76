//! The request options users ask for (encoding_format, dimensions,
//! truncate, priority), GET /v1/models and the in-band load report, over
//! real HTTP against in-process servers running a tiny random BERT.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

/// 128 tokens for the slow model (its max_seq_length), so every forward
/// pass takes a while.
fn long_text() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(20)
}

async fn post(server: &TestServer, body: Value, priority: Option<&str>) -> reqwest::Response {
    let mut request = server.client.post(server.url("/v1/embeddings")).json(&body);
    if let Some(priority) = priority {
        request = request.header("x-switchyard-priority", priority);
    }
    request.send().await.unwrap()
}

/// Asserts a 4xx OpenAI error naming `param`, and returns its message.
async fn expect_error(response: reqwest::Response, status: u16, param: &str) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Parses `endpoint-load-metrics`, insisting on the exact documented form:
/// (queue_depth, queue_capacity, in_flight).
fn load_report(headers: &reqwest::header::HeaderMap) -> (u64, u64, u64) {
    let value = headers
        .get("endpoint-load-metrics")
        .expect("every response carries endpoint-load-metrics")
        .to_str()
        .unwrap();
    let fields = value.strip_prefix("TEXT ").expect("TEXT format");
    let values: Vec<(&str, u64)> = fields
        .split(", ")
        .map(|field| {
            let (key, n) = field.split_once('=').unwrap();
            (key, n.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        names,
        [
            "named_metrics.queue_depth",
            "named_metrics.queue_capacity",
            "named_metrics.in_flight"
        ],
        "{value}"
    );
    (values[0].1, values[1].1, values[2].1)
}

fn decode_base64(text: &str) -> Vec<f32> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoding_format_float_is_the_default_and_base64_packs_the_same_floats() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        let input = json!(["hello world", "one two three"]);

        let default = server.vectors(input.clone()).await;
        let response = post(
            &server,
            json!({"input": input, "encoding_format": "float"}),
            None,
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(vectors_of(&response.json().await.unwrap()), default);

        let response = post(
            &server,
            json!({"input": input, "encoding_format": "base64"}),
            None,
        )
        .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        for (i, expected) in default.iter().enumerate() {
            let packed = body["data"][i]["embedding"].as_str().unwrap();
            // 32 floats are 128 bytes: 43 groups of 4 characters.
            assert_eq!(packed.len(), 172);
            assert_eq!(&decode_base64(packed), expected);
        }

        for bad in [json!("int8"), json!("BASE64"), json!("")] {
            let response = post(
                &server,
                json!({"input": "hello", "encoding_format": bad}),
                None,
            )
            .await;
            let message = expect_error(response, 400, "encoding_format").await;
            assert!(message.contains("encoding_format"), "{message}");
        }
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_is_refused_unless_it_is_the_models_own() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default()); // 32 dimensions
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        let plain = server.vectors(json!("hello world")).await;

        for same in [json!(32), json!(null)] {
            let response = post(
                &server,
                json!({"input": "hello world", "dimensions": same}),
                None,
            )
            .await;
            assert_eq!(response.status(), 200, "dimensions {same}");
            assert_eq!(vectors_of(&response.json().await.unwrap()), plain);
        }

        for bad in [
            json!(16),
            json!(64),
            json!(0),
            json!(-32),
            json!(32.5),
            json!("32"),
            json!([32]),
        ] {
            let response = post(
                &server,
                json!({"input": "hello world", "dimensions": bad}),
                None,
            )
            .await;
            let message = expect_error(response, 400, "dimensions").await;
            assert!(message.contains("Matryoshka"), "{message}");
            assert!(message.contains("32"), "names the model's size: {message}");
        }
        assert_eq!(
            server
                .metric("switchyard_embed_rejected_total{reason=\"unsupported_dimensions\"}")
                .await,
            7.0
        );
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_false_refuses_an_input_over_the_limit_naming_it() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default()); // max_seq_length 24
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        // 30 words plus [CLS] and [SEP].
        let too_long = "hello world ".repeat(15);
        // 22 words plus [CLS] and [SEP]: exactly the limit.
        let at_limit = "hello world ".repeat(11);

        let response = post(
            &server,
            json!({"input": ["one", at_limit, too_long], "truncate": false}),
            None,
        )
        .await;
        let message = expect_error(response, 413, "input").await;
        assert!(message.contains("input[2] is 32 tokens"), "{message}");
        assert!(message.contains("24"), "names the limit: {message}");

        // Truncated by default and when asked, cut at 24 tokens.
        for truncate in [json!(null), json!(true)] {
            let response = post(
                &server,
                json!({"input": [too_long], "truncate": truncate}),
                None,
            )
            .await;
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["usage"]["prompt_tokens"], 24);
        }

        // Inputs within the limit give the same vectors either way.
        let input = json!(["one", at_limit]);
        let truncated = server.vectors(input.clone()).await;
        let response = post(&server, json!({"input": input, "truncate": false}), None).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["usage"]["prompt_tokens"], 3 + 24);
        assert_eq!(vectors_of(&body), truncated);

        let response = post(&server, json!({"input": "x", "truncate": "no"}), None).await;
        assert_eq!(response.status(), 422);

        let metrics = server.metrics().await;
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_rejected_total{reason=\"input_too_long\"}"
            ),
            1.0
        );
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_served_model_in_openai_form() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        let response = server
            .client
            .get(server.url("/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "list");
        let models = body["data"].as_array().unwrap();
        assert_eq!(models.len(), 1, "{body}");
        assert_eq!(models[0]["id"], "tiny-test");
        assert_eq!(models[0]["object"], "model");
        assert_eq!(models[0]["owned_by"], "switchyard");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let created = models[0]["created"].as_u64().unwrap();
        assert!(created <= now && created + 600 > now, "created {created}");

        let response = server
            .client
            .post(server.url("/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_load_report() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server =
            TestServer::started_ready(config(dir.path(), &["--queue-capacity", "300"])).await;
        let get = |path: &str| server.client.get(server.url(path)).send();
        let responses = vec![
            post(&server, json!({"input": "hello"}), None).await,
            post(&server, json!({"input": []}), None).await,
            post(&server, json!({"input": "x"}), Some("urgent")).await,
            get("/health/ready").await.unwrap(),
            get("/health/live").await.unwrap(),
            get("/metrics").await.unwrap(),
            get("/v1/models").await.unwrap(),
            get("/nowhere").await.unwrap(),
            get("/v1/embeddings").await.unwrap(),
        ];
        let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
        assert_eq!(statuses, [200, 400, 400, 200, 200, 200, 200, 404, 405]);
        for response in &responses {
            // Idle: nothing queued, and nothing in flight besides the
            // request being answered.
            assert_eq!(
                load_report(response.headers()),
                (0, 300, 0),
                "{}",
                response.url()
            );
        }
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_header_is_validated_and_counted_per_class() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        for (priority, status) in [
            (Some("interactive"), 200),
            (Some("bulk"), 200),
            (Some("bulk"), 200),
            (None, 200),
            (Some("Bulk"), 400),
            (Some("high"), 400),
            (Some(""), 400),
        ] {
            let response = post(&server, json!({"input": "hello"}), priority).await;
            if status == 200 {
                assert_eq!(response.status(), 200, "{priority:?}");
            } else {
                let message = expect_error(response, status, "x-switchyard-priority").await;
                assert!(message.contains("interactive"), "{message}");
            }
        }
        let metrics = server.metrics().await;
        let sample = |name: &str| metric_value(&metrics, name);
        assert_eq!(
            sample("switchyard_embed_class_requests_total{class=\"interactive\"}"),
            2.0
        );
        assert_eq!(
            sample("switchyard_embed_class_requests_total{class=\"bulk\"}"),
            2.0
        );
        assert_eq!(
            sample("switchyard_embed_queue_wait_seconds_count{class=\"bulk\"}"),
            2.0
        );
        assert_eq!(
            sample("switchyard_embed_queue_wait_seconds_count{class=\"interactive\"}"),
            2.0
        );
        for line in [
            "switchyard_embed_class_queue_depth{class=\"interactive\"} 0",
            "switchyard_embed_class_queue_depth{class=\"bulk\"} 0",
            "switchyard_embed_bulk_promoted_total 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "missing {line}");
        }
        let (_, report) = server.ready_report().await;
        assert_eq!(
            report["queue_depth_by_class"],
            json!({"interactive": 0, "bulk": 0})
        );
        server.stop().await.unwrap();
    })
    .await
}

/// Queues a large bulk request behind a one-input-per-batch model, then
/// sends one interactive input. Returns (whether the bulk request was still
/// running when the interactive one was answered, the interactive answer's
/// load report, the readiness report seen while bulk work was queued).
async fn interactive_behind_bulk(server: &TestServer) -> (bool, (u64, u64, u64), Value) {
    let bulk_inputs: Vec<String> = (0..48).map(|i| format!("{i} {}", long_text())).collect();
    let bulk = tokio::spawn({
        let client = server.client.clone();
        let url = server.url("/v1/embeddings");
        async move {
            let response = client
                .post(url)
                .header("x-switchyard-priority", "bulk")
                .json(&json!({ "input": bulk_inputs }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["data"].as_array().unwrap().len(), 48);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let (_, report) = server.ready_report().await;
        if report["queue_depth_by_class"]["bulk"].as_u64().unwrap() >= 24 {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline && !bulk.is_finished(),
            "never saw the bulk request queued: {report}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    let response = post(server, json!({"input": long_text()}), None).await;
    let still_running = !bulk.is_finished();
    assert_eq!(response.status(), 200);
    let load = load_report(response.headers());
    bulk.await.unwrap();
    (still_running, load, seen)
}

fn slow_one_at_a_time(dir: &std::path::Path, promote_after: &str) -> switchyard_backend::Config {
    config(
        dir,
        &[
            "--max-batch",
            "1",
            "--max-wait",
            "0s",
            "--max-inputs",
            "64",
            "--queue-capacity",
            "64",
            "--bulk-promote-after",
            promote_after,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_work_overtakes_queued_bulk_work() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::slow());
        let server = TestServer::started_ready(slow_one_at_a_time(dir.path(), "60s")).await;
        let (bulk_still_running, (queue_depth, capacity, in_flight), seen) =
            interactive_behind_bulk(&server).await;
        assert!(
            bulk_still_running,
            "the interactive input waited for the whole bulk request"
        );
        assert!(queue_depth > 0, "bulk work was still queued");
        assert_eq!(capacity, 64);
        assert!(in_flight >= 1, "the bulk request was still in flight");
        assert_eq!(seen["queue_depth_by_class"]["interactive"], 0, "{seen}");
        assert_eq!(
            seen["queue_depth"], seen["queue_depth_by_class"]["bulk"],
            "{seen}"
        );

        let metrics = server.metrics().await;
        assert_eq!(
            metric_value(&metrics, "switchyard_embed_bulk_promoted_total"),
            0.0
        );
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_queue_wait_seconds_count{class=\"bulk\"}"
            ),
            48.0
        );
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_work_older_than_the_promotion_age_is_not_overtaken() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::slow());
        // Promoted at once: plain arrival order.
        let server = TestServer::started_ready(slow_one_at_a_time(dir.path(), "0s")).await;
        let (_, (queue_depth, _, _), _) = interactive_behind_bulk(&server).await;
        assert_eq!(
            queue_depth, 0,
            "the interactive input, queued last, must be served last"
        );
        let promoted = server.metric("switchyard_embed_bulk_promoted_total").await;
        assert!(
            promoted >= 1.0,
            "bulk inputs were served ahead of a waiting interactive one"
        );
        server.stop().await.unwrap();
    })
    .await
}
