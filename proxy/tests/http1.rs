//! HTTP/1.x as a client and a backend see it through the proxy: body
//! framing (chunked, Content-Length, HEAD, 204, 304), `Expect:
//! 100-continue`, keep-alive on both sides, HTTP/1.0, malformed requests,
//! hop-by-hop headers, the time budget and a backend that dies in the
//! middle of a body.
//!
//! Both ends are raw sockets: the client writes bytes to the plain-HTTP
//! listener (`mode = "serve"`) and parses what comes back, and the backend
//! is a small TCP server that records every request it decodes, so framing
//! and headers are checked as they are on the wire; large responses are
//! also fetched over HTTPS with HTTP/1.1. Every wait is bounded by
//! [`WAIT`]: a hang fails the test instead of blocking it.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use common::{pool, Proxy};

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------
// HTTP/1.1 messages, as both raw ends read them

/// A message head: the start line, and the headers with lowercased names.
#[derive(Debug, Clone)]
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn status(&self) -> u16 {
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.line))
    }

    fn chunked(&self) -> bool {
        self.all("transfer-encoding")
            .any(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad Content-Length {v:?} in {self:?}"))
        })
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A request body as RFC 9112 section 6.3 delimits it.
fn request_framing(head: &Head) -> Framing {
    if head.chunked() {
        Framing::Chunked
    } else {
        head.content_length()
            .map_or(Framing::Empty, Framing::Length)
    }
}

/// A response body to a `method` request, as RFC 9112 section 6.3 delimits it.
fn response_framing(head: &Head, method: &str) -> Framing {
    let status = head.status();
    if method == "HEAD" || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if head.chunked() {
        Framing::Chunked
    } else {
        head.content_length()
            .map_or(Framing::UntilClose, Framing::Length)
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF {what}"))
}

/// One line without its CRLF; EOF before the line is an error.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, what: &str) -> io::Result<String> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Err(eof(what));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// The next head, or `None` when the peer closed before sending a byte.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Head>> {
    if r.fill_buf().await?.is_empty() {
        return Ok(None);
    }
    let line = read_line(r, "in a start line").await?;
    let mut headers = Vec::new();
    loop {
        let text = read_line(r, "inside a head").await?;
        if text.is_empty() {
            return Ok(Some(Head { line, headers }));
        }
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| invalid(format!("header line {text:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
}

/// A body as `framing` delimits it, chunked encoding decoded.
async fn read_body<R: AsyncBufRead + Unpin>(r: &mut R, framing: Framing) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body).await?;
        }
        Framing::UntilClose => {
            r.read_to_end(&mut body).await?;
        }
        Framing::Chunked => loop {
            let line = read_line(r, "before a chunk size").await?;
            let hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(hex, 16)
                .map_err(|_| invalid(format!("chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(r, "in the trailers").await?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            if !read_line(r, "after a chunk").await?.is_empty() {
                return Err(invalid("no CRLF after a chunk".to_string()));
            }
        },
    }
    Ok(body)
}

/// Runs `f`, panicking if it takes longer than [`WAIT`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

/// `len` bytes in which every offset has its own value for a long stretch,
/// so a dropped, repeated or shifted block shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// `got == want`, reported as lengths and the first difference.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

// ---------------------------------------------------------------------
// The raw client

/// A raw HTTP/1.x connection to the proxy.
struct Client {
    io: BufReader<TcpStream>,
}

#[derive(Debug)]
struct Response {
    head: Head,
    body: Vec<u8>,
}

/// A request head (`Host: localhost` plus `headers`), ready to write.
fn request(method: &str, path: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text + "\r\n"
}

impl Client {
    /// Connects to the proxy's plain-HTTP listener.
    async fn connect(proxy: &Proxy) -> Client {
        let addr = proxy.http.expect("the plain-HTTP listener is configured");
        // It opens with the HTTPS listener Proxy::start waited for; retry briefly anyway.
        let deadline = Instant::now() + WAIT;
        loop {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    return Client {
                        io: BufReader::new(s),
                    }
                }
                Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("write", self.io.get_mut().write_all(bytes.as_ref()))
            .await
            .expect("write to the proxy");
    }

    /// The next response (an interim one included) to a `method` request,
    /// with its body decoded.
    async fn response(&mut self, method: &str) -> Response {
        let read = async {
            let head = read_head(&mut self.io)
                .await?
                .ok_or_else(|| eof("before a response"))?;
            let body = read_body(&mut self.io, response_framing(&head, method)).await?;
            io::Result::Ok(Response { head, body })
        };
        within("response", read)
            .await
            .unwrap_or_else(|e| panic!("reading a response to {method}: {e}"))
    }

    /// The next final response, skipping interim (1xx) ones.
    async fn final_response(&mut self, method: &str) -> Response {
        loop {
            let resp = self.response(method).await;
            if resp.head.status() >= 200 {
                return resp;
            }
        }
    }

    /// Sends `req` and returns its final response.
    async fn exchange(&mut self, method: &str, req: impl AsRef<[u8]>) -> Response {
        self.send(req).await;
        self.final_response(method).await
    }

    /// Whether the proxy sent anything within `limit` (it stays unread).
    async fn sent_within(&mut self, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.io.fill_buf()).await,
            Ok(Ok(buf)) if !buf.is_empty()
        )
    }

    /// The next response head, or `None` when the proxy closed the
    /// connection (EOF or reset) without one.
    async fn head_or_close(&mut self) -> Option<Head> {
        match within("response or close", read_head(&mut self.io)).await {
            Ok(head) => head,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a response head: {e}"),
        }
    }

    /// Reads until the proxy closes the connection; returns what came first.
    async fn until_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        match within("close", self.io.read_to_end(&mut rest)).await {
            Ok(_) => rest,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => rest,
            Err(e) => panic!("reading until close: {e}"),
        }
    }
}

