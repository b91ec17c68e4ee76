//! One HTTP/1.x request: limits, route, pool and backend choice, the
//! request body read whole, attempts with retries, the response relayed.
//!
//! The rules (what is retried, what counts against a backend's health,
//! what the client is told) are those of the h2 path in [`crate::proxy`];
//! the shared parts live in [`crate::request`].

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::time::Instant as Deadline;

use bytes::Bytes;

use super::body::{self, BodyError, Relay, RelayError};
use super::head::{self, Framing, Known, RequestHead, ResponseHead};
use super::Connection;
use crate::config::{Config, TimeoutSection};
use crate::request::{self, Attempts, Finished, Refusal};
use crate::routing::{Backend, Lease, Pool};
use crate::shared::Active;
use crate::upstream::Conn;

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// One request's state, from its head to its access-log line.
struct Call {
    active: Arc<Active>,
    head: RequestHead,
    request_id: String,
    start: Instant,
    pool: Option<Arc<Pool>>,
    /// The member of the current (latest) attempt.
    member: Option<usize>,
    lease: Option<Lease>,
    tried: Vec<SocketAddr>,
    attempts: u32,
    refusal: Option<Refusal>,
    status: u16,
    bytes_in: usize,
    bytes_out: usize,
    /// The request body has been read off the connection.
    body_read: bool,
    error: Option<String>,
    /// The client connection can carry another request after this one.
    keep: bool,
}

impl Call {
    fn new(active: Arc<Active>, head: RequestHead, keep: bool) -> Self {
        let request_id = request::request_id(head.fields.known(Known::XRequestId).next());
        Call {
            active,
            request_id,
            head,
            start: Instant::now(),
            pool: None,
            member: None,
            lease: None,
            tried: Vec::new(),
            attempts: 0,
            refusal: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            body_read: false,
            error: None,
            keep,
        }
    }

    fn config(&self) -> &Config {
        &self.active.config
    }

    fn backend_name(&self) -> &str {
        self.lease
            .as_ref()
            .map_or("", |l| l.backend().name.as_str())
    }

    fn record(&self, unrouted: &[prometheus::IntCounter; 6]) {
        Finished {
            request_id: &self.request_id,
            method: self.head.method(),
            path: self.head.path(),
            status: self.status,
            pool: self.pool.as_deref(),
            served_by: self.member.filter(|_| self.refusal.is_none()),
            backend: self.backend_name(),
            elapsed: self.start.elapsed(),
            attempts: self.attempts,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            error: self.error.clone(),
        }
        .record(unrouted);
    }
}

/// Why an attempt got no usable response head.
enum Failure {
    Connect(std::io::Error),
    TimedOut,
    /// Writing the request failed (and no early answer could be read).
    Unsent(String),
    Broken(String),
    /// Failed after the backend had begun to answer (an interim 1xx, or
    /// part of a head): the request was seen, so it is never sent again.
    Answered(String),
}

impl Failure {
    fn from_body(e: BodyError) -> Self {
        match e {
            BodyError::TimedOut => Failure::TimedOut,
            e => Failure::Broken(e.to_string()),
        }
    }

    /// Whether a request that failed this way on a pooled connection,
    /// with nothing answered, goes again on a fresh one to the same
    /// backend: always when it could not be written (the backend had closed
    /// the idle connection), else only a replayable body, since the
    /// backend may have read the request before it closed.
    fn may_resend(&self, replayable: bool) -> bool {
        match self {
            Failure::Unsent(_) => true,
            Failure::Broken(_) => replayable,
            Failure::Connect(_) | Failure::TimedOut | Failure::Answered(_) => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::TimedOut => "timed out".to_string(),
            Failure::Unsent(e) => format!("sending the request: {e}"),
            Failure::Broken(e) | Failure::Answered(e) => e.clone(),
        }
    }
}

impl Connection {
    /// Serves one request; whether the connection may carry another.
    pub(super) async fn serve_request(&mut self, head: RequestHead) -> bool {
        let keep = head.keep_alive() && !self.closing();
        let mut call = Call::new(self.app.shared.active(), head, keep);
        self.route_and_forward(&mut call).await;
        call.record(&self.app.unrouted);
        call.lease = None;
        // A large body left the buffer grown; do not hold that while idle.
        if self.buf.is_empty() && self.buf.capacity() > 4 * super::CLIENT_BUFFER {
            self.buf = bytes::BytesMut::with_capacity(super::CLIENT_BUFFER);
        }
        if !call.keep && call.head.has_body() && !call.body_read {
            self.linger().await;
        }
        call.keep
    }

