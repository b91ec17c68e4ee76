//! Test harness: generated certificates, the real `switchyard` binary in a
//! temporary directory, upstreams in-process or in child processes, and
//! HTTPS clients. Every child process is killed when its handle drops,
//! so a failing assertion cannot leave processes behind.
#![allow(dead_code)] // each test binary uses a different part of it

pub mod upstream;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

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

/// A port that was free a moment ago (the proxy needs fixed ports in its
/// config; upstreams use port 0 directly).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
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

/// A running `switchyard run`, killed on drop.
pub struct Proxy {
    child: Child,
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
    /// is replaced with a free port. `[health]` defaults to [`FAST_HEALTH`].
    pub async fn start(body: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = generate_certs(dir.path());
        let (https, admin) = (loopback(free_port()), loopback(free_port()));
        let http_port = free_port();
        let http = body.contains("{http_port}").then(|| loopback(http_port));
        let mut config = format!(
            "[server]\nthreads = 2\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n\
             run_dir = \"run\"\nstate_file = \"run/state.json\"\n\n\
             [listeners.https]\naddress = \"{https}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n\
             [admin]\naddress = \"{admin}\"\n\n"
        );
        if !body.contains("[health]") {
            config.push_str(FAST_HEALTH);
        }
        config.push_str(&body.replace("{http_port}", &http_port.to_string()));
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn switchyard");
        let proxy = Proxy {
            child,
            https,
            admin,
            http,
            certs,
            dir,
        };
        proxy.wait_listening().await;
        proxy
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let metrics = format!("http://{}/metrics", self.admin);
        loop {
            let admin_up = reqwest::get(&metrics)
                .await
                .is_ok_and(|r| r.status() == 200);
            if admin_up && tokio::net::TcpStream::connect(self.https).await.is_ok() {
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
        self.client_builder().build().expect("client")
    }

    /// An HTTPS client limited to HTTP/1.1.
    pub fn client_h1(&self) -> reqwest::Client {
        self.client_builder().http1_only().build().expect("client")
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&self.certs.pem).expect("parse cert");
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
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("switchyard.toml")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// What one request of a load run saw.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub instance: String,
}

/// Sends `total` POSTs to `url` from `concurrency` tasks.
pub async fn load(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    total: usize,
) -> Vec<Result<Outcome, String>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                out.push(send(&client, &url).await);
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(batch) = tasks.join_next().await {
        all.extend(batch.expect("load task"));
    }
    all
}

pub async fn send(client: &reqwest::Client, url: &str) -> Result<Outcome, String> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"input":"hello"}"#)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let instance = resp
        .headers()
        .get("x-switchyard-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    resp.bytes().await.map_err(|e| format!("{e:?}"))?;
    Ok(Outcome { status, instance })
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
            .args(["--exact", entry_test, "--nocapture", "--test-threads", "1"])
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
