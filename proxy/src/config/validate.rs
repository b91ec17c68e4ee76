//! Cross-field rules that serde cannot express.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::error::Problem;
use super::locate::KeyPath;
use super::{Config, DnsTarget, PoolSpec, RolloutSpec, RouteSpec, Sticky, MAX_HEADERS};
use crate::tls::{self, KeyPairFile};

/// Checks `config`, resolving relative paths against `base` and backend
/// names to socket addresses. Returns every problem found.
pub(super) fn validate(config: &mut Config, base: &Path) -> Vec<Problem> {
    let mut v = Validator::default();
    v.server(config, base);
    v.tls(config, base);
    v.admin(config, base);
    v.health(config);
    v.passive(config);
    v.timeouts(config);
    v.retry(config);
    v.limits(config);
    v.pools(config);
    v.discovery(config);
    v.replicas(config);
    v.routes(config);
    let routes: Vec<_> = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let path = KeyPath::root().key("routes").index(i);
            (path, r.rate_limits.as_slice(), r.shed.as_ref())
        })
        .collect();
    v.problems
        .extend(super::edge::validate(&config.rate_limits, &routes));
    v.problems
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn fail(&mut self, path: KeyPath, message: impl Into<String>) {
        self.problems.push(Problem {
            path,
            message: message.into(),
        });
    }

    fn check(&mut self, ok: bool, path: &[&str], message: &str) {
        if !ok {
            let p = path.iter().fold(KeyPath::root(), |p, k| p.key(k));
            self.fail(p, message);
        }
    }

    fn replicas(&mut self, c: &Config) {
        let r = &c.replicas;
        self.check(
            !r.resync_interval.is_zero(),
            &["replicas", "resync_interval"],
            "must be greater than 0",
        );
        self.check(
            r.judge_lease >= 2 * r.resync_interval,
            &["replicas", "judge_lease"],
            "must be at least twice resync_interval: the lease is renewed at every resync",
        );
    }

    fn server(&mut self, c: &mut Config, base: &Path) {
        let s = &mut c.server;
        s.run_dir = base.join(&s.run_dir);
        s.state_file = base.join(&s.state_file);
        let threads = s.threads;
        self.check(threads >= 1, &["server", "threads"], "must be at least 1");
    }

    fn tls(&mut self, c: &mut Config, base: &Path) {
        let https = &mut c.listeners.https;
        https.cert = base.join(&https.cert);
        https.key = base.join(&https.key);
        if let Err(e) = tls::load_key_pair(&https.cert, &https.key) {
            let key = match e.file {
                KeyPairFile::Cert => "cert",
                KeyPairFile::Key => "key",
            };
            let path = KeyPath::root().key("listeners").key("https").key(key);
            self.fail(path, e.message);
        }
    }

    /// Reads the admin token and refuses an unauthenticated admin API on a
    /// non-loopback address.
    fn admin(&mut self, c: &mut Config, base: &Path) {
        let root = KeyPath::root().key("admin");
        let a = &mut c.admin;
        if let Some(file) = &mut a.token_file {
            *file = base.join(&*file);
        }
        let token = match (&a.token_env, &a.token_file) {
            (Some(_), Some(_)) => {
                self.fail(
                    root.key("token_file"),
                    "set either token_env or token_file, not both",
                );
                return;
            }
            (Some(var), None) => std::env::var(var).map_err(|_| {
                (
                    root.key("token_env"),
                    format!("environment variable {var} is not set"),
                )
            }),
            (None, Some(file)) => std::fs::read_to_string(file).map_err(|e| {
                (
                    root.key("token_file"),
                    format!("cannot read {}: {e}", file.display()),
                )
            }),
            // Neither set: the conventional variable, when present.
            (None, None) => Ok(std::env::var(DEFAULT_TOKEN_ENV).unwrap_or_default()),
        };
        match token.map(|t| t.trim().to_string()) {
            Ok(t) if t.is_empty() && (a.token_env.is_some() || a.token_file.is_some()) => {
                let key = if a.token_env.is_some() {
                    "token_env"
                } else {
                    "token_file"
                };
                self.fail(root.key(key), "the admin token is empty");
            }
            Ok(t) if t.is_empty() => {
                if !a.address.ip().is_loopback() {
                    let msg = format!(
                        "a non-loopback admin address needs a token: set {DEFAULT_TOKEN_ENV}, token_env or token_file"
                    );
                    self.fail(root.key("address"), msg);
                }
            }
            Ok(t) => a.token = Some(t),
            Err((path, msg)) => self.fail(path, msg),
        }
    }

    fn health(&mut self, c: &Config) {
        let h = &c.health;
        self.check(
            h.path.starts_with('/'),
            &["health", "path"],
            "must start with '/'",
        );
        self.check(
            !h.interval.is_zero(),
            &["health", "interval"],
            "must be greater than 0",
        );
        self.check(
            !h.timeout.is_zero(),
            &["health", "timeout"],
            "must be greater than 0",
        );
        self.check(h.rise >= 1, &["health", "rise"], "must be at least 1");
        self.check(h.fall >= 1, &["health", "fall"], "must be at least 1");
    }

    fn passive(&mut self, c: &Config) {
        let p = &c.passive;
        self.check(
            !p.ejection_base.is_zero(),
            &["passive", "ejection_base"],
            "must be greater than 0",
        );
        self.check(
            p.ejection_max >= p.ejection_base,
            &["passive", "ejection_max"],
            "must not be shorter than passive.ejection_base",
        );
    }

    fn timeouts(&mut self, c: &Config) {
        let t = &c.timeouts;
        for (key, d) in [
            ("client_idle", t.client_idle),
            ("client_head", t.client_head),
            ("client_body", t.client_body),
            ("connect", t.connect),
            ("read", t.read),
            ("total", t.total),
            ("upstream_idle", t.upstream_idle),
        ] {
            self.check(!d.is_zero(), &["timeouts", key], "must be greater than 0");
        }
        self.check(
            t.total >= t.connect,
            &["timeouts", "total"],
            "must not be shorter than timeouts.connect",
        );
    }

    fn retry(&mut self, c: &Config) {
        let r = &c.retry;
        self.check(r.retries <= 10, &["retry", "retries"], "must be at most 10");
    }

    fn limits(&mut self, c: &Config) {
        let l = &c.limits;
        self.check(
            l.max_body_bytes >= 1,
            &["limits", "max_body_bytes"],
            "must be at least 1",
        );
        self.check(
            l.max_header_bytes >= 1024,
            &["limits", "max_header_bytes"],
            "must be at least 1024",
        );
        self.check(
            l.body_buffer_total >= l.max_body_bytes,
            &["limits", "body_buffer_total"],
            "must not be below limits.max_body_bytes, or the largest allowed body could never be buffered",
        );
        self.check(
            (1..=MAX_HEADERS).contains(&l.max_headers),
            &["limits", "max_headers"],
            &format!("must be between 1 and {MAX_HEADERS}"),
        );
        self.check(
            l.max_connections >= 1,
            &["limits", "max_connections"],
            "must be at least 1",
        );
        self.check(
            (1..=MAX_STREAMS).contains(&l.max_streams),
            &["limits", "max_streams"],
            &format!("must be between 1 and {MAX_STREAMS}"),
        );
        for (key, window) in [
            ("h2_stream_window", l.h2_stream_window),
            ("h2_connection_window", l.h2_connection_window),
        ] {
            self.check(
                (H2_MIN_WINDOW..=H2_MAX_WINDOW).contains(&window),
                &["limits", key],
                &format!("must be between {H2_MIN_WINDOW} and {H2_MAX_WINDOW} (RFC 9113 §6.9)"),
            );
        }
    }

    fn pools(&mut self, c: &mut Config) {
        let root = KeyPath::root().key("pools");
        if c.pools.is_empty() {
            self.fail(root.clone(), "at least one pool is required");
        }
        for (name, pool) in c.pools.iter_mut() {
            let path = root.key(name);
            if !is_valid_name(name) {
                self.fail(
                    path.clone(),
                    format!("pool name '{name}' may only use letters, digits, '-' and '_'"),
                );
            }
            self.pool(name, pool, &path);
        }
    }

    fn pool(&mut self, name: &str, pool: &mut PoolSpec, path: &KeyPath) {
        let list = path.key("backends");
        if let Some(Err(msg)) = pool.dns.as_deref().map(DnsTarget::parse) {
            self.fail(path.key("dns"), msg);
        }
        if pool.backends.is_empty() {
            if pool.dns.is_none() {
                let msg = format!("pool '{name}' has no backends and no dns");
                self.fail(list.clone(), msg);
            }
            return;
        }
        self.caps(path, pool.max_in_flight, pool.max_connecting);
        let mut seen: HashSet<SocketAddr> = HashSet::new();
        for (i, b) in pool.backends.iter_mut().enumerate() {
            self.caps(&list.index(i), b.max_in_flight, b.max_connecting);
            let at = list.index(i).key("address");
            match resolve(&b.address) {
                Ok(addr) => {
                    b.socket = Some(addr);
                    if !seen.insert(addr) {
                        let msg = format!("duplicate backend {addr} in pool '{name}'");
                        self.fail(at, msg);
                    }
                }
                Err(msg) => self.fail(at, msg),
            }
        }
        // Addresses from DNS take weight 1, so they count as such a backend.
        if pool.dns.is_none() && pool.backends.iter().all(|b| b.weight == 0) {
            let msg = format!("pool '{name}' needs at least one backend with weight > 0");
            self.fail(list.index(0).key("weight"), msg);
        }
    }

    fn discovery(&mut self, c: &Config) {
        let d = &c.discovery;
        self.check(
            !d.min_ttl.is_zero(),
            &["discovery", "min_ttl"],
            "must be greater than 0",
        );
        self.check(
            d.max_ttl >= d.min_ttl,
            &["discovery", "max_ttl"],
            "must be at least min_ttl",
        );
    }

    /// A cap of 0 would keep the backend out of service for good.
    fn caps(&mut self, at: &KeyPath, max_in_flight: Option<u32>, max_connecting: Option<u32>) {
        for (key, cap) in [
            ("max_in_flight", max_in_flight),
            ("max_connecting", max_connecting),
        ] {
            if cap == Some(0) {
                self.fail(at.key(key), "must be at least 1 (leave it out for no cap)");
            }
        }
    }

    fn routes(&mut self, c: &Config) {
        let root = KeyPath::root().key("routes");
        if c.routes.is_empty() {
            self.fail(root.clone(), "at least one [[routes]] entry is required");
        }
        let mut labels = HashSet::new();
        for (i, route) in c.routes.iter().enumerate() {
            self.route(c, route, &root.index(i));
            let label = route.label(i);
            if !labels.insert(label.clone()) {
                self.fail(
                    root.index(i).key("name"),
                    format!("duplicate route name '{label}'"),
                );
            }
        }
    }

    fn route(&mut self, c: &Config, r: &RouteSpec, path: &KeyPath) {
        if let Some(host) = &r.host {
            if !is_valid_host_pattern(host) {
                let msg = format!(
                    "host '{host}' must be a host name or '*.' followed by a domain, without port"
                );
                self.fail(path.key("host"), msg);
            }
        }
        if !r.path_prefix.starts_with('/') {
            self.fail(path.key("path_prefix"), "must start with '/'");
        }
        match (&r.pool, &r.split) {
            (Some(_), Some(_)) => {
                self.fail(path.key("split"), "set either 'pool' or 'split', not both");
            }
            (None, None) => self.fail(path.clone(), "route needs 'pool' or 'split'"),
            (Some(pool), None) => self.pool_ref(c, pool, path.key("pool")),
            (None, Some(split)) => {
                for pool in split.keys() {
                    self.pool_ref(c, pool, path.key("split").key(pool));
                }
                if split.values().all(|w| *w == 0) {
                    let msg = "split needs at least one pool with weight > 0";
                    self.fail(path.key("split"), msg);
                }
            }
        }
        if let Some(name) = &r.name {
            if !is_valid_name(name) {
                let msg = format!("route name '{name}' may only use letters, digits, '-' and '_'");
                self.fail(path.key("name"), msg);
            }
        }
        if let Some(sticky) = &r.sticky {
            self.sticky(sticky, &path.key("sticky"));
        }
        if let Some(rollout) = &r.rollout {
            self.rollout(r, rollout, &path.key("rollout"));
        }
        if let Some(force) = &r.force {
            let at = path.key("force");
            if http::HeaderName::from_bytes(force.header.as_bytes()).is_err() {
                self.fail(
                    at.key("header"),
                    format!("'{}' is not a valid header name", force.header),
                );
            }
            if force.allow.is_empty() {
                self.fail(
                    at.key("allow"),
                    "list at least one pool the header may select",
                );
            }
            for (i, pool) in force.allow.iter().enumerate() {
                self.pool_ref(c, pool, at.key("allow").index(i));
            }
        }
    }

    fn rollout(&mut self, r: &RouteSpec, spec: &RolloutSpec, path: &KeyPath) {
        if r.name.is_none() {
            let msg = "a route with a rollout needs a 'name' (the admin API addresses it by name)";
            self.fail(path.clone(), msg);
        }
        let split = r.effective_split();
        if split.len() != 2 {
            let msg = "a rollout needs a split of exactly two pools: the baseline and the canary";
            self.fail(path.clone(), msg);
        } else if !split.iter().any(|(pool, _)| *pool == spec.canary) {
            let msg = format!(
                "canary '{}' is not a pool of this route's split",
                spec.canary
            );
            self.fail(path.key("canary"), msg);
        }
        let rising = spec.steps.windows(2).all(|w| w[0] < w[1]);
        let in_range = spec.steps.iter().all(|s| (1..=100).contains(s));
        if spec.steps.last() != Some(&100) || !rising || !in_range {
            let msg = "steps must rise, each between 1 and 100, and end at 100";
            self.fail(path.key("steps"), msg);
        }
        if spec.interval < std::time::Duration::from_millis(100) {
            self.fail(path.key("interval"), "must be at least 100ms");
        }
        if spec.min_requests == 0 {
            self.fail(path.key("min_requests"), "must be at least 1");
        }
        if spec.max_failed_checks == 0 {
            self.fail(path.key("max_failed_checks"), "must be at least 1");
        }
        if !(spec.max_error_rate > 0.0 && spec.max_error_rate <= 1.0) {
            self.fail(path.key("max_error_rate"), "must be above 0 and at most 1");
        }
        if !(1.0..=f64::MAX).contains(&spec.max_latency_ratio) {
            self.fail(path.key("max_latency_ratio"), "must be at least 1");
        }
        if !(spec.significance > 0.0 && spec.significance < 0.5) {
            self.fail(path.key("significance"), "must be above 0 and below 0.5");
        }
        if let Some(compare) = &spec.compare {
            let at = path.key("compare");
            if !(compare.sample > 0.0 && compare.sample <= 1.0) {
                self.fail(at.key("sample"), "must be above 0 and at most 1");
            }
            if !(compare.min_cosine > 0.0 && compare.min_cosine <= 1.0) {
                self.fail(at.key("min_cosine"), "must be above 0 and at most 1");
            }
        }
    }

    fn sticky(&mut self, s: &Sticky, path: &KeyPath) {
        match (&s.header, &s.cookie) {
            (Some(h), None) => {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    self.fail(
                        path.key("header"),
                        format!("'{h}' is not a valid header name"),
                    );
                }
            }
            (None, Some(c)) => {
                if c.is_empty() || c.contains([';', '=', ' ']) {
                    self.fail(
                        path.key("cookie"),
                        format!("'{c}' is not a valid cookie name"),
                    );
                }
            }
            _ => self.fail(path.clone(), "set exactly one of 'header' and 'cookie'"),
        }
    }

    fn pool_ref(&mut self, c: &Config, pool: &str, path: KeyPath) {
        if !c.pools.contains_key(pool) {
            let known: Vec<&str> = c.pools.keys().map(String::as_str).collect();
            let msg = format!(
                "unknown pool '{pool}' (defined pools: {})",
                known.join(", ")
            );
            self.fail(path, msg);
        }
    }
}

/// Upper bound of `limits.max_streams`: each open stream may hold a
/// buffered body, so the product with `max_connections` is the memory risk.
const MAX_STREAMS: u32 = 1000;
/// HTTP/2's initial window, and the largest window it allows.
const H2_MIN_WINDOW: u32 = 65_535;
const H2_MAX_WINDOW: u32 = (1 << 31) - 1;

/// Read for the admin token when neither `token_env` nor `token_file` is set.
pub const DEFAULT_TOKEN_ENV: &str = "SWITCHYARD_ADMIN_TOKEN";

/// Resolves `host:port` once; runtime state is keyed by the result.
fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !address.contains(':') {
        return Err(format!(
            "backend address '{address}' needs a port, like '127.0.0.1:9101'"
        ));
    }
    match address.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("backend address '{address}' resolved to nothing")),
        Err(e) => Err(format!("cannot resolve backend address '{address}': {e}")),
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_valid_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    super::has_labels_of(name, b"-")
}
