//! The HTTP/1.x engine of the public listeners.
//!
//! Pingora's HTTP/1 proxy path measured 3.3x nginx's instructions per
//! request (docs/benchmarks.md), most of it in per-request session
//! objects, header maps and tasks that a proxy with one job does not need.
//! Pingora still owns TLS, graceful upgrade and shutdown.
//!
//! Per connection: read a head ([`head`]), hand the request to the core
//! ([`crate::request`], through [`front`]), and go round again while both
//! sides keep it alive.
//! An idle connection gives its buffers back after [`HOT_IDLE`], so a
//! silent client costs its task and socket, not 32 KiB of buffers.

mod front;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::codec::head::{self, HeadError, RequestHead, RequestLimits};
use crate::config::Config;
use crate::listener::Frontend;

/// Read buffer of a client connection while it is in use.
const CLIENT_BUFFER: usize = 16 * 1024;
/// How long an idle connection keeps its buffers in case the next request
/// follows at once, as it does for a busy keep-alive client.
const HOT_IDLE: Duration = Duration::from_millis(100);
/// Longest wait for a closing connection's close_notify or FIN to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves one HTTP/1.x client connection until it closes.
pub async fn serve(app: Arc<Frontend>, io: Stream, shutdown: ShutdownWatch) {
    Connection::new(app, io).serve(shutdown).await;
}

/// One client connection speaking HTTP/1.x.
struct Connection {
    app: Arc<Frontend>,
    io: Stream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// What is being written to the client, reused across requests.
    out: Vec<u8>,
    client: Option<IpAddr>,
    tls: bool,
}

impl Connection {
    fn new(app: Arc<Frontend>, io: Stream) -> Self {
        let client = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let tls = io.get_ssl_digest().is_some();
        Self {
            app,
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            client,
            tls,
        }
    }

    fn closing(&self) -> bool {
        self.app.closing()
    }

    async fn serve(mut self, mut shutdown: ShutdownWatch) {
        let mut first = true;
        loop {
            let limits = head_limits(&self.app.shared.active().config, first);
            let again = match self.next_head(&mut shutdown, &limits).await {
                Ok(Some(head)) => self.serve_request(head).await,
                Ok(None) => false,
                Err(e) => {
                    self.refuse_head(e, limits.request.max_bytes).await;
                    false
                }
            };
            if !again {
                return self.close().await;
            }
            first = false;
        }
    }

    /// Ends the connection with a TLS close_notify (or a FIN): a body that
    /// runs to the close is then told apart from a truncated one.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.io.shutdown()).await;
    }

    /// The next request head; `None` when the client closes, stays idle
    /// past `idle`, or the server shuts down while it is idle.
    async fn next_head(
        &mut self,
        shutdown: &mut ShutdownWatch,
        limits: &HeadLimits,
    ) -> Result<Option<RequestHead>, HeadError> {
        if self.buf.is_empty() && !self.await_bytes(shutdown, limits.idle).await {
            return Ok(None);
        }
        // A head has `timeouts.client_head` from its first byte.
        let deadline = Instant::now() + limits.head;
        loop {
            if let Some(head) = head::parse_request(&mut self.buf, &limits.request)? {
                return Ok(Some(head));
            }
            if self.buf.capacity() - self.buf.len() < CLIENT_BUFFER / 4 {
                self.buf.reserve(CLIENT_BUFFER);
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Err(_) => return Err(HeadError::TimedOut),
                // Closed or failed mid-head: nothing to answer.
                Ok(_) => return Ok(None),
            }
        }
    }

    /// Waits up to `idle` for the first bytes of a head; false when none
    /// come or the server begins to shut down. After [`HOT_IDLE`] the
    /// buffers go back to the allocator and the wait goes on through a
    /// one-byte read, which needs none.
    async fn await_bytes(&mut self, shutdown: &mut ShutdownWatch, idle: Duration) -> bool {
        if *shutdown.borrow() {
            return false;
        }
        let until = Instant::now() + idle;
        // A fresh connection has no buffers yet and starts cold.
        if self.buf.capacity() > 0 {
            if self.buf.capacity() - self.buf.len() < CLIENT_BUFFER / 4 {
                self.buf.reserve(CLIENT_BUFFER);
            }
            let hot = (Instant::now() + HOT_IDLE).min(until);
            tokio::select! {
                r = tokio::time::timeout_at(hot, self.io.read_buf(&mut self.buf)) => match r {
                    Ok(Ok(n)) => return n > 0,
                    Ok(Err(_)) => return false,
                    Err(_) => {}
                },
                _ = shutdown.changed() => return false,
            }
        }
        self.buf = BytesMut::new();
        self.out = Vec::new();
        let mut first = [0u8; 1];
        tokio::select! {
            r = tokio::time::timeout_at(until, self.io.read(&mut first)) => match r {
                Ok(Ok(1)) => {
                    self.buf.reserve(CLIENT_BUFFER);
                    self.buf.extend_from_slice(&first);
                    true
                }
                _ => false,
            },
            _ = shutdown.changed() => false,
        }
    }

    /// Answers a head that could not be parsed, then closes.
    async fn refuse_head(&mut self, e: HeadError, max_head: usize) {
        front::refuse_unparsed(self, e, max_head).await;
    }

    /// Closes after an answer sent while the client may still be sending a
    /// body: shutting the write side and draining for a moment lets the
    /// client read the answer instead of getting a reset.
    async fn linger(&mut self) {
        const LINGER: Duration = Duration::from_secs(2);
        const MAX_DRAIN: usize = 1 << 20;
        let drain = async {
            let _ = self.io.shutdown().await;
            let mut drained = 0;
            // On the heap: an array here would sit in every connection's
            // future, idle or not, since this future is part of it.
            let mut sink = vec![0u8; 8192];
            while drained < MAX_DRAIN {
                match self.io.read(&mut sink).await {
                    Ok(n) if n > 0 => drained += n,
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// How the next head is waited for and read, from one look at the
/// configuration in effect.
struct HeadLimits {
    request: RequestLimits,
    /// Wait for its first byte: a new connection owes its first head
    /// promptly (`client_head`), a kept-alive one may idle (`client_idle`).
    idle: Duration,
    /// Wait for the rest of it, from its first byte.
    head: Duration,
}

fn head_limits(config: &Config, first: bool) -> HeadLimits {
    let (l, t) = (&config.limits, &config.timeouts);
    HeadLimits {
        request: RequestLimits {
            max_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            underscores: l.underscores_in_headers,
        },
        idle: if first { t.client_head } else { t.client_idle },
        head: t.client_head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each connection's task holds this future from accept to close, idle
    /// or not, so an array on any path it may take (an 8 KiB drain buffer
    /// in `linger` once) is paid by every silent connection.
    #[test]
    fn a_connection_future_stays_small() {
        let size = future_size(serve);
        assert!(size <= 4096, "h1::serve's future takes {size} bytes");
    }
}
