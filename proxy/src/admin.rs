//! The admin listener (loopback by default): `GET /metrics` and the
//! proxy's own `GET /health/{live,ready}` ([`crate::probes`]), open, and
//! the JSON admin API under `/admin/`, behind a bearer token when one is
//! configured.
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | `/admin/backends` | every backend: pool, weight, state, in-flight and connecting counts with their caps, report |
//! | POST | `/admin/backends/{addr}/drain[?wait=30s]` | stop new requests; optionally wait for in-flight to reach 0 |
//! | POST | `/admin/backends/{addr}/undrain` | take requests again |
//! | GET | `/admin/routes` | effective routes and splits |
//! | GET | `/admin/routes/{name}/rollout` | a rollout's state, step, weight and last windows |
//! | POST | `/admin/routes/{name}/rollout/{start,pause,resume,promote,abort}` | steer it |
//! | GET | `/admin/config` | effective configuration, secrets left out |
//! | GET | `/admin/config/status` | latest reload attempt and active config hash |
//! | POST | `/admin/reload` | reload the configuration file now |
//! | GET | `/admin/replicas` | the `[replicas]` sync: Redis reachable, state version, changes waiting, config hash, rollout judge |
//!
//! Errors: 401 bad or missing token, 404 unknown path or backend, 405 wrong
//! method, 400 malformed parameter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::config::RolloutSpec;
use crate::probes;
use crate::replicas::Author;
use crate::rollout::{Phase, Rollout};
use crate::routing::{clock, strip_port, Backend, HostMatch, Member, StickyKey, NO_CAP};
use crate::shared::Shared;

/// Longest `?wait=` a drain accepts.
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(300);

pub struct Admin {
    shared: Arc<Shared>,
}

