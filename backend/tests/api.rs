//! The HTTP API and batching, against in-process servers running a tiny
//! random BERT (no download needed).

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const LONG: &str = "the quick brown fox jumps over the lazy dog and the dog is fast, \
                    one two three of the long sentence";

const REPORT_FIELDS: &[&str] = &[
    "status",
    "ready",
    "version",
    "model",
    "queue_depth",
    "queue_capacity",
    "queue_depth_by_class",
    "in_flight",
    "cache_hit_rate",
    "cache",
    "uptime_s",
];

fn assert_report_shape(report: &Value) {
    for field in REPORT_FIELDS {
        assert!(
            report.get(field).is_some(),
            "readiness lacks {field}: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_alone_equals_the_same_input_batched_with_longer_ones() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        // A generous wait makes sure the three inputs share one forward pass.
        let server = TestServer::started_ready(config(dir.path(), &["--max-wait", "50ms"])).await;

        let alone = server.vectors(json!("hello world")).await;
        let batched = server.vectors(json!([LONG, "hello world", "one"])).await;
        assert_eq!(
            server.metric("switchyard_embed_batch_size_count").await,
            2.0,
            "expected one batch per request"
        );
        assert_eq!(server.metric("switchyard_embed_batch_size_sum").await, 4.0);

        let diff = max_abs_diff(&alone[0], &batched[1]);
        assert!(diff < 1e-5, "padding changed the vector by {diff}");
        assert!(
            max_abs_diff(&batched[0], &batched[1]) > 1e-3,
            "different texts should give different vectors"
        );
        for v in alone.iter().chain(&batched) {
            assert_eq!(v.len(), 32);
            assert!((norm(v) - 1.0).abs() < 1e-5, "norm {}", norm(v));
        }
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_does_not_wait_for_company() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(dir.path(), &["--max-wait", "3s"])).await;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            server.vectors(json!(["hello", "world"])).await;
            let took = started.elapsed();
            assert!(
                took < std::time::Duration::from_secs(1),
                "a request nobody could join waited {took:?}"
            );
        }
        assert_eq!(server.metric("switchyard_embed_batch_size_sum").await, 6.0);
        assert_eq!(
            server.metric("switchyard_embed_batch_size_count").await,
            3.0
        );
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_truncated_at_max_seq_length() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default()); // max_seq_length 24
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        let text = "hello world ".repeat(30);
        let longer = format!("{text} and a different tail that must be cut off");

        let response = server.embed(json!([text, longer])).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["usage"]["prompt_tokens"], 48, "24 tokens each: {body}");
        assert_eq!(body["usage"]["total_tokens"], 48);
        let vectors = vectors_of(&body);
        assert!(max_abs_diff(&vectors[0], &vectors[1]) < 1e-6);

        let short = server.vectors(json!("hello world")).await;
        assert!(max_abs_diff(&short[0], &vectors[0]) > 1e-3);
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_is_openai_shaped_and_base64_matches_floats() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(
            dir.path(),
            &["--version", "blue-v1", "--instance", "backend-a"],
        ))
        .await;
        let response = server
            .client
            .post(server.url("/v1/embeddings"))
            .json(&json!({"input": ["hello", "world"], "model": "anything"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-switchyard-instance"], "backend-a");
        assert_eq!(response.headers()["x-switchyard-version"], "blue-v1");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "tiny-test");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(body["data"][1]["object"], "embedding");
        let floats = vectors_of(&body);

        let response = server
            .client
            .post(server.url("/v1/embeddings"))
            .json(&json!({"input": ["hello", "world"], "encoding_format": "base64"}))
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        for (i, expected) in floats.iter().enumerate() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(body["data"][i]["embedding"].as_str().unwrap())
                .unwrap();
            let decoded: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&decoded, expected);
        }
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_until_the_model_is_loaded_and_warm() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        // A FIFO in place of config.json holds the loader at its first read
        // for as long as the test wants, without any test hook in the server.
        let config_path = dir.path().join("config.json");
        let config_json = std::fs::read(&config_path).unwrap();
        std::fs::remove_file(&config_path).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&config_path)
            .status()
            .unwrap();
        assert!(status.success());

        let server = TestServer::start(config(dir.path(), &["--version", "green"])).await;
        for _ in 0..3 {
            let (code, report) = server.ready_report().await;
            assert_eq!(code, 503);
            assert_report_shape(&report);
            assert_eq!(report["status"], "warming_up");
            assert_eq!(report["ready"], false);
            assert_eq!(report["version"], "green");
            assert_eq!(report["model"], "tiny-test");
            assert_eq!(report["cache"], "disabled");
            assert_eq!(report["cache_hit_rate"], Value::Null);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let live = server
            .client
            .get(server.url("/health/live"))
            .send()
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
        let early = server.embed(json!("hello")).await;
        assert_eq!(early.status(), 503);
        assert!(early.headers().contains_key("retry-after"));
        assert_eq!(server.metric("switchyard_embed_ready").await, 0.0);

        tokio::task::spawn_blocking(move || std::fs::write(config_path, config_json))
            .await
            .unwrap()
            .unwrap();
        server.wait_ready().await;
        let (_, report) = server.ready_report().await;
        assert_report_shape(&report);
        assert_eq!(report["status"], "ready");
        assert_eq!(report["ready"], true);
        assert_eq!(report["queue_capacity"], 256);
        assert_eq!(server.metric("switchyard_embed_ready").await, 1.0);
        assert_eq!(server.embed(json!("hello")).await.status(), 200);
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_openai_errors() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(
            dir.path(),
            &[
                "--max-inputs",
                "4",
                "--queue-capacity",
                "8",
                "--max-body",
                "1KiB",
            ],
        ))
        .await;
        let big = json!({"input": "word ".repeat(400)}).to_string();
        // (method, path, body, status, error type, param)
        let cases: Vec<(&str, &str, String, u16, &str, Value)> = vec![
            (
                "POST",
                "/v1/embeddings",
                "not json".into(),
                400,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "POST",
                "/v1/embeddings",
                "{\"input\": [\"a\"".into(),
                400,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "POST",
                "/v1/embeddings",
                "".into(),
                400,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "POST",
                "/v1/embeddings",
                "{}".into(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": null}).to_string(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": 5}).to_string(),
                422,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": {"text": "x"}}).to_string(),
                422,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": [1, 2]}).to_string(),
                422,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": ["ok", null]}).to_string(),
                422,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": []}).to_string(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": ""}).to_string(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": ["ok", ""]}).to_string(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": ["a", "b", "c", "d", "e"]}).to_string(),
                400,
                "invalid_request_error",
                json!("input"),
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": "x", "model": 7}).to_string(),
                422,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "POST",
                "/v1/embeddings",
                json!({"input": "x", "encoding_format": "int8"}).to_string(),
                400,
                "invalid_request_error",
                json!("encoding_format"),
            ),
            (
                "POST",
                "/v1/embeddings",
                big,
                413,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "GET",
                "/v1/embeddings",
                "".into(),
                405,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/embeddings",
                "{}".into(),
                405,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "POST",
                "/health/ready",
                "".into(),
                405,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "DELETE",
                "/metrics",
                "".into(),
                405,
                "invalid_request_error",
                Value::Null,
            ),
            (
                "GET",
                "/v1/nothing-here",
                "".into(),
                404,
                "invalid_request_error",
                Value::Null,
            ),
        ];
        for (method, path, body, status, kind, param) in cases {
            let response = server
                .client
                .request(method.parse().unwrap(), server.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let case = format!("{method} {path} {:.60}", body);
            assert_eq!(response.status().as_u16(), status, "{case}");
            assert!(
                response.headers().contains_key("x-switchyard-instance"),
                "{case}"
            );
            assert_eq!(response.headers()["x-switchyard-version"], "dev", "{case}");
            if status == 405 {
                assert!(response.headers().contains_key("allow"), "{case}");
            }
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["type"], kind, "{case}: {error}");
            assert_eq!(error["error"]["param"], param, "{case}: {error}");
            assert!(
                error["error"]["message"].as_str().unwrap().len() > 5,
                "{case}"
            );
        }
        let too_many = server.embed(json!(["a", "b", "c", "d", "e"])).await;
        let error: Value = too_many.json().await.unwrap();
        assert_eq!(error["error"]["code"], "too_many_inputs");

        // None of that hurt the server.
        assert_eq!(server.vectors(json!(["a", "b", "c", "d"])).await.len(), 4);
        let metrics = server.metrics().await;
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_rejected_total{reason=\"invalid\"}"
            ),
            14.0
        );
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_rejected_total{reason=\"too_many_inputs\"}"
            ),
            2.0
        );
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_rejected_total{reason=\"body_too_large\"}"
            ),
            1.0
        );
        assert_eq!(
            metric_value(&metrics, "switchyard_embed_requests_total{status=\"400\"}"),
            11.0
        );
        assert_eq!(
            metric_value(&metrics, "switchyard_embed_requests_total{status=\"413\"}"),
            1.0
        );
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::slow());
        let server = TestServer::started_ready(config(
            dir.path(),
            &[
                "--queue-capacity",
                "4",
                "--max-inputs",
                "4",
                "--max-batch",
                "4",
                "--max-wait",
                "0s",
            ],
        ))
        .await;
        // Watches readiness during the burst: a full queue must read as
        // "overloaded" while staying ready (200).
        let overloaded = tokio::spawn({
            let client = server.client.clone();
            let url = server.url("/health/ready");
            async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while std::time::Instant::now() < deadline {
                    let response = client.get(&url).send().await.unwrap();
                    let code = response.status().as_u16();
                    let report: Value = response.json().await.unwrap();
                    if report["status"] == "overloaded" {
                        return Some((code, report));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                None
            }
        });
        let text = "the quick brown fox jumps over the lazy dog ".repeat(20);
        let mut rejected = 0;
        let mut served = 0;
        // Waves of 24 concurrent requests, until the watcher has seen the
        // full queue (the first wave almost always suffices).
        for _wave in 0..5 {
            let requests: Vec<_> = (0..24)
                .map(|_| {
                    let client = server.client.clone();
                    let url = server.url("/v1/embeddings");
                    let body = json!({"input": [text, text, text, text]});
                    tokio::spawn(async move {
                        let response = client.post(url).json(&body).send().await.unwrap();
                        let status = response.status().as_u16();
                        let retry_after = response.headers().get("retry-after").cloned();
                        let body: Value = response.json().await.unwrap();
                        (status, retry_after, body)
                    })
                })
                .collect();
            for request in requests {
                let (status, retry_after, body) = request.await.unwrap();
                match status {
                    200 => served += 1,
                    503 => {
                        rejected += 1;
                        assert_eq!(retry_after.unwrap(), "1");
                        assert_eq!(body["error"]["type"], "overloaded_error");
                        assert_eq!(body["error"]["code"], "queue_full");
                    }
                    other => panic!("unexpected status {other}: {body}"),
                }
            }
            if overloaded.is_finished() {
                break;
            }
        }
        assert!(
            rejected > 0,
            "waves of 24 concurrent requests never filled a queue of 4"
        );
        assert!(served > 0);
        let (code, report) = overloaded
            .await
            .unwrap()
            .expect("readiness never said overloaded");
        assert_eq!(code, 200, "{report}");
        assert_eq!(report["ready"], true);
        assert_eq!(report["queue_depth"], report["queue_capacity"]);
        let metrics = server.metrics().await;
        assert_eq!(
            metric_value(
                &metrics,
                "switchyard_embed_rejected_total{reason=\"queue_full\"}"
            ),
            rejected as f64
        );
        assert_eq!(
            metric_value(&metrics, "switchyard_embed_requests_total{status=\"503\"}"),
            rejected as f64
        );
        assert_eq!(metric_value(&metrics, "switchyard_embed_queue_depth"), 0.0);
        let (code, report) = server.ready_report().await;
        assert_eq!((code, report["status"].as_str()), (200, Some("ready")));
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_the_documented_names() {
    bounded(async {
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(dir.path(), &[])).await;
        server.vectors(json!(["hello", "world"])).await;
        assert_eq!(server.embed(json!([])).await.status(), 400);
        let metrics = server.metrics().await;
        for name in [
            "switchyard_embed_requests_total{status=\"200\"} 1",
            "switchyard_embed_request_duration_seconds_count 2",
            "switchyard_embed_queue_wait_seconds_count{class=\"interactive\"} 2",
            "switchyard_embed_inference_duration_seconds_count 1",
            "switchyard_embed_batch_size_sum 2",
            "switchyard_embed_queue_depth 0",
            "switchyard_embed_queue_capacity 256",
            "switchyard_embed_in_flight_requests 0",
            "switchyard_embed_ready 1",
            "switchyard_embed_rejected_total{reason=\"invalid\"} 1",
            "switchyard_embed_cache_hits_total 0",
            "switchyard_embed_cache_misses_total 0",
            "switchyard_embed_cache_errors_total 0",
        ] {
            assert!(
                metrics.lines().any(|l| l == name),
                "missing {name:?} in\n{metrics}"
            );
        }
        server.stop().await.unwrap();
    })
    .await
}