    async fn route_and_forward(&mut self, call: &mut Call) {
        let active = call.active.clone();
        let limits = &active.config.limits;
        if let Framing::Length(n) = call.head.framing {
            if n > limits.max_body_bytes {
                let msg = format!("request body exceeds {} bytes", limits.max_body_bytes);
                return self.refuse_unread(call, 413, "body_too_large", &msg).await;
            }
        }
        let Some(route) = active.router.find(call.head.host(), call.head.path()) else {
            let msg = format!("no route for {}", call.head.path());
            return self.refuse_unread(call, 404, "no_route", &msg).await;
        };
        let pool = route.choose_pool(&call.head).clone();
        let Some(first) = pool.pick(&[]) else {
            call.refusal = Some(Refusal::NoBackend);
            let (status, kind, msg) = Refusal::NoBackend.describe(&pool.name);
            call.pool = Some(pool);
            return self.refuse_unread(call, status, kind, &msg).await;
        };
        call.lease = Some(Lease::new(pool.members[first].backend.clone()));
        call.member = Some(first);
        call.pool = Some(pool);
        let Some(body) = self.read_body(call).await else {
            return;
        };
        let wire = self.upstream_request(call, body.bytes);
        let replayable = wire.body.len() <= active.config.retry.buffer_body_max;
        self.forward(call, &wire, replayable).await;
    }

    /// An answer given before the body was read: the connection closes
    /// unless there is no body.
    async fn refuse_unread(&mut self, call: &mut Call, status: u16, kind: &str, msg: &str) {
        if call.head.has_body() {
            call.keep = false;
        }
        self.respond(call, status, kind, msg).await;
    }

    async fn read_body(&mut self, call: &mut Call) -> Option<body::Body> {
        let framing = call.head.framing;
        let expects = call.head.expects_continue();
        if framing != Framing::Empty && expects && !call.head.http10 && self.buf.is_empty() {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            let wait = call.config().timeouts.read;
            if body::write_out(&mut self.io, &mut self.out, wait)
                .await
                .is_err()
            {
                call.keep = false;
                return None;
            }
        }
        let limits = body_limits(call);
        let max = limits.max;
        match body::read_request(&mut self.io, &mut self.buf, framing, limits).await {
            Ok(body) => {
                call.bytes_in = body.bytes.len();
                call.body_read = true;
                Some(body)
            }
            Err(BodyError::TimedOut) => {
                call.keep = false;
                let msg = "the request body did not arrive in time";
                self.respond(call, 408, "request_timeout", msg).await;
                None
            }
            Err(BodyError::Busy(what)) => {
                call.keep = false;
                self.respond(call, 503, "overloaded", what).await;
                None
            }
            Err(BodyError::TooLarge) => {
                call.keep = false;
                let msg = format!("request body exceeds {max} bytes");
                self.respond(call, 413, "body_too_large", &msg).await;
                None
            }
            Err(BodyError::Malformed(what)) => {
                call.keep = false;
                let msg = format!("malformed request body: {what}");
                self.respond(call, 400, "bad_request", &msg).await;
                None
            }
            Err(e) => {
                call.keep = false;
                call.error = Some(format!("reading the request body failed: {e}"));
                None
            }
        }
    }

