//! HTTP/1.x as a client and a backend see it through the proxy: body
//! framing (chunked, Content-Length, HEAD, 204, 304), `Expect:
//! 100-continue`, keep-alive on both sides, HTTP/1.0, malformed requests,
//! hop-by-hop headers and a backend that dies in the middle of a body.
//! (The time budget, a rule of every protocol, is tested in proxy.rs.)
//!
//! Both ends are raw sockets: the client writes bytes to the plain-HTTP
//! listener (`mode = "serve"`) and parses what comes back, and the backend
//! is a small TCP server that records every request it decodes, so framing
//! and headers are checked as they are on the wire; large responses are
//! also fetched over HTTPS with HTTP/1.1 (see `common::raw`).

mod common;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::*;
use common::{pool, Proxy};

// ---------------------------------------------------------------------
// Request bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_backend_intact() {
    let backend = Backend::start(|_| ok(b"done")).await;
    let proxy = proxy_for(&backend, "").await;
    let big = pattern(3000);
    let chunks: [&[u8]; 4] = [b"hello ", b"chunked\r\n", &big, b" world"];
    let mut client = Client::connect(&proxy).await;

    client
        .send(request(
            "POST",
            "/upload",
            &["Transfer-Encoding: chunked", "Content-Type: text/plain"],
        ))
        .await;
    for chunk in chunks {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        client.send(framed).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.send("0\r\n\r\n").await;
    let resp = client.final_response("POST").await;

    assert_eq!(resp.head.status(), 200, "{resp:?}");
    assert_eq!(resp.body, b"done");
    let got = backend.only_request();
    assert_eq!((got.method(), got.path()), ("POST", "/upload"));
    assert_same_bytes(&got.body, &chunks.concat(), "decoded body at the backend");

    // The terminating chunk was consumed: the connection serves another request.
    let next = client.exchange("GET", request("GET", "/next", &[])).await;
    assert_eq!((next.head.status(), &next.body[..]), (200, &b"done"[..]));
    assert_eq!(backend.requests()[1].path(), "/next");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_body_reaches_the_backend() {
    let backend = Backend::start(|_| ok(b"stored")).await;
    let proxy = proxy_for(&backend, "").await;
    let body = pattern(10_000);
    let mut client = Client::connect(&proxy).await;

    let length = format!("Content-Length: {}", body.len());
    client
        .send(request(
            "POST",
            "/upload",
            &[&length, "Expect: 100-continue"],
        ))
        .await;
    // A proxy may answer 100 Continue or simply wait for the body.
    if client.sent_within(Duration::from_secs(1)).await {
        let interim = client.response("POST").await;
        assert_eq!(
            interim.head.status(),
            100,
            "only 100 Continue may come before the body: {interim:?}"
        );
    }
    client.send(&body).await;
    let resp = client.final_response("POST").await;

    assert_eq!(resp.head.status(), 200, "{resp:?}");
    assert_eq!(resp.body, b"stored");
    assert_same_bytes(&backend.only_request().body, &body, "body at the backend");
}

// ---------------------------------------------------------------------
// Response bodies

/// A backend answering `/cl` with `body` and its Content-Length, and any
/// other path with `body` in chunks of assorted sizes, each its own write.
async fn large_body_backend(body: Arc<Vec<u8>>) -> Backend {
    Backend::start(move |req| {
        if req.path() == "/cl" {
            return ok(&body);
        }
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut rest = &body[..];
        for size in [1, 100, 4096, 65_535, 65_536, 300_000].into_iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
        chunked_ok(&chunks)
    })
    .await
}

/// Fetches `path` over a raw plain-HTTP connection and over HTTPS with
/// HTTP/1.1, asserting the decoded body is `want` both times; returns
/// the raw response's head.
async fn fetch_both_ways(proxy: &Proxy, path: &str, want: &[u8]) -> Head {
    let mut client = Client::connect(proxy).await;
    let resp = client.exchange("GET", request("GET", path, &[])).await;
    assert_eq!(resp.head.status(), 200, "{:?}", resp.head);
    assert_same_bytes(&resp.body, want, &format!("plain HTTP {path}"));

    let tls = within("HTTPS response", async {
        let resp = proxy.client_h1().get(proxy.url(path)).send().await?;
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(resp.status(), 200);
        resp.bytes().await
    })
    .await
    .expect("HTTPS request");
    assert_same_bytes(&tls, want, &format!("HTTPS {path}"));
    resp.head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_content_length_response_arrives_byte_identical() {
    let body = Arc::new(pattern(2 << 20));
    let backend = large_body_backend(body.clone()).await;
    let proxy = proxy_for(&backend, "").await;

    let head = fetch_both_ways(&proxy, "/cl", &body).await;
    assert_eq!(
        head.content_length(),
        Some(body.len()),
        "the backend's Content-Length is kept: {head:?}"
    );
    assert!(!head.chunked(), "{head:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_response_arrives_byte_identical() {
    let body = Arc::new(pattern(2 << 20));
    let backend = large_body_backend(body.clone()).await;
    let proxy = proxy_for(&backend, "").await;

    fetch_both_ways(&proxy, "/chunked", &body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_response_has_headers_but_no_body_and_keeps_the_connection() {
    let backend = Backend::start(|req| match req.method() {
        "HEAD" => Reply::Write(vec![raw_response(
            "200 OK",
            &["Content-Length: 1234", "Content-Type: text/plain"],
            b"",
        )]),
        _ => ok(b"after head"),
    })
    .await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    let head = client.exchange("HEAD", request("HEAD", "/doc", &[])).await;
    assert_eq!(head.head.status(), 200, "{head:?}");
    assert_eq!(head.head.content_length(), Some(1234), "{head:?}");
    assert_eq!(head.head.get("content-type"), Some("text/plain"));
    assert_eq!(backend.only_request().method(), "HEAD");

    // Had the proxy sent any body bytes, they would be read here as the
    // next response's status line.
    let next = client.exchange("GET", request("GET", "/doc", &[])).await;
    assert_eq!(next.head.status(), 200, "{next:?}");
    assert_eq!(next.body, b"after head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_204_and_304_keep_the_connection_usable() {
    let backend = Backend::start(|req| match req.path() {
        "/204" => Reply::Write(vec![raw_response("204 No Content", &[], b"")]),
        "/304" => Reply::Write(vec![raw_response(
            "304 Not Modified",
            &["ETag: \"v1\""],
            b"",
        )]),
        _ => ok(b"after"),
    })
    .await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    for (path, status) in [("/204", 204), ("/304", 304), ("/204", 204)] {
        let resp = client.exchange("GET", request("GET", path, &[])).await;
        assert_eq!(resp.head.status(), status, "{resp:?}");
        assert!(
            resp.head.content_length().unwrap_or(0) == 0 && !resp.head.chunked(),
            "a {status} announces no body: {resp:?}"
        );
        let next = client.exchange("GET", request("GET", "/after", &[])).await;
        assert_eq!((next.head.status(), &next.body[..]), (200, &b"after"[..]));
    }
    assert_eq!(backend.requests().len(), 6);
}

// ---------------------------------------------------------------------
// Connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_reuse_upstream_connections() {
    let backend = Backend::start(|req| ok(req.path().as_bytes())).await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    for i in 0..50 {
        let path = format!("/r{i}");
        let resp = client.exchange("GET", request("GET", &path, &[])).await;
        assert_eq!(resp.head.status(), 200, "request {i}: {resp:?}");
        assert_eq!(resp.body, path.as_bytes(), "request {i}");
    }
    assert_eq!(backend.requests().len(), 50);
    let conns = backend.connections();
    assert!(
        conns <= 3,
        "50 sequential requests took {conns} backend connections"
    );
}

/// An HTTP/1.0 request without keep-alive to `path` gets `want` whole,
/// not chunked, and then the proxy closes the connection.
async fn http10_gets_the_body_then_a_close(proxy: &Proxy, path: &str, want: &[u8]) {
    let mut client = Client::connect(proxy).await;
    client
        .send(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"))
        .await;
    let resp = client.final_response("GET").await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
    assert!(
        !resp.head.chunked(),
        "chunked framing sent to an HTTP/1.0 client: {:?}",
        resp.head
    );
    assert_eq!(resp.body, want);
    let rest = client.until_close().await;
    assert!(rest.is_empty(), "bytes after the response: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_gets_a_full_response_then_a_close() {
    let backend = Backend::start(|_| ok(b"hello, HTTP/1.0")).await;
    let proxy = proxy_for(&backend, "").await;

    http10_gets_the_body_then_a_close(&proxy, "/ten", b"hello, HTTP/1.0").await;
    assert_eq!(backend.only_request().path(), "/ten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_gets_a_chunked_backend_response_unchunked() {
    let backend = Backend::start(|_| chunked_ok(&[b"hello, ", b"HTTP/1.0"])).await;
    let proxy = proxy_for(&backend, "").await;

    http10_gets_the_body_then_a_close(&proxy, "/ten", b"hello, HTTP/1.0").await;
}

/// The plain listener has its own accept loop; its socket must still pass
/// to the new instance on a graceful upgrade, as Pingora's listeners do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_hands_the_plain_listener_over() {
    let backend = reached_backend().await;
    let mut proxy = proxy_for(&backend, "").await;
    let mut before = Client::connect(&proxy).await;
    let resp = before.exchange("GET", request("GET", "/before", &[])).await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");

    proxy.upgrade().await;
    proxy.wait_retired(Duration::from_secs(20)).await;
    let mut after = Client::connect(&proxy).await;
    let resp = after.exchange("GET", request("GET", "/after", &[])).await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
    assert!(
        !proxy.log().contains("cannot listen"),
        "the new instance bound its own socket: {}",
        proxy.log()
    );
}

// ---------------------------------------------------------------------
// Malformed requests

/// RFC 9112 section 6.1 lets a server either refuse a request with both
/// Content-Length and chunked encoding, or frame it by the chunked encoding
/// alone and close the connection after responding. Either way the
/// Content-Length must not frame it: here it would end the body inside the
/// first chunk, and the request pipelined behind it must not be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_encoding_is_refused() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    client
        .send(
            "POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await;
    let head = client
        .head_or_close()
        .await
        .expect("an answer, not a close");
    assert_eq!(head.status(), 400, "{head:?}");
    let rest = client.until_close().await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "the pipelined request was answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_content_length_is_refused() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    client
        .send("POST /bad HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\nhello")
        .await;
    let head = client.head_or_close().await;
    assert!(
        head.as_ref()
            .is_some_and(|h| (400..500).contains(&h.status())),
        "got {head:?}, not a 4xx"
    );
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_a_400_or_a_close_never_a_hang() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    client.send("HELLO\r\n\r\n").await;
    if let Some(head) = client.head_or_close().await {
        assert_eq!(head.status(), 400, "{head:?}");
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
}

// ---------------------------------------------------------------------
// Failing backends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_mid_body_does_not_hang_the_client() {
    let backend = Backend::start(|_| {
        Reply::WriteThenClose(vec![
            raw_response("200 OK", &["Content-Length: 100000"], b""),
            pattern(1000),
        ])
    })
    .await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    client.send(request("GET", "/truncated", &[])).await;
    let outcome = within("response, error or close", async {
        let Some(head) = read_head(&mut client.io).await? else {
            return io::Result::Ok(None);
        };
        let body = read_body(&mut client.io, response_framing(&head, "GET")).await;
        Ok(Some((head, body)))
    })
    .await;
    match outcome {
        // The proxy broke the connection before or after the head.
        Err(_) | Ok(None) => {}
        Ok(Some((head, body))) if head.status() == 200 => assert!(
            body.is_err(),
            "a 100000-byte body from a backend that sent 1000 read whole: {} bytes",
            body.map_or(0, |b| b.len())
        ),
        Ok(Some((head, body))) => {
            assert_eq!(head.status(), 502, "{head:?}");
            body.expect("the 502's own body");
        }
    }
}

// ---------------------------------------------------------------------
// Headers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_reach_the_backend() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    let headers = [
        "Connection: keep-alive, x-custom-hop",
        "X-Custom-Hop: secret",
        "Keep-Alive: timeout=5",
    ];
    let resp = client
        .exchange("GET", request("GET", "/hop", &headers))
        .await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
    let got = backend.only_request();
    for name in ["x-custom-hop", "keep-alive"] {
        assert_eq!(got.head.get(name), None, "{:?}", got.head);
    }
    assert!(
        got.head
            .all("connection")
            .all(|v| !v.to_ascii_lowercase().contains("x-custom-hop")),
        "{:?}",
        got.head
    );
}

// ---------------------------------------------------------------------
// Found in review of the HTTP/1.x engine

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_line_without_a_reason_phrase_is_relayed() {
    let backend =
        Backend::start(|_| Reply::Write(vec![raw_response("200", &["Content-Length: 2"], b"ok")]))
            .await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;
    for _ in 0..2 {
        let resp = client.exchange("GET", request("GET", "/bare", &[])).await;
        assert_eq!(resp.head.status(), 200, "{resp:?}");
        assert_eq!(resp.body, b"ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_to_head_have_no_body() {
    let backend = reached_backend().await;
    let body = pool("p", &[(backend.addr, 1)])
        + "[[routes]]\npath_prefix = \"/api\"\npool = \"p\"\n\n"
        + "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"serve\"\n";
    let proxy = Proxy::start(&body).await;
    let mut client = Client::connect(&proxy).await;

    let head = client
        .exchange("HEAD", request("HEAD", "/other", &[]))
        .await;
    assert_eq!(head.head.status(), 404, "{head:?}");
    assert!(
        head.head.content_length().is_some_and(|n| n > 0),
        "{head:?}"
    );
    // Had the 404 carried its body, it would be read here as a status line.
    let get = client.exchange("GET", request("GET", "/other", &[])).await;
    assert_eq!(get.head.status(), 404, "{get:?}");
    let json: serde_json::Value = serde_json::from_slice(&get.body).expect("JSON error body");
    assert_eq!(json["error"]["type"], "no_route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_forwarded_with_its_authority_as_host() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    let req = "GET HTTP://target.example:8080/abs?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n";
    let resp = client.exchange("GET", req).await;
    assert_eq!(resp.head.status(), 200, "{resp:?}");
    let got = backend.only_request();
    assert_eq!(got.path(), "/abs?q=1");
    let hosts: Vec<&str> = got.head.all("host").collect();
    assert_eq!(hosts, ["target.example:8080"], "{:?}", got.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_without_host_are_refused() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    client.send("GET /no-host HTTP/1.1\r\n\r\n").await;
    let head = client.head_or_close().await.expect("an answer");
    assert_eq!(head.status(), 400, "{head:?}");
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_reaches_the_client_as_it_comes() {
    let pause = Duration::from_millis(1500);
    let backend = Backend::start(move |_| {
        Reply::Paced(
            vec![
                [
                    raw_response("200 OK", &["Transfer-Encoding: chunked"], b""),
                    b"5\r\nfirst\r\n".to_vec(),
                ]
                .concat(),
                b"4\r\nlast\r\n0\r\n\r\n".to_vec(),
            ],
            pause,
        )
    })
    .await;
    let proxy = proxy_for(&backend, "").await;
    let mut client = Client::connect(&proxy).await;

    let sent = Instant::now();
    client.send(request("GET", "/stream", &[])).await;
    let head = within("head", read_head(&mut client.io))
        .await
        .expect("a head")
        .expect("not a close");
    assert!(head.chunked(), "{head:?}");
    let size = within("first chunk", read_line(&mut client.io, "chunk size"))
        .await
        .expect("chunk size");
    let data = within("first chunk", read_line(&mut client.io, "chunk data"))
        .await
        .expect("chunk data");
    assert_eq!((size.trim(), data.trim()), ("5", "first"));
    assert!(
        sent.elapsed() < pause,
        "the first chunk came after {:?}, with the rest",
        sent.elapsed()
    );
    let rest = within("rest", read_body(&mut client.io, Framing::Chunked))
        .await
        .expect("the rest of the body");
    assert_eq!(rest, b"last");
}
