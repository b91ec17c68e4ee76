//! The proxy's own answers: which status and message each refusal or
//! failure gets, and the JSON error body (OpenAI's error shape).

use std::net::SocketAddr;

use super::{Call, Front, Head as _};
use crate::codec::head::HeadError;
use crate::routing::Pool;

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoBackend,
    /// Every backend that could take it is at its in-flight or connect cap.
    Full,
    TimeBudget,
}

impl Refusal {
    /// Why `pool` had no backend for a request that has tried `tried`.
    pub fn none_left(pool: &Pool, tried: &[SocketAddr]) -> Self {
        if pool.all_full(tried) {
            Refusal::Full
        } else {
            Refusal::NoBackend
        }
    }

    /// Status, error type and message of the answer.
    pub fn describe(self, pool: &str) -> (u16, &'static str, String) {
        match self {
            Refusal::NoBackend => (
                503,
                "no_backend",
                format!("no healthy backend in pool '{pool}'"),
            ),
            Refusal::Full => (
                503,
                "overloaded",
                format!("every backend in pool '{pool}' is at its max_in_flight or max_connecting"),
            ),
            Refusal::TimeBudget => (
                504,
                "upstream_timeout",
                "request time budget spent".to_string(),
            ),
        }
    }
}

/// An answer of the proxy's own, for a front end to write as it is.
pub struct Reply<'a> {
    pub status: u16,
    /// Empty for a HEAD request, whose answer has the headers only.
    pub body: &'a [u8],
    length: usize,
    request_id: &'a str,
    /// Headers of this answer alone (a 429's Retry-After and RateLimit).
    extra: &'a [(&'static [u8], String)],
}

impl Reply<'_> {
    /// Every header of the answer, in order.
    pub fn headers(&self, mut put: impl FnMut(&[u8], &[u8])) {
        put(b"content-type", b"application/json");
        put(b"content-length", self.length.to_string().as_bytes());
        if self.status == 503 {
            // The proxy's own 503s are load, not faults: ask for a retry.
            put(b"retry-after", b"1");
        }
        for (name, value) in self.extra {
            put(name, value.as_bytes());
        }
        put(b"x-request-id", self.request_id.as_bytes());
    }
}

/// The OpenAI-shaped JSON body of an answer the proxy gives itself.
pub fn error_body(kind: &str, message: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": kind } }).to_string()
}

/// Writes an answer of the proxy's own.
pub async fn respond<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    status: u16,
    kind: &str,
    msg: &str,
) {
    respond_with(front, call, (status, kind, msg), &[]).await;
}

/// [`respond`], with headers of its own.
pub async fn respond_with<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    (status, kind, msg): (u16, &str, &str),
    extra: &[(&'static [u8], String)],
) {
    let body = error_body(kind, msg);
    call.keep &= !front.closing();
    call.status = status;
    let sent = if call.head.is_head() { 0 } else { body.len() };
    let reply = Reply {
        status,
        body: &body.as_bytes()[..sent],
        length: body.len(),
        request_id: &call.request_id,
        extra,
    };
    match front.answer(call, &reply).await {
        Ok(()) => call.bytes_out = sent,
        Err(e) => {
            call.keep = false;
            call.error = Some(format!("could not send the error answer: {e}"));
        }
    }
}

/// An answer given before the body was read: an HTTP/1.x connection
/// closes unless there is no body, which would otherwise be read as the
/// next request.
pub async fn refuse_unread<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    status: u16,
    kind: &str,
    msg: &str,
) {
    if call.head.has_body() {
        call.keep = false;
    }
    respond(front, call, status, kind, msg).await;
}

/// A request answered without a backend: no healthy one, or no time left.
pub async fn refuse<F: Front>(front: &mut F, call: &mut Call<F::Head>, refusal: Refusal) {
    call.refusal = Some(refusal);
    let (status, kind, msg) = refusal.describe(call.pool_name());
    call.error = Some(msg.clone());
    respond(front, call, status, kind, &msg).await;
}

/// Answers a head that could not be parsed or was refused by its codec:
/// status, error type and message.
pub fn refuse_head(e: HeadError, max_head: usize) -> (u16, &'static str, String) {
    match e {
        HeadError::TooLarge => (
            431,
            "headers_too_large",
            format!("request headers exceed {max_head} bytes or the header-count limit"),
        ),
        HeadError::Malformed(what) => (400, "bad_request", format!("malformed request: {what}")),
        HeadError::NotImplemented(what) => (501, "not_implemented", what.to_string()),
        HeadError::TimedOut => (
            408,
            "request_timeout",
            "the request head did not arrive in time".to_string(),
        ),
    }
}