    /// The request as sent to a backend: hop-by-hop headers dropped, the
    /// forwarding headers set, the body framed by length.
    fn upstream_request(&self, call: &Call, body: Bytes) -> Wire {
        let head = &call.head;
        let fields = &head.fields;
        let inline = body.len() <= INLINE_BODY;
        let room = if inline { body.len() } else { 0 };
        let mut wire = Vec::with_capacity(fields.raw.len() + 160 + room);
        wire.extend_from_slice(head.method().as_bytes());
        wire.push(b' ');
        let (path, query) = head.origin_form();
        wire.extend_from_slice(path);
        wire.extend_from_slice(query);
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        // An absolute-form target's authority replaces the Host header.
        let absolute = head.is_absolute_form();
        if let Some(host) = head.authority().filter(|_| absolute) {
            put_header(&mut wire, b"host", host);
        }
        for (name, value, known) in fields.iter() {
            // The proxy frames the body and sets the forwarding headers.
            let own = match known {
                Known::Host => absolute,
                Known::ContentLength
                | Known::Expect
                | Known::XForwardedFor
                | Known::XForwardedProto
                | Known::XRequestId => true,
                _ => false,
            };
            if !own && !known.is_hop_by_hop() {
                put_header(&mut wire, name, value);
            }
        }
        if let Some(ip) = self.client {
            wire.extend_from_slice(b"x-forwarded-for: ");
            request::forwarded_for(&mut wire, fields.known(Known::XForwardedFor), ip);
            wire.extend_from_slice(b"\r\n");
        }
        let proto: &[u8] = if self.tls { b"https" } else { b"http" };
        put_header(&mut wire, b"x-forwarded-proto", proto);
        put_header(&mut wire, b"x-request-id", call.request_id.as_bytes());
        if head.framing != Framing::Empty || !body.is_empty() {
            let _ = write!(wire, "content-length: {}\r\n", body.len());
        }
        wire.extend_from_slice(b"\r\n");
        if inline {
            wire.extend_from_slice(&body);
            return Wire {
                head: wire,
                body: Bytes::new(),
            };
        }
        Wire { head: wire, body }
    }

    /// Attempts on backends until one answers or the retry rule says stop.
    async fn forward(&mut self, call: &mut Call, wire: &Wire, replayable: bool) {
        let active = call.active.clone();
        let config = &active.config;
        let pool = call.pool.clone().expect("picked before forwarding");
        loop {
            let Some(left) = config.timeouts.total.checked_sub(call.start.elapsed()) else {
                return self.refuse(call, Refusal::TimeBudget).await;
            };
            let backend = pool.members[call.member.expect("picked")].backend.clone();
            call.tried.push(backend.addr);
            call.attempts += 1;
            let timeouts = &config.timeouts;
            let head_request = call.head.is_head();
            match attempt(&backend, wire, timeouts, left, head_request, replayable).await {
                Ok((conn, resp)) => {
                    let retry_after = resp.fields.get("retry-after").is_some();
                    request::record_answer(&backend, config, resp.status, retry_after);
                    if !(resp.status == 503 && may_retry(call, &pool, replayable)) {
                        return self.relay(call, conn, resp).await;
                    }
                }
                Err((failure, reused)) => {
                    let timed_out = matches!(failure, Failure::TimedOut);
                    let answered = matches!(failure, Failure::Answered(_));
                    let connecting = matches!(failure, Failure::Connect(_));
                    if connecting || !reused {
                        let what = match &failure {
                            Failure::Connect(e) => format!("connect failed: {e}"),
                            f => format!("proxying failed: {}", f.describe()),
                        };
                        backend.record_failure(&config.passive, what);
                    }
                    // A timeout after connecting is not retried: it would
                    // only double the load.
                    let retry = (connecting || !(timed_out || answered))
                        && may_retry(call, &pool, replayable);
                    if !retry {
                        return self.fail(call, &failure).await;
                    }
                }
            }
            let Some(next) = pool.pick(&call.tried) else {
                return self.refuse(call, Refusal::NoBackend).await;
            };
            pool.metrics.retries.inc();
            call.lease = Some(Lease::new(pool.members[next].backend.clone()));
            call.member = Some(next);
        }
    }

    async fn refuse(&mut self, call: &mut Call, refusal: Refusal) {
        call.refusal = Some(refusal);
        let pool = call
            .pool
            .as_ref()
            .map_or("", |p| p.name.as_str())
            .to_string();
        let (status, kind, msg) = refusal.describe(&pool);
        call.error = Some(msg.clone());
        self.respond(call, status, kind, &msg).await;
    }

