//! The public listeners: the application behind them, which caps the
//! client connections open at once and hands each connection to the
//! front end its ALPN protocol asks for ([`crate::h2`] or [`crate::h1`]),
//! and the plain-HTTP listener's own accept loop ([`plain`]).
//!
//! A connection over `limits.max_connections` is closed as soon as it is
//! accepted, before any TLS work. TLS connections are counted from accept
//! to close, handshake included: a tracer attached before the handshake
//! uncounts them when Pingora drops the socket, also after a failed or
//! timed-out handshake, which never reaches this application.

mod plain;

pub use plain::PlainListener;

use std::sync::atomic::{AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{ConnectionFilter, PreTlsProcess};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::{Tracer, Tracing};
use prometheus::IntCounter;

use crate::shared::Shared;

/// Client connections open right now, over both public listeners.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Client connections open right now (for the metrics).
pub fn open_connections() -> usize {
    OPEN.load(Relaxed)
}

/// The application of the public listeners.
pub struct Frontend {
    /// Offers h2: the TLS listener does, through ALPN; the plain one has no ALPN.
    h2: bool,
    pub(crate) shared: Arc<Shared>,
    /// `requests_total{pool="none",backend="none"}`: answered before routing.
    pub(crate) unrouted: [IntCounter; 6],
}

impl Frontend {
    /// The application behind the TLS listener: h2 or HTTP/1.x by ALPN.
    pub fn tls(shared: Arc<Shared>) -> Self {
        Self::with(true, shared)
    }

    /// The application behind the plain-HTTP listener: HTTP/1.x only.
    pub fn plain(shared: Arc<Shared>) -> Self {
        Self::with(false, shared)
    }

    fn with(h2: bool, shared: Arc<Shared>) -> Self {
        let unrouted = shared.metrics.requests_by_class("none", "none");
        Self {
            h2,
            shared,
            unrouted,
        }
    }

    /// The server is shutting down or handing its sockets over.
    pub fn closing(&self) -> bool {
        self.shared.closing.load(Ordering::Relaxed)
    }

    /// [`admit`], with a guard that uncounts the connection. (Not
    /// `then_some(Counted)`: that builds, and drops, a guard on refusal.)
    fn admit(&self) -> Option<Counted> {
        if admit(&self.shared) {
            Some(Counted)
        } else {
            None
        }
    }
}

/// Counts a new connection, or refuses it when `limits.max_connections`
/// are open already.
fn admit(shared: &Shared) -> bool {
    let max = shared.active().config.limits.max_connections;
    if OPEN.fetch_add(1, Relaxed) < max {
        return true;
    }
    OPEN.fetch_sub(1, Relaxed);
    shared.metrics.connections_refused.inc();
    false
}

#[async_trait]
impl ServerApp for Frontend {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Only TLS connections come through Pingora, each carrying its
        // own counter (`CountTls`); plain ones come from `PlainListener`.
        if self.h2 && stream.selected_alpn_proto() == Some(ALPN::H2) {
            crate::h2::serve(self.clone(), stream, shutdown.clone()).await;
        } else {
            crate::h1::serve(self.clone(), stream, shutdown.clone()).await;
        }
        None
    }
}

/// Admits a TLS connection at accept time, or closes it there when
/// `limits.max_connections` are open already.
pub struct Gate {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl Gate {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self { shared })
    }
}

#[async_trait]
impl ConnectionFilter for Gate {
    async fn should_accept(&self, _addr: Option<&std::net::SocketAddr>) -> bool {
        admit(&self.shared)
    }
}

/// One admitted connection; uncounted when dropped.
#[derive(Debug)]
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Relaxed);
    }
}

/// Attaches the count to a TLS connection's socket before its handshake,
/// so that it ends with the socket whatever becomes of the handshake.
#[derive(Debug)]
pub struct CountTls;

#[async_trait]
impl PreTlsProcess for CountTls {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        stream.tracer = Some(Tracer(Box::new(TlsCount)));
        Ok(())
    }
}

/// Pingora calls `on_disconnected` when it drops the socket.
#[derive(Debug)]
struct TlsCount;

impl Tracing for TlsCount {
    fn on_connected(&self) {}

    fn on_disconnected(&self) {
        OPEN.fetch_sub(1, Relaxed);
    }

    fn boxed_clone(&self) -> Box<dyn Tracing> {
        // Pingora clones tracers only for upstream peers; a clone must not
        // uncount the connection a second time.
        Box::new(Untraced)
    }
}

#[derive(Debug)]
struct Untraced;

impl Tracing for Untraced {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {}
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(Untraced)
    }
}
