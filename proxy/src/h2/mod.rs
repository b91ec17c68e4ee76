//! The HTTP/2 front end, on the `h2` crate (the one Pingora's own h2 path
//! uses): frames, HPACK, flow control and the protocol's abuse limits are
//! the crate's; every rule of a request is the core's
//! ([`crate::request`]). Pingora's h2 proxy took 2.3x HAProxy's CPU per
//! request (docs/benchmarks.md), most of it in per-stream sessions and
//! header-map conversions this path does not make.
//!
//! One task per connection drives the connection and all of its streams
//! ([`stream`]): no task per stream, and no cross-thread wake-ups between
//! a stream and the connection that carries its frames.

mod stream;

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::time::{sleep, Instant};

use crate::config::LimitSection;
use crate::listener::Frontend;

/// Longest wait, once the connection is closing with no stream left, for
/// its GOAWAY to go out and the client to close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The settings a client is held to: the head and stream limits and the
/// flow-control windows of `[limits]`. The h2 crate's defaults bound the
/// rest: 20 streams reset before they are accepted (rapid reset,
/// CVE-2023-44487), 1024 stream errors caused by the client, 400 KiB
/// queued per stream for sending, and CONTINUATION frames counted against
/// the header-list size (each checked by tests/h2_abuse.rs).
fn builder(limits: &LimitSection) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_streams)
        .initial_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window);
    b
}

/// Serves one h2 client connection until it closes.
pub async fn serve(app: Arc<Frontend>, io: Stream, mut shutdown: ShutdownWatch) {
    let client = io
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    let active = app.shared.active();
    let (limits, timeouts) = (&active.config.limits, &active.config.timeouts);
    // The handshake ends with the client's preface, owed within client_head.
    let handshake = builder(limits).handshake::<_, Bytes>(io);
    let Ok(Ok(mut conn)) = tokio::time::timeout(timeouts.client_head, handshake).await else {
        return;
    };
    let idle = timeouts.client_idle;
    drop(active);
    let mut streams = FuturesUnordered::new();
    let mut quiet = pin!(sleep(idle));
    let mut stopping = pin!(shutdown.changed());
    let (mut busy, mut closing) = (false, false);
    loop {
        let event = poll_fn(|cx| loop {
            // Every stream that can move runs before the connection is
            // polled, which is what writes their frames: answers that are
            // ready together go out in one write (one TLS record) instead
            // of one each, as HAProxy batches them.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if busy && streams.is_empty() {
                busy = false;
                let wait = if closing { CLOSE_WAIT } else { idle };
                quiet.as_mut().reset(Instant::now() + wait);
            }
            match conn.poll_accept(cx) {
                // A new stream starts here, in place: handing the request
                // out of this closure first had cost several copies of it.
                Poll::Ready(Some(Ok((req, respond)))) => {
                    busy = true;
                    streams.push(stream::serve(app.clone(), req, respond, client));
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "h2 connection ended");
                    return Poll::Ready(Event::Ended);
                }
                Poll::Ready(None) => return Poll::Ready(Event::Ended),
                Poll::Pending => {}
            }
            if streams.is_empty() && quiet.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Quiet);
            }
            if !closing && stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stopping);
            }
            return Poll::Pending;
        })
        .await;
        match event {
            Event::Ended => return,
            // Idle past client_idle, or closing and nothing left.
            Event::Quiet if closing => return,
            Event::Quiet | Event::Stopping => {
                // GOAWAY: streams already open finish, no new one starts.
                conn.graceful_shutdown();
                closing = true;
                quiet.as_mut().reset(Instant::now() + CLOSE_WAIT);
            }
        }
    }
}

/// What ends a turn of the connection's loop.
enum Event {
    /// The client closed the connection, or broke the protocol.
    Ended,
    /// No stream open for the idle (or closing) wait.
    Quiet,
    /// The server began to shut down or hand over.
    Stopping,
}