type Reply = Response<Vec<u8>>;

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn metrics(&self) -> Reply {
        self.shared.refresh_gauges();
        let m = &self.shared.metrics;
        m.client_connections
            .set(i64::try_from(crate::listener::open_connections()).unwrap_or(i64::MAX));
        m.body_buffer_bytes
            .set(i64::try_from(crate::codec::body::buffered_bytes()).unwrap_or(i64::MAX));
        let body = self.shared.metrics.encode();
        reply(StatusCode::OK, "text/plain; version=0.0.4", body)
    }

    async fn route(&self, method: &Method, path: &str, query: &str) -> Reply {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let get = |f: &dyn Fn() -> Reply| allow(method, &Method::GET, f);
        match segments.as_slice() {
            ["admin", "backends"] => get(&|| ok(self.backends())),
            ["admin", "routes"] => get(&|| ok(self.routes())),
            ["admin", "config"] => get(&|| ok(self.config())),
            ["admin", "config", "status"] => get(&|| ok(json!(self.shared.reload_status()))),
            ["admin", "reload"] => allow(method, &Method::POST, &|| self.reload()),
            ["admin", "routes", name, "rollout"] => get(&|| self.rollout(name)),
            ["admin", "rate-limits"] => get(&|| ok(self.rate_limits(query))),
            ["admin", "replicas"] => get(&|| ok(self.replicas())),
            ["admin", "routes", name, "rollout", action] => {
                allow(method, &Method::POST, &|| self.steer(name, action))
            }
            ["admin", "backends", addr, action @ ("drain" | "undrain")] => {
                if method != Method::POST {
                    return method_not_allowed("POST");
                }
                self.drain(addr, *action == "drain", query).await
            }
            _ => json_error(StatusCode::NOT_FOUND, "not_found", "unknown admin path"),
        }
    }

    fn backends(&self) -> Value {
        let active = self.shared.active();
        let mut listed = std::collections::HashSet::new();
        let mut out = Vec::new();
        for pool in active.pools.values() {
            for m in &pool.members {
                listed.insert(m.backend.addr);
                out.push(backend_json(&m.backend, Some((&pool.name, m))));
            }
        }
        // Backends no longer configured but still known (finishing requests).
        for b in self.shared.registry.all() {
            if !listed.contains(&b.addr) {
                out.push(backend_json(&b, None));
            }
        }
        json!({ "backends": out })
    }

    /// `GET /admin/rate-limits[?top=N]`: every route's rules with their
    /// decisions, tracked keys and most limited keys (hashed; default 10).
    fn rate_limits(&self, query: &str) -> Value {
        let top = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("top="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(10usize)
            .min(256);
        let active = self.shared.active();
        let routes: Vec<Value> = active
            .config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| {
                let limits = active.limits[i].as_ref()?;
                Some(json!({ "route": spec.label(i), "rules": limits.report(top) }))
            })
            .collect();
        json!({ "routes": routes })
    }

    /// `GET /admin/replicas`: whether drains and rollouts are shared
    /// through Redis, whether it answers, the state version applied,
    /// changes waiting, this replica's configuration hash (compare them
    /// across replicas), and who judges the rollouts.
    fn replicas(&self) -> Value {
        let sync = &self.shared.sync;
        let shared = self.shared.active().config.replicas.redis_url.is_some();
        json!({
            "shared": shared,
            "connected": sync.connected.load(std::sync::atomic::Ordering::Relaxed),
            "state_version": sync.version.load(std::sync::atomic::Ordering::Relaxed),
            "pending_changes": sync.pending(),
            "config_hash": self.shared.reload_status().active_hash,
            "replica_id": sync.id,
            "judge": shared.then(|| sync.judge()).flatten(),
            "is_judge": sync.is_judge(),
        })
    }

    fn routes(&self) -> Value {
        let active = self.shared.active();
        let routes: Vec<Value> = active
            .router
            .routes()
            .iter()
            .map(|r| {
                // u64: a split's weights may add up past u32::MAX.
                let total: u64 = r.split.entries().iter().map(|e| u64::from(e.weight)).sum();
                let split: Vec<Value> = r
                    .split
                    .entries()
                    .iter()
                    .map(|e| {
                        let percent = f64::from(e.weight) * 100.0 / total.max(1) as f64;
                        json!({ "pool": e.pool.name, "weight": e.weight, "percent": percent })
                    })
                    .collect();
                let host = match &r.host {
                    HostMatch::Any => None,
                    HostMatch::Exact(h) => Some(h.clone()),
                    HostMatch::Suffix(s) => Some(format!("*{s}")),
                };
                let sticky = r.sticky.as_ref().map(|k| match k {
                    StickyKey::Header(h) => json!({ "header": h.as_str() }),
                    StickyKey::Cookie(c) => json!({ "cookie": c }),
                });
                let force = r.force.as_ref().map(|f| {
                    let allow: Vec<&str> = f.allow.iter().map(|p| p.name.as_str()).collect();
                    json!({ "header": f.header.as_str(), "allow": allow })
                });
                json!({
                    "name": r.name, "host": host, "path_prefix": r.path_prefix,
                    "split": split, "sticky": sticky, "force": force,
                    "fallback": r.fallback.is_some(),
                })
            })
            .collect();
        json!({ "routes": routes })
    }

    /// `GET /admin/routes/{name}/rollout`: the rollout's phase, step,
    /// weight and last windows, with its settings.
    fn rollout(&self, name: &str) -> Reply {
        let active = self.shared.active();
        let Some(spec) = rollout_spec(&active.config, name) else {
            return no_rollout(name);
        };
        let status = self.shared.rollout(name);
        ok(json!({
            "route": name,
            "state": status.as_ref().map(|r| r.phase),
            "step": status.as_ref().map(|r| r.step),
            "weight": status.as_ref().map(|r| r.weight),
            "failed_in_row": status.as_ref().map(|r| r.failed_in_row),
            "windows_judged": status.as_ref().map(|r| r.windows_judged),
            "windows": status.as_ref().map(|r| r.recent.clone()),
            "settings": spec,
        }))
    }

    /// `POST /admin/routes/{name}/rollout/{start|pause|resume|promote|abort}`.
    fn steer(&self, name: &str, action: &str) -> Reply {
        let active = self.shared.active();
        let Some(spec) = rollout_spec(&active.config, name) else {
            return no_rollout(name);
        };
        let change = |r: &mut Option<Rollout>| match (action, r.as_mut()) {
            ("start", _) => *r = Some(Rollout::start(spec)),
            ("pause", Some(r)) if r.phase.judging() => r.phase = Phase::Paused,
            ("resume", Some(r)) if r.phase == Phase::Paused => r.phase = Phase::Progressing,
            ("promote", Some(r)) => r.promote(spec),
            ("abort", Some(r)) => {
                r.weight = 0;
                r.phase = Phase::RolledBack;
            }
            _ => {}
        };
        if !matches!(action, "start" | "pause" | "resume" | "promote" | "abort") {
            let msg = "use start, pause, resume, promote or abort";
            return json_error(StatusCode::NOT_FOUND, "not_found", msg);
        }
        if let Err(e) = self.shared.update_rollout(name, Author::Operator, change) {
            let msg = format!("could not persist the rollout: {e}");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "state_not_saved", &msg);
        }
        tracing::info!(target: "switchyard::rollout", route = name, decision = action, "rollout steered through the admin API");
        self.rollout(name)
    }

    /// The effective configuration. The admin token is never serialized;
    /// only where it comes from is shown.
    fn config(&self) -> Value {
        let active = self.shared.active();
        json!({
            "file": self.shared.config_path.display().to_string(),
            "hash": active.config.source_hash,
            "config": &*active.config,
        })
    }

    fn reload(&self) -> Reply {
        match self.shared.reload("admin") {
            Ok(()) => ok(json!(self.shared.reload_status())),
            Err(e) => json_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", &e),
        }
    }

    async fn drain(&self, addr: &str, on: bool, query: &str) -> Reply {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            let msg = format!("'{addr}' is not a socket address like 127.0.0.1:9101");
            return json_error(StatusCode::BAD_REQUEST, "bad_request", &msg);
        };
        let wait = match parse_wait(query) {
            Ok(w) => w,
            Err(msg) => return json_error(StatusCode::BAD_REQUEST, "bad_request", &msg),
        };
        let backend = match self.shared.set_drained(&addr, on) {
            Ok(Some(b)) => b,
            Ok(None) => {
                let msg = format!("no backend {addr}");
                return json_error(StatusCode::NOT_FOUND, "not_found", &msg);
            }
            Err(e) => {
                let msg = format!("drain applied but not persisted: {e}");
                return json_error(StatusCode::INTERNAL_SERVER_ERROR, "state_file", &msg);
            }
        };
        let drained = match wait {
            Some(limit) if on => wait_idle(&backend, limit).await,
            _ => backend.in_flight() == 0,
        };
        ok(json!({
            "address": addr.to_string(),
            "draining": on,
            "in_flight": backend.in_flight(),
            "drained": on && drained,
            "state": state_of(&backend),
        }))
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let active = self.shared.active();
        let Some(token) = active.config.admin.token.as_deref() else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), token.as_bytes())
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Reply {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        let query = req.uri.query().unwrap_or("").to_string();
        // Open like /metrics: probes carry no token (see `probes`).
        let shared = &self.shared;
        match path.as_str() {
            "/metrics" => return allow(&method, &Method::GET, &|| self.metrics()),
            "/health/live" => return allow(&method, &Method::GET, &|| probes::live(shared)),
            "/health/ready" => return allow(&method, &Method::GET, &|| probes::ready(shared)),
            _ => {}
        }
        if !path.starts_with("/admin/") {
            return json_error(StatusCode::NOT_FOUND, "not_found", "unknown path");
        }
        if !self.authorized(session) {
            let mut resp = json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            );
            resp.headers_mut()
                .insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
            return resp;
        }
        self.route(&method, &path, &query).await
    }
}

