//! The public listener: HTTP/2 and HTTP/1.1 over TLS with real clients,
//! plain HTTP refused cleanly, and the optional plain-HTTP listener.

mod common;

use std::time::Duration;

use common::{metric, pool, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn single_pool(up: &Upstream) -> String {
    pool("p", &[(up.addr, 1)]) + "[[routes]]\npool = \"p\"\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_gets_h2_and_http1() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&single_pool(&up)).await;

    let resp = proxy
        .client()
        .get(proxy.url("/v1/models"))
        .send()
        .await
        .expect("h2");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-instance"], "up");

    let resp = proxy
        .client_h1()
        .get(proxy.url("/v1/models"))
        .send()
        .await
        .expect("h1");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
}

/// A client that resets its h2 stream (RST_STREAM, as dropping a reqwest
/// request does) cancels the upstream attempt: the backend's in-flight
/// count, held by the request's lease, is back to 0 long before the slow
/// backend would have answered, and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_h2_stream_cancels_its_upstream_attempt() {
    let slow = Upstream::start("slow", 5000).await;
    let proxy = Proxy::start(&single_pool(&slow)).await;
    let client = proxy.client();
    let gauge = format!(
        "switchyard_upstream_in_flight_requests{{backend=\"{}\"}}",
        slow.addr
    );

    let request = client.get(proxy.url("/v1/embeddings")).send();
    let dropped = tokio::time::timeout(Duration::from_millis(500), request).await;
    assert!(dropped.is_err(), "the slow backend answered early");
    assert_eq!(slow.control.requests(), 1);
    let started = std::time::Instant::now();
    let mut freed = false;
    while !freed && started.elapsed() < Duration::from_secs(2) {
        freed = metric(&proxy.metrics().await, &gauge) == Some(0.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the lease outlived the cancelled stream");

    slow.control
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let resp = client
        .get(proxy.url("/v1/embeddings"))
        .send()
        .await
        .expect("the same client is served after the reset");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

/// Posts an embedding request with the curl CLI, trusting the test CA;
/// returns curl's output with the response headers, after asserting success.
async fn curl_embedding(proxy: &Proxy, flags: &'static [&'static str]) -> String {
    let url = proxy.url("/v1/embeddings");
    let resolve = format!("localhost:{}:127.0.0.1", proxy.https.port());
    let ca = proxy.certs.ca.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10"])
            .args(flags)
            .arg("--cacert")
            .arg(&ca)
            .args(["--resolve", &resolve])
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"input":"hi"}"#,
            ])
            .arg(&url)
            .output()
            .expect("curl runs")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "curl {flags:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_with_cacert() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&single_pool(&up)).await;
    let text = curl_embedding(&proxy, &["--http2"]).await;
    assert!(text.starts_with("HTTP/2 200"), "got: {text}");
    assert!(text.contains("x-switchyard-pool: p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_clients_are_served() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&single_pool(&up)).await;
    let text = curl_embedding(&proxy, &["--http1.1", "--tlsv1.2", "--tls-max", "1.2"]).await;
    assert!(text.starts_with("HTTP/1.1 200"), "got: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_fails_cleanly() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&single_pool(&up)).await;

    let mut tcp = tokio::net::TcpStream::connect(proxy.https)
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    let read = read.expect("the proxy closes the connection instead of hanging");
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/"),
        "no HTTP answer on the TLS port ({read:?})"
    );

    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/", proxy.https.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP must not succeed");
    assert_eq!(up.control.requests(), 0);

    // And the listener is unharmed.
    let resp = proxy
        .client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("TLS still works");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_redirects_to_https() {
    let up = Upstream::start("up", 0).await;
    let body = single_pool(&up)
        + "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"redirect\"\n";
    let proxy = Proxy::start(&body).await;
    let http = proxy.http.expect("http listener");
    wait_for_port(http).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = client
        .get(format!(
            "http://localhost:{}/v1/embeddings?x=1",
            http.port()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 308);
    let expected = format!("https://localhost:{}/v1/embeddings?x=1", proxy.https.port());
    assert_eq!(resp.headers()["location"], expected.as_str());
    assert_eq!(up.control.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_can_serve() {
    let up = Upstream::start("up", 0).await;
    let body = single_pool(&up)
        + "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"serve\"\n";
    let proxy = Proxy::start(&body).await;
    let http = proxy.http.expect("http listener");
    wait_for_port(http).await;
    let resp = reqwest::get(format!("http://{http}/v1/x"))
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(echo["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&single_pool(&up)).await;
    let next = proxy.dir.path().join("next");
    std::fs::create_dir(&next).expect("mkdir");
    let rotated = common::generate_certs(&next);
    let url = proxy.url("/");
    let trusts_new = || async { proxy.client_trusting(&rotated.pem).get(&url).send().await };
    assert!(trusts_new().await.is_err(), "the new CA is not in use yet");
    // Clients that trust only the old CA keep their connections open across
    // the rotation: a connection cut by it would have to reconnect, and that
    // handshake (new certificate, old CA) fails the load.
    let load = common::Load::start(&proxy, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Key first, then certificate, each renamed into place (as certs/gen-dev-certs does).
    std::fs::rename(&rotated.key, proxy.dir.path().join("key.pem")).expect("rename key");
    std::fs::rename(&rotated.cert, proxy.dir.path().join("cert.pem")).expect("rename cert");
    let mut served = false;
    for _ in 0..100 {
        if trusts_new().await.is_ok_and(|r| r.status() == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "new handshakes get the new certificate within 5 s; log:\n{}",
        proxy.log()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish().await;
}

async fn wait_for_port(addr: std::net::SocketAddr) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never accepted");
}