// ---------------------------------------------------------------------
// The raw backend

/// A request as the backend decoded it.
#[derive(Debug, Clone)]
struct Received {
    head: Head,
    body: Vec<u8>,
}

impl Received {
    fn method(&self) -> &str {
        self.head.line.split(' ').next().unwrap_or_default()
    }

    fn path(&self) -> &str {
        self.head.line.split(' ').nth(1).unwrap_or_default()
    }
}

/// What the backend does with a request.
enum Reply {
    /// Writes each part separately, then waits for the next request.
    Write(Vec<Vec<u8>>),
    /// Writes each part, then closes the connection.
    WriteThenClose(Vec<Vec<u8>>),
    /// Writes each part with a pause before every part after the first.
    Paced(Vec<Vec<u8>>, Duration),
    /// Never answers, and keeps the connection open.
    Hang,
}

/// A response head (start line and `headers` exactly as given) and body.
fn raw_response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// `200 OK` with `body` and its Content-Length.
fn ok(body: &[u8]) -> Reply {
    let length = format!("Content-Length: {}", body.len());
    Reply::Write(vec![raw_response("200 OK", &[&length], body)])
}

/// `200 OK`, chunked: each of `chunks` is a chunk and a write of its own.
fn chunked_ok(chunks: &[&[u8]]) -> Reply {
    let mut parts = vec![raw_response("200 OK", &["Transfer-Encoding: chunked"], b"")];
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        let mut part = format!("{:x}\r\n", chunk.len()).into_bytes();
        part.extend_from_slice(chunk);
        part.extend_from_slice(b"\r\n");
        parts.push(part);
    }
    parts.push(b"0\r\n\r\n".to_vec());
    Reply::Write(parts)
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 backend on 127.0.0.1:0. It passes the proxy's health
/// checks by itself (they are neither recorded nor counted) and hands
/// every other request to its handler. Dropping it stops it and closes
/// all its connections.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    /// Connections that carried at least one non-health request.
    conns: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let addr = listener.local_addr().expect("local addr");
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let conns = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (s, c) = (Arc::clone(&seen), Arc::clone(&conns));
        let task = tokio::spawn(async move {
            // Owned here, so aborting this task drops every connection.
            let mut connections = JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                if let Ok((stream, _)) = listener.accept().await {
                    connections.spawn(serve(stream, handler.clone(), s.clone(), c.clone()));
                }
            }
        });
        Backend {
            addr,
            seen,
            conns,
            task,
        }
    }

    fn requests(&self) -> Vec<Received> {
        self.seen.lock().expect("not poisoned").clone()
    }

    /// The only request received; fails if there were none or several.
    fn only_request(&self) -> Received {
        let all = self.requests();
        assert_eq!(all.len(), 1, "one request at the backend: {all:?}");
        all.into_iter().next().expect("one")
    }

    fn connections(&self) -> usize {
        self.conns.load(SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: TcpStream,
    handler: Handler,
    seen: Arc<Mutex<Vec<Received>>>,
    conns: Arc<AtomicUsize>,
) {
    let mut io = BufReader::new(stream);
    let mut counted = false;
    while let Ok(Some(head)) = read_head(&mut io).await {
        if head.line.starts_with("GET /health/ready ") {
            let report = br#"{"ready":true}"#;
            let length = format!("Content-Length: {}", report.len());
            let headers = [
                "Content-Type: application/json",
                &length,
                "Connection: close",
            ];
            let _ = io
                .get_mut()
                .write_all(&raw_response("200 OK", &headers, report))
                .await;
            return;
        }
        if !counted {
            counted = true;
            conns.fetch_add(1, SeqCst);
        }
        let expects_continue = head
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue
            && io
                .get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let Ok(body) = read_body(&mut io, request_framing(&head)).await else {
            return;
        };
        let received = Received { head, body };
        let reply = handler(&received);
        seen.lock().expect("not poisoned").push(received);
        let (parts, close, pause) = match reply {
            Reply::Write(parts) => (parts, false, Duration::ZERO),
            Reply::WriteThenClose(parts) => (parts, true, Duration::ZERO),
            Reply::Paced(parts, pause) => (parts, false, pause),
            Reply::Hang => std::future::pending().await,
        };
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if io.get_mut().write_all(&part).await.is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

// ---------------------------------------------------------------------
// The proxy

/// The proxy with one pool holding only `backend`, every path routed to
/// it, the plain-HTTP listener serving, and `extra` config sections.
async fn proxy_for(backend: &Backend, extra: &str) -> Proxy {
    let body = pool("p", &[(backend.addr, 1)])
        + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n\n"
        + "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"serve\"\n\n"
        + extra;
    Proxy::start(&body).await
}

/// Answers every request with `200 OK` and the body `reached`.
async fn reached_backend() -> Backend {
    Backend::start(|_| ok(b"reached")).await
}

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
async fn total_time_budget_answers_504_when_the_backend_never_answers() {
    let backend = Backend::start(|_| Reply::Hang).await;
    let proxy = proxy_for(&backend, "[timeouts]\ntotal = \"1s\"\nread = \"10s\"\n").await;
    let mut client = Client::connect(&proxy).await;

    let started = Instant::now();
    let resp = client.exchange("GET", request("GET", "/slow", &[])).await;
    let took = started.elapsed();

    assert_eq!(resp.head.status(), 504, "{resp:?}");
    let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON error body");
    assert_eq!(json["error"]["type"], "upstream_timeout", "{json}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "the 1 s budget ended the request after {took:?}"
    );
    assert_eq!(backend.only_request().path(), "/slow");
}

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
