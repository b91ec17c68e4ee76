//! Two proxy replicas in one rollout, sharing it through one real
//! redis-server: one judge, both apply the same weights, and the judge
//! sees both replicas' counts. Traffic through the replica that does not
//! judge drives the verdicts (a healthy canary is promoted, a failing one
//! rolled back on both), an admin call on either replica steers both, and
//! killing the judge hands the lease to the other.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::rollout::{rollout_config, status, steer, until, weights};
use common::{metric, Load, Proto, Proxy, Upstream};
use serde_json::Value;

/// The judge lease of these tests: a dead judge is replaced within it.
const LEASE: Duration = Duration::from_secs(1);

/// Blue and green behind two replicas sharing `redis`, with 600 ms
/// windows; `rollout` adds to the rollout section.
async fn replicas(redis: &Redis, rollout: &str) -> (Upstream, Upstream, [Proxy; 2]) {
    let blue = Upstream::start("blue", 1).await;
    let green = Upstream::start("green", 1).await;
    let body = format!(
        "[replicas]\nredis_url = \"{}\"\nresync_interval = \"100ms\"\njudge_lease = \"{}ms\"\n",
        redis.url(),
        LEASE.as_millis()
    ) + &rollout_config(
        &blue,
        &green,
        &format!("interval = \"600ms\"\nmin_requests = 20\n{rollout}"),
    );
    let proxies = [Proxy::start(&body).await, Proxy::start(&body).await];
    (blue, green, proxies)
}

