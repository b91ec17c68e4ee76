//! The proxy's own liveness and readiness, served on the admin listener
//! without the token, as `/metrics` is: orchestrator probes and L4
//! balancers carry no credentials.
//!
//! - `GET /health/live`: 200 while the process serves.
//! - `GET /health/ready`: 200 when some route has an eligible backend;
//!   503 `not_ready` when none has, and 503 `stopping` once a graceful
//!   shutdown or upgrade has begun, so that balancers send new connections
//!   elsewhere while in-flight requests finish.
//!
//! Both carry the hash of the configuration in effect, so every replica's
//! configuration can be compared from outside. With `[replicas]`, readiness
//! also says whether the shared state is current: a replica cut from Redis
//! stays ready (it serves with the last state it knew) but says so.

use std::sync::atomic::Ordering;

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::shared::{Active, Shared};

type Reply = Response<Vec<u8>>;

pub fn live(shared: &Shared) -> Reply {
    answer(StatusCode::OK, json!({ "status": "live" }), shared)
}

pub fn ready(shared: &Shared) -> Reply {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    if shared.closing.load(Ordering::Relaxed) {
        let reason = "a graceful shutdown or upgrade has begun";
        return answer(
            unavailable,
            json!({ "status": "stopping", "reason": reason }),
            shared,
        );
    }
    let active = shared.active();
    let routes = active.router.routes().len();
    match serving_routes(&active) {
        0 => {
            let reason =
                "no route has an eligible backend (healthy, ready, not ejected, not drained)";
            answer(
                unavailable,
                json!({ "status": "not_ready", "reason": reason }),
                shared,
            )
        }
        serving => {
            let body = json!({ "status": "ready", "routes": routes, "routes_serving": serving });
            answer(StatusCode::OK, body, shared)
        }
    }
}

/// Routes that could pick a backend now: a pool of their split that gets
/// traffic (a weight above 0, or any pool when the route falls back) has
/// an eligible member of weight above 0.
fn serving_routes(active: &Active) -> usize {
    active
        .router
        .routes()
        .iter()
        .filter(|r| {
            r.split
                .entries()
                .iter()
                .any(|e| (e.weight > 0 || r.fallback.is_some()) && e.pool.pick(&[]).is_some())
        })
        .count()
}

fn answer(status: StatusCode, mut body: Value, shared: &Shared) -> Reply {
    body["config_hash"] = json!(shared.reload_status().active_hash);
    if shared.active().config.replicas.redis_url.is_some() {
        let sync = &shared.sync;
        let connected = sync.connected.load(Ordering::Relaxed);
        body["shared_state"] = json!({
            "redis": if connected { "connected" } else { "unreachable" },
            "version": sync.version.load(Ordering::Relaxed),
        });
    }
    crate::admin::reply(status, "application/json", body.to_string().into_bytes())
}