/// Polls until `backend` has no request in flight or `limit` passes.
async fn wait_idle(backend: &Backend, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while backend.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend.in_flight() == 0
}

/// `wait=30s` from a query string; absent means do not wait.
fn parse_wait(query: &str) -> Result<Option<Duration>, String> {
    let mut wait = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some(("wait", v)) = pair.split_once('=') else {
            return Err(format!("unknown parameter '{pair}'; only wait=<duration>"));
        };
        let d = humantime::parse_duration(v)
            .map_err(|e| format!("wait={v}: {e}; write it like wait=30s"))?;
        if d > MAX_DRAIN_WAIT {
            return Err(format!("wait={v} exceeds {}s", MAX_DRAIN_WAIT.as_secs()));
        }
        wait = Some(d);
    }
    Ok(wait)
}

/// `starting`, `healthy`, `unhealthy`, `ejected`, `draining` or `drained`.
pub fn state_of(b: &Backend) -> &'static str {
    match () {
        _ if b.is_draining() && b.in_flight() > 0 => "draining",
        _ if b.is_draining() => "drained",
        _ if b.is_ejected() => "ejected",
        _ if !b.has_been_healthy() => "starting",
        _ if b.is_eligible() => "healthy",
        _ => "unhealthy",
    }
}

fn backend_json(b: &Backend, membership: Option<(&str, &Member)>) -> Value {
    let progress = b.progress.lock().expect("progress lock");
    let report = progress.last_report.as_ref().map(|(r, at)| {
        let mut v = json!(r);
        v["age_ms"] = json!(clock::now_ms().saturating_sub(*at));
        v
    });
    let last_error = b.last_error().or_else(|| progress.last_error.clone());
    let (pool, weight, requests, caps) = match membership {
        Some((pool, m)) => (
            Some(pool),
            m.weight,
            m.requests.iter().map(|c| c.get()).sum(),
            [m.max_in_flight, m.max_connecting],
        ),
        None => (None, 0, 0u64, [NO_CAP; 2]),
    };
    let [max_in_flight, max_connecting] = caps.map(|c| (c != NO_CAP).then_some(c));
    json!({
        "pool": pool,
        "address": b.addr.to_string(),
        "name": b.name,
        "weight": weight,
        "state": match pool {
            // Removed from the configuration: drained, never cut off.
            None if b.in_flight() > 0 => "draining",
            None => "drained",
            Some(_) => state_of(b),
        },
        "in_flight": b.in_flight(),
        "max_in_flight": max_in_flight,
        "connecting": b.connecting(),
        "max_connecting": max_connecting,
        "healthy": b.is_healthy(),
        "ready": b.is_ready(),
        "requests": requests,
        "last_error": last_error,
        "report": report,
    })
}