/// The index of the one replica that judges, once both agree on it.
async fn judge(proxies: &[Proxy]) -> usize {
    let started = Instant::now();
    loop {
        let mut views = Vec::new();
        for proxy in proxies {
            views.push(proxy.admin("GET", "/admin/replicas").await.1);
        }
        let judges: Vec<usize> = (0..views.len())
            .filter(|i| views[*i]["is_judge"] == true)
            .collect();
        let holder = &views[0]["judge"];
        let agreed = views.iter().all(|v| v["judge"] == *holder);
        if let ([one], true) = (judges.as_slice(), agreed) {
            assert_eq!(views[*one]["replica_id"], *holder, "{views:?}");
            return *one;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no single judge: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls both replicas at once until `done` holds on each, so that each
/// one's every step is seen; the statuses seen on each.
async fn until_both(
    proxies: &[Proxy; 2],
    limit: Duration,
    done: impl Fn(&Value) -> bool + Copy,
) -> [Vec<Value>; 2] {
    let [a, b] = proxies;
    let (a, b) = tokio::join!(until(a, limit, done), until(b, limit, done));
    [a, b]
}

/// The canary's weight in `proxy`'s routes.
async fn green_weight(proxy: &Proxy) -> Value {
    let (_, routes) = proxy.admin("GET", "/admin/routes").await;
    let split = &routes["routes"][0]["split"];
    split
        .as_array()
        .and_then(|s| s.iter().find(|e| e["pool"] == "green"))
        .map(|e| e["weight"].clone())
        .unwrap_or_else(|| panic!("no green in {routes}"))
}

/// Traffic through one replica alone, first the one that does not judge,
/// then the judge, drives the rollout to promotion on both: the judge
/// counts every replica's traffic, its own included, from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_judge_promotes_on_traffic_that_either_replica_serves_alone() {
    let redis = Redis::start();
    let (_blue, green, proxies) = replicas(&redis, "").await;
    let j = judge(&proxies).await;
    for (round, through) in [1 - j, j].into_iter().enumerate() {
        if round > 0 {
            steer(&proxies[through], "start").await;
        }
        // Without traffic the rollout holds at its first step.
        until_both(&proxies, Duration::from_secs(2), |s| {
            s["weight"] == 20 && s["windows_judged"] == 0
        })
        .await;
        let load = Load::over(&proxies[through], Proto::H2, 4);
        let seen = until_both(&proxies, Duration::from_secs(20), |s| {
            s["state"] == "promoted"
        })
        .await;
        for seen in &seen {
            assert_eq!(weights(seen), [20, 50, 100]);
        }
        load.finish().await; // asserts that no request failed
        let last = status(&proxies[j]).await;
        let windows = last["windows"].as_array().expect("windows");
        assert!(!windows.is_empty(), "{last:#}");
        for w in windows.iter().filter(|w| w["outcome"] == "pass") {
            assert!(w["baseline_requests"].as_u64() >= Some(20), "{w}");
            assert!(w["canary_requests"].as_u64() >= Some(20), "{w}");
        }
        // The same state on both, the verdicts included.
        assert_eq!(status(&proxies[1 - j]).await["windows"], last["windows"]);
        for proxy in &proxies {
            assert_eq!(green_weight(proxy).await, 100);
        }
    }
    assert!(green.control.requests() > 0);
    for (i, want) in [(j, 1.0), (1 - j, 0.0)] {
        let scrape = proxies[i].metrics().await;
        assert_eq!(metric(&scrape, "switchyard_replica_judge"), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_failing_through_the_other_replica_is_rolled_back_on_both() {
    let redis = Redis::start();
    let (_blue, green, proxies) = replicas(&redis, "").await;
    green.control.set(&green.control.failing, true);
    let j = judge(&proxies).await;
    let other = &proxies[1 - j];
    let load = Load::over(other, Proto::H2, 4);

    let seen = until_both(&proxies, Duration::from_secs(10), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    for seen in &seen {
        assert_eq!(weights(seen).last(), Some(&0));
        assert!(!weights(seen).contains(&50), "never past the first step");
    }
    // Every canary failure was retried on the baseline.
    load.finish().await;
    let before = green.control.requests();
    for proxy in &proxies {
        let via = proxy.via(Proto::H2);
        for _ in 0..20 {
            assert_eq!(via.send(via.get("/")).await.status(), 200);
        }
        let scrape = proxy.metrics().await;
        let state = metric(&scrape, "switchyard_rollout_state{route=\"default\"}");
        assert_eq!(state, Some(4.0), "rolled back");
    }
    assert_eq!(green.control.requests(), before, "the canary got traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_call_on_either_replica_steers_both() {
    let redis = Redis::start();
    let (_blue, _green, proxies) = replicas(&redis, "").await;
    let j = judge(&proxies).await;
    let (judge, other) = (&proxies[j], &proxies[1 - j]);
    let loads = [
        Load::over(judge, Proto::H2, 2),
        Load::over(other, Proto::H2, 2),
    ];
    until_both(&proxies, Duration::from_secs(10), |s| s["weight"] == 50).await;

    // Paused where the judge is not: the judge stops too.
    assert_eq!(steer(other, "pause").await.0, "paused");
    until(judge, Duration::from_secs(2), |s| s["state"] == "paused").await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    for proxy in &proxies {
        let now = status(proxy).await;
        assert_eq!(
            (&now["state"], &now["weight"]),
            (&"paused".into(), &50.into()),
            "{now}"
        );
    }

    assert_eq!(
        steer(judge, "abort").await,
        ("rolled_back".into(), 0.into())
    );
    until(other, Duration::from_secs(2), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    assert_eq!(green_weight(other).await, 0);

    assert_eq!(
        steer(other, "promote").await,
        ("promoted".into(), 100.into())
    );
    until(judge, Duration::from_secs(2), |s| s["state"] == "promoted").await;
    assert_eq!(green_weight(judge).await, 100);
    for load in loads {
        load.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_judge_hands_the_lease_over_and_the_rollout_goes_on() {
    let redis = Redis::start();
    let (_blue, _green, mut proxies) = replicas(&redis, "").await;
    let j = judge(&proxies).await;
    let load = Load::over(&proxies[1 - j], Proto::H2, 4);
    until_both(&proxies, Duration::from_secs(10), |s| s["weight"] == 50).await;

    // SIGKILL: the lease is not given back, it has to expire.
    proxies[j].signal(libc::SIGKILL);
    proxies[j].wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    let survivor = &proxies[1 - j];
    loop {
        let (_, view) = survivor.admin("GET", "/admin/replicas").await;
        if view["is_judge"] == true {
            assert_eq!(view["judge"], view["replica_id"], "{view}");
            break;
        }
        assert!(killed.elapsed() < LEASE * 3, "no takeover: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = killed.elapsed();
    println!("the survivor took the judge lease {took:?} after the judge was killed");
    assert!(took <= LEASE + Duration::from_millis(500), "{took:?}");
    let scrape = survivor.metrics().await;
    let taken = metric(&scrape, "switchyard_replica_judge_acquisitions_total");
    assert_eq!(taken, Some(1.0));

    let seen = until(survivor, Duration::from_secs(10), |s| {
        s["state"] == "promoted"
    })
    .await;
    assert_eq!(weights(&seen).last(), Some(&100));
    load.finish().await; // asserts that no request failed
}

/// Redis killed mid-rollout: both replicas keep serving with the weight
/// they knew and nobody judges; Redis back (empty) gets the rollout from
/// the replicas' copies, a judge takes the lease again, and the rollout
/// goes on to promotion on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_gone_the_weights_hold_and_the_rollout_resumes_when_it_returns() {
    let mut redis = Redis::start();
    let (_blue, _green, proxies) = replicas(&redis, "").await;
    judge(&proxies).await;
    // Without traffic the rollout holds at its first step.
    until_both(&proxies, Duration::from_secs(2), |s| s["weight"] == 20).await;
    redis.kill();
    let loads = [
        Load::over(&proxies[0], Proto::H2, 2),
        Load::over(&proxies[1], Proto::H2, 2),
    ];
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let mut judged = Vec::new();
    for proxy in &proxies {
        judged.push(status(proxy).await["windows_judged"].clone());
    }
    // Three windows' time: nothing judged, the weight held.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    for (proxy, judged) in proxies.iter().zip(judged) {
        let (_, view) = proxy.admin("GET", "/admin/replicas").await;
        assert_eq!(
            (&view["connected"], &view["is_judge"]),
            (&false.into(), &false.into()),
            "{view}"
        );
        let now = status(proxy).await;
        assert_eq!(
            (&now["weight"], &now["windows_judged"]),
            (&20.into(), &judged),
            "{now}"
        );
    }

    redis.restart();
    let seen = until_both(&proxies, Duration::from_secs(20), |s| {
        s["state"] == "promoted"
    })
    .await;
    for seen in &seen {
        assert_eq!(weights(seen), [20, 50, 100]);
    }
    judge(&proxies).await;
    for load in loads {
        load.finish().await; // Redis failing failed no request
    }
}
