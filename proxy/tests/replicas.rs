//! Three real proxy replicas on loopback share one limit through one real
//! redis-server: under an offered load of three times the limit, spread
//! evenly over the replicas, the admitted rate stays within 10% of the
//! limit; once Redis is SIGKILLed mid-run no request fails and each replica
//! falls back to its third of the limit.
//!
//! The first phase lasts `SWITCHYARD_TEST_REPLICAS_SECS` seconds (20 by
//! default, the length the requirement names); the one without Redis lasts
//! [`WITHOUT_REDIS`].

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{metric, pool, Proxy, Upstream};
use tokio::task::JoinSet;

const REPLICAS: u32 = 3;
/// The shared limit: requests per second, and the burst a fresh key spends.
const RATE: f64 = 50.0;
const BURST: u32 = 50;
/// Offered load as a multiple of the limit: far enough above it that every
/// replica is over its fallback share too, low enough for 2 CI cores.
const OVERLOAD: f64 = 3.0;
const WITHOUT_REDIS: Duration = Duration::from_secs(8);
const FALLBACKS: &str = "switchyard_ratelimit_redis_fallbacks_total";

/// One fast upstream behind a route whose one shared rule counts every
/// request (they all carry the same API key). The Redis timeout is generous
/// so that a CI machine's scheduling hiccup does not send a replica to its
/// fallback for a second while Redis is up: this test is about sharing.
fn config(up: &Upstream, redis: &Redis) -> String {
    format!(
        "[rate_limits]\nredis_url = \"{}\"\nreplicas = {REPLICAS}\nredis_timeout = \"250ms\"\n\n",
        redis.url()
    ) + &pool("p", &[(up.addr, 1)])
        + "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\npool = \"p\"\n"
        + &format!(
            "[[routes.rate_limits]]\nname = \"fleet\"\nkey = \"header:x-api-key\"\n\
             rate = {RATE}\nburst = {BURST}\nshared = true\n"
        )
}

/// Sends requests under another key until the replica has decided one
/// through Redis, so that the measured load never meets the local
/// decisions made while the connection is being set up.
async fn until_on_redis(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = proxy.client();
    loop {
        let resp = client.get(proxy.url("/")).header("x-api-key", "warm-up");
        assert_eq!(resp.send().await.expect("warm-up").status(), 200);
        let scrape = proxy.metrics().await;
        if metric(&scrape, "switchyard_ratelimit_redis_seconds_count").is_some_and(|n| n > 0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never on Redis:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fallbacks(proxy: &Proxy) -> f64 {
    metric(&proxy.metrics().await, FALLBACKS).expect("fallback counter")
}

/// One answer: when its request was sent (since the load began) and its
/// status, or why it got none.
struct Answer {
    sent: Duration,
    outcome: Result<u16, String>,
}

/// An open-loop load of `per_replica` requests a second to each proxy for
/// `length`: a request is sent on time even while earlier ones are still
/// waiting, so a slow answer cannot lower the offered rate.
fn offer(proxies: &[Proxy], per_replica: f64, length: Duration) -> JoinSet<Vec<Answer>> {
    let start = Instant::now();
    let mut replicas = JoinSet::new();
    for proxy in proxies {
        let (client, url) = (proxy.client(), proxy.url("/"));
        replicas.spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / per_replica));
            let mut requests = JoinSet::new();
            while start.elapsed() < length {
                ticks.tick().await;
                let sent = start.elapsed();
                let req = client.get(&url).header("x-api-key", "shared-load");
                requests.spawn(async move {
                    let outcome = req.send().await.map(|r| r.status().as_u16());
                    let outcome = outcome.map_err(|e| format!("{e:?}"));
                    Answer { sent, outcome }
                });
            }
            let mut answers = Vec::new();
            while let Some(answer) = requests.join_next().await {
                answers.push(answer.expect("request task"));
            }
            answers
        });
    }
    replicas
}

