//! Test harness: generated certificates, the real `switchyard` binary in a
//! temporary directory, upstreams in-process or in child processes, and
//! HTTPS clients. Every child process is killed when its handle drops,
//! so a failing assertion cannot leave processes behind.
#![allow(dead_code)] // each test binary uses a different part of it

pub mod matrix;
pub mod ports;
pub mod raw;
pub mod redis;
pub mod rollout;
pub mod upstream;
pub mod venv;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use matrix::{Proto, Via};
pub use ports::free_port;
pub use upstream::Upstream;

/// A throwaway CA and a `localhost`/127.0.0.1 server certificate it signed
/// (webpki refuses a self-signed CA certificate as a server certificate).
pub struct Certs {
    /// Server certificate and key, as the proxy loads them.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificate clients trust, as a file and as PEM.
    pub ca: PathBuf,
    pub pem: Vec<u8>,
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` (ECDSA P-256) into `dir`.
pub fn generate_certs(dir: &Path) -> Certs {
    let p = |name: &str| dir.join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-days", "2", "-subj", "/CN=switchyard test CA"],
        ],
        &[("-keyout", p("ca.key")), ("-out", p("ca.pem"))],
    );
    openssl(
        &[&["req"], &ec[..], &["-subj", "/CN=localhost"]],
        &[("-keyout", p("key.pem")), ("-out", p("server.csr"))],
    );
    let ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
               extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
    std::fs::write(p("server.ext"), ext).expect("write extensions");
    openssl(
        &[&["x509", "-req", "-days", "2", "-CAcreateserial"]],
        &[
            ("-in", p("server.csr")),
            ("-CA", p("ca.pem")),
            ("-CAkey", p("ca.key")),
            ("-extfile", p("server.ext")),
            ("-out", p("cert.pem")),
        ],
    );
    let pem = std::fs::read(p("ca.pem")).expect("read CA cert");
    Certs {
        cert: p("cert.pem"),
        key: p("key.pem"),
        ca: p("ca.pem"),
        pem,
    }
}

fn openssl(args: &[&[&str]], files: &[(&str, PathBuf)]) {
    let mut cmd = Command::new("openssl");
    for group in args {
        cmd.args(*group);
    }
    for (flag, path) in files {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.output().expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `[pools.<name>]` with the given backends and weights.
pub fn pool(name: &str, backends: &[(SocketAddr, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(addr, w)| format!("{{ address = \"{addr}\", weight = {w} }}"))
        .collect();
    format!("[pools.{name}]\nbackends = [{}]\n", list.join(", "))
}

/// Fast health settings so tests converge in well under a second.
pub const FAST_HEALTH: &str =
    "[health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\n";

/// The admin token every test proxy is configured with.
pub const ADMIN_TOKEN: &str = "test-token";

/// A running `switchyard run`, killed on drop.
pub struct Proxy {
    child: Child,
    /// Instances replaced by [`Proxy::upgrade`], still finishing up.
    retired: Vec<Child>,
    /// The generated sections preceding the test's body.
    header: String,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// The plain-HTTP listener, when the config body used `{http_port}`.
    pub http: Option<SocketAddr>,
    pub certs: Certs,
    pub dir: TempDir,
}

impl Proxy {
    /// Starts the proxy with `body` appended to generated `[server]`,
    /// `[listeners.https]` and `[admin]` sections. `{http_port}` in `body`
    /// is replaced with a free port. `[health]` defaults to [`FAST_HEALTH`]
    /// and `[server]` to [`TEST_SERVER`].
    pub async fn start(body: &str) -> Proxy {
        Proxy::start_with("", body).await
    }

    /// [`Proxy::start`] with `listeners` (more listener sections, which may
    /// use `{http_port}`) in the generated part, so that
    /// [`Proxy::rewrite`] keeps them.
    pub async fn start_with(listeners: &str, body: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = generate_certs(dir.path());
        let (https, admin) = (loopback(free_port()), loopback(free_port()));
        let http_port = free_port();
        let http = [listeners, body]
            .iter()
            .any(|s| s.contains("{http_port}"))
            .then(|| loopback(http_port));
        let with_port = |s: &str| s.replace("{http_port}", &http_port.to_string());
        let header = format!(
            "[listeners.https]\naddress = \"{https}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n\
             [admin]\naddress = \"{admin}\"\ntoken_file = \"admin-token\"\n\n{}",
            with_port(listeners)
        );
        std::fs::write(dir.path().join("admin-token"), ADMIN_TOKEN).expect("write token");
        std::fs::write(
            dir.path().join("switchyard.toml"),
            compose(&header, &with_port(body)),
        )
        .expect("write config");
        let child = spawn_switchyard(dir.path(), false);
        let proxy = Proxy {
            child,
            retired: Vec::new(),
            header,
            https,
            admin,
            http,
            certs,
            dir,
        };
        proxy.wait_listening().await;
        proxy
    }

    /// Replaces the test's part of the configuration the way editors do
    /// (write a temporary file, rename it over the original).
    pub fn rewrite(&self, body: &str) {
        let tmp = self.dir.path().join(".switchyard.toml.tmp");
        std::fs::write(&tmp, compose(&self.header, body)).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    /// A graceful binary upgrade: start a second instance with `--upgrade`,
    /// then SIGQUIT the running one so it hands its listening sockets over.
    pub async fn upgrade(&mut self) {
        let sock = self.dir.path().join("run/upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let new = spawn_switchyard(self.dir.path(), true);
        let ready = eventually(Duration::from_secs(10), || sock.exists()).await;
        assert!(
            ready,
            "new instance never opened its upgrade socket; log:\n{}",
            self.log()
        );
        let old = std::mem::replace(&mut self.child, new);
        signal(&old, libc::SIGQUIT);
        self.retired.push(old);
    }

    /// Waits until every instance replaced by [`Proxy::upgrade`] has exited.
    pub async fn wait_retired(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let dir = self.dir.path().to_path_buf();
        for child in &mut self.retired {
            while child.try_wait().expect("try_wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "old instance still running; log:\n{}",
                    read_log(&dir)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits for the running instance to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "proxy still running; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `sig` to the running instance.
    pub fn signal(&self, sig: i32) {
        signal(&self.child, sig);
    }

    /// An admin API call with the bearer token; returns status and JSON.
    pub async fn admin(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        self.admin_as(method, path, Some(ADMIN_TOKEN)).await
    }

    pub async fn admin_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = reqwest::Client::new()
            .request(method, format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(60));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let metrics = format!("http://{}/metrics", self.admin);
        loop {
            let admin_up = reqwest::get(&metrics)
                .await
                .is_ok_and(|r| r.status() == 200);
            let plain_up = match self.http {
                Some(addr) => accepts(addr).await,
                None => true,
            };
            if admin_up && plain_up && accepts(self.https).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// An HTTPS client trusting this proxy's certificate (h2 via ALPN).
    pub fn client(&self) -> reqwest::Client {
        self.client_builder(&self.certs.pem)
            .build()
            .expect("client")
    }

    /// An HTTPS client limited to HTTP/1.1.
    pub fn client_h1(&self) -> reqwest::Client {
        self.client_builder(&self.certs.pem)
            .http1_only()
            .build()
            .expect("client")
    }

    /// An HTTPS client trusting only the CA certificate `ca_pem`.
    pub fn client_trusting(&self, ca_pem: &[u8]) -> reqwest::Client {
        self.client_builder(ca_pem).build().expect("client")
    }

    fn client_builder(&self, ca_pem: &[u8]) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(ca_pem).expect("parse cert");
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .resolve("localhost", self.https)
            .timeout(Duration::from_secs(10))
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("scrape metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// The running instance's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("switchyard.toml")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for child in self.retired.iter_mut().chain([&mut self.child]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
}

/// Short shutdown periods so that tests end quickly.
pub const TEST_SERVER: &str = "[server]\nthreads = 2\ngrace_period = \"1s\"\n\
    shutdown_timeout = \"1s\"\nrun_dir = \"run\"\nstate_file = \"run/state.json\"\n\n";

fn compose(header: &str, body: &str) -> String {
    let default =
        |section: &str, text: &'static str| if body.contains(section) { "" } else { text };
    let (server, health) = (
        default("[server]", TEST_SERVER),
        default("[health]", FAST_HEALTH),
    );
    format!("{server}{header}{health}{body}")
}

/// `switchyard run` on `dir/switchyard.toml`, appending to `dir/proxy.log`.
fn spawn_switchyard(dir: &Path, upgrade: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("proxy.log"))
        .expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("run")
        .arg("--config")
        .arg(dir.join("switchyard.toml"));
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn switchyard")
}

pub fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of the sample `name{labels}` in a Prometheus text scrape.
pub fn metric(scrape: &str, sample: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Keeps `concurrency` clients busy until stopped; collects failures.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    /// Half h2, half HTTP/1.1 over TLS: one client per task, so the load
    /// holds `concurrency` connections, half of them HTTP/1.1 keep-alive,
    /// whose close races h2 does not have.
    pub fn start(proxy: &Proxy, concurrency: usize) -> Load {
        let protos = [Proto::H2, Proto::H1Tls].into_iter().cycle();
        Load::run(protos.take(concurrency).map(|p| proxy.via(p)).collect())
    }

    /// `concurrency` clients of `proto`, one connection each.
    pub fn over(proxy: &Proxy, proto: Proto, concurrency: usize) -> Load {
        Load::run((0..concurrency).map(|_| proxy.via(proto)).collect())
    }

    fn run(vias: Vec<Via>) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for via in vias {
                let flag = flag.clone();
                tasks.spawn(async move {
                    let (mut sent, mut failures) = (0, Vec::new());
                    while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                        sent += 1;
                        match via.outcome("/v1/embeddings").await {
                            Ok(o) if o.status == 200 => {}
                            Ok(o) => failures.push(format!("status {}", o.status)),
                            Err(e) => failures.push(e),
                        }
                    }
                    (sent, failures)
                });
            }
            let (mut sent, mut failures) = (0, Vec::new());
            while let Some(r) = tasks.join_next().await {
                let (s, f) = r.expect("load task");
                sent += s;
                failures.extend(f);
            }
            (sent, failures)
        });
        Load { stop, handle }
    }

    /// Stops the clients: requests sent, and what each failed one got.
    pub async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (sent, failures) = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("load stops")
            .expect("load task");
        assert!(sent > 20, "the load ran ({sent} requests)");
        (sent, failures)
    }

    /// Stops the clients and asserts that every request succeeded.
    pub async fn finish(self) -> usize {
        let (sent, failures) = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {sent} requests failed: {failures:?}",
            failures.len()
        );
        sent
    }
}

/// An upstream in a child process (so a test can SIGKILL it), killed on drop.
pub struct ChildUpstream {
    child: Child,
    pub addr: SocketAddr,
}

const CHILD_ENV: &str = "SWITCHYARD_TEST_CHILD_UPSTREAM";

impl ChildUpstream {
    /// Re-runs this test binary with only `entry_test` selected; that test
    /// calls [`serve_child_upstream_if_requested`], which serves instead of
    /// returning when the environment asks it to.
    pub fn spawn(entry_test: &str, name: &str, delay_ms: u64) -> ChildUpstream {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                entry_test,
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, format!("{name}:{delay_ms}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        // Read on a thread so a child that never reports cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let addr = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| {
                    // libtest may have started the line with "test <name> ... ".
                    let at = l.find("LISTENING ")?;
                    l[at + "LISTENING ".len()..].trim().parse().ok()
                });
            let _ = tx.send(addr);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(addr)) => ChildUpstream { child, addr },
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child upstream {name} did not report its address");
            }
        }
    }

    /// SIGKILL, as a crashing or OOM-killed backend dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildUpstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In a child spawned by [`ChildUpstream::spawn`], serves forever; in a
/// normal test run, returns at once.
pub fn serve_child_upstream_if_requested() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (name, delay) = spec.split_once(':').expect("name:delay");
    let delay: u64 = delay.parse().expect("delay ms");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let up = Upstream::start(name, delay).await;
        // Straight to the fd: the test harness may capture `println!`.
        let mut out = std::io::stdout().lock();
        writeln!(out, "LISTENING {}", up.addr).expect("report address");
        out.flush().expect("flush address");
        drop(out);
        std::future::pending::<()>().await;
    });
}
