//! HTTP/2 abuse battery on the public TLS listener: each test plays one
//! attack with `tests/h2abuse/attack.py` (the Python `h2` package's frame
//! and HPACK layers, on a real TLS connection) against the real binary,
//! while an ordinary h2 client keeps asking for a page. Each asserts what
//! the abuse connection got (GOAWAY, resets, refusals or a close), that
//! the proxy's RSS growth and CPU time stayed under a stated bound, and
//! that the ordinary client was answered 200 within its deadline all along.
//!
//! The venv with the pinned packages (`tests/h2abuse/requirements.txt`) is
//! made under Cargo's target tmp dir on first use and reused after.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{pool, Proxy, Upstream};
use serde_json::Value;

/// `[limits] max_streams` in every test config: small, so that "more
/// streams than advertised" needs few of them.
const MAX_STREAMS: u64 = 16;

/// Bound on the proxy's peak RSS growth during any one attack. Each
/// measured 2-4 MiB (the ordinary client's traffic included); one stream's
/// decoded HPACK bomb alone would be 48 MB, 5,000 accepted reset streams
/// or 700,000 queued SETTINGS ACKs tens of MB.
const MAX_RSS_GROWTH_KIB: u64 = 8 * 1024;

/// How long the ordinary client may wait for each answer under attack.
const BYSTANDER_DEADLINE: Duration = Duration::from_secs(2);

/// The attacks go to `/v1/embeddings` on `up`; the ordinary client asks
/// for `/v1/models` from a backend of its own, so the attack's backend
/// counts only what the attack got through.
fn config(up: &Upstream, bystander: &Upstream, limits: &str) -> String {
    pool("p", &[(up.addr, 1)])
        + &pool("b", &[(bystander.addr, 1)])
        + "[[routes]]\npath_prefix = \"/v1/embeddings\"\npool = \"p\"\n"
        + "[[routes]]\npool = \"b\"\n\n"
        + &format!("[limits]\nmax_streams = {MAX_STREAMS}\n{limits}")
}

/// A proxy in front of a fresh attack backend (answering after
/// `delay_ms`) and a bystander backend, with `limits` and `more` sections.
async fn setup(delay_ms: u64, limits: &str, more: &str) -> (Upstream, Upstream, Proxy) {
    let up = Upstream::start("up", delay_ms).await;
    let bystander = Upstream::start("bystander", 0).await;
    let proxy = Proxy::start(&(config(&up, &bystander, limits) + more)).await;
    (up, bystander, proxy)
}

/// The venv's python, made once per target dir and requirements.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| common::venv::python("h2abuse-venv", &driver_dir()))
}

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2abuse")
}

/// Runs one attack; returns the driver's JSON report.
async fn attack(proxy: &Proxy, name: &str, args: &[&str]) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(driver_dir().join("attack.py"))
        .arg(name)
        .arg("--port")
        .arg(proxy.https.port().to_string())
        .arg("--ca")
        .arg(&proxy.certs.ca)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A failing assertion or a timeout drops the child: no leftovers.
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn attack.py");
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("attack {name} did not finish"))
        .expect("attack.py ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "attack {name} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("attack {name} report {stdout:?}: {e}"))
}

/// The proxy's memory and CPU as /proc reports them.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    peak_rss_kib: u64,
    cpu: Duration,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the parenthesised name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a system constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("clock ticks");
    Usage {
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        cpu: Duration::from_millis(ticks * 1000 / hz),
    }
}

/// An ordinary h2 client asking for a page every 20 ms while an attack
/// runs; every answer must be a 200 within [`BYSTANDER_DEADLINE`].
struct Bystander {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Duration, Vec<String>)>,
}

impl Bystander {
    fn start(proxy: &Proxy) -> Bystander {
        let client = proxy.client();
        let url = proxy.url("/v1/models");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), served.clone());
        let task = tokio::spawn(async move {
            let (mut slowest, mut failures) = (Duration::ZERO, Vec::new());
            while !flag.load(SeqCst) {
                let t = Instant::now();
                let sent = client.get(&url).timeout(BYSTANDER_DEADLINE).send().await;
                match sent {
                    Ok(r) if r.status() == 200 && r.version() == reqwest::Version::HTTP_2 => {
                        count.fetch_add(1, SeqCst);
                    }
                    Ok(r) => failures.push(format!("{:?} {}", r.version(), r.status())),
                    Err(e) => failures.push(format!("{e:?}")),
                }
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (slowest, failures)
        });
        Bystander { stop, served, task }
    }

    /// Waits for the client's first answer.
    async fn wait_served(&self) {
        let served =
            common::eventually(Duration::from_secs(5), || self.served.load(SeqCst) > 0).await;
        assert!(served, "the ordinary client was never served");
    }

    /// Stops the client; asserts it was served throughout.
    async fn finish(self, attack: &str) -> Duration {
        self.stop.store(true, SeqCst);
        let (slowest, failures) = self.task.await.expect("bystander task");
        let served = self.served.load(SeqCst);
        assert!(
            failures.is_empty(),
            "{attack}: the ordinary client failed {} times ({served} served): {failures:?}",
            failures.len()
        );
        assert!(
            served >= 3,
            "{attack}: the ordinary client was served {served} times"
        );
        slowest
    }
}

