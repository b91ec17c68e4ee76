//! Automated canary rollouts against real upstreams: a healthy canary is
//! promoted through every step, a failing one is rolled back, a trickle of
//! traffic holds, a graceful upgrade resumes at the same step, and the
//! admin API steers a rollout.

mod common;

use std::time::Duration;

use common::rollout::{failed_check, rollout_config, status, steer, until, weights};
use common::{Load, Proto, Proxy, Upstream};

/// Both upstreams (with `delay_ms` per request) and the proxy.
async fn setup(delay_ms: u64, rollout: &str) -> (Upstream, Upstream, Proxy) {
    let blue = Upstream::start("blue", delay_ms).await;
    let green = Upstream::start("green", delay_ms).await;
    let proxy = Proxy::start(&rollout_config(&blue, &green, rollout)).await;
    (blue, green, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_canary_is_promoted_through_every_step() {
    let (blue, green, proxy) = setup(1, "interval = \"500ms\"\nmin_requests = 20\n").await;
    let load = Load::over(&proxy, Proto::H2, 4);

    let seen = until(&proxy, Duration::from_secs(15), |s| {
        s["state"] == "promoted"
    })
    .await;
    assert_eq!(weights(&seen), [20, 50, 100]);
    let (_, routes) = proxy.admin("GET", "/admin/routes").await;
    let split = &routes["routes"][0]["split"];
    let green_weight = split
        .as_array()
        .and_then(|s| s.iter().find(|e| e["pool"] == "green"))
        .map(|e| e["weight"].clone());
    assert_eq!(green_weight, Some(100.into()), "{routes}");
    load.finish().await; // asserts that no request failed
    assert!(blue.control.requests() > 0 && green.control.requests() > 0);
    let last = &seen.last().expect("a status")["windows"];
    assert!(
        last.as_array()
            .is_some_and(|w| w.iter().all(|w| w["outcome"] == "pass")),
        "{last}"
    );
}

/// A canary answering only 500s under load, rolled back; the requests the
/// load sent and those that failed, each failure checked to be a canary's.
async fn roll_back_a_failing_canary(extra: &str) -> (usize, Vec<String>) {
    let settings = format!("interval = \"500ms\"\nmin_requests = 20\n{extra}");
    let (_blue, green, proxy) = setup(1, &settings).await;
    green.control.set(&green.control.failing, true);
    let load = Load::over(&proxy, Proto::H2, 4);

    let started = std::time::Instant::now();
    let seen = until(&proxy, Duration::from_secs(10), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    // Two failed windows roll back: within 2 intervals, plus one for the
    // window in progress and slack for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.last().expect("a status")["weight"], 0);
    assert_eq!(
        weights(&seen),
        [20, 0],
        "never promoted past the first step"
    );
    let (sent, failed) = load.stop().await;
    assert!(failed.iter().all(|f| f == "status 500"), "{failed:?}");
    assert!(
        failed.len() as u64 <= green.control.requests(),
        "only canary requests failed"
    );
    println!("blast radius: {} of {sent} requests failed", failed.len());
    // After the rollback the canary gets nothing.
    let before = green.control.requests();
    let via = proxy.via(Proto::H2);
    for _ in 0..20 {
        assert_eq!(via.send(via.get("/")).await.status(), 200);
    }
    assert_eq!(green.control.requests(), before);
    let scrape = proxy.metrics().await;
    assert!(
        scrape.contains("switchyard_rollout_state{route=\"default\"} 4"),
        "{scrape}"
    );
    (sent, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_canary_is_rolled_back_and_its_failures_retried_on_the_baseline() {
    let (sent, failed) = roll_back_a_failing_canary("").await;
    assert!(sent > 100, "{sent}");
    // The canary's windows counted every 500 (it was rolled back), yet
    // each of those requests was answered by the baseline.
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_retry_on_baseline_the_blast_radius_is_the_canary_share() {
    let (sent, failed) = roll_back_a_failing_canary("retry_on_baseline = false\n").await;
    assert!(!failed.is_empty() && failed.len() < sent, "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickle_holds_and_never_promotes() {
    let (blue, green, proxy) = setup(0, "interval = \"300ms\"\nmin_requests = 1000\n").await;
    let via = proxy.via(Proto::H2);
    for _ in 0..30 {
        assert_eq!(via.send(via.get("/")).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(blue.control.requests() + green.control.requests(), 30);
    let now = status(&proxy).await;
    assert_eq!(now["state"], "holding", "{now}");
    assert_eq!(now["weight"], 20);
    assert!(
        now["windows_judged"].as_u64().is_some_and(|n| n >= 2),
        "{now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_mid_rollout_resumes_at_the_same_step_and_the_api_steers_it() {
    let (_blue, _green, mut proxy) = setup(1, "interval = \"700ms\"\nmin_requests = 20\n").await;
    let load = Load::over(&proxy, Proto::H2, 4);
    until(&proxy, Duration::from_secs(10), |s| s["weight"] == 50).await;
    assert_eq!(steer(&proxy, "pause").await, ("paused".into(), 50.into()));

    proxy.upgrade().await;
    proxy.wait_retired(Duration::from_secs(10)).await;
    let resumed = status(&proxy).await;
    assert_eq!(
        (&resumed["state"], &resumed["weight"]),
        (&"paused".into(), &50.into())
    );
    // Paused: the weight holds over several intervals.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(status(&proxy).await["weight"], 50);

    assert_eq!(
        steer(&proxy, "abort").await,
        ("rolled_back".into(), 0.into())
    );
    assert_eq!(
        steer(&proxy, "promote").await,
        ("promoted".into(), 100.into())
    );
    let (code, _) = proxy
        .admin("POST", "/admin/routes/default/rollout/launch")
        .await;
    assert_eq!(code, 404);
    let (code, _) = proxy.admin("GET", "/admin/routes/nope/rollout").await;
    assert_eq!(code, 404);
    load.finish().await; // asserts that no request failed across the upgrade
}

/// A canary that never becomes ready gets no traffic (its requests fall
/// back to the baseline) and fails the readiness check: rolled back, with
/// no request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_that_is_never_ready_is_rolled_back_without_failing_requests() {
    let (_blue, green, proxy) = setup(1, "interval = \"500ms\"\nmin_requests = 20\n").await;
    green.control.set(&green.control.not_ready, true);
    let load = Load::over(&proxy, Proto::H2, 4);
    let seen = until(&proxy, Duration::from_secs(10), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    let last = seen.last().expect("a status");
    assert!(failed_check(last, "readiness"), "{last:#}");
    load.finish().await; // asserts that no request failed
}

/// Output agreement: a canary that answers 200s at normal latency with
/// other vectors (another pooling, say) fails on the mirrored pairs and is
/// rolled back; the same vectors on both arms promote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_with_other_vectors_fails_on_agreement() {
    for (green_vector, want) in [
        (vec![0.9, 0.436, 0.0], "rolled_back"),
        (vec![1.0, 0.0, 0.0], "promoted"),
    ] {
        let compare = "compare = { sample = 0.2, min_cosine = 0.999 }\n";
        let settings = format!("interval = \"500ms\"\nmin_requests = 20\n{compare}");
        let (blue, green, proxy) = setup(1, &settings).await;
        *blue.control.embedding.lock().expect("lock") = Some(vec![1.0, 0.0, 0.0]);
        *green.control.embedding.lock().expect("lock") = Some(green_vector);
        let load = Load::over(&proxy, Proto::H2, 4);
        let seen = until(&proxy, Duration::from_secs(10), |s| {
            s["state"] == "rolled_back" || s["state"] == "promoted"
        })
        .await;
        let last = seen.last().expect("a status");
        assert_eq!(last["state"], want, "{last:#}");
        load.finish().await; // the client never sees a mirror's answer
        if want == "rolled_back" {
            assert!(failed_check(last, "agreement"), "{last:#}");
        }
    }
}

/// `rollback = "gradual"`: a canary failing at 50 % steps down through 20
/// to 0, one step per window, so the baseline is not hit by all of the
/// traffic at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gradual_rollback_steps_down_one_step_per_window() {
    let settings = "interval = \"500ms\"\nmin_requests = 20\nrollback = \"gradual\"\n";
    let (_blue, green, proxy) = setup(1, settings).await;
    let load = Load::over(&proxy, Proto::H2, 4);
    until(&proxy, Duration::from_secs(10), |s| s["weight"] == 50).await;
    // Paused while the canary breaks, so that no window mixing before and
    // after can pass and promote it; paused windows are dropped.
    assert_eq!(steer(&proxy, "pause").await.1, 50);
    green.control.set(&green.control.failing, true);
    tokio::time::sleep(Duration::from_millis(700)).await;
    steer(&proxy, "resume").await;
    let seen = until(&proxy, Duration::from_secs(10), |s| {
        s["state"] == "rolled_back" && s["weight"] == 0
    })
    .await;
    assert_eq!(weights(&seen), [50, 20, 0], "one step down per window");
    let (_, failed) = load.stop().await;
    assert!(failed.iter().all(|f| f == "status 500"), "{failed:?}");
}

/// A/A on the real proxy: 20 rollouts of a canary identical to the
/// baseline, one after another under the same load. The goal is
/// at most one false rollback in 20; the statistical tests alone allow
/// 1 % per rollout (docs/rollouts.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_a_a_rollouts_roll_back_at_most_once() {
    let (_blue, _green, proxy) = setup(5, "interval = \"400ms\"\nmin_requests = 20\n").await;
    let load = Load::over(&proxy, Proto::H2, 4);
    let mut verdicts = Vec::new();
    for i in 0..20 {
        if i > 0 {
            steer(&proxy, "start").await;
        }
        let seen = until(&proxy, Duration::from_secs(20), |s| {
            s["state"] == "rolled_back" || s["state"] == "promoted"
        })
        .await;
        let last = seen.last().expect("a status").clone();
        verdicts.push(last["state"].as_str().unwrap_or_default().to_string());
        if last["state"] == "rolled_back" {
            println!("A/A rollout {i} rolled back: {last:#}");
        }
    }
    let rolled_back = verdicts.iter().filter(|v| *v == "rolled_back").count();
    println!("A/A: {rolled_back} of 20 rollouts rolled back");
    assert!(rolled_back <= 1, "{verdicts:?}");
    load.finish().await; // asserts that no request failed
}

/// A canary 50 % slower than the baseline (15 ms against 10 ms) fails on
/// latency and is rolled back, with no request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_half_again_as_slow_is_rolled_back() {
    let blue = Upstream::start("blue", 10).await;
    let green = Upstream::start("green", 15).await;
    let settings = "interval = \"1s\"\nmin_requests = 20\n";
    let proxy = Proxy::start(&rollout_config(&blue, &green, settings)).await;
    let load = Load::over(&proxy, Proto::H2, 8);
    let seen = until(&proxy, Duration::from_secs(15), |s| {
        s["state"] == "rolled_back" || s["state"] == "promoted"
    })
    .await;
    let last = seen.last().expect("a status");
    assert_eq!(last["state"], "rolled_back", "{last:#}");
    assert!(
        failed_check(last, "latency_shift") || failed_check(last, "latency_p99_ratio"),
        "{last:#}"
    );
    load.finish().await; // asserts that no request failed
}
