//! Ports for servers the tests start by address (the proxy's listeners, a
//! redis-server, an address known to be closed).
//!
//! Binding port 0 and closing again hands out a port from the kernel's
//! ephemeral range, which the kernel may give away again at once: as the
//! source port of any outgoing connection (the proxy's own health checks,
//! another test's client), which makes the server's bind fail, or, to a
//! client connecting to that very port before the server listens, as a
//! connection to itself that reads its own request back. These ports come
//! from below the ephemeral range, which the kernel never hands out by
//! itself, each one once per test process; a bind check skips any that
//! another process holds. The backend's tests include this file too.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port used; the CI stack's fixed ports lie below it.
const FIRST: u32 = 20_000;

/// A port on 127.0.0.1 that nothing listens on, outside the kernel's
/// ephemeral range.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_low().max(FIRST + 1_000);
    let span = end - FIRST;
    // Test binaries that run at once (the backend's and a stack's helper
    // scripts, say) start at different places.
    let start = std::process::id() * 7_919 % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % span;
        let port = u16::try_from(port).expect("ports fit in u16");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{end}");
}

/// The low end of `net.ipv4.ip_local_port_range` (Linux's default 32768).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
