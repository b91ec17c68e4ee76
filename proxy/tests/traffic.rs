//! Traffic control under load: drains, hot reloads (blue/green, canary,
//! sticky, forced pool, invalid edits, removed backends), graceful upgrade,
//! per-backend caps (`max_in_flight`), the admin API's error cases and the
//! proxy's own health probes. What decides a single request's way
//! runs over each client protocol (see `common::matrix`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::matrix::{assert_all_200, matrix};
use common::{eventually, metric, pool, Load, Proxy, Upstream, Via};

fn split_route(split: &str, extra: &str) -> String {
    format!("[[routes]]\npath_prefix = \"/\"\nsplit = {{ {split} }}\n{extra}")
}

/// The `/admin/backends` entry of `up`.
async fn backend_entry(proxy: &Proxy, up: &Upstream) -> serde_json::Value {
    let (_, list) = proxy.admin("GET", "/admin/backends").await;
    list["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["address"] == up.addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{} not listed: {list}", up.addr))
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Waits until the reload status shows `hash` differs from `before`.
async fn wait_reloaded(proxy: &Proxy, before: &serde_json::Value) -> serde_json::Value {
    for _ in 0..150 {
        let (_, status) = proxy.admin("GET", "/admin/config/status").await;
        if status["active_hash"] != before["active_hash"] || status["result"] == "error" {
            return status;
        }
        sleep_ms(20).await;
    }
    panic!("no reload seen; log:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_answers_every_error_case() {
    let a = Upstream::start("a", 0).await;
    let body = pool("p", &[(a.addr, 1)]) + &split_route("p = 100", "");
    let proxy = Proxy::start(&body).await;
    let backend = format!("/admin/backends/{}", a.addr);

    for (method, path, token, want) in [
        ("GET", "/admin/backends", None, 401),
        ("GET", "/admin/backends", Some("wrong"), 401),
        ("GET", "/admin/backends", Some(common::ADMIN_TOKEN), 200),
        ("POST", "/admin/backends", Some(common::ADMIN_TOKEN), 405),
        (
            "GET",
            &format!("{backend}/drain"),
            Some(common::ADMIN_TOKEN),
            405,
        ),
        (
            "POST",
            "/admin/backends/not-an-address/drain",
            Some(common::ADMIN_TOKEN),
            400,
        ),
        (
            "POST",
            "/admin/backends/127.0.0.1:1/drain",
            Some(common::ADMIN_TOKEN),
            404,
        ),
        (
            "POST",
            &format!("{backend}/drain?wait=soon"),
            Some(common::ADMIN_TOKEN),
            400,
        ),
        (
            "POST",
            &format!("{backend}/drain?bogus=1"),
            Some(common::ADMIN_TOKEN),
            400,
        ),
        ("GET", "/admin/nothing", Some(common::ADMIN_TOKEN), 404),
        ("GET", "/admin/routes", Some(common::ADMIN_TOKEN), 200),
        ("GET", "/admin/config", Some(common::ADMIN_TOKEN), 200),
        (
            "GET",
            "/admin/config/status",
            Some(common::ADMIN_TOKEN),
            200,
        ),
        ("GET", "/admin/reload", Some(common::ADMIN_TOKEN), 405),
        ("POST", "/admin/reload", Some(common::ADMIN_TOKEN), 200),
        ("GET", "/metrics", None, 200),
    ] {
        let (status, json) = proxy.admin_as(method, path, token).await;
        assert_eq!(status, want, "{method} {path} (token {token:?}): {json}");
        if status >= 400 && path != "/metrics" {
            assert!(
                json["error"]["message"].is_string(),
                "{method} {path}: {json}"
            );
        }
    }
    let (_, config) = proxy.admin("GET", "/admin/config").await;
    assert!(
        !config.to_string().contains(common::ADMIN_TOKEN),
        "token redacted"
    );
    assert_eq!(
        config["config"]["admin"]["token_file"]
            .as_str()
            .map(|f| f.ends_with("admin-token")),
        Some(true)
    );
    let (_, backends) = proxy.admin("GET", "/admin/backends").await;
    let b = &backends["backends"][0];
    assert_eq!(b["state"], "healthy");
    assert_eq!(b["pool"], "p");
    assert_eq!(b["report"]["version"], "a-v1");
}

/// Polls a probe, without the admin token, until it answers `want`;
/// returns that answer's JSON.
async fn probe_until(proxy: &Proxy, path: &str, want: u16) -> serde_json::Value {
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..250 {
        last = proxy.admin_as("GET", path, None).await;
        if last.0 == want {
            return last.1;
        }
        sleep_ms(20).await;
    }
    panic!("{path} never answered {want}; last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_probes_need_no_token_and_follow_the_backends() {
    let a = Upstream::start("a", 0).await;
    let b = Upstream::start("b", 0).await;
    let body = pool("p", &[(a.addr, 1), (b.addr, 1)]) + &split_route("p = 100", "");
    let proxy = Proxy::start(&body).await;
    let (_, status) = proxy.admin("GET", "/admin/config/status").await;
    let hash = &status["active_hash"];
    assert!(hash.as_str().is_some_and(|h| !h.is_empty()), "{status}");

    let (code, live) = proxy.admin_as("GET", "/health/live", None).await;
    assert_eq!((code, &live["status"]), (200, &"live".into()), "{live}");
    assert_eq!(&live["config_hash"], hash);
    let ready = probe_until(&proxy, "/health/ready", 200).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(&ready["config_hash"], hash);
    assert_eq!(proxy.admin_as("POST", "/health/ready", None).await.0, 405);

    // One backend left is enough; none is not.
    a.control.set(&a.control.not_ready, true);
    sleep_ms(400).await;
    assert_eq!(proxy.admin_as("GET", "/health/ready", None).await.0, 200);
    b.control.set(&b.control.not_ready, true);
    let down = probe_until(&proxy, "/health/ready", 503).await;
    assert_eq!(down["status"], "not_ready", "{down}");
    assert!(down["reason"]
        .as_str()
        .is_some_and(|r| r.contains("eligible")));
    assert_eq!(&down["config_hash"], hash);
    assert_eq!(proxy.admin_as("GET", "/health/live", None).await.0, 200);

    b.control.set(&b.control.not_ready, false);
    probe_until(&proxy, "/health/ready", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_is_503_with_every_backend_stopped() {
    // A port nothing listens on: the backend never passes a check.
    let stopped = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let proxy = Proxy::start(&(pool("p", &[(stopped, 1)]) + &split_route("p = 100", ""))).await;
    sleep_ms(500).await;
    let (code, body) = proxy.admin_as("GET", "/health/ready", None).await;
    assert_eq!(
        (code, &body["status"]),
        (503, &"not_ready".into()),
        "{body}"
    );
}

/// `up` as the only backend, behind a 20 s shutdown grace period.
fn long_grace(up: &Upstream) -> String {
    let server =
        "[server]\ngrace_period = \"20s\"\nrun_dir = \"run\"\nstate_file = \"run/state.json\"\n";
    format!(
        "{server}{}{}",
        pool("p", &[(up.addr, 1)]),
        split_route("p = 100", "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_says_stopping_once_a_shutdown_begins() {
    let slow = Upstream::start("slow", 2000).await;
    let proxy = Proxy::start(&long_grace(&slow)).await;
    // Pingora stops accepting on SIGTERM; a probe connection kept alive
    // from before still gets answers, which is what this watches.
    let probe = reqwest::Client::new();
    let url = format!("http://{}/health/ready", proxy.admin);
    probe_until(&proxy, "/health/ready", 200).await;
    assert_eq!(probe.get(&url).send().await.expect("probe").status(), 200);

    // An in-flight request keeps the proxy in its grace period.
    let (client, page) = (proxy.client(), proxy.url("/"));
    let request = tokio::spawn(async move { client.get(page).send().await.map(|r| r.status()) });
    assert!(eventually(Duration::from_secs(2), || slow.control.requests() == 1).await);
    proxy.signal(libc::SIGTERM);
    sleep_ms(300).await;
    let resp = probe
        .get(&url)
        .send()
        .await
        .expect("probe on the kept-alive connection");
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["status"], "stopping", "{body}");
    assert_eq!(
        request.await.expect("join").expect("in-flight request"),
        200
    );
}

matrix!(
    drain_under_load_stops_new_requests_and_waits_for_in_flight,
    |proto| async move {
        let a = Upstream::start("a", 20).await;
        let b = Upstream::start("b", 20).await;
        let victim = Upstream::start("victim", 20).await;
        let body =
            pool("p", &[(a.addr, 1), (b.addr, 1), (victim.addr, 1)]) + &split_route("p = 100", "");
        let proxy = proto.start(&body).await;
        let load = Load::over(&proxy, proto, 8);
        sleep_ms(400).await;

        let path = format!("/admin/backends/{}/drain?wait=10s", victim.addr);
        let (status, ack) = proxy.admin("POST", &path).await;
        assert_eq!(status, 200, "{ack}");
        assert_eq!(
            ack["drained"], true,
            "wait returned once in-flight reached 0: {ack}"
        );
        assert_eq!(ack["in_flight"], 0);
        let at_ack = victim.control.requests();
        assert!(at_ack > 0);
        // Repeating the call is harmless.
        let (status, again) = proxy.admin("POST", &path).await;
        assert_eq!(
            (status, &again["state"]),
            (200, &serde_json::json!("drained"))
        );
        sleep_ms(600).await;
        load.finish().await;
        assert_eq!(
            victim.control.requests(),
            at_ack,
            "no request after the drain was acknowledged"
        );

        let state =
            std::fs::read_to_string(proxy.dir.path().join("run/state.json")).expect("state file");
        assert!(
            state.contains(&victim.addr.to_string()),
            "drain persisted: {state}"
        );
        let entry = backend_entry(&proxy, &victim).await;
        assert_eq!(entry["state"], "drained");

        let (status, _) = proxy
            .admin("POST", &format!("/admin/backends/{}/undrain", victim.addr))
            .await;
        assert_eq!(status, 200);
        load_and_expect_traffic(&proxy.via(proto), &victim).await;
    }
);

async fn load_and_expect_traffic(via: &Via, up: &Upstream) {
    let before = up.control.requests();
    assert_all_200(&via.load("/", 4, 60).await);
    assert!(
        up.control.requests() > before,
        "{} takes requests again",
        up.control.name
    );
}

matrix!(
    blue_to_green_by_editing_the_file_under_load,
    |proto| async move {
        let blue1 = Upstream::start("blue1", 5).await;
        let blue2 = Upstream::start("blue2", 5).await;
        let green = Upstream::start("green", 5).await;
        let pools =
            pool("blue", &[(blue1.addr, 1), (blue2.addr, 1)]) + &pool("green", &[(green.addr, 1)]);
        let proxy = proto
            .start(&(pools.clone() + &split_route("blue = 100, green = 0", "")))
            .await;
        let (_, before) = proxy.admin("GET", "/admin/config/status").await;
        let load = Load::over(&proxy, proto, 8);
        sleep_ms(400).await;
        assert_eq!(green.control.requests(), 0);

        proxy.rewrite(&(pools + &split_route("blue = 0, green = 100", "")));
        let written = std::time::Instant::now();
        let status = wait_reloaded(&proxy, &before).await;
        assert_eq!(status["result"], "ok", "{status}");
        assert_eq!(status["trigger"], "file");
        sleep_ms(2000u64.saturating_sub(written.elapsed().as_millis() as u64)).await;
        let blue_at_2s = blue1.control.requests() + blue2.control.requests();
        sleep_ms(600).await;
        load.finish().await;
        assert_eq!(
            blue1.control.requests() + blue2.control.requests(),
            blue_at_2s,
            "2 s after the write every new request goes to green"
        );
        assert!(green.control.requests() > 0);
        let scrape = proxy.metrics().await;
        assert_eq!(
            metric(
                &scrape,
                "switchyard_route_split_weight{pool=\"green\",route=\"routes[0]\"}"
            ),
            Some(100.0)
        );
        assert_eq!(
            metric(&scrape, "switchyard_config_reloads_total{result=\"ok\"}"),
            Some(1.0)
        );
        assert!(
            metric(
                &scrape,
                "switchyard_config_last_reload_success_timestamp_seconds"
            )
            .unwrap_or(0.0)
                > 1e9
        );
    }
);

// Each of the three protocols sends 4000 requests where one run sent
// 10,000: the canary's count is Binomial(4000, 0.05), mean 200, standard
// deviation 13.8, and 3.5-6.5 % (140-260 requests) lies 4.35 deviations
// either side: an exact tail of 1.5e-5 per protocol, 4.4e-5 for the three.
matrix!(canary_split_95_5, |proto| async move {
    const REQUESTS: usize = 4000;
    let stable = Upstream::start("stable", 0).await;
    let canary = Upstream::start("canary", 0).await;
    let body = pool("stable", &[(stable.addr, 1)])
        + &pool("canary", &[(canary.addr, 1)])
        + &split_route("stable = 95, canary = 5", "");
    let proxy = proto.start(&body).await;
    assert_all_200(&proxy.via(proto).load("/", 16, REQUESTS).await);
    let share = canary.control.requests() as f64 / REQUESTS as f64 * 100.0;
    assert!((3.5..=6.5).contains(&share), "canary got {share:.2}%");
});

/// Pool that served each key (sticky header `x-user`).
async fn pools_by_key(via: &Via, keys: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for key in keys {
        let resp = via.send(via.get("/").header("x-user", key)).await;
        let pool = resp.headers()["x-switchyard-pool"]
            .to_str()
            .expect("ascii")
            .to_string();
        out.insert(key.clone(), pool);
    }
    out
}

// Keys hash to fixed buckets (FNV-1a), so the outcome for a given key set
// is the same on every run: of these 200 keys, 8 sit in the 5 % canary
// and 52 in the 25 % one (400 keys, one protocol, had 13 and 94).
matrix!(
    sticky_keys_keep_their_pool_and_canary_growth_is_monotone,
    |proto| async move {
        let blue = Upstream::start("blue", 0).await;
        let green = Upstream::start("green", 0).await;
        let pools = pool("blue", &[(blue.addr, 1)]) + &pool("green", &[(green.addr, 1)]);
        let sticky = "sticky = { header = \"x-user\" }\n";
        let proxy = proto
            .start(&(pools.clone() + &split_route("blue = 95, green = 5", sticky)))
            .await;
        let via = proxy.via(proto);
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();

        let first = pools_by_key(&via, &keys).await;
        assert_eq!(
            pools_by_key(&via, &keys).await,
            first,
            "same key, same pool"
        );
        let on_canary: Vec<&String> = keys.iter().filter(|k| first[*k] == "green").collect();
        assert!(
            !on_canary.is_empty() && on_canary.len() < keys.len() * 15 / 100,
            "{} keys on green",
            on_canary.len()
        );

        let (_, before) = proxy.admin("GET", "/admin/config/status").await;
        proxy.rewrite(&(pools + &split_route("blue = 75, green = 25", sticky)));
        assert_eq!(wait_reloaded(&proxy, &before).await["result"], "ok");
        let grown = pools_by_key(&via, &keys).await;
        for k in &on_canary {
            assert_eq!(grown[*k], "green", "{k} stayed on the canary");
        }
        let now_green = keys.iter().filter(|k| grown[*k] == "green").count();
        assert!(
            now_green > on_canary.len() * 2,
            "the canary grew: {now_green}"
        );
    }
);

matrix!(forced_pool_only_from_the_allow_list, |proto| async move {
    let blue = Upstream::start("blue", 0).await;
    let green = Upstream::start("green", 0).await;
    let red = Upstream::start("red", 0).await;
    let body = pool("blue", &[(blue.addr, 1)])
        + &pool("green", &[(green.addr, 1)])
        + &pool("red", &[(red.addr, 1)])
        + &split_route(
            "blue = 100",
            "force = { header = \"x-switchyard-pool\", allow = [\"green\"] }\n",
        );
    let proxy = proto.start(&body).await;
    let via = proxy.via(proto);
    for (asked, served) in [("green", "green"), ("red", "blue"), ("nonsense", "blue")] {
        let resp = via
            .send(via.get("/").header("x-switchyard-pool", asked))
            .await;
        assert_eq!(
            resp.headers()["x-switchyard-pool"],
            served,
            "asked for {asked}"
        );
    }
    assert_eq!(red.control.requests(), 0);
});

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_edit_under_load_keeps_the_old_routing() {
    let a = Upstream::start("a", 5).await;
    let b = Upstream::start("b", 5).await;
    let pools = pool("p", &[(a.addr, 1), (b.addr, 1)]);
    let proxy = Proxy::start(&(pools.clone() + &split_route("p = 100", ""))).await;
    let (_, before) = proxy.admin("GET", "/admin/config/status").await;
    let load = Load::start(&proxy, 8);
    sleep_ms(300).await;

    proxy.rewrite(&(pools + &split_route("p = 100, missing = 5", "")));
    let status = wait_reloaded(&proxy, &before).await;
    assert_eq!(status["result"], "error");
    assert_eq!(
        status["active_hash"], before["active_hash"],
        "the old config stays"
    );
    let error = status["error"].as_str().expect("error text");
    let file = proxy.config_path().display().to_string();
    assert!(
        error.starts_with(&format!("{file}:"))
            && error.contains("routes[0].split.missing: unknown pool 'missing'"),
        "{error}"
    );
    let line: usize = error[file.len() + 1..]
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .expect("line");
    let text = std::fs::read_to_string(proxy.config_path()).expect("config");
    assert!(
        text.lines()
            .nth(line - 1)
            .is_some_and(|l| l.contains("missing")),
        "line {line} names the key"
    );

    let (a0, b0) = (a.control.requests(), b.control.requests());
    sleep_ms(400).await;
    load.finish().await;
    assert!(
        a.control.requests() > a0 && b.control.requests() > b0,
        "old routing still serves"
    );
    let scrape = proxy.metrics().await;
    assert_eq!(
        metric(&scrape, "switchyard_config_reloads_total{result=\"error\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_removes_a_backend_fails_no_request() {
    let a = Upstream::start("a", 30).await;
    let b = Upstream::start("b", 30).await;
    let gone = Upstream::start("gone", 30).await;
    let proxy = Proxy::start(
        &(pool("p", &[(a.addr, 1), (b.addr, 1), (gone.addr, 1)]) + &split_route("p = 100", "")),
    )
    .await;
    let (_, before) = proxy.admin("GET", "/admin/config/status").await;
    let load = Load::start(&proxy, 8);
    sleep_ms(400).await;

    proxy.rewrite(&(pool("p", &[(a.addr, 1), (b.addr, 1)]) + &split_route("p = 100", "")));
    assert_eq!(wait_reloaded(&proxy, &before).await["result"], "ok");
    sleep_ms(200).await;
    let after_reload = gone.control.requests();
    sleep_ms(500).await;
    load.finish().await;
    assert_eq!(
        gone.control.requests(),
        after_reload,
        "the removed backend gets nothing new"
    );
    let entry = backend_entry(&proxy, &gone).await;
    assert_eq!(entry["state"], "drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads() {
    let a = Upstream::start("a", 0).await;
    let proxy = Proxy::start(&(pool("p", &[(a.addr, 1)]) + &split_route("p = 100", ""))).await;
    proxy.signal(libc::SIGHUP);
    let mut status = serde_json::Value::Null;
    let seen = eventually(Duration::from_secs(5), || {
        status = futures_block(proxy.admin("GET", "/admin/config/status"));
        status["trigger"] == "sighup"
    })
    .await;
    assert!(seen, "{status}");
    assert_eq!(status["result"], "ok");
}

/// Runs an admin call from a synchronous `eventually` condition.
fn futures_block<F: std::future::Future<Output = (u16, serde_json::Value)>>(
    f: F,
) -> serde_json::Value {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_upgrade_under_load_keeps_drains() {
    let a = Upstream::start("a", 10).await;
    let b = Upstream::start("b", 10).await;
    let drained = Upstream::start("drained", 10).await;
    let body =
        pool("p", &[(a.addr, 1), (b.addr, 1), (drained.addr, 1)]) + &split_route("p = 100", "");
    let mut proxy = Proxy::start(&body).await;
    let (status, _) = proxy
        .admin(
            "POST",
            &format!("/admin/backends/{}/drain?wait=5s", drained.addr),
        )
        .await;
    assert_eq!(status, 200);
    let at_drain = drained.control.requests();

    let load = Load::start(&proxy, 8);
    sleep_ms(400).await;
    proxy.upgrade().await;
    // The old instance hands over its sockets, finishes its requests and
    // exits; then the new one serves alone.
    proxy.wait_retired(Duration::from_secs(20)).await;
    sleep_ms(300).await;
    load.finish().await;
    assert_eq!(
        drained.control.requests(),
        at_drain,
        "the drain held across the upgrade"
    );
    let entry = backend_entry(&proxy, &drained).await;
    assert_eq!(
        entry["state"], "drained",
        "the new instance restored the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_then_exits_early() {
    let slow = Upstream::start("slow", 600).await;
    let mut proxy = Proxy::start(&long_grace(&slow)).await;
    let (client, url) = (proxy.client(), proxy.url("/"));
    let request =
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    assert!(eventually(Duration::from_secs(2), || slow.control.requests() == 1).await);

    let started = std::time::Instant::now();
    proxy.signal(libc::SIGTERM);
    assert_eq!(
        request
            .await
            .expect("join")
            .expect("in-flight request completes"),
        200
    );
    let code = proxy.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited well before the 20 s grace period"
    );
}

/// `switchyard_pool_fallbacks_total` from `from` to `to`, whatever the
/// label order of the exposition.
fn fallbacks(scrape: &str, from: &str, to: &str) -> f64 {
    let (from, to) = (format!("from=\"{from}\""), format!("to=\"{to}\""));
    scrape
        .lines()
        .filter(|l| l.starts_with("switchyard_pool_fallbacks_total{"))
        .filter(|l| l.contains(&from) && l.contains(&to))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

matrix!(
    a_drained_out_pool_falls_back_to_the_other_pool_of_its_split,
    |proto| async move {
        let blue = Upstream::start("blue", 0).await;
        let green = Upstream::start("green", 0).await;
        let pools = pool("blue", &[(blue.addr, 1)]) + &pool("green", &[(green.addr, 1)]);
        let proxy = proto
            .start(&(pools.clone() + &split_route("blue = 90, green = 10", "")))
            .await;
        let drain = format!("/admin/backends/{}/drain", blue.addr);
        assert_eq!(proxy.admin("POST", &drain).await.0, 200);

        let via = proxy.via(proto);
        let results = via.load("/", 4, 200).await;
        assert_all_200(&results);
        assert_eq!(
            (blue.control.requests(), green.control.requests()),
            (0, 200)
        );
        // Blue is drawn 90 % of the time: Binomial(200, 0.9) is 180 ± 4.2.
        let fell = fallbacks(&proxy.metrics().await, "blue", "green");
        assert!((160.0..=200.0).contains(&fell), "{fell} fallbacks");

        // Switched off, a request drawn for the drained pool gets 503.
        let (_, before) = proxy.admin("GET", "/admin/config/status").await;
        proxy.rewrite(&(pools + &split_route("blue = 90, green = 10", "fallback = false\n")));
        assert_eq!(wait_reloaded(&proxy, &before).await["result"], "ok");
        let mut refused = 0;
        for _ in 0..20 {
            let status = via.send(via.get("/")).await.status();
            assert!(status == 200 || status == 503, "{status}");
            refused += usize::from(status == 503);
        }
        // P(no 503 in 20 draws at 90 %) = 1e-20.
        assert!(refused > 0, "no request was refused without fallback");
    }
);

/// The sample of metric `name` for `up` in pool `p`.
fn member_metric(scrape: &str, name: &str, up: &Upstream) -> Option<f64> {
    metric(
        scrape,
        &format!("{name}{{backend=\"{}\",pool=\"p\"}}", up.addr),
    )
}

/// Starts a GET of `/` through `via` in the background: its status and
/// the instance that answered.
fn in_background(via: &Via) -> tokio::task::JoinHandle<(u16, String)> {
    let via = via.clone();
    tokio::spawn(async move {
        let resp = via.send(via.get("/")).await;
        let instance = resp.headers()["x-switchyard-instance"]
            .to_str()
            .expect("ascii")
            .to_string();
        (resp.status().as_u16(), instance)
    })
}

/// Waits until `up` has received `n` requests.
async fn received(up: &Upstream, n: u64) {
    let seen = eventually(Duration::from_secs(5), || up.control.requests() >= n).await;
    assert!(
        seen,
        "{} got {} requests",
        up.control.name,
        up.control.requests()
    );
}

matrix!(
    a_pool_whose_backends_are_all_full_answers_503_at_once,
    |proto| async move {
        let a = Upstream::start("a", 1000).await;
        let b = Upstream::start("b", 1000).await;
        let body = pool("p", &[(a.addr, 1), (b.addr, 1)])
            + "max_in_flight = 1\n"
            + &split_route("p = 100", "");
        let proxy = proto.start(&body).await;
        let via = proxy.via(proto);
        let held = [in_background(&via), in_background(&via)];
        received(&a, 1).await;
        received(&b, 1).await;
        let entry = backend_entry(&proxy, &a).await;
        assert_eq!(
            (&entry["in_flight"], &entry["max_in_flight"]),
            (&serde_json::json!(1), &serde_json::json!(1)),
            "{entry}"
        );
        assert_eq!(entry["max_connecting"], serde_json::Value::Null, "{entry}");

        let started = std::time::Instant::now();
        let resp = via.send(via.get("/")).await;
        let took = started.elapsed();
        assert_eq!(resp.status(), 503);
        assert!(took < Duration::from_millis(300), "refused after {took:?}");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert!(resp.headers().contains_key("x-request-id"));
        let error: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(error["error"]["type"], "overloaded", "{error}");
        let message = error["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("max_in_flight"), "{error}");

        let mut served = Vec::new();
        for request in held {
            let (status, instance) = request.await.expect("join");
            assert_eq!(status, 200);
            served.push(instance);
        }
        served.sort();
        assert_eq!(served, ["a", "b"], "one request on each backend");
        let scrape = proxy.metrics().await;
        for up in [&a, &b] {
            let skips = member_metric(&scrape, "switchyard_backend_full_skips_total", up);
            assert!(skips.is_some_and(|n| n >= 1.0), "{skips:?}");
            let connecting = member_metric(&scrape, "switchyard_backend_connecting", up);
            assert_eq!(connecting, Some(0.0));
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_backend_is_skipped_while_its_sibling_has_room() {
    let slow = Upstream::start("slow", 200).await;
    let fast = Upstream::start("fast", 5).await;
    // The cap on the slow backend alone: the pool can always take more.
    let body = format!(
        "[pools.p]\nbackends = [{{ address = \"{}\", max_in_flight = 2 }}, \
         {{ address = \"{}\" }}]\n{}",
        slow.addr,
        fast.addr,
        split_route("p = 100", "")
    );
    let proxy = Proxy::start(&body).await;
    let load = Load::start(&proxy, 8);
    sleep_ms(1500).await;
    load.finish().await;
    // Without the cap, least-connections would even out the in-flight
    // counts: about four each.
    let peak = slow.control.peak_concurrency();
    assert!(
        (1..=2).contains(&peak),
        "slow backend served {peak} at once"
    );
    assert!(fast.control.requests() > slow.control.requests());
    let scrape = proxy.metrics().await;
    let skips = member_metric(&scrape, "switchyard_backend_full_skips_total", &slow);
    assert!(skips.is_some_and(|n| n >= 1.0), "{skips:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_lowers_the_cap_counts_requests_already_in_flight() {
    let slow = Upstream::start("slow", 1500).await;
    let with_cap = |cap: u32| {
        pool("p", &[(slow.addr, 1)])
            + &format!("max_in_flight = {cap}\n")
            + &split_route("p = 100", "")
    };
    let proxy = Proxy::start(&with_cap(4)).await;
    let via = proxy.via(common::Proto::H2);
    let held = [in_background(&via), in_background(&via)];
    received(&slow, 2).await;

    proxy.rewrite(&with_cap(1));
    let (status, reload) = proxy.admin("POST", "/admin/reload").await;
    assert_eq!((status, &reload["result"]), (200, &serde_json::json!("ok")));
    assert_eq!(backend_entry(&proxy, &slow).await["max_in_flight"], 1);
    // The two requests from before the reload still count against it.
    assert_eq!(via.send(via.get("/")).await.status(), 503);

    for request in held {
        assert_eq!(request.await.expect("join").0, 200);
    }
    let mut entry = serde_json::Value::Null;
    let idle = eventually(Duration::from_secs(2), || {
        entry = futures_block(proxy.admin("GET", "/admin/backends"));
        entry["backends"][0]["in_flight"] == 0
    })
    .await;
    assert!(idle, "{entry}");
    assert_eq!(via.send(via.get("/")).await.status(), 200);
}
