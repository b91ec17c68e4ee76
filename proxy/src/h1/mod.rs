//! The public listener's application, and its own HTTP/1.x engine.
//!
//! Connections that negotiated h2 go to Pingora's proxy ([`crate::proxy`]).
//! HTTP/1.x is served here: Pingora's HTTP/1 proxy path measured 3.3x
//! nginx's instructions per request (docs/benchmarks.md), most of it in
//! per-request session objects, header maps and tasks that a proxy with
//! one job does not need. Pingora still owns the listeners, TLS, graceful
//! upgrade and shutdown.
//!
//! Per connection: read a head ([`head`]), serve the request
//! ([`exchange`]), and go round again while both sides keep it alive.

pub mod body;
mod exchange;
pub mod head;
pub mod upstream;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::Switchyard;
use crate::shared::Shared;
use head::{HeadError, RequestHead};

/// How long a kept-alive client connection may sit between requests
/// (Pingora's HTTP/1 default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Read buffer of a client connection.
const CLIENT_BUFFER: usize = 16 * 1024;
/// Longest wait for a closing connection's close_notify or FIN to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The application of the public listeners.
pub struct Frontend {
    h2: Arc<HttpProxy<Switchyard>>,
    shared: Arc<Shared>,
    /// `requests_total{pool="none",backend="none"}`: answered before routing.
    unrouted: [IntCounter; 6],
}

impl Frontend {
    pub fn new(h2: HttpProxy<Switchyard>, shared: Arc<Shared>) -> Self {
        let unrouted = shared.metrics.requests_by_class("none", "none");
        Self {
            h2: Arc::new(h2),
            shared,
            unrouted,
        }
    }
}

#[async_trait]
impl ServerApp for Frontend {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.h2.process_new(stream, shutdown).await;
        }
        Connection::new(self.clone(), stream)
            .serve(shutdown.clone())
            .await;
        None
    }

    async fn cleanup(&self) {
        self.h2.cleanup().await;
    }
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
            buf: BytesMut::with_capacity(CLIENT_BUFFER),
            out: Vec::with_capacity(CLIENT_BUFFER),
            client,
            tls,
        }
    }

    fn closing(&self) -> bool {
        self.app.shared.closing.load(Ordering::Relaxed)
    }

    async fn serve(mut self, mut shutdown: ShutdownWatch) {
        loop {
            let (max_head, head_wait) = {
                let config = &self.app.shared.active().config;
                (config.limits.max_header_bytes, config.timeouts.read)
            };
            let again = match self.next_head(&mut shutdown, max_head, head_wait).await {
                Ok(Some(head)) => self.serve_request(head).await,
                Ok(None) => false,
                Err(e) => {
                    self.refuse_head(e, max_head).await;
                    false
                }
            };
            if !again {
                return self.close().await;
            }
        }
    }

    /// Ends the connection with a TLS close_notify (or a FIN): a body that
    /// runs to the close is then told apart from a truncated one.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.io.shutdown()).await;
    }

    /// The next request head; `None` when the client closes, stays idle
    /// too long, or the server shuts down while it is idle.
    async fn next_head(
        &mut self,
        shutdown: &mut ShutdownWatch,
        max_head: usize,
        head_wait: Duration,
    ) -> Result<Option<RequestHead>, HeadError> {
        // A head has `timeouts.read` from its first byte; idling before it
        // is the keep-alive wait's.
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + head_wait);
            }
            if !self.buf.is_empty() {
                if let Some(head) = head::parse_request(&mut self.buf, max_head)? {
                    return Ok(Some(head));
                }
            }
            if self.buf.capacity() - self.buf.len() < CLIENT_BUFFER / 4 {
                self.buf.reserve(CLIENT_BUFFER);
            }
            let read = match deadline {
                None if *shutdown.borrow() => return Ok(None),
                None => tokio::select! {
                    r = tokio::time::timeout(KEEPALIVE_IDLE, self.io.read_buf(&mut self.buf)) => r,
                    _ = shutdown.changed() => return Ok(None),
                },
                Some(at) => tokio::time::timeout_at(at, self.io.read_buf(&mut self.buf)).await,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                // Timed out, closed or failed: nothing to answer.
                _ => return Ok(None),
            }
        }
    }

    /// Answers a head that could not be parsed, then closes.
    async fn refuse_head(&mut self, e: HeadError, max_head: usize) {
        let (status, kind, message) = match e {
            HeadError::TooLarge => (
                431,
                "headers_too_large",
                format!("request headers exceed {max_head} bytes"),
            ),
            HeadError::Malformed(what) => {
                (400, "bad_request", format!("malformed request: {what}"))
            }
        };
        exchange::refuse_unparsed(self, status, kind, &message).await;
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
            let mut sink = [0u8; 8192];
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
