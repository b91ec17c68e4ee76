//! Connections to backends: opened with a deadline, and kept idle per
//! backend for reuse.
//!
//! No task watches an idle connection (Pingora spawns one per release,
//! about 5 % of a request's instructions): a connection the backend
//! closed is found by a non-blocking read when it is taken, and a
//! request that still fails on a reused connection is sent once more on
//! a fresh one.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections kept per backend; more are closed when released.
const IDLE_PER_BACKEND: usize = 256;
/// Idle connections kept over all backends together (Pingora's h2 path
/// keeps as many).
const IDLE_TOTAL: usize = 4096;

/// Idle connections held right now, over every backend.
static IDLE_HELD: AtomicUsize = AtomicUsize::new(0);

/// An open connection to a backend with its read buffer.
pub struct Conn {
    pub io: TcpStream,
    pub buf: BytesMut,
    /// Taken from the idle set rather than freshly opened.
    pub reused: bool,
    /// May go back to the idle set once its response is read.
    pub reusable: bool,
    idle_since: Instant,
}

impl Conn {
    pub async fn open(addr: SocketAddr, wait: Duration) -> io::Result<Conn> {
        let io = match tokio::time::timeout(wait, TcpStream::connect(addr)).await {
            Ok(io) => io?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        // Heads and small bodies go out in one write each; Nagle would
        // hold the next one back for the previous one's ACK.
        io.set_nodelay(true)?;
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            reused: false,
            reusable: true,
            idle_since: Instant::now(),
        })
    }

    /// Whether the backend has not closed it, checked without blocking:
    /// a readable idle connection is either at EOF or holds stray bytes,
    /// and both make it unusable.
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The idle connections to one backend, most recently used last.
#[derive(Default)]
pub struct Idle {
    conns: Mutex<VecDeque<Conn>>,
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection idle for less than `max_idle`
    /// and still open.
    pub fn take(&self, max_idle: Duration) -> Option<Conn> {
        let mut conns = self.lock();
        while let Some(mut conn) = conns.pop_back() {
            IDLE_HELD.fetch_sub(1, Relaxed);
            if conn.idle_since.elapsed() < max_idle && conn.is_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request, first closing connections idle
    /// for `max_idle` or more.
    pub fn put(&self, mut conn: Conn, max_idle: Duration) {
        conn.idle_since = Instant::now();
        let mut conns = self.lock();
        while conns
            .front()
            .is_some_and(|c| c.idle_since.elapsed() >= max_idle)
        {
            conns.pop_front();
            IDLE_HELD.fetch_sub(1, Relaxed);
        }
        if conns.len() < IDLE_PER_BACKEND && IDLE_HELD.load(Relaxed) < IDLE_TOTAL {
            IDLE_HELD.fetch_add(1, Relaxed);
            conns.push_back(conn);
        }
    }

    /// Closes connections idle for `max_idle` or more; the health checker
    /// calls this so that a backend no longer sent traffic is not left
    /// with half-closed sockets.
    pub fn prune(&self, max_idle: Duration) {
        let mut conns = self.lock();
        let before = conns.len();
        conns.retain(|c| c.idle_since.elapsed() < max_idle);
        IDLE_HELD.fetch_sub(before - conns.len(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn idle_connections_are_reused_until_closed_or_stale() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wait = Duration::from_secs(1);
        let idle = Idle::default();

        let conn = Conn::open(addr, wait).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        idle.put(conn, wait);
        let conn = idle.take(wait).expect("an open connection is reused");
        assert!(conn.reused);

        idle.put(conn, wait);
        drop(server_side);
        // Let the reactor see the FIN.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(idle.take(wait).is_none(), "a closed connection is dropped");

        let conn = Conn::open(addr, wait).await.unwrap();
        idle.put(conn, Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
        idle.prune(Duration::from_millis(10));
        // Young enough for `take`'s own limit: only the prune removed it.
        assert!(idle.take(wait).is_none(), "a stale connection is pruned");
    }
}