fn rollout_spec<'c>(config: &'c crate::config::Config, name: &str) -> Option<&'c RolloutSpec> {
    config
        .routes
        .iter()
        .find(|r| r.name.as_deref() == Some(name))?
        .rollout
        .as_ref()
}

fn no_rollout(name: &str) -> Reply {
    let msg = format!("no route '{name}' with a [routes.rollout] section");
    json_error(StatusCode::NOT_FOUND, "not_found", &msg)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn allow(method: &Method, wanted: &Method, f: &dyn Fn() -> Reply) -> Reply {
    if method == wanted {
        f()
    } else {
        method_not_allowed(wanted.as_str())
    }
}

fn method_not_allowed(wanted: &str) -> Reply {
    let mut resp = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {wanted}"),
    );
    let value = http::HeaderValue::from_str(wanted).expect("method names are valid headers");
    resp.headers_mut().insert("allow", value);
    resp
}

fn ok(body: Value) -> Reply {
    reply(
        StatusCode::OK,
        "application/json",
        body.to_string().into_bytes(),
    )
}

pub fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

pub fn json_error(status: StatusCode, kind: &str, message: &str) -> Reply {
    let body = json!({ "error": { "message": message, "type": kind } });
    reply(status, "application/json", body.to_string().into_bytes())
}

/// The plain-HTTP listener in `redirect` mode: 308 to the HTTPS URL.
pub struct Redirect {
    pub https_port: u16,
}

#[async_trait]
impl ServeHttp for Redirect {
    async fn response(&self, session: &mut ServerSession) -> Reply {
        let req = session.req_header();
        let host = req
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .map(strip_port)
            .unwrap_or("localhost");
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let location = match self.https_port {
            443 => format!("https://{host}{path}"),
            port => format!("https://{host}:{port}{path}"),
        };
        Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header("location", location)
            .header("content-length", 0)
            .body(Vec::new())
            .expect("redirect parts are valid")
    }
}
