//! The bounds a client cannot push past: the connection cap (plain and
//! TLS, failed handshakes included), the head, idle and body deadlines,
//! the process-wide budget for buffered request bodies, and a request
//! that got any answer from its backend never being sent again.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::matrix::matrix;
use common::metric;
use common::raw::*;
use common::{pool, Upstream};

/// How long the proxy may take past a configured deadline.
const SLACK: Duration = Duration::from_millis(1500);

/// Opens a plain connection and proves it is served (a full exchange).
async fn served(client: &mut Client) {
    let resp = client.exchange("GET", request("GET", "/ok", &[])).await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once_and_counted() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "[limits]\nmax_connections = 3\n").await;
    // Failed TLS handshakes first: each must give its place back.
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(proxy.https).await.expect("connect");
        tcp.write_all(b"\x16\x03\x01\x00\x05hello")
            .await
            .expect("write");
        let _ = Client::wrap(Box::new(tcp)).until_close().await;
    }
    let mut tls = Client::connect_tls(&proxy).await;
    served(&mut tls).await;
    let mut plain = [Client::connect(&proxy).await, Client::connect(&proxy).await];
    for c in &mut plain {
        served(c).await;
    }

    // The fourth is closed without a byte, before any request.
    let mut over = Client::connect(&proxy).await;
    assert!(
        over.until_close().await.is_empty(),
        "a 4th connection got bytes"
    );
    let refused = metric(
        &proxy.metrics().await,
        "switchyard_client_connections_refused_total",
    );
    assert_eq!(refused, Some(1.0));
    assert_eq!(
        metric(&proxy.metrics().await, "switchyard_client_connections"),
        Some(3.0)
    );

    // Closing one (the TLS one) frees its place.
    drop(tls);
    let scrape_says_two = async {
        for _ in 0..100 {
            let open = metric(&proxy.metrics().await, "switchyard_client_connections");
            if open == Some(2.0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        scrape_says_two.await,
        "the closed connection is still counted"
    );
    served(&mut Client::connect(&proxy).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_too_slowly_gets_408() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "[timeouts]\nclient_head = \"1s\"\n").await;
    let mut client = Client::connect(&proxy).await;
    let started = Instant::now();
    client.send("GET /slow HTTP/1.1\r\nHost: t\r\n").await;
    let head = client.head_or_close().await.expect("an answer");
    assert_eq!(head.status(), 408, "{head:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(1) + SLACK,
        "{took:?}"
    );
    assert!(backend.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_on_time() {
    let backend = reached_backend().await;
    let proxy = proxy_for(
        &backend,
        "[timeouts]\nclient_head = \"1s\"\nclient_idle = \"2s\"\n",
    )
    .await;
    // A new connection that never speaks: the head deadline.
    let mut silent = Client::connect(&proxy).await;
    let started = Instant::now();
    assert!(
        silent.until_close().await.is_empty(),
        "a silent connection got bytes"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1) + SLACK,
        "closed after {took:?}"
    );

    // After a request: the (longer) keep-alive idle timeout.
    let mut idle = Client::connect(&proxy).await;
    served(&mut idle).await;
    let started = Instant::now();
    assert!(idle.until_close().await.is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(2) + SLACK,
        "idle connection closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_gets_408_within_its_deadline() {
    let backend = reached_backend().await;
    let proxy = proxy_for(
        &backend,
        "[timeouts]\nclient_body = \"1s\"\nread = \"30s\"\n",
    )
    .await;
    let mut client = Client::connect(&proxy).await;
    let started = Instant::now();
    client
        .send("POST /trickle HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    let resp = client.response("POST").await;
    assert_eq!(resp.head.status(), 408, "{resp:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1) + SLACK, "{took:?}");
    let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON error");
    assert!(json["error"]["message"].is_string(), "{json}");
    assert!(backend.requests().is_empty());
}

matrix!(
    a_streamed_body_that_stalls_gets_408_within_client_body,
    |proto| async move {
        let up = Upstream::start("up", 0).await;
        let body = pool("p", &[(up.addr, 1)])
            + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n"
            + "[timeouts]\nclient_body = \"1s\"\nread = \"30s\"\n";
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);
        // Three bytes, then nothing: chunked on HTTP/1.1, DATA on h2.
        let first = futures_util::stream::once(async { Ok::<_, std::io::Error>("abc") });
        let stalled = first.chain(futures_util::stream::pending());
        let started = Instant::now();
        let req = via
            .post("/trickle")
            .body(reqwest::Body::wrap_stream(stalled));
        let resp = via.send(req).await;
        assert_eq!(resp.status(), 408);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1) + SLACK, "{took:?}");
        let json: serde_json::Value = resp.json().await.expect("JSON error");
        assert_eq!(json["error"]["type"], "request_timeout", "{json}");
        assert_eq!(up.control.requests(), 0);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_buffer_budget_get_503_and_the_budget_comes_back() {
    let backend = reached_backend().await;
    let limits = "[limits]\nmax_body_bytes = 1048576\nbody_buffer_total = 1048576\n";
    let proxy = proxy_for(&backend, limits).await;
    let half = 600 * 1024;

    // A holds most of the budget: a body declared 1 MiB, 600 KiB of it sent.
    let mut a = Client::connect(&proxy).await;
    a.send(format!(
        "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n{}",
        "a".repeat(half)
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let buffered = metric(
        &proxy.metrics().await,
        "switchyard_request_body_buffer_bytes",
    );
    assert!(buffered.is_some_and(|b| b >= half as f64), "{buffered:?}");

    // B does not fit beside it.
    let b_request = format!(
        "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: {half}\r\n\r\n{}",
        "b".repeat(half)
    );
    let mut b = Client::connect(&proxy).await;
    b.send(&b_request).await;
    let resp = b.response("POST").await;
    assert_eq!(resp.head.status(), 503, "{resp:?}");
    assert!(resp.head.get("retry-after").is_some(), "{resp:?}");

    // A finishes and is served; its share comes back, and B then fits.
    a.send("a".repeat(1048576 - half)).await;
    assert_eq!(a.final_response("POST").await.head.status(), 200);
    let mut b = Client::connect(&proxy).await;
    let resp = b.exchange("POST", &b_request).await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
    let paths: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.path().to_string())
        .collect();
    assert_eq!(paths, ["/a", "/b"]);
}

/// Once a backend has answered anything, even an interim response, the
/// request may have had effects: it is never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_1xx_then_closed_is_sent_once() {
    for interim in ["101 Switching Protocols", "100 Continue", "103 Early Hints"] {
        let backend =
            Backend::start(move |_| Reply::WriteThenClose(vec![raw_response(interim, &[], b"")]))
                .await;
        let proxy = proxy_for(&backend, "").await;
        let mut client = Client::connect(&proxy).await;
        client.send(request("GET", "/once", &[])).await;
        let last = client.final_response("GET").await;
        assert_eq!(last.head.status(), 502, "after {interim}: {last:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            backend.requests().len(),
            1,
            "after {interim}: {:?}",
            backend.requests()
        );
    }
}
