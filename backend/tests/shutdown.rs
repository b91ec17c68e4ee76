//! SIGTERM handling of the real binary, and startup errors that stop it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn report(client: &reqwest::Client, server: &BinaryServer) -> (u16, Value) {
    let response = client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn wait_ready(client: &reqwest::Client, server: &BinaryServer) {
    wait_until("the binary to become ready", || async {
        matches!(
            client.get(server.url("/health/ready")).send().await,
            Ok(r) if r.status() == 200
        )
    })
    .await;
}

/// The binary on a tiny model, ready, with every request held in flight for
/// `latency`.
async fn spawn_ready(
    latency: &str,
    shutdown_timeout: &str,
) -> (tempfile::TempDir, BinaryServer, reqwest::Client) {
    let dir = tiny_model_dir(TinyModel::default());
    let model_dir = dir.path().display().to_string();
    let server = BinaryServer::spawn(&[
        "--model-dir",
        &model_dir,
        "--fault-latency",
        latency,
        "--shutdown-timeout",
        shutdown_timeout,
    ]);
    let client = reqwest::Client::new();
    wait_ready(&client, &server).await;
    (dir, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_every_request_in_flight_then_exits_zero() {
    bounded(async {
        let (_dir, mut server, client) = spawn_ready("3s", "20s").await;

        let requests: Vec<_> = (0..8)
            .map(|i| {
                let client = client.clone();
                let url = server.url("/v1/embeddings");
                tokio::spawn(async move {
                    let response = client
                        .post(url)
                        .json(&json!({"input": [format!("request {i}"), "hello"]}))
                        .send()
                        .await
                        .expect("request in flight at SIGTERM was not lost");
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap();
                    (status, body)
                })
            })
            .collect();
        wait_until("all 8 requests to be in flight", || async {
            report(&client, &server).await.1["in_flight"] == 8
        })
        .await;

        server.signal("TERM");
        wait_until("readiness to report draining", || async {
            let (code, body) = report(&client, &server).await;
            code == 503 && body["status"] == "draining" && body["ready"] == false
        })
        .await;

        for request in requests {
            let (status, body) = request.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(vectors_of(&body).len(), 2);
        }
        let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(15)))
            .await
            .unwrap();
        assert_eq!(code, Some(0));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outliving_the_shutdown_timeout_make_the_exit_fail() {
    bounded(async {
        let (_dir, mut server, client) = spawn_ready("30s", "300ms").await;
        let url = server.url("/v1/embeddings");
        let stuck = tokio::spawn({
            let client = client.clone();
            async move { client.post(url).json(&json!({"input": "hi"})).send().await }
        });
        wait_until("the request to be in flight", || async {
            report(&client, &server).await.1["in_flight"] == 1
        })
        .await;
        server.signal("TERM");
        let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(15)))
            .await
            .unwrap();
        assert_eq!(code, Some(1));
        stuck.abort();
    })
    .await
}

#[test]
fn a_model_that_cannot_load_stops_the_server_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().display().to_string();
    let mut server = BinaryServer::spawn(&["--model-dir", &model_dir]);
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(1));
}

#[test]
fn an_unknown_matmul_kernel_stops_the_server_naming_the_variable() {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard-backend"))
        .args(["--listen", "127.0.0.1:0"])
        .env("SWITCHYARD_MATMUL_KERNEL", "avx1024")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn switchyard-backend");
    let mut child = ChildGuard(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            r#"SWITCHYARD_MATMUL_KERNEL=\"avx1024\": expected one of portable, avx2, avx512"#
        ),
        "{stderr}"
    );
}
