//! The Redis cache against a real redis-server, including Redis dying and
//! coming back under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn cache_status(server: &TestServer) -> String {
    server.ready_report().await.1["cache"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn wait_cache(server: &TestServer, status: &str) {
    wait_until(&format!("cache status {status}"), || async {
        cache_status(server).await == status
    })
    .await;
}

async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("emb:*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Write-back is fire-and-forget, so repeat the request until it hits.
async fn wait_hits(server: &TestServer, texts: Value, hits: f64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let response = server.embed(texts.clone()).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        if server.metric("switchyard_embed_cache_hits_total").await >= hits {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "no cache hit");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_identical_to_the_miss_that_filled_it() {
    bounded(async {
        let redis = RedisServer::start();
        let dir = tiny_model_dir(TinyModel::default());
        let server =
            TestServer::started_ready(config(dir.path(), &["--redis-url", &redis.url()])).await;
        wait_cache(&server, "ok").await;
        assert_eq!(server.ready_report().await.1["cache_hit_rate"], Value::Null);

        let texts = json!(["hello world", "the quick brown fox"]);
        let response = server.embed(texts.clone()).await;
        assert_eq!(response.status(), 200);
        let miss: Value = response.json().await.unwrap();
        assert_eq!(
            server.metric("switchyard_embed_cache_misses_total").await,
            2.0
        );

        let hit = wait_hits(&server, texts, 2.0).await;
        assert_eq!(hit["data"], miss["data"], "a hit must equal the miss");
        assert_eq!(hit["usage"], miss["usage"]);
        let inferred = server.metric("switchyard_embed_batch_size_sum").await;

        // The second identical request never reached the model.
        let again = server.vectors(json!(["hello world"])).await;
        assert_eq!(again[0], vectors_of(&miss)[0]);
        assert_eq!(
            server.metric("switchyard_embed_batch_size_sum").await,
            inferred
        );

        let lookups = server.metric("switchyard_embed_cache_hits_total").await
            + server.metric("switchyard_embed_cache_misses_total").await;
        let hits = server.metric("switchyard_embed_cache_hits_total").await;
        let (_, report) = server.ready_report().await;
        let rate = report["cache_hit_rate"].as_f64().unwrap();
        assert!((rate - hits / lookups).abs() < 1e-9, "{report}");
        assert!(rate > 0.0 && rate < 1.0);

        // emb:{fingerprint}:{sha256(text)} holding raw little-endian f32s.
        let mut keys = redis_keys(&redis).await;
        keys.sort();
        assert_eq!(keys.len(), 2, "{keys:?}");
        let digest = hex::encode(Sha256::digest("hello world"));
        let key = keys
            .iter()
            .find(|k| k.ends_with(&digest))
            .expect("key by sha256");
        let fingerprint = key
            .strip_prefix("emb:")
            .unwrap()
            .strip_suffix(&format!(":{digest}"))
            .unwrap();
        assert_eq!(fingerprint.len(), 16);
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let bytes: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let stored: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(stored, vectors_of(&miss)[0]);
        let ttl: i64 = redis::cmd("TTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 3500 && ttl <= 3600, "ttl {ttl}");
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_mid_run_fails_no_request_and_the_cache_comes_back() {
    bounded(async {
        let mut redis = RedisServer::start();
        let dir = tiny_model_dir(TinyModel::default());
        let server = Arc::new(
            TestServer::started_ready(config(
                dir.path(),
                &["--redis-url", &redis.url(), "--cache-timeout", "50ms"],
            ))
            .await,
        );
        wait_cache(&server, "ok").await;

        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn({
            let server = server.clone();
            let stop = stop.clone();
            async move {
                let mut statuses = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let texts = json!(["a repeated text", format!("unique text {i}")]);
                    statuses.push(server.embed(texts).await.status().as_u16());
                    i += 1;
                }
                statuses
            }
        });

        wait_until("some cache hits", || async {
            server.metric("switchyard_embed_cache_hits_total").await > 5.0
        })
        .await;
        redis.kill();
        wait_cache(&server, "unavailable").await;
        let errors_while_down = server.metric("switchyard_embed_cache_errors_total").await;
        assert!(errors_while_down > 0.0);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;

        redis.restart();
        wait_cache(&server, "ok").await;
        let hits_before = server.metric("switchyard_embed_cache_hits_total").await;
        wait_until("hits after the restart", || async {
            server.metric("switchyard_embed_cache_hits_total").await > hits_before + 5.0
        })
        .await;

        stop.store(true, Ordering::Relaxed);
        let statuses = load.await.unwrap();
        assert!(statuses.len() > 20, "only {} requests ran", statuses.len());
        assert!(
            statuses.iter().all(|&s| s == 200),
            "failed requests: {:?}",
            statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
        );
        Arc::into_inner(server).unwrap().stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_delays_nothing_and_is_picked_up_later() {
    bounded(async {
        let mut redis = RedisServer::unstarted();
        let dir = tiny_model_dir(TinyModel::default());
        let server =
            TestServer::started_ready(config(dir.path(), &["--redis-url", &redis.url()])).await;
        assert_eq!(cache_status(&server).await, "unavailable");
        assert_eq!(server.vectors(json!("hello")).await.len(), 1);
        assert!(server.metric("switchyard_embed_cache_errors_total").await >= 1.0);
        assert_eq!(
            server.metric("switchyard_embed_cache_misses_total").await,
            1.0
        );

        redis.restart();
        wait_cache(&server, "ok").await;
        server.vectors(json!("hello")).await;
        wait_hits(&server, json!("hello"), 1.0).await;
        server.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_no_more_than_the_time_budget() {
    bounded(async {
        let redis = RedisServer::start();
        let dir = tiny_model_dir(TinyModel::default());
        let server = TestServer::started_ready(config(
            dir.path(),
            &["--redis-url", &redis.url(), "--cache-timeout", "50ms"],
        ))
        .await;
        wait_cache(&server, "ok").await;
        server.vectors(json!("warm")).await;

        redis.signal("STOP");
        // Resume Redis even if an assertion below fails.
        struct Resume<'a>(&'a RedisServer);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.signal("CONT");
            }
        }
        let _resume = Resume(&redis);
        for i in 0..5 {
            let started = std::time::Instant::now();
            let vectors = server.vectors(json!(format!("text {i}"))).await;
            assert_eq!(vectors.len(), 1);
            let took = started.elapsed();
            assert!(
                took < std::time::Duration::from_millis(1000),
                "a hung redis held a request for {took:?}"
            );
        }
        wait_cache(&server, "unavailable").await;
        assert!(server.metric("switchyard_embed_cache_errors_total").await >= 5.0);
        drop(_resume);
        wait_cache(&server, "ok").await;
        server.stop().await.unwrap();
    })
    .await
}
