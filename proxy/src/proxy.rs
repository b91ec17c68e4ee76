//! The request path on Pingora's `ProxyHttp` hooks: HTTP/2 connections
//! (HTTP/1.x has its own engine, [`crate::h1`]).
//!
//! Per request: check limits, match a route, draw a pool, pick a backend
//! (weighted least-connections) and hold a [`Lease`] on it; on a connect
//! failure, a broken upstream connection or a 503, retry on a backend not
//! yet tried while the retry budget, the time budget and the replayable
//! body allow.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use prometheus::IntCounter;

use crate::config::Underscores;
use crate::request::{self, Attempts, Finished, Refusal};
use crate::routing::{Lease, Pool};
use crate::shared::{Active, Shared};

const REQUEST_ID: &str = "x-request-id";
// Pre-parsed names for header lookups: a `&str` key is parsed and
// validated again on every `HeaderMap::get`.
static REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub struct Switchyard {
    shared: Arc<Shared>,
    /// `requests_total{pool="none",backend="none"}`: answered before routing.
    unrouted: [IntCounter; 6],
}

impl Switchyard {
    pub fn new(shared: Arc<Shared>) -> Self {
        let unrouted = shared.metrics.requests_by_class("none", "none");
        Self { shared, unrouted }
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    request_id: String,
    active: Option<Arc<Active>>,
    pool: Option<Arc<Pool>>,
    /// The member picked in `request_filter`, used by the first attempt.
    first_pick: Option<usize>,
    /// The member of the current (latest) attempt.
    member: Option<usize>,
    lease: Option<Lease>,
    tried: Vec<SocketAddr>,
    attempts: u32,
    /// Set when a 503 was turned into a retryable error.
    retrying_503: bool,
    refusal: Option<Refusal>,
}

impl Ctx {
    fn config(&self) -> &crate::config::Config {
        &self.active.as_ref().expect("set in request_filter").config
    }

    fn backend_name(&self) -> &str {
        self.lease
            .as_ref()
            .map_or("", |l| l.backend().name.as_str())
    }
}

#[async_trait]
impl ProxyHttp for Switchyard {
    type CTX = Ctx;

