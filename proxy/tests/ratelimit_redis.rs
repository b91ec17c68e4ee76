//! Shared rate limits against a real redis-server: two limiters ("replicas")
//! share one budget, the Lua script decides as `gcra::decide` does, and a
//! killed, hung or restarted Redis turns decisions local (or refusals) within
//! the timeout and back again.

mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter};

use common::redis::Redis;
use switchyard::ratelimit::shared::BACKOFF;
use switchyard::ratelimit::{
    decide, now_ns, stable_key, Decision, KeyHasher, Quota, SharedLimiter, SharedOptions, Via,
};

static LOCAL_KEYS: LazyLock<KeyHasher> = LazyLock::new(KeyHasher::new);

fn options(timeout: Duration, fail_closed: bool) -> SharedOptions {
    SharedOptions {
        timeout,
        replicas: 2,
        fail_closed,
        rtt: Histogram::with_opts(HistogramOpts::new("rtt_seconds", "rtt")).unwrap(),
        fallbacks: IntCounter::new("fallbacks_total", "fallbacks").unwrap(),
    }
}

fn limiter(redis: &Redis, opts: &SharedOptions) -> SharedLimiter {
    SharedLimiter::new(&redis.url(), opts.clone()).expect("url parses")
}

async fn check(limiter: &SharedLimiter, client: &str, quota: &Quota, cost: u64) -> (Decision, Via) {
    let key = stable_key("route", "rule", client.as_bytes());
    let local_key = LOCAL_KEYS.hash(0, client.as_bytes());
    limiter
        .check(&key, local_key, quota, cost, now_ns(Instant::now()))
        .await
}

/// Asks (cost 0, spending nothing) until Redis decides; returns how long
/// that took.
async fn until_via_redis(limiter: &SharedLimiter) -> Duration {
    let start = Instant::now();
    let quota = Quota::new(1.0, 1);
    while check(limiter, "probe", &quota, 0).await.1 != Via::Redis {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Redis never used"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn near(got: Duration, want: Duration) -> bool {
    got.abs_diff(want) <= Duration::from_millis(50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_budget() {
    let redis = Redis::start();
    let opts = options(Duration::from_millis(500), false);
    let replicas = [limiter(&redis, &opts), limiter(&redis, &opts)];
    for replica in &replicas {
        until_via_redis(replica).await;
    }
    let quota = Quota::new(1.0, 10);
    for (i, replica) in replicas.iter().cycle().take(10).enumerate() {
        let (d, via) = check(replica, "alice", &quota, 1).await;
        assert_eq!(via, Via::Redis);
        assert!(d.allowed, "request {i}");
        assert_eq!(d.remaining, 9 - i as u64);
    }
    for replica in &replicas {
        let (d, via) = check(replica, "alice", &quota, 1).await;
        assert_eq!(via, Via::Redis);
        assert!(!d.allowed, "the 11th and 12th are refused on both");
        assert!(near(d.retry_after, Duration::from_secs(1)), "{d:?}");
        assert!(near(d.reset, Duration::from_secs(10)), "{d:?}");
    }
    assert!(check(&replicas[1], "bob", &quota, 1).await.0.allowed);
    assert!(opts.rtt.get_sample_count() >= 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_decides_as_gcra_decide() {
    let redis = Redis::start();
    let limiter = limiter(&redis, &options(Duration::from_millis(500), false));
    until_via_redis(&limiter).await;
    // A 500 ms interval: the milliseconds this test takes change no count.
    let quota = Quota::new(2.0, 10);
    let sequences: [(&str, &[u64]); 2] = [
        ("fresh-full-burst", &[10, 1, 0]),
        ("mixed", &[0, 1, 3, 11, 2, 4, 1, 0, 1]),
    ];
    for (client, costs) in sequences {
        let (frozen, mut tat) = (now_ns(Instant::now()), 0);
        for &cost in costs {
            let (want, next) = decide(&quota, tat, frozen, cost);
            tat = next;
            let (got, via) = check(&limiter, client, &quota, cost).await;
            assert_eq!(via, Via::Redis);
            let what = format!("{client}, cost {cost}: {got:?} vs {want:?}");
            assert_eq!(
                (got.allowed, got.remaining),
                (want.allowed, want.remaining),
                "{what}"
            );
            assert!(near(got.retry_after, want.retry_after), "{what}");
            assert!(near(got.reset, want.reset), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_falls_back_at_once_and_is_used_again_once_back() {
    let mut redis = Redis::start();
    let timeout = Duration::from_millis(5);
    let (open_opts, closed_opts) = (options(timeout, false), options(timeout, true));
    let (open, closed) = (limiter(&redis, &open_opts), limiter(&redis, &closed_opts));
    until_via_redis(&open).await;
    until_via_redis(&closed).await;
    let fallbacks = (open_opts.fallbacks.get(), closed_opts.fallbacks.get());
    redis.kill();

    // 10 per second across 2 replicas: each allows 5 on its own.
    let quota = Quota::new(10.0, 10);
    let mut allowed = 0;
    for _ in 0..20 {
        let start = Instant::now();
        let (d, via) = check(&open, "carol", &quota, 1).await;
        assert!(start.elapsed() < timeout + Duration::from_millis(45));
        assert_eq!(via, Via::Fallback);
        allowed += usize::from(d.allowed);
    }
    assert_eq!(allowed, 5, "the quota divided by the replicas");
    assert_eq!(open_opts.fallbacks.get(), fallbacks.0 + 20);

    let (d, via) = check(&closed, "carol", &quota, 1).await;
    assert_eq!(via, Via::Closed);
    assert!(!d.allowed);
    assert_eq!(d.retry_after, BACKOFF);
    assert_eq!(closed_opts.fallbacks.get(), fallbacks.1 + 1);

    redis.restart();
    let waited = until_via_redis(&open).await;
    assert!(waited <= 3 * BACKOFF, "back on Redis after {waited:?}");
    let (d, via) = check(&open, "carol", &quota, 1).await;
    assert_eq!(via, Via::Redis);
    assert_eq!(d.remaining, 9, "the restarted Redis starts empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_one_timeout_per_backoff() {
    let redis = Redis::start();
    let timeout = Duration::from_millis(50);
    let opts = options(timeout, false);
    let limiter = limiter(&redis, &opts);
    until_via_redis(&limiter).await;
    let fallbacks = opts.fallbacks.get();
    redis.signal(libc::SIGSTOP);

    let quota = Quota::new(1.0, 10);
    let start = Instant::now();
    let (_, via) = check(&limiter, "dave", &quota, 1).await;
    assert_eq!(via, Via::Fallback);
    let first = start.elapsed();
    assert!(first >= timeout && first < timeout * 3, "{first:?}");
    for _ in 0..40 {
        assert_eq!(check(&limiter, "dave", &quota, 1).await.1, Via::Fallback);
    }
    // Without the backoff the 40 would wait 40 timeouts (2 s).
    assert!(start.elapsed() < timeout * 5, "{:?}", start.elapsed());
    assert_eq!(opts.fallbacks.get(), fallbacks + 41);

    redis.signal(libc::SIGCONT);
    until_via_redis(&limiter).await;
}
