//! One attempt on one backend, over HTTP/1.1: a pooled connection (or a
//! fresh one), the request written, the final response head read.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::headers::Wire;
use crate::codec::body::{self, BodyError};
use crate::codec::head::{self, ResponseHead};
use crate::config::TimeoutSection;
use crate::routing::Backend;
use crate::upstream::Conn;

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an attempt got no usable response head.
pub enum Failure {
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
    pub fn from_body(e: BodyError) -> Self {
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

    pub fn describe(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::TimedOut => "timed out".to_string(),
            Failure::Unsent(e) => format!("sending the request: {e}"),
            Failure::Broken(e) | Failure::Answered(e) => e.clone(),
        }
    }
}

/// One attempt on `backend`: a pooled connection (or, if that turns out
/// stale, a fresh one), the request written, the response head read.
pub async fn attempt(
    backend: &Backend,
    wire: &Wire,
    timeouts: &TimeoutSection,
    left: Duration,
    head_request: bool,
    replayable: bool,
) -> Result<(Conn, ResponseHead), (Failure, bool)> {
    let mut pooled = backend.idle.take(timeouts.upstream_idle);
    loop {
        let mut conn = match pooled.take() {
            Some(conn) => conn,
            None => backend
                .connect(timeouts.connect.min(left))
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
