//! Both ends of an HTTP/1.x exchange as raw sockets: a client that writes
//! bytes to the proxy (plain or TLS) and parses what comes back, and a
//! backend that records every request it decodes, so framing and headers
//! are checked as they are on the wire. Every wait is bounded by [`WAIT`]:
//! a hang fails the test instead of blocking it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use super::{pool, Proxy};

/// A byte stream to the proxy: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A TCP connection to `addr`, retried briefly: listeners open together,
/// and the test harness waited only for the first.
async fn tcp(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The longest any single step may take.
pub const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------
// HTTP/1.1 messages, as both raw ends read them

/// A message head: the start line, and the headers with lowercased names.
#[derive(Debug, Clone)]
pub struct Head {
    pub line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn status(&self) -> u16 {
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.line))
    }

    pub fn chunked(&self) -> bool {
        self.all("transfer-encoding")
            .any(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad Content-Length {v:?} in {self:?}"))
        })
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A request body as RFC 9112 section 6.3 delimits it.
pub fn request_framing(head: &Head) -> Framing {
    if head.chunked() {
        Framing::Chunked
    } else {
        head.content_length()
            .map_or(Framing::Empty, Framing::Length)
    }
}

/// A response body to a `method` request, as RFC 9112 section 6.3 delimits it.
pub fn response_framing(head: &Head, method: &str) -> Framing {
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

pub fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

pub fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF {what}"))
}

/// One line without its CRLF; EOF before the line is an error.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, what: &str) -> io::Result<String> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Err(eof(what));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// The next head, or `None` when the peer closed before sending a byte.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Head>> {
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
pub async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    framing: Framing,
) -> io::Result<Vec<u8>> {
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
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

/// `len` bytes in which every offset has its own value for a long stretch,
/// so a dropped, repeated or shifted block shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// `got == want`, reported as lengths and the first difference.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
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
pub struct Client {
    pub io: BufReader<Box<dyn Stream>>,
}

#[derive(Debug)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

/// A request head (`Host: localhost` plus `headers`), ready to write.
pub fn request(method: &str, path: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text + "\r\n"
}

impl Client {
    /// Connects to the proxy's plain-HTTP listener.
    pub async fn connect(proxy: &Proxy) -> Client {
        let addr = proxy.http.expect("the plain-HTTP listener is configured");
        Client::wrap(Box::new(tcp(addr).await))
    }

    /// Connects to the proxy's HTTPS listener, offering only HTTP/1.1.
    pub async fn connect_tls(proxy: &Proxy) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls_pki_types::CertificateDer::pem_slice_iter(&proxy.certs.pem)
            .next()
            .expect("a CA certificate")
            .expect("valid PEM");
        roots.add(ca).expect("add the test CA");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tcp = tcp(proxy.https).await;
        let tls = within(
            "TLS handshake",
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .expect("TLS handshake with the proxy");
        Client::wrap(Box::new(tls))
    }

    /// A client over any stream, e.g. a socket the test wrote raw bytes to.
    pub fn wrap(io: Box<dyn Stream>) -> Client {
        Client {
            io: BufReader::new(io),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("write", self.io.get_mut().write_all(bytes.as_ref()))
            .await
            .expect("write to the proxy");
    }

    /// The next response (an interim one included) to a `method` request,
    /// with its body decoded.
    pub async fn response(&mut self, method: &str) -> Response {
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
    pub async fn final_response(&mut self, method: &str) -> Response {
        loop {
            let resp = self.response(method).await;
            if resp.head.status() >= 200 {
                return resp;
            }
        }
    }

    /// Sends `req` and returns its final response.
    pub async fn exchange(&mut self, method: &str, req: impl AsRef<[u8]>) -> Response {
        self.send(req).await;
        self.final_response(method).await
    }

    /// Whether the proxy sent anything within `limit` (it stays unread).
    pub async fn sent_within(&mut self, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.io.fill_buf()).await,
            Ok(Ok(buf)) if !buf.is_empty()
        )
    }

    /// The next response head, or `None` when the proxy closed the
    /// connection (EOF or reset) without one.
    pub async fn head_or_close(&mut self) -> Option<Head> {
        match within("response or close", read_head(&mut self.io)).await {
            Ok(head) => head,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a response head: {e}"),
        }
    }

    /// Reads until the proxy closes the connection; returns what came first.
    pub async fn until_close(&mut self) -> Vec<u8> {
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
pub struct Received {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Received {
    pub fn method(&self) -> &str {
        self.head.line.split(' ').next().unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.head.line.split(' ').nth(1).unwrap_or_default()
    }
}

/// What the backend does with a request.
pub enum Reply {
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
pub fn raw_response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
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
pub fn ok(body: &[u8]) -> Reply {
    let length = format!("Content-Length: {}", body.len());
    Reply::Write(vec![raw_response("200 OK", &[&length], body)])
}

/// `200 OK`, chunked: each of `chunks` is a chunk and a write of its own.
pub fn chunked_ok(chunks: &[&[u8]]) -> Reply {
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

pub type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 backend on 127.0.0.1:0. It passes the proxy's health
/// checks by itself (they are neither recorded nor counted) and hands
/// every other request to its handler. Dropping it stops it and closes
/// all its connections.
pub struct Backend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    /// Connections that carried at least one non-health request.
    conns: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Backend {
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

    pub fn requests(&self) -> Vec<Received> {
        self.seen.lock().expect("not poisoned").clone()
    }

    /// The only request received; fails if there were none or several.
    pub fn only_request(&self) -> Received {
        let all = self.requests();
        assert_eq!(all.len(), 1, "one request at the backend: {all:?}");
        all.into_iter().next().expect("one")
    }

    pub fn connections(&self) -> usize {
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
pub async fn proxy_for(backend: &Backend, extra: &str) -> Proxy {
    let body = pool("p", &[(backend.addr, 1)])
        + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n\n"
        + "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"serve\"\n\n"
        + extra;
    Proxy::start(&body).await
}

/// Answers every request with `200 OK` and the body `reached`.
pub async fn reached_backend() -> Backend {
    Backend::start(|_| ok(b"reached")).await
}
