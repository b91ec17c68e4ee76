//! The plain-HTTP listener's accept loop: ours, not Pingora's.
//!
//! Pingora spawns one task per accepted socket whose future holds the TLS
//! handshake and its event handling inline, the same type on a plain
//! listener: 8.8 KiB per idle connection (massif, docs/security.md), past
//! the 8 KiB an idle connection may cost. This loop spawns the HTTP/1.x
//! engine's future alone. The socket still lives in Pingora's table of
//! listening sockets, so a graceful upgrade hands it over like the others.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::listener::Listener;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

use super::{Counted, Frontend};

/// As Pingora's listeners: the kernel's cap (somaxconn) applies anyway.
const BACKLOG: u32 = 65535;
/// Pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The service that serves `listeners.http` in `serve` mode.
pub struct PlainListener {
    address: String,
    app: Arc<Frontend>,
    threads: usize,
}

impl PlainListener {
    pub fn new(address: String, app: Arc<Frontend>, threads: usize) -> Self {
        Self {
            address,
            app,
            threads,
        }
    }
}

#[async_trait]
impl Service for PlainListener {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let listener = match listen(&self.address, fds) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                // Pingora's own listeners panic here; a clear exit is kinder.
                tracing::error!(address = %self.address, "listeners.http.address: cannot listen: {e}");
                std::process::exit(1);
            }
        };
        let mut loops = JoinSet::new();
        for _ in 0..listeners_per_fd.max(1) {
            let (l, app, s) = (listener.clone(), self.app.clone(), shutdown.clone());
            loops.spawn(accept_loop(l, app, s));
        }
        while loops.join_next().await.is_some() {}
    }

    fn name(&self) -> &str {
        "switchyard http"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.address.clone()])
    }
}

/// The socket an old instance handed over, else a new one, registered in
/// the table so that the next upgrade hands it on.
fn listen(address: &str, fds: Option<ListenFds>) -> io::Result<Listener> {
    let inherited = fds.as_ref().and_then(|t| t.lock().get(address).copied());
    let listener = match inherited {
        Some(fd) => {
            // SAFETY: the table holds listening sockets the old instance
            // sent, and nothing else in this process uses this one.
            let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            std.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(std)?
        }
        None => bind(address)?,
    };
    if inherited.is_none() {
        if let Some(table) = &fds {
            table.lock().add(address.to_string(), listener.as_raw_fd());
        }
    }
    Ok(listener.into())
}

fn bind(address: &str) -> io::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr = address
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: Arc<Listener>, app: Arc<Frontend>, mut shutdown: ShutdownWatch) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
                continue;
            }
        };
        let mut stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept on the plain-HTTP listener failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Past the cap the socket is dropped, i.e. closed, unread.
        let Some(counted) = app.admit() else {
            continue;
        };
        let _ = stream.set_nodelay();
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _counted: Counted = counted;
            crate::h1::serve(app, Box::new(stream), shutdown).await;
        });
    }
}