    /// No downstream modules. Pingora's default adds a response-compression
    /// module at level 0 (off), which still ran its filters on every request
    /// (about 1 % of a request's instructions); nothing here compresses.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            request_id: String::new(),
            active: None,
            pool: None,
            first_pick: None,
            member: None,
            lease: None,
            tried: Vec::new(),
            attempts: 0,
            retrying_503: false,
            refusal: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let given = session.req_header().headers.get(&REQUEST_ID_NAME);
        ctx.request_id = request::request_id(given.map(|v| v.as_bytes()));
        let active = self.shared.active();
        let limits = &active.config.limits;
        // Pingora sets no write timeout on h2 streams: a client that never
        // opens its flow-control window would hold each stream (and its
        // response) forever. Same per-write wait as the h1 engine's.
        session.set_write_timeout(Some(active.config.timeouts.read));
        if head_size(session.req_header()) > limits.max_header_bytes {
            let msg = format!("request headers exceed {} bytes", limits.max_header_bytes);
            session.set_keepalive(None);
            respond(session, ctx, 431, "headers_too_large", &msg).await?;
            return Ok(true);
        }
        if !police_underscores(session.req_header_mut(), limits.underscores_in_headers) {
            let msg = "malformed request: underscore in a header name";
            respond(session, ctx, 400, "bad_request", msg).await?;
            return Ok(true);
        }
        if content_length(session.req_header()).is_some_and(|n| n > limits.max_body_bytes) {
            let msg = format!("request body exceeds {} bytes", limits.max_body_bytes);
            // The unread body would poison a kept-alive connection.
            session.set_keepalive(None);
            respond(session, ctx, 413, "body_too_large", &msg).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let Some(route) = active.router.find(host(req), req.uri.path()) else {
            let msg = format!("no route for {}", req.uri.path());
            respond(session, ctx, 404, "no_route", &msg).await?;
            return Ok(true);
        };
        let pool = route.choose_pool(req).clone();
        match pool.pick(&[]) {
            Some(i) => {
                ctx.first_pick = Some(i);
                ctx.lease = Some(Lease::new(pool.members[i].backend.clone()));
                ctx.member = Some(i);
            }
            None => {
                ctx.refusal = Some(Refusal::NoBackend);
                let msg = format!("no healthy backend in pool '{}'", pool.name);
                ctx.pool = Some(pool);
                respond(session, ctx, 503, "no_backend", &msg).await?;
                return Ok(true);
            }
        }
        ctx.pool = Some(pool);
        ctx.active = Some(active);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Bytes read from the client: a replay on retry does not add to it.
        let read = session.body_bytes_read() as u64;
        let max = ctx.config().limits.max_body_bytes;
        if read > max {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("request body exceeds {max} bytes"),
            );
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pool = ctx.pool.as_deref().expect("set in request_filter");
        let timeouts = &ctx.active.as_ref().expect("set").config.timeouts;
        let Some(left) = timeouts.total.checked_sub(ctx.start.elapsed()) else {
            ctx.refusal = Some(Refusal::TimeBudget);
            return Error::e_explain(ErrorType::HTTPStatus(504), "request time budget spent");
        };
        let index = match ctx.first_pick.take() {
            Some(i) => i,
            None => {
                let Some(i) = pool.pick(&ctx.tried) else {
                    ctx.refusal = Some(Refusal::NoBackend);
                    return Error::e_explain(ErrorType::HTTPStatus(503), "no backend left to try");
                };
                pool.metrics.retries.inc();
                ctx.lease = Some(Lease::new(pool.members[i].backend.clone()));
                i
            }
        };
        let addr = pool.members[index].backend.addr;
        ctx.member = Some(index);
        ctx.tried.push(addr);
        ctx.attempts += 1;
        let mut peer = HttpPeer::new(addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(timeouts.connect.min(left));
        o.total_connection_timeout = Some(timeouts.connect.min(left));
        o.read_timeout = Some(timeouts.read.min(left));
        o.write_timeout = Some(timeouts.read.min(left));
        o.idle_timeout = Some(timeouts.upstream_idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let previous = upstream.headers.get_all(&X_FORWARDED_FOR).iter();
            let mut forwarded = Vec::new();
            request::forwarded_for(&mut forwarded, previous.map(|v| v.as_bytes()), ip);
            upstream.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream.insert_header("x-forwarded-proto", scheme(session))?;
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        let backend = ctx
            .lease
            .as_ref()
            .expect("leased in upstream_peer")
            .backend();
        let retry_after = resp.headers.contains_key("retry-after");
        request::record_answer(backend, ctx.config(), status, retry_after);
        if status == 503 && self.may_retry(session, ctx) {
            ctx.retrying_503 = true;
            let mut e = Error::explain(
                ErrorType::HTTPStatus(503),
                format!("backend {} answered 503", backend.name),
            );
            e.set_retry(true);
            return Err(e.into_up());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if self.shared.closing.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        let headers = &ctx.config().response_headers;
        if headers.pool {
            if let Some(pool) = &ctx.pool {
                resp.insert_header("x-switchyard-pool", pool.name.as_str())?;
            }
        }
        if headers.backend {
            resp.insert_header("x-switchyard-backend", ctx.backend_name())?;
        }
        resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(lease) = &ctx.lease {
            let what = format!("connect failed: {}", e.etype().as_str());
            lease.backend().record_failure(&ctx.config().passive, what);
            e = e.more_context(format!("backend {}", lease.backend().name));
        }
        // Nothing reached the backend, so any request may go elsewhere.
        let retry = self.may_retry(session, ctx);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if std::mem::take(&mut ctx.retrying_503) {
            return e; // decided in upstream_response_filter
        }
        let mut e = e.more_context(format!("backend {}", ctx.backend_name()));
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        // A pooled connection the backend already closed says nothing
        // about the backend's health.
        if upstream_fault && !client_reused {
            if let Some(lease) = &ctx.lease {
                let what = format!("proxying failed: {}", e.etype().as_str());
                lease.backend().record_failure(&ctx.config().passive, what);
            }
        }
        // Inference calls are idempotent, so a request whose response has
        // not started may be replayed elsewhere, whatever its method. A
        // timeout is not retried: it would only double the load.
        let retry = upstream_fault
            && session.response_written().is_none()
            && !is_timeout(e.etype())
            && self.may_retry(session, ctx);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (status, kind, message) = describe_failure(e, ctx);
        if status > 0 {
            if let Err(write_err) = respond(session, ctx, status, kind, &message).await {
                tracing::debug!(error = %write_err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let req = session.req_header();
        Finished {
            request_id: &ctx.request_id,
            method: req.method.as_str(),
            path: req.uri.path(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            pool: ctx.pool.as_deref(),
            served_by: ctx.member.filter(|_| ctx.refusal.is_none()),
            backend: ctx.backend_name(),
            elapsed: ctx.start.elapsed(),
            attempts: ctx.attempts,
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            error: e.map(|e| e.to_string()),
        }
        .record(&self.unrouted);
        ctx.lease = None;
    }
}

impl Switchyard {
    /// Whether another attempt is allowed: retries left, time left, the
    /// body still replayable, and an untried eligible backend exists.
    fn may_retry(&self, session: &Session, ctx: &Ctx) -> bool {
        let config = ctx.config();
        let Some(pool) = ctx.pool.as_deref() else {
            return false;
        };
        let replayable = !session.as_ref().retry_buffer_truncated()
            && session.body_bytes_read() <= config.retry.buffer_body_max
            && content_length(session.req_header())
                .is_none_or(|n| n <= config.retry.buffer_body_max as u64);
        Attempts {
            config,
            pool,
            start: ctx.start,
            attempts: ctx.attempts,
            tried: &ctx.tried,
            replayable,
        }
        .may_retry()
    }
}

fn is_timeout(t: &ErrorType) -> bool {
    matches!(
        t,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}

/// Status, error type and message for a request that could not be proxied.
fn describe_failure(e: &Error, ctx: &Ctx) -> (u16, &'static str, String) {
    let pool = ctx.pool.as_ref().map_or("", |p| p.name.as_str());
    match (ctx.refusal, e.etype()) {
        (Some(refusal), _) => refusal.describe(pool),
        (None, ErrorType::HTTPStatus(413)) => (413, "body_too_large", reason(e)),
        (None, ErrorType::HTTPStatus(code)) => (*code, "upstream_error", reason(e)),
        (None, t) => match e.esource() {
            ErrorSource::Upstream if is_timeout(t) => (
                504,
                "upstream_timeout",
                format!("backend {} timed out", ctx.backend_name()),
            ),
            ErrorSource::Upstream => (
                502,
                "upstream_error",
                format!("backend {} failed: {}", ctx.backend_name(), t.as_str()),
            ),
            ErrorSource::Downstream => match t {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                    (0, "", String::new())
                }
                _ => (400, "bad_request", "malformed request".to_string()),
            },
            ErrorSource::Internal | ErrorSource::Unset => {
                (500, "internal_error", "internal proxy error".to_string())
            }
        },
    }
}

fn reason(e: &Error) -> String {
    e.context
        .as_ref()
        .map_or_else(|| e.etype().as_str().to_string(), |c| c.to_string())
}

/// Writes a JSON error response in the OpenAI error shape.
async fn respond(
    session: &mut Session,
    ctx: &Ctx,
    status: u16,
    kind: &str,
    message: &str,
) -> Result<()> {
    let body = request::error_body(kind, message);
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// Approximate size of the request head as sent on HTTP/1.1.
fn head_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.raw_path().len() + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Applies `limits.underscores_in_headers` as the h1 engine does
/// (`h1::head`): some backends fold `x_foo` into `x-foo`, so an underscored
/// name could smuggle a header past the proxy. False: refuse the request.
fn police_underscores(req: &mut RequestHeader, policy: Underscores) -> bool {
    let underscored = |name: &HeaderName| name.as_str().contains('_');
    if policy == Underscores::Forward || !req.headers.keys().any(underscored) {
        return true;
    }
    if policy == Underscores::Refuse {
        return false;
    }
    let names: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|n| underscored(n))
        .cloned()
        .collect();
    for name in &names {
        req.remove_header(name);
    }
    true
}

fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The requested host: HTTP/2 `:authority`, else the Host header.
fn host(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(HOST).and_then(|v| v.to_str().ok()))
}

fn scheme(session: &Session) -> &'static str {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    if tls {
        "https"
    } else {
        "http"
    }
}
