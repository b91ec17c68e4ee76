//! Edge protection against real sockets: per-client rate limits (429 with
//! Retry-After and the RateLimit headers), shadow mode, per-client
//! concurrency limits, costs by body size, and shedding by priority class
//! when the backends report deep queues.

mod common;

use std::time::{Duration, Instant};

use common::matrix::matrix;
use common::{metric, pool, Proxy, Upstream, FAST_HEALTH};

/// Sends `probe` until it answers `want`, failing the test after `limit`.
async fn until<F: std::future::Future<Output = u16>>(
    limit: Duration,
    probe: impl Fn() -> F,
    want: u16,
) {
    let deadline = Instant::now() + limit;
    while probe().await != want {
        assert!(Instant::now() < deadline, "no {want} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One pool of `up` behind a route with the given rule tables (TOML after
/// the `[[routes]]` entry).
fn limited(up: &Upstream, rules: &str) -> String {
    pool("p", &[(up.addr, 1)])
        + "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\npool = \"p\"\n"
        + rules
}

const PER_KEY: &str =
    "[[routes.rate_limits]]\nname = \"per-key\"\nkey = \"header:x-api-key\"\nrate = 2\nburst = 5\n";

matrix!(
    a_client_over_its_limit_gets_429_while_another_at_its_rate_sees_none,
    |proto| async move {
        let up = Upstream::start("up", 0).await;
        let proxy = proto.start(&limited(&up, PER_KEY)).await;
        let via = proxy.via(proto);
        let send = |key: &'static str| {
            let via = via.clone();
            async move { via.send(via.get("/").header("x-api-key", key)).await }
        };
        // The noisy key spends its burst of 5 at once; the sixth is refused.
        for _ in 0..5 {
            assert_eq!(send("noisy").await.status(), 200);
        }
        let refused = send("noisy").await;
        assert_eq!(refused.status(), 429);
        let header = |name: &str| {
            refused
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        assert_eq!(header("retry-after").as_deref(), Some("1"));
        assert_eq!(
            header("ratelimit-policy").as_deref(),
            Some("\"per-key\";q=5;w=3")
        );
        let state = header("ratelimit").expect("RateLimit header");
        assert!(state.starts_with("\"per-key\";r=0;t="), "{state}");
        assert!(header("x-request-id").is_some());
        let json: serde_json::Value = refused.json().await.expect("JSON error body");
        assert_eq!(json["error"]["type"], "rate_limited", "{json}");
        // A client at its rate (one request per 600 ms against 2/s) is never
        // refused while the noisy one keeps hammering.
        let mut noisy_refused = 0;
        for _ in 0..4 {
            assert_eq!(send("calm").await.status(), 200);
            for _ in 0..5 {
                noisy_refused += u32::from(send("noisy").await.status() == 429);
            }
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        assert!(noisy_refused > 10, "{noisy_refused}");
        let scrape = proxy.metrics().await;
        let limited = "switchyard_ratelimit_decisions_total{result=\"limited\",route=\"api\",rule=\"per-key\"}";
        assert!(
            metric(&scrape, limited).is_some_and(|n| n >= 10.0),
            "{scrape}"
        );
        // The admin API names the noisy key only hashed.
        let (_, report) = proxy.admin("GET", "/admin/rate-limits").await;
        let rule = &report["routes"][0]["rules"][0];
        let top = rule["top_limited_keys"][0]["key"]
            .as_str()
            .expect("a limited key");
        assert_eq!(top.len(), 16, "{report}");
        assert!(!report.to_string().contains("noisy"), "{report}");
        assert!(proxy.log().contains("\"limited\":\"per-key\""));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_mode_refuses_nothing_and_counts_what_it_would() {
    let up = Upstream::start("up", 0).await;
    let shadow = format!("{PER_KEY}shadow = true\n");
    let proxy = Proxy::start(&limited(&up, &shadow)).await;
    let client = proxy.client();
    for _ in 0..20 {
        let resp = client
            .get(proxy.url("/"))
            .header("x-api-key", "k")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
    }
    let scrape = proxy.metrics().await;
    let shadowed = "switchyard_ratelimit_decisions_total{result=\"shadow_limited\",route=\"api\",rule=\"per-key\"}";
    // 5 fit the burst; about 15 would have been refused.
    assert!(
        metric(&scrape, shadowed).is_some_and(|n| n >= 13.0),
        "{scrape}"
    );
    assert!(proxy.log().contains("\"shadow_limited\":\"per-key\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_without_the_header_is_limited_by_its_address() {
    let up = Upstream::start("up", 0).await;
    let proxy = Proxy::start(&limited(&up, PER_KEY)).await;
    let client = proxy.client();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(
            client
                .get(proxy.url("/"))
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_in_flight_caps_one_key_and_not_another() {
    let up = Upstream::start("up", 400).await;
    let rule =
        "[[routes.rate_limits]]\nname = \"conc\"\nkey = \"header:x-api-key\"\nmax_in_flight = 2\n";
    let proxy = Proxy::start(&limited(&up, rule)).await;
    let client = proxy.client();
    let send = |key: &'static str| {
        let (client, url) = (client.clone(), proxy.url("/"));
        tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .expect("sent");
            resp.status().as_u16()
        })
    };
    let slow: Vec<_> = (0..2).map(|_| send("a")).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    assert_eq!(
        send("a").await.expect("task"),
        429,
        "a third request of key a"
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "refused at once"
    );
    assert_eq!(
        send("b").await.expect("task"),
        200,
        "key b has its own slots"
    );
    for t in slow {
        assert_eq!(t.await.expect("task"), 200);
    }
    // The slots were given back.
    assert_eq!(send("a").await.expect("task"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_priced_by_body_size_charges_large_bodies_more() {
    let up = Upstream::start("up", 0).await;
    let rule = "[[routes.rate_limits]]\nname = \"bytes\"\nkey = \"ip\"\nrate = 1\nburst = 10\ncost_per_bytes = 1000\n";
    let proxy = Proxy::start(&limited(&up, rule)).await;
    let client = proxy.client();
    let post = |size: usize| client.post(proxy.url("/")).body(vec![b'x'; size]).send();
    // 4,000 bytes cost 4: two fit the burst of 10, the third does not.
    assert_eq!(post(4000).await.expect("sent").status(), 200);
    assert_eq!(post(4000).await.expect("sent").status(), 200);
    assert_eq!(post(4000).await.expect("sent").status(), 429);
    // A small one (cost 1) still fits what is left.
    assert_eq!(post(10).await.expect("sent").status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_fleet_sheds_bulk_before_interactive() {
    let a = Upstream::start("a", 0).await;
    let b = Upstream::start("b", 0).await;
    let shed =
        "[routes.shed]\ndefault = \"interactive\"\nclasses = { bulk = 0.5, interactive = 0.9 }\n";
    let body = pool("p", &[(a.addr, 1), (b.addr, 1)])
        + FAST_HEALTH
        + "[[routes]]\nname = \"api\"\npath_prefix = \"/\"\npool = \"p\"\n"
        + shed;
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();
    let send = |class: Option<&'static str>| {
        let mut req = client.get(proxy.url("/"));
        if let Some(class) = class {
            req = req.header("x-switchyard-priority", class);
        }
        async move { req.send().await.expect("sent").status().as_u16() }
    };
    assert_eq!(send(Some("bulk")).await, 200, "idle fleet");
    // Queues at 70 % of capacity: past bulk's limit, under interactive's.
    for up in [&a, &b] {
        up.control
            .queue_depth
            .store(180, std::sync::atomic::Ordering::SeqCst);
    }
    until(Duration::from_secs(3), || send(Some("bulk")), 503).await;
    assert_eq!(send(Some("interactive")).await, 200);
    assert_eq!(send(None).await, 200, "the default class is interactive");
    assert_eq!(
        send(Some("made-up")).await,
        200,
        "unknown classes get the default"
    );
    // Full queues: interactive goes too, with a fast 503 and Retry-After.
    for up in [&a, &b] {
        up.control
            .queue_depth
            .store(256, std::sync::atomic::Ordering::SeqCst);
    }
    until(Duration::from_secs(3), || send(None), 503).await;
    let resp = client.get(proxy.url("/")).send().await.expect("sent");
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let json: serde_json::Value = resp.json().await.expect("JSON error body");
    assert_eq!(json["error"]["type"], "overloaded", "{json}");
    let scrape = proxy.metrics().await;
    let bulk = "switchyard_shed_requests_total{class=\"bulk\",route=\"api\"}";
    assert!(metric(&scrape, bulk).is_some_and(|n| n >= 1.0), "{scrape}");
    let saturation = "switchyard_route_saturation{route=\"api\"}";
    assert!(
        metric(&scrape, saturation).is_some_and(|s| s >= 1.0),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_the_shared_rules_of_two_routes_keep_their_own_budgets() {
    let up = Upstream::start("up", 0).await;
    // Nothing listens on the port: every shared decision is the fallback's.
    let dead = common::free_port();
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\npool = \"p\"\n\
             [[routes.rate_limits]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 0.1\nburst = 2\nshared = true\n"
        )
    };
    let body = format!("[rate_limits]\nredis_url = \"redis://127.0.0.1:{dead}\"\n\n")
        + &pool("p", &[(up.addr, 1)])
        + &route("a")
        + &route("b");
    let proxy = Proxy::start(&body).await;
    let client = proxy.client();
    let get = |path: &str| {
        let req = client.get(proxy.url(path));
        async move { req.send().await.expect("sent").status().as_u16() }
    };
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(get("/a").await);
    }
    assert_eq!(on_a, [200, 200, 429], "route a's burst of 2");
    assert_eq!(get("/b").await, 200, "route b's budget is not a's");
    let scrape = proxy.metrics().await;
    let fallbacks = metric(&scrape, "switchyard_ratelimit_redis_fallbacks_total");
    assert_eq!(fallbacks, Some(4.0), "{scrape}");
}