/// Plays `name` with a bystander alongside and prints what it cost the
/// proxy (the figures quoted in docs/security.md); asserts that the peak
/// RSS grew at most [`MAX_RSS_GROWTH_KIB`] and the CPU time spent stayed
/// within `max_cpu`. Returns the driver's report.
async fn play(proxy: &Proxy, name: &str, args: &[&str], max_cpu: Duration) -> Value {
    let pid = proxy.pid();
    let bystander = Bystander::start(proxy);
    // Measure from a warm proxy: its first h2 connection and TLS session
    // cost the same with or without an attack.
    bystander.wait_served().await;
    // "5" resets the peak (VmHWM) to the current RSS (proc(5)).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset peak RSS");
    let before = usage(pid);
    let report = attack(proxy, name, args).await;
    let slowest = bystander.finish(name).await;
    let after = usage(pid);
    let growth = after.peak_rss_kib.saturating_sub(before.rss_kib);
    let cpu = after.cpu.saturating_sub(before.cpu);
    eprintln!(
        "h2abuse {name}: RSS {} -> peak {} KiB (+{growth} KiB), CPU {} ms, slowest ordinary answer {} ms\n  {report}",
        before.rss_kib,
        after.peak_rss_kib,
        cpu.as_millis(),
        slowest.as_millis()
    );
    assert!(
        growth <= MAX_RSS_GROWTH_KIB,
        "{name}: RSS grew {growth} KiB (bound {MAX_RSS_GROWTH_KIB} KiB)"
    );
    assert!(cpu <= max_cpu, "{name}: {cpu:?} of CPU (bound {max_cpu:?})");
    report
}

fn count(report: &Value, map: &str, key: &str) -> u64 {
    report[map][key].as_u64().unwrap_or(0)
}

/// Thousands of streams opened and cancelled at once (CVE-2023-44487): the
/// server must stop the connection early (GOAWAY ENHANCE_YOUR_CALM, as
/// h2's pending-reset cap does) rather than work through every stream, and
/// the backend must see only a sliver of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off() {
    let (up, _bystander, proxy) = setup(0, "", "").await;
    let report = play(
        &proxy,
        "rapid-reset",
        &["--streams", "5000", "--seconds", "3"],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(report["goaway"], "ENHANCE_YOUR_CALM", "{report}");
    let reached = up.control.requests();
    eprintln!("h2abuse rapid-reset: {reached} of 5000 requests reached the backend");
    assert!(
        reached <= 64,
        "{reached} of 5000 reset requests reached the backend"
    );
}

/// CONTINUATION frames without END_HEADERS, as fast as the client can
/// write them: the server must end the connection once the header list
/// passes its limit, not keep decoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    let (up, _bystander, proxy) = setup(0, "", "").await;
    let report = play(
        &proxy,
        "continuation",
        &["--seconds", "3"],
        Duration::from_millis(500),
    )
    .await;
    assert!(
        report["closed"] == true && !report["goaway"].is_null(),
        "{report}"
    );
    let sent = report["sent_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent < 4 << 20,
        "the server took {sent} bytes of one header block"
    );
    assert_eq!(up.control.requests(), 0);
}

/// A 4 KB field put in the HPACK table and referenced 12,000 times per
/// header block (48 MB decoded from 12 KB sent), on 50 streams: each is
/// refused (431, a reset or the connection), none reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_is_refused() {
    let (up, _bystander, proxy) = setup(0, "", "").await;
    let report = play(
        &proxy,
        "hpack-bomb",
        &["--streams", "50", "--seconds", "5"],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(count(&report, "status", "200"), 0, "{report}");
    let refused = count(&report, "status", "431")
        + report["rst"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    assert!(
        refused == 50 || !report["goaway"].is_null(),
        "every bomb must be refused: {report}"
    );
    assert_eq!(up.control.requests(), 0);
}

/// SETTINGS frames sent nonstop without reading the ACKs: the server may
/// answer each (then the unread ACKs must hold it back, not pile up) or
/// GOAWAY; either way its memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_bounded() {
    flood("settings-flood", "settings_acks").await;
}

/// PING frames sent nonstop without reading the PONGs; as SETTINGS above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_bounded() {
    flood("ping-flood", "ping_acks").await;
}

async fn flood(name: &str, acks: &str) {
    let (_up, _bystander, proxy) = setup(0, "", "").await;
    let report = play(
        &proxy,
        name,
        &["--seconds", "3"],
        Duration::from_millis(1500),
    )
    .await;
    let (sent, got) = (
        report["sent_frames"].as_u64().unwrap_or(0),
        report[acks].as_u64().unwrap_or(0),
    );
    assert!(
        report["goaway"] == "ENHANCE_YOUR_CALM" || got + 1 >= sent,
        "{name}: {got} acks for {sent} frames: {report}"
    );
}

