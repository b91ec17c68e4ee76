//! The request core: the whole decision sequence of one request, written
//! once for every client protocol. The front ends ([`crate::h1`],
//! [`crate::h2`]) only move bytes: they hand over a parsed head, read the
//! body when asked, and write the answers they are given.
//!
//! The phases, in order (`docs/request-path.md` names each function):
//! admit ([`admit`]), route and choose the pool, pick and lease
//! (falling back to another pool of the split when the drawn one has
//! none eligible; [`route_and_forward`]), read the body ([`read_body`]), attempt and
//! judge ([`forward`]), relay ([`forward::relay`]), finish
//! ([`Call::finish`]). Upstreams always speak HTTP/1.1 ([`attempt`]).

mod answer;
mod attempt;
mod call;
mod forward;
pub mod headers;
mod log;
mod mirror;

pub use answer::{refuse_head, respond, Refusal, Reply};
pub use call::Call;

use std::future::Future;
use std::io;
use std::net::IpAddr;

use prometheus::IntCounter;

use crate::codec::body::{Body, BodyError, BodyLimits, RelayError, Relayed};
use crate::codec::head::{Known, ResponseHead};
use crate::config::LimitSection;
use crate::ratelimit::{self, Phase, RouteLimits};
use crate::routing::RequestHeaders;
use crate::upstream::Conn;

/// A request head as the core reads it, whatever protocol carried it.
pub trait Head: RequestHeaders {
    fn method(&self) -> &str;
    /// The path without the query, for routing and the access log.
    fn path(&self) -> &str;
    /// The requested host: the target's authority, else the Host header.
    fn host(&self) -> Option<&str>;
    /// The target in origin form: (path, `?query` or empty).
    fn target(&self) -> (&[u8], &[u8]);
    /// The target's own authority (an HTTP/1.1 absolute-form target, the
    /// h2 `:authority`), which replaces the Host header upstream.
    fn target_authority(&self) -> Option<&[u8]>;
    /// Every (name, value, kind) header, in order.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], Known)>;
    /// The body length the client declared, if it did.
    fn declared_length(&self) -> Option<u64>;
    /// A body follows the head.
    fn has_body(&self) -> bool;
    /// Header lines (or fields) in the head.
    fn header_count(&self) -> usize;
    /// About the head's size as HTTP/1.1 bytes.
    fn size(&self) -> usize;

    fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }

    /// Every value of a recognised header, in order.
    fn known(&self, kind: Known) -> impl Iterator<Item = &[u8]> {
        self.fields().filter(move |f| f.2 == kind).map(|f| f.1)
    }
}

/// What a protocol front end does for the core: it moves bytes and
/// decides nothing about the request.
pub trait Front {
    type Head: Head;

    /// The client's address, for X-Forwarded-For.
    fn client(&self) -> Option<IpAddr>;
    /// Whether the client came over TLS, for X-Forwarded-Proto.
    fn tls(&self) -> bool;
    /// `requests_total{pool="none",backend="none"}`: answered before routing.
    fn unrouted(&self) -> &[IntCounter; 6];
    /// The server is shutting down or handing its sockets over.
    fn closing(&self) -> bool;

    /// Reads the whole request body within `limits`.
    fn read_body(
        &mut self,
        call: &Call<Self::Head>,
        limits: BodyLimits,
    ) -> impl Future<Output = Result<Body, BodyError>> + Send;