/// Of the requests sent in `[from, to)`: how many were admitted (200), and
/// every answer that was neither a 200 nor a 429.
fn tally(answers: &[Answer], from: Duration, to: Duration) -> (usize, Vec<String>) {
    let phase = answers.iter().filter(|a| a.sent >= from && a.sent < to);
    let (mut admitted, mut failures) = (0, Vec::new());
    for answer in phase {
        match &answer.outcome {
            Ok(200) => admitted += 1,
            Ok(429) => {}
            Ok(status) => failures.push(format!("status {status}")),
            Err(e) => failures.push(e.clone()),
        }
    }
    (admitted, failures)
}

/// Asserts that `admitted` is within `tolerance` (a fraction) of `expected`.
fn assert_near(what: &str, admitted: usize, expected: f64, tolerance: f64) {
    let off = (admitted as f64 - expected) / expected;
    println!(
        "{what}: {admitted} admitted, {expected:.0} expected ({:+.1}%)",
        off * 100.0
    );
    assert!(
        off.abs() <= tolerance,
        "{what}: {admitted} admitted, {expected:.0} ± {:.0}% expected",
        tolerance * 100.0
    );
}

fn phase_length() -> Duration {
    let secs = std::env::var("SWITCHYARD_TEST_REPLICAS_SECS").map_or(20.0, |s| {
        s.parse().expect("SWITCHYARD_TEST_REPLICAS_SECS: seconds")
    });
    Duration::from_secs_f64(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_shared_limit_with_and_without_redis() {
    let mut redis = Redis::start();
    let up = Upstream::start("up", 0).await;
    let body = config(&up, &redis);
    let mut proxies = Vec::new();
    for _ in 0..REPLICAS {
        let proxy = Proxy::start(&body).await;
        until_on_redis(&proxy).await;
        proxies.push(proxy);
    }
    let mut before = Vec::new();
    for proxy in &proxies {
        before.push(fallbacks(proxy).await);
    }

    let with_redis = phase_length();
    let per_replica = RATE * OVERLOAD / f64::from(REPLICAS);
    let start = Instant::now();
    let mut load = offer(&proxies, per_replica, with_redis + WITHOUT_REDIS);
    tokio::time::sleep_until((start + with_redis).into()).await;
    let mut at_kill = Vec::new();
    for proxy in &proxies {
        at_kill.push(fallbacks(proxy).await);
    }
    redis.kill();
    let mut answers = Vec::new();
    while let Some(replica) = load.join_next().await {
        answers.extend(replica.expect("load task"));
    }
    let end = with_redis + WITHOUT_REDIS;
    println!(
        "{} requests offered over {:.0} s to {REPLICAS} replicas ({:.0}/s); limit {RATE}/s, burst {BURST}",
        answers.len(),
        end.as_secs_f64(),
        answers.len() as f64 / end.as_secs_f64()
    );

    // Redis up: one budget for the three, the burst plus the rate.
    let (admitted, failures) = tally(&answers, Duration::ZERO, with_redis);
    let expected = f64::from(BURST) + RATE * with_redis.as_secs_f64();
    let local: Vec<f64> = at_kill.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("with Redis: decided without it, per replica: {local:?}");
    assert_near("with Redis", admitted, expected, 0.10);
    assert!(failures.is_empty(), "with Redis: {failures:?}");

    // Redis killed: each replica decides alone with a third of the rate and
    // of the burst (its fallback store has not seen the key yet). ±15%, not
    // 10: the phase is shorter, so one replica stalled for a second by a
    // busy CI machine moves the count by ~4%, and a few requests in flight
    // at the kill were decided by Redis. A fallback that forgot to divide
    // the limit would admit three times as many.
    let (admitted, failures) = tally(&answers, with_redis, end);
    let burst_share = f64::from(BURST / REPLICAS * REPLICAS);
    let expected = burst_share + RATE * WITHOUT_REDIS.as_secs_f64();
    println!("without Redis: {} failed", failures.len());
    assert_near("without Redis", admitted, expected, 0.15);
    assert!(failures.is_empty(), "without Redis: {failures:?}");
    for (proxy, at_kill) in proxies.iter().zip(at_kill) {
        let decided_locally = fallbacks(proxy).await - at_kill;
        let offered = per_replica * WITHOUT_REDIS.as_secs_f64();
        assert!(
            decided_locally >= offered * 0.9,
            "{decided_locally} of about {offered:.0} decided without Redis"
        );
    }
}