    async fn fail(&mut self, call: &mut Call, failure: &Failure) {
        let name = call.backend_name().to_string();
        let (status, msg) = match failure {
            Failure::TimedOut => (504, format!("backend {name} timed out")),
            Failure::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                (504, format!("backend {name} timed out"))
            }
            f => (502, format!("backend {name} failed: {}", f.describe())),
        };
        let kind = if status == 504 {
            "upstream_timeout"
        } else {
            "upstream_error"
        };
        call.error = Some(msg.clone());
        self.respond(call, status, kind, &msg).await;
    }

    /// Sends the backend's answer on to the client.
    async fn relay(&mut self, call: &mut Call, mut conn: Conn, resp: ResponseHead) {
        let decode = resp.framing == Framing::Chunked && call.head.http10;
        call.keep &= resp.framing != Framing::UntilClose && !decode && !self.closing();
        self.response_head(call, &resp, decode);
        call.status = resp.status;
        let config = call.active.config.clone();
        let relayed = Relay {
            up: &mut conn.io,
            up_buf: &mut conn.buf,
            client: &mut self.io,
            out: &mut self.out,
            framing: resp.framing,
            decode,
            wait: config.timeouts.read,
        }
        .run()
        .await;
        match relayed {
            Ok(done) => {
                call.bytes_out = done.bytes_out;
                if conn.reusable && resp.keep_alive() && conn.buf.is_empty() {
                    let backend = call.lease.as_ref().expect("leased").backend();
                    backend.idle.put(conn, config.timeouts.upstream_idle);
                }
            }
            Err((RelayError::Upstream(e), done)) => {
                call.keep = false;
                call.bytes_out = done.bytes_out;
                let backend = call.lease.as_ref().expect("leased").backend().clone();
                if !conn.reused {
                    backend.record_failure(&config.passive, format!("proxying failed: {e}"));
                }
                if done.untouched {
                    self.out.clear();
                    self.fail(call, &Failure::from_body(e)).await;
                } else {
                    call.error = Some(format!("backend {} failed mid-body: {e}", backend.name));
                }
            }
            Err((RelayError::Client(e), done)) => {
                call.keep = false;
                call.bytes_out = done.bytes_out;
                call.error = Some(format!("client went away: {e}"));
            }
        }
    }

    /// The response head for the client, into `self.out`.
    fn response_head(&mut self, call: &Call, resp: &ResponseHead, decode: bool) {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        put_status(out, resp.status, resp.reason());
        let fields = &resp.fields;
        for (name, value, known) in fields.iter() {
            // The request id is the proxy's.
            if known != Known::XRequestId && !known.is_hop_by_hop() {
                put_header(out, name, value);
            }
        }
        // A body passed through as coded names every coding as sent (a
        // close-delimited one may carry codings other than chunked).
        let coded =
            resp.framing == Framing::UntilClose || (resp.framing == Framing::Chunked && !decode);
        if coded {
            for coding in fields.known(Known::TransferEncoding) {
                put_header(out, b"transfer-encoding", coding);
            }
        }
        let shown = &call.config().response_headers;
        if shown.pool {
            if let Some(pool) = &call.pool {
                put_header(out, b"x-switchyard-pool", pool.name.as_bytes());
            }
        }
        if shown.backend {
            put_header(out, b"x-switchyard-backend", call.backend_name().as_bytes());
        }
        self.end_head(call);
    }

    /// The request id and connection headers, and the blank line.
    fn end_head(&mut self, call: &Call) {
        put_header(&mut self.out, b"x-request-id", call.request_id.as_bytes());
        if !call.keep {
            self.out.extend_from_slice(b"connection: close\r\n");
        } else if call.head.http10 {
            self.out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes an answer of the proxy's own.
    async fn respond(&mut self, call: &mut Call, status: u16, kind: &str, msg: &str) {
        let body = request::error_body(kind, msg);
        call.keep &= !self.closing();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        put_status(&mut self.out, status, b"");
        self.out
            .extend_from_slice(b"content-type: application/json\r\n");
        let _ = write!(self.out, "content-length: {}\r\n", body.len());
        if status == 503 {
            // The proxy's own 503s are load, not faults: ask for a retry.
            self.out.extend_from_slice(b"retry-after: 1\r\n");
        }
        self.end_head(call);
        // A HEAD answer has the body's headers but never the body.
        let sent = if call.head.is_head() { 0 } else { body.len() };
        self.out.extend_from_slice(&body.as_bytes()[..sent]);
        call.status = status;
        let wait = call.config().timeouts.read;
        match body::write_out(&mut self.io, &mut self.out, wait).await {
            Ok(()) => call.bytes_out = sent,
            Err(e) => {
                call.keep = false;
                call.error = Some(format!("could not send the error answer: {e}"));
            }
        }
    }
}

/// Answers a request whose head could not be parsed, then closes.
pub(super) async fn refuse_unparsed(conn: &mut Connection, status: u16, kind: &str, msg: &str) {
    let mut call = Call::new(conn.app.shared.active(), head::placeholder(), false);
    call.error = Some(msg.to_string());
    conn.respond(&mut call, status, kind, msg).await;
    call.record(&conn.app.unrouted);
    conn.linger().await;
}

/// Bounds of a request body: `client_body` from now, never past the
/// request's `timeouts.total`.
fn body_limits(call: &Call) -> body::BodyLimits {
    let (limits, timeouts) = (&call.config().limits, &call.config().timeouts);
    let deadline = (Instant::now() + timeouts.client_body).min(call.start + timeouts.total);
    body::BodyLimits {
        max: limits.max_body_bytes,
        budget: limits.body_buffer_total,
        deadline: Deadline::from_std(deadline),
    }
}

fn may_retry(call: &Call, pool: &Pool, replayable: bool) -> bool {
    Attempts {
        config: call.config(),
        pool,
        start: call.start,
        attempts: call.attempts,
        tried: &call.tried,
        replayable,
    }
    .may_retry()
}

/// One attempt on `backend`: a pooled connection (or, if that turns out
/// stale, a fresh one), the request written, the response head read.
async fn attempt(
    backend: &Backend,
    wire: &Wire,
    timeouts: &TimeoutSection,
    left: std::time::Duration,
    head_request: bool,
    replayable: bool,
) -> Result<(Conn, ResponseHead), (Failure, bool)> {
    let mut pooled = backend.idle.take(timeouts.upstream_idle);
    loop {
        let mut conn = match pooled.take() {
            Some(conn) => conn,
            None => Conn::open(backend.addr, timeouts.connect.min(left))
                .await
                .map_err(|e| (Failure::Connect(e), false))?,
        };
        let deadline = tokio::time::Instant::now() + timeouts.read.min(left);
        let exchanged = tokio::time::timeout_at(deadline, exchange(&mut conn, wire, head_request))
            .await
            .unwrap_or(Err(Failure::TimedOut));
        match exchanged {
            Ok(resp) => return Ok((conn, resp)),
            Err(f) if conn.reused && conn.buf.is_empty() && f.may_resend(replayable) => continue,
            Err(f) => return Err((f, conn.reused)),
        }
    }
}

/// Writes the request and reads the final response head.
async fn exchange(
    conn: &mut Conn,
    wire: &Wire,
    head_request: bool,
) -> Result<ResponseHead, Failure> {
    use tokio::io::AsyncWriteExt;
    let mut written = conn.io.write_all(&wire.head).await;
    if written.is_ok() && !wire.body.is_empty() {
        written = conn.io.write_all(&wire.body).await;
    }
    if let Err(e) = written {
        // A backend may answer early (a 413, say) and close before reading
        // the whole request: that answer, if it can still be read, is the
        // response, and the connection is spent.
        conn.reusable = false;
        return read_head(conn, head_request)
            .await
            .map_err(|_| Failure::Unsent(e.to_string()));
    }
    read_head(conn, head_request).await
}

/// Reads the final response head, skipping interim (1xx) ones. Once any
/// byte of an answer has come, a failure is [`Failure::Answered`].
async fn read_head(conn: &mut Conn, head_request: bool) -> Result<ResponseHead, Failure> {
    let mut interim = false;
    loop {
        match head::parse_response(&mut conn.buf, MAX_RESPONSE_HEAD, head_request) {
            Ok(Some(resp)) if resp.status == 101 => {
                return Err(Failure::Answered("protocol upgrade not supported".into()))
            }
            Ok(Some(resp)) if resp.status < 200 => {
                interim = true;
                continue;
            }
            Ok(Some(resp)) => return Ok(resp),
            Ok(None) => {}
            Err(_) => return Err(Failure::Answered("malformed response head".into())),
        }
        let begun = interim || !conn.buf.is_empty();
        if let Err(e) = body::read_some(&mut conn.io, &mut conn.buf).await {
            return Err(match Failure::from_body(e) {
                Failure::Broken(what) if begun => Failure::Answered(what),
                f => f,
            });
        }
    }
}

/// A request as written to a backend: the head, with a small body inline
/// so that one write carries both, or a large body apart so that it is
/// never copied.
struct Wire {
    head: Vec<u8>,
    body: Bytes,
}

/// Bodies up to this size are copied into the head's write.
const INLINE_BODY: usize = 16 * 1024;

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `200 OK\r\n`; the standard reason when the backend gave none.
fn put_status(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    let standard = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(if reason.is_empty() {
        standard.as_bytes()
    } else {
        reason
    });
    out.extend_from_slice(b"\r\n");
}