    /// Writes an answer of the proxy's own.
    fn answer(
        &mut self,
        call: &Call<Self::Head>,
        reply: &Reply<'_>,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Relays a backend's response (its head is `resp`, its body follows
    /// on `conn`). May clear `call.keep`.
    fn relay(
        &mut self,
        call: &mut Call<Self::Head>,
        conn: &mut Conn,
        resp: &ResponseHead,
    ) -> impl Future<Output = Result<Relayed, (RelayError, Relayed)>> + Send;

    /// Runs `work` unless the client cancels the request first (an h2
    /// RST_STREAM); `None` then, and `work` is dropped.
    fn unless_cancelled<T: Send>(
        &mut self,
        work: impl Future<Output = T> + Send,
    ) -> impl Future<Output = Option<T>> + Send;
}

/// Serves one request from its head to its access-log line.
pub async fn serve<F: Front>(front: &mut F, call: &mut Call<F::Head>)
where
    F::Head: Send + Sync,
{
    route_and_forward(front, call).await;
    call.finish(front.unrouted());
}

/// Admit, route, choose the pool, pick and lease, read the body, forward.
async fn route_and_forward<F: Front>(front: &mut F, call: &mut Call<F::Head>)
where
    F::Head: Send + Sync,
{
    let active = call.active.clone();
    if let Err((status, kind, msg)) = admit(&call.head, &active.config.limits) {
        return answer::refuse_unread(front, call, status, kind, &msg).await;
    }
    let Some(route) = active.router.find(call.head.host(), call.head.path()) else {
        let msg = format!("no route for {}", call.head.path());
        return answer::refuse_unread(front, call, 404, "no_route", &msg).await;
    };
    let limits = active.limits[route.index].as_deref();
    if let Some(limits) = limits {
        if !within_limits(front, call, limits, Phase::Head).await {
            return;
        }
    }
    if let Some((class, saturation)) = route
        .shed
        .as_ref()
        .and_then(|s| s.refuses(&call.head, &route.split))
    {
        let msg = format!(
            "the fleet is saturated ({:.0}%): '{class}' requests are shed; retry later",
            saturation * 100.0
        );
        return answer::refuse_unread(front, call, 503, "overloaded", &msg).await;
    }
    let (drawn, forced) = route.choose_pool(&call.head);
    let picked = match drawn.lease(&[]) {
        Some((member, lease)) => Some((drawn.clone(), member, lease)),
        // A forced pool is the client's explicit choice: no substitute.
        None if !forced => route.fall_back(drawn),
        None => None,
    };
    let Some((pool, first, lease)) = picked else {
        let refusal = Refusal::none_left(drawn, &[]);
        call.refusal = Some(refusal);
        let (status, kind, msg) = refusal.describe(&drawn.name);
        call.pool = Some(drawn.clone());
        return answer::refuse_unread(front, call, status, kind, &msg).await;
    };
    call.lease = Some(lease);
    call.member = Some(first);
    call.arm = route
        .windows
        .as_ref()
        .and_then(|w| Some((w.clone(), w.arm(&pool.name)?)));
    call.pool = Some(pool);
    let Some(body) = read_body(front, call).await else {
        return;
    };
    if let Some(limits) = limits.filter(|l| l.prices_bodies()) {
        if !within_limits(front, call, limits, Phase::Body(body.bytes.len())).await {
            return;
        }
    }
    let wire = headers::upstream_request(call, body.bytes, front.client(), front.tls());
    let replayable = wire.body_len() <= active.config.retry.buffer_body_max;
    forward::forward(front, call, wire, replayable).await;
}

/// Runs the route's limit rules of `phase`; false when one refused the
/// request, which has then been answered with a 429.
async fn within_limits<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    limits: &RouteLimits,
    phase: Phase,
) -> bool
where
    F::Head: Send + Sync,
{
    let now = ratelimit::now_ns(call.start);
    let checked = limits
        .check(
            &call.head,
            front.client(),
            now,
            phase,
            &mut call.slots,
            &mut call.shadow_limited,
        )
        .await;
    let Err(limited) = checked else {
        return true;
    };
    if phase == Phase::Head && call.head.has_body() {
        call.keep = false; // the unread body would be taken for the next request
    }
    let answer = (429, "rate_limited", limited.message.as_str());
    answer::respond_with(front, call, answer, &limited.headers).await;
    call.limited = Some(limited.rule);
    false
}

/// Limits a head must meet before anything else is done for it. The
/// HTTP/1.x parser enforces the same bounds while reading; this is where
/// they hold for every protocol.
fn admit(head: &impl Head, limits: &LimitSection) -> Result<(), (u16, &'static str, String)> {
    if head.header_count() > limits.max_headers {
        let msg = format!("request has more than {} headers", limits.max_headers);
        return Err((431, "headers_too_large", msg));
    }
    if head
        .declared_length()
        .is_some_and(|n| n > limits.max_body_bytes)
    {
        let msg = format!("request body exceeds {} bytes", limits.max_body_bytes);
        return Err((413, "body_too_large", msg));
    }
    Ok(())
}

/// The request body, read whole so that it can be replayed; `None` when
/// it could not be (the client has been answered, or is gone).
async fn read_body<F: Front>(front: &mut F, call: &mut Call<F::Head>) -> Option<Body>
where
    F::Head: Send + Sync,
{
    let limits = call.body_limits();
    match front.read_body(call, limits).await {
        Ok(body) => {
            call.bytes_in = body.bytes.len();
            call.body_read = true;
            Some(body)
        }
        Err(e) => {
            call.keep = false;
            let (status, kind, msg) = match e {
                BodyError::TimedOut => (
                    408,
                    "request_timeout",
                    "the request body did not arrive in time".to_string(),
                ),
                BodyError::Busy(what) => (503, "overloaded", what.to_string()),
                BodyError::TooLarge => (
                    413,
                    "body_too_large",
                    format!("request body exceeds {} bytes", limits.max),
                ),
                BodyError::Malformed(what) => (
                    400,
                    "bad_request",
                    format!("malformed request body: {what}"),
                ),
                e => {
                    call.error = Some(format!("reading the request body failed: {e}"));
                    return None;
                }
            };
            answer::respond(front, call, status, kind, &msg).await;
            None
        }
    }
}
