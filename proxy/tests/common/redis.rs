//! A throwaway redis-server (no persistence) that can be killed and started
//! again on the same port, and is killed when its handle drops.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = super::free_port();
        let child = Some(spawn(port));
        Redis { port, child }
    }

    /// Starts again on the same port, as a restarted Redis comes back.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            reap(child);
        }
    }

    /// Another signal, e.g. SIGSTOP to hang it with its sockets open.
    pub fn signal(&self, sig: i32) {
        super::signal(self.child.as_ref().expect("redis is running"), sig);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server on `port`, once it accepts connections.
fn spawn(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (scripts/install-deps)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        // The caller's handle does not exist yet: kill it here.
        if Instant::now() > deadline {
            reap(child);
            panic!("redis-server never listened on {port}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}
