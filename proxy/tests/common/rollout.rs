//! Rollout helpers shared by the rollout tests: the blue/green setup and
//! the admin API calls that watch and steer route `default`'s rollout.

use std::time::Duration;

use serde_json::Value;

use super::{pool, Proxy, Upstream};

/// Blue is the baseline, green the canary; fast windows so tests converge
/// in seconds; passive ejection off, so a failing canary keeps its traffic
/// and is judged on it.
pub fn rollout_config(blue: &Upstream, green: &Upstream, rollout: &str) -> String {
    pool("blue", &[(blue.addr, 1)])
        + &pool("green", &[(green.addr, 1)])
        + "[passive]\nfailures = 0\n"
        + "[[routes]]\nname = \"default\"\npath_prefix = \"/\"\nsplit = { blue = 100, green = 0 }\n"
        + "[routes.rollout]\ncanary = \"green\"\nsteps = [20, 50, 100]\n"
        + rollout
}

pub async fn status(proxy: &Proxy) -> Value {
    let (code, body) = proxy.admin("GET", "/admin/routes/default/rollout").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Polls the rollout until `done` holds, returning the statuses seen.
pub async fn until(proxy: &Proxy, limit: Duration, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < limit {
        let now = status(proxy).await;
        let finished = done(&now);
        seen.push(now);
        if finished {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "rollout never got there: {:#}",
        seen.last().unwrap_or(&Value::Null)
    );
}

/// `POST .../rollout/{action}`: the state and weight it answers.
pub async fn steer(proxy: &Proxy, action: &str) -> (Value, Value) {
    let path = format!("/admin/routes/default/rollout/{action}");
    let (code, body) = proxy.admin("POST", &path).await;
    assert_eq!(code, 200, "{body}");
    (body["state"].clone(), body["weight"].clone())
}

/// Whether check `name` failed in one of the status's recent windows.
pub fn failed_check(status: &Value, name: &str) -> bool {
    let failed = format!("{name} Fail");
    status["windows"].as_array().is_some_and(|w| {
        w.iter()
            .flat_map(|w| w["checks"].as_array().into_iter().flatten())
            .any(|c| c.as_str().is_some_and(|c| c.starts_with(&failed)))
    })
}

pub fn weights(seen: &[Value]) -> Vec<u64> {
    let mut out: Vec<u64> = seen.iter().filter_map(|s| s["weight"].as_u64()).collect();
    out.dedup();
    out
}