/// A client that advertises a stream window of 0 and never opens it: its
/// responses cannot be sent, so the streams must be given up (reset, or the
/// connection closed) within the time budget, not held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_stall_is_given_up() {
    let timeouts = "[timeouts]\nread = \"1s\"\ntotal = \"2s\"\nclient_idle = \"2s\"\n";
    let (_up, _bystander, proxy) = setup(0, "", timeouts).await;
    let streams = MAX_STREAMS.to_string();
    let report = play(
        &proxy,
        "zero-window",
        &["--streams", &streams, "--seconds", "6"],
        Duration::from_millis(500),
    )
    .await;
    let reset = report["streams_reset"].as_u64().unwrap_or(0);
    assert!(
        reset == MAX_STREAMS || report["closed"] == true,
        "stalled streams still held after 6 s: {report}"
    );
}

/// Three times SETTINGS_MAX_CONCURRENT_STREAMS opened at once against a
/// slow backend: the advertised number are served, the rest refused with
/// RST_STREAM(REFUSED_STREAM) (RFC 9113 §5.1.2), before reaching the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_advertised_limit_are_refused() {
    let (_up, _bystander, proxy) = setup(800, "", "").await;
    let streams = (3 * MAX_STREAMS).to_string();
    let report = play(
        &proxy,
        "excess-streams",
        &["--streams", &streams, "--seconds", "5"],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(count(&report, "status", "200"), MAX_STREAMS, "{report}");
    assert_eq!(
        count(&report, "rst", "REFUSED_STREAM"),
        2 * MAX_STREAMS,
        "{report}"
    );
}

/// An h2 connection that says nothing after its preface is closed after
/// `timeouts.client_idle`, as an idle HTTP/1.1 connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_is_closed() {
    let (_up, _bystander, proxy) = setup(0, "", "[timeouts]\nclient_idle = \"1s\"\n").await;
    let report = attack(&proxy, "idle", &["--seconds", "5"]).await;
    let after = report["closed_after_s"].as_f64().unwrap_or(f64::MAX);
    assert!(
        (0.9..3.0).contains(&after),
        "idle h2 connection closed after {after} s: {report}"
    );
}

/// What the backend saw of a request carrying `x_under` and `x-dash`,
/// sent over `client`; or the proxy's status and JSON body when refused.
async fn underscore_request(proxy: &Proxy, client: reqwest::Client) -> (u16, Value) {
    let resp = client
        .get(proxy.url("/v1/models"))
        .header("x_under", "1")
        .header("x-dash", "1")
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let has_id = resp.headers().contains_key("x-request-id");
    let body: Value = resp.json().await.expect("JSON body");
    assert!(has_id, "no x-request-id: {body}");
    (status, body)
}

fn forwarded(echo: &Value, name: &str) -> bool {
    echo["header_names"]
        .as_array()
        .is_some_and(|names| names.iter().any(|n| n == name))
}

/// `limits.underscores_in_headers` acts alike on h2 and HTTP/1.1: `drop`
/// (the default) removes the header, `refuse` answers 400 with the JSON
/// error body, `forward` passes it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_header_names_follow_the_policy_on_h2_as_on_h1() {
    for policy in ["drop", "refuse", "forward"] {
        let limits = format!("underscores_in_headers = \"{policy}\"\n");
        let (_up, _bystander, proxy) = setup(0, &limits, "").await;
        for (version, client) in [("h2", proxy.client()), ("h1", proxy.client_h1())] {
            let (status, body) = underscore_request(&proxy, client).await;
            let what = format!("{policy} on {version}: {status} {body}");
            match policy {
                "refuse" => {
                    assert_eq!(status, 400, "{what}");
                    assert_eq!(body["error"]["type"], "bad_request", "{what}");
                }
                _ => {
                    assert_eq!(status, 200, "{what}");
                    assert!(forwarded(&body, "x-dash"), "{what}");
                    assert_eq!(forwarded(&body, "x_under"), policy == "forward", "{what}");
                }
            }
        }
    }
}

/// A client that negotiates h2 and never sends the connection preface is
/// closed after `timeouts.client_head`, as a silent HTTP/1.1 one is
/// (Pingora's h2 handshake has no deadline of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_without_preface_is_closed() {
    let (_up, _bystander, proxy) = setup(0, "", "[timeouts]\nclient_head = \"1s\"\n").await;
    let report = attack(&proxy, "silent", &["--seconds", "5"]).await;
    let after = report["closed_after_s"].as_f64().unwrap_or(f64::MAX);
    assert!(
        (0.9..3.0).contains(&after),
        "silent h2 connection closed after {after} s: {report}"
    );
}
