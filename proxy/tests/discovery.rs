//! Pools from DNS: a real DNS server (tests/dns/server.py, dnslib) on a
//! loopback port answers from a zone the tests edit while the real proxy
//! runs. A record added takes traffic after `rise` passing checks, a
//! record removed drains without failing a request, and a SERVFAIL keeps
//! the last good set.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{metric, Load, Proxy, Upstream};
use serde_json::{json, Value};

/// The TTL the zone gives every record.
const TTL_S: u64 = 1;

/// The test DNS server, killed on drop.
struct Dns {
    child: Child,
    zone: PathBuf,
    addr: SocketAddr,
}

impl Dns {
    fn start(dir: &Path, zone: &Value) -> Dns {
        let path = dir.join("zone.json");
        write_zone(&path, zone);
        let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dns");
        let mut child = Command::new(common::venv::python("dns-venv", &driver))
            .arg(driver.join("server.py"))
            .arg("--zone")
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the DNS server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read port");
        let port: u16 = line.trim().parse().expect("the server prints its port");
        Dns {
            child,
            zone: path,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// Replaces the zone at once (written aside, renamed over).
    fn serve(&self, zone: &Value) {
        write_zone(&self.zone, zone);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_zone(path: &Path, zone: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, zone.to_string()).expect("write zone");
    std::fs::rename(&tmp, path).expect("rename zone");
}

/// `_api._tcp.test.` with one SRV record per upstream (all on `up.test.`,
/// 127.0.0.1), and `up.test.` itself.
fn srv_zone(ups: &[&Upstream]) -> Value {
    let targets: Vec<Value> = ups
        .iter()
        .map(|u| json!([u.addr.port(), "up.test."]))
        .collect();
    json!({
        "ttl": TTL_S,
        "names": {
            "up.test.": {"A": ["127.0.0.1"]},
            "_api._tcp.test.": {"SRV": targets},
        },
    })
}

/// One pool, `api`, from `dns`, asking `server` with a 1 s floor.
fn config(server: &Dns, dns: &str) -> String {
    format!(
        "[discovery]\nnameservers = [\"{}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"5s\"\n\n\
         [pools.api]\ndns = \"{dns}\"\n\n[[routes]]\npath_prefix = \"/\"\npool = \"api\"\n",
        server.addr
    )
}

/// A sample of the proxy's metrics, 0 when absent.
async fn sample(proxy: &Proxy, name: &str) -> f64 {
    metric(&proxy.metrics().await, name).unwrap_or(0.0)
}

/// Scrapes until `name` reaches `want`; how long that took, or `None`
/// after `limit`.
async fn wait_for(proxy: &Proxy, name: &str, want: f64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if sample(proxy, name).await == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

const ADDRESSES: &str = "switchyard_discovery_addresses{pool=\"api\"}";

/// Sends `n` requests one after the other; all must succeed.
async fn send(proxy: &Proxy, n: usize) {
    let client = proxy.client();
    for _ in 0..n {
        let r = client
            .get(proxy.url("/v1/embeddings"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_record_takes_traffic_only_after_rise_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, added) = (
        Upstream::start("first", 0).await,
        Upstream::start("added", 0).await,
    );
    let dns = Dns::start(dir.path(), &srv_zone(&[&first]));
    let proxy = Proxy::start(&config(&dns, "_api._tcp.test")).await;
    send(&proxy, 5).await;
    assert_eq!(first.control.requests(), 5, "the first address serves");

    // The new address fails its checks: in the pool, but no traffic.
    added.control.set(&added.control.not_ready, true);
    dns.serve(&srv_zone(&[&first, &added]));
    let applied = wait_for(&proxy, ADDRESSES, 2.0, Duration::from_secs(10))
        .await
        .expect("the added record is applied");
    eprintln!(
        "record added: applied after {} ms (TTL {TTL_S} s)",
        applied.as_millis()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&proxy, 20).await;
    assert_eq!(
        added.control.requests(),
        0,
        "no traffic before its checks pass"
    );

    added.control.set(&added.control.not_ready, false);
    let start = Instant::now();
    while added.control.requests() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "it never took traffic"
        );
        send(&proxy, 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_record_drains_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Slow answers, so that requests are in flight on it when it goes.
    let (kept, removed) = (
        Upstream::start("kept", 200).await,
        Upstream::start("removed", 200).await,
    );
    let dns = Dns::start(dir.path(), &srv_zone(&[&kept, &removed]));
    let proxy = Proxy::start(&config(&dns, "_api._tcp.test")).await;
    assert_eq!(sample(&proxy, ADDRESSES).await, 2.0);
    let load = Load::start(&proxy, 8);
    let start = Instant::now();
    while removed.control.requests() < 4 || kept.control.requests() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "both take traffic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    dns.serve(&srv_zone(&[&kept]));
    let applied = wait_for(&proxy, ADDRESSES, 1.0, Duration::from_secs(10))
        .await
        .expect("the removal is applied");
    eprintln!(
        "record removed: applied after {} ms (TTL {TTL_S} s)",
        applied.as_millis()
    );
    // Requests already sent to it may still arrive; none after that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = removed.control.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await;
    assert_eq!(
        removed.control.requests(),
        served,
        "no new requests once removed"
    );
    assert!(
        proxy
            .log()
            .contains("backend left DNS and its requests are done"),
        "the drain ended: {}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servfail_keeps_the_last_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start("up", 0).await;
    let zone = json!({"ttl": TTL_S, "names": {"up.test.": {"A": ["127.0.0.1"]}}});
    let dns = Dns::start(dir.path(), &zone);
    let proxy = Proxy::start(&config(&dns, &format!("up.test:{}", up.addr.port()))).await;
    send(&proxy, 3).await;

    dns.serve(&json!({"ttl": TTL_S, "servfail": true, "names": {}}));
    let errors = "switchyard_discovery_lookups_total{pool=\"api\",result=\"error\"}";
    let start = Instant::now();
    while sample(&proxy, errors).await < 2.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "lookups fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(&proxy, 10).await;
    assert_eq!(up.control.requests(), 13, "the last good set still serves");
    assert_eq!(sample(&proxy, ADDRESSES).await, 1.0);
}
