//! Proxy replicas sharing drains through one real Redis: a drain on one
//! replica reaches every replica within a second under load, an undrain
//! brings the backend back everywhere, and a replica cut from Redis keeps
//! serving and converges once Redis returns, a drain made meanwhile
//! included. An ignored test measures the convergence over 100 changes
//! (docs/replicas.md).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::matrix::Proto;
use common::redis::Redis;
use common::{pool, Load, Proxy, Upstream, FAST_HEALTH};

fn config(redis: &Redis, a: &Upstream, b: &Upstream) -> String {
    pool("p", &[(a.addr, 1), (b.addr, 1)])
        + FAST_HEALTH
        + &format!("[replicas]\nredis_url = \"{}\"\n", redis.url())
        + "[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n"
}

/// Whether `proxy` lists `addr` as draining (or drained).
async fn draining(proxy: &Proxy, addr: SocketAddr) -> bool {
    let (_, list) = proxy.admin("GET", "/admin/backends").await;
    let entry = list["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["address"] == addr.to_string()).cloned())
        .unwrap_or_else(|| panic!("{addr} not listed: {list}"));
    entry["state"] == "draining" || entry["state"] == "drained"
}

/// How long until every proxy says `addr` is (or is not) draining.
async fn converged(proxies: &[Proxy], addr: SocketAddr, on: bool, limit: Duration) -> Duration {
    let started = Instant::now();
    for proxy in proxies {
        seen_after(proxy, addr, on, started, limit).await;
    }
    started.elapsed()
}

/// How long after `since` `proxy` says `addr` is (or is not) draining,
/// polled every 5 ms.
async fn seen_after(
    proxy: &Proxy,
    addr: SocketAddr,
    on: bool,
    since: Instant,
    limit: Duration,
) -> Duration {
    while draining(proxy, addr).await != on {
        assert!(since.elapsed() < limit, "not converged in {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed()
}

async fn steer(proxy: &Proxy, addr: SocketAddr, action: &str) {
    let (code, body) = proxy
        .admin("POST", &format!("/admin/backends/{addr}/{action}"))
        .await;
    assert_eq!(code, 200, "{body}");
}

/// Redis, two upstreams, and three replicas sharing them, each under a
/// load of `clients` h2 clients for half a second already.
async fn three_under_load(clients: usize) -> (Redis, Upstream, Upstream, [Proxy; 3], Vec<Load>) {
    let redis = Redis::start();
    let (a, b) = (Upstream::start("a", 1).await, Upstream::start("b", 1).await);
    let body = config(&redis, &a, &b);
    let proxies = [
        Proxy::start(&body).await,
        Proxy::start(&body).await,
        Proxy::start(&body).await,
    ];
    let loads: Vec<Load> = proxies
        .iter()
        .map(|p| Load::over(p, Proto::H2, clients))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    (redis, a, b, proxies, loads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_on_one_replica_reaches_all_three_within_a_second_under_load() {
    let (_redis, a, _b, proxies, loads) = three_under_load(2).await;

    steer(&proxies[0], a.addr, "drain").await;
    let took = converged(&proxies, a.addr, true, Duration::from_secs(1)).await;
    println!("drain reached all three replicas in {took:?}");
    // Nothing new reaches a from any replica.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = a.control.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.control.requests(),
        before,
        "a drained backend got traffic"
    );

    steer(&proxies[2], a.addr, "undrain").await;
    let took = converged(&proxies, a.addr, false, Duration::from_secs(1)).await;
    println!("undrain reached all three replicas in {took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.control.requests() > before, "the backend is back");
    for load in loads {
        load.finish().await; // asserts that no request failed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_from_redis_keeps_serving_and_converges_when_it_returns() {
    let mut redis = Redis::start();
    let (a, b) = (Upstream::start("a", 1).await, Upstream::start("b", 1).await);
    let body = config(&redis, &a, &b);
    let proxies = [Proxy::start(&body).await, Proxy::start(&body).await];
    let loads: Vec<Load> = proxies
        .iter()
        .map(|p| Load::over(p, Proto::H2, 2))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Made while Redis is gone: in effect here at once, elsewhere later.
    steer(&proxies[0], a.addr, "drain").await;
    assert!(draining(&proxies[0], a.addr).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!draining(&proxies[1], a.addr).await, "no path between them");
    let (_, state) = proxies[1].admin("GET", "/admin/replicas").await;
    assert_eq!(state["connected"], false, "{state}");
    // Still ready, since it serves; readiness says with what.
    let (status, ready) = proxies[1].admin("GET", "/health/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["shared_state"]["redis"], "unreachable", "{ready}");

    // Back without its data (no persistence): the replicas' copies refill it.
    redis.restart();
    let took = converged(&proxies, a.addr, true, Duration::from_secs(3)).await;
    println!("converged {took:?} after Redis returned");
    let (_, state) = proxies[1].admin("GET", "/admin/replicas").await;
    assert_eq!(state["connected"], true, "{state}");
    let (_, ready) = proxies[1].admin("GET", "/health/ready").await;
    assert_eq!(ready["shared_state"]["redis"], "connected", "{ready}");
    let scrape = proxies[1].metrics().await;
    assert!(
        scrape.contains("switchyard_replica_state_connected 1"),
        "{scrape}"
    );
    assert!(scrape.contains("switchyard_config_info{hash="), "{scrape}");
    for load in loads {
        load.finish().await; // Redis failing failed no request
    }
}

/// The goal, drain convergence across 3 replicas with p99 ≤ 1 s,
/// over many drains: 50 drains and 50 undrains sent to replica 1 under
/// load through all three, each timed from before its admin call until
/// each other replica lists the change. A measurement that prints
/// figures, so not run by default:
/// `cargo test --release -p switchyard --test shared_state -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement that prints figures (docs/replicas.md)"]
async fn drain_convergence_over_a_hundred_changes() {
    let (_redis, a, _b, proxies, loads) = three_under_load(1).await;
    let mut took = Vec::new();
    for change in 0..100 {
        let on = change % 2 == 0;
        let sent = Instant::now();
        steer(&proxies[0], a.addr, if on { "drain" } else { "undrain" }).await;
        let limit = Duration::from_secs(5);
        let (one, two) = tokio::join!(
            seen_after(&proxies[1], a.addr, on, sent, limit),
            seen_after(&proxies[2], a.addr, on, sent, limit)
        );
        took.extend([one, two]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    took.sort();
    let rank = |q: f64| took[((q * took.len() as f64).ceil() as usize).max(1) - 1];
    println!(
        "drain convergence, 3 replicas, {} observations (100 changes x 2 other replicas): \
         p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        rank(0.5),
        rank(0.99),
        took[took.len() - 1]
    );
    for load in loads {
        load.finish().await; // no request failed meanwhile
    }
}
