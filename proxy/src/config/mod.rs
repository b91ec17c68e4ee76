//! The configuration file: one TOML document, strictly parsed.
//!
//! Every key is documented in `config/switchyard.toml` and `config/README.md`.
//! Loading is two steps: serde (types, unknown keys, durations) and then
//! [`validate`] (cross-field rules). Both report the file, the key path and
//! the line of every problem.

mod duration;
mod edge;
mod error;
mod locate;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use edge::{LimitKey, RateLimitSection, RateLimitSpec, RedisFailure, ShedSpec};
pub use error::{ConfigError, ConfigErrors};
pub use locate::KeyPath;

/// A validated configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    pub listeners: Listeners,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub passive: PassiveSection,
    #[serde(default)]
    pub timeouts: TimeoutSection,
    #[serde(default)]
    pub retry: RetrySection,
    #[serde(default)]
    pub limits: LimitSection,
    #[serde(default)]
    pub rate_limits: RateLimitSection,
    #[serde(default)]
    pub replicas: ReplicaSection,
    #[serde(default)]
    pub discovery: DiscoverySection,
    #[serde(default)]
    pub response_headers: ResponseHeaders,
    pub pools: BTreeMap<String, PoolSpec>,
    pub routes: Vec<RouteSpec>,
    /// SHA-256 of the file text this was parsed from.
    #[serde(skip)]
    pub source_hash: String,
}

/// `[replicas]`: runtime state (drains, rollouts) shared with other
/// replicas through Redis. Read at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSection {
    /// Redis shared by the replicas, e.g. `redis://10.0.0.5:6379`; without
    /// it, drains stay with this process.
    pub redis_url: Option<String>,
    /// How often a replica checks the shared version, whatever pub/sub says.
    #[serde(with = "duration")]
    pub resync_interval: Duration,
    /// Prefix of the Redis keys, so several fleets can share one Redis.
    pub key_prefix: String,
    /// Expiry of the lease that makes one replica judge the rollouts: how
    /// long the others wait before taking over from a judge that died.
    /// Renewed at every sync.
    #[serde(with = "duration")]
    pub judge_lease: Duration,
}

impl Default for ReplicaSection {
    fn default() -> Self {
        Self {
            redis_url: None,
            resync_interval: Duration::from_secs(1),
            key_prefix: "switchyard".into(),
            judge_lease: Duration::from_secs(3),
        }
    }
}

/// `[discovery]`: how pools with `dns` are resolved.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySection {
    /// `ip:port` of the name servers to ask; empty: the system's
    /// (`/etc/resolv.conf`, with its search domains).
    pub nameservers: Vec<SocketAddr>,
    /// A record's TTL is raised to this before the next lookup, so a TTL
    /// of 0 cannot make the proxy query in a loop.
    #[serde(with = "duration")]
    pub min_ttl: Duration,
    /// ... and lowered to this, so a long TTL cannot hide changes for long.
    #[serde(with = "duration")]
    pub max_ttl: Duration,
}

impl Default for DiscoverySection {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
        }
    }
}

/// What a pool's `dns` names: a `host:port` (its A/AAAA records, all on
/// that port) or an SRV name (each target's addresses, on its port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsTarget {
    Host { name: String, port: u16 },
    Srv(String),
}

impl DnsTarget {
    /// Parses a pool's `dns` value; the error says what is expected.
    pub fn parse(value: &str) -> Result<Self, String> {
        let expected = || {
            format!("'{value}' is neither host:port (like 'backends.internal:9100') nor an SRV name (like '_api._tcp.backends.internal')")
        };
        if value.starts_with('_') {
            let labels = value.trim_end_matches('.').split('.').count();
            return (labels >= 3 && is_dns_name(value))
                .then(|| Self::Srv(value.to_string()))
                .ok_or_else(expected);
        }
        let (name, port) = value.rsplit_once(':').ok_or_else(expected)?;
        match port.parse::<u16>() {
            Ok(port) if port > 0 && is_dns_name(name) => Ok(Self::Host {
                name: name.to_string(),
                port,
            }),
            _ => Err(expected()),
        }
    }
}

/// A DNS name (one final dot allowed): letters, digits, '-' and '_'.
fn is_dns_name(name: &str) -> bool {
    has_labels_of(name.strip_suffix('.').unwrap_or(name), b"-_")
}

/// Non-empty dot-separated labels of letters, digits and `extra` bytes.
fn has_labels_of(name: &str, extra: &[u8]) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        })
}

/// Process-level settings handed to Pingora's `ServerConf`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// After SIGTERM/SIGQUIT, how long in-flight requests may still run.
    #[serde(with = "duration")]
    pub grace_period: Duration,
    /// After the grace period, how long services get to stop.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Holds the pid file and the graceful-upgrade socket.
    pub run_dir: PathBuf,
    /// Where runtime state (drains) is persisted.
    pub state_file: PathBuf,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            grace_period: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            run_dir: PathBuf::from(".run"),
            state_file: PathBuf::from(".run/state.json"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    pub https: HttpsListener,
    pub http: Option<HttpListener>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsListener {
    pub address: SocketAddr,
    /// PEM certificate chain, relative to the config file's directory.
    pub cert: PathBuf,
    /// PEM private key matching `cert`.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListener {
    pub address: SocketAddr,
    #[serde(default)]
    pub mode: HttpMode,
}

/// What the plain-HTTP listener does with a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// Answer with a 308 to the same URL on the HTTPS listener.
    #[default]
    Redirect,
    /// Proxy the request like the HTTPS listener does.
    Serve,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub address: SocketAddr,
    /// Environment variable holding the bearer token for `/admin/*`
    /// (without this and `token_file`: `SWITCHYARD_ADMIN_TOKEN`, if set).
    pub token_env: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// The token read from `token_env` or `token_file`; never serialized.
    #[serde(skip)]
    pub token: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token_env: None,
            token_file: None,
            token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub path: String,
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Consecutive passing checks before a backend takes traffic.
    pub rise: u32,
    /// Consecutive failing checks before a backend stops taking traffic.
    pub fall: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            path: "/health/ready".to_string(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        }
    }
}

impl HealthSection {
    /// Readiness reports older than this no longer count towards load.
    pub fn report_ttl(&self) -> Duration {
        self.interval * 3
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveSection {
    /// Consecutive connect failures or 5xx answers that eject a backend; 0 disables.
    pub failures: u32,
    #[serde(with = "duration")]
    pub ejection_base: Duration,
    #[serde(with = "duration")]
    pub ejection_max: Duration,
}

impl Default for PassiveSection {
    fn default() -> Self {
        Self {
            failures: 3,
            ejection_base: Duration::from_secs(5),
            ejection_max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutSection {
    /// How long a client connection may sit idle between requests.
    #[serde(with = "duration")]
    pub client_idle: Duration,
    /// How long a client has to send a whole request head, from its first
    /// byte (and a new connection from its accept).
    #[serde(with = "duration")]
    pub client_head: Duration,
    /// How long a client has to send a whole request body, from the end of
    /// its head; never past `total`.
    #[serde(with = "duration")]
    pub client_body: Duration,
    /// TCP connect to a backend.
    #[serde(with = "duration")]
    pub connect: Duration,
    /// Longest wait for any single read from a backend.
    #[serde(with = "duration")]
    pub read: Duration,
    /// Budget of a whole request, retries included.
    #[serde(with = "duration")]
    pub total: Duration,
    /// How long an idle upstream keep-alive connection is kept for reuse.
    #[serde(with = "duration")]
    pub upstream_idle: Duration,
}

impl Default for TimeoutSection {
    fn default() -> Self {
        Self {
            client_idle: Duration::from_secs(60),
            client_head: Duration::from_secs(10),
            client_body: Duration::from_secs(30),
            connect: Duration::from_secs(1),
            read: Duration::from_secs(30),
            total: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    /// Further attempts after the first, each on a backend not yet tried.
    pub retries: u32,
    /// Request bodies up to this size are replayed on a retry. Every body
    /// is read whole before its first attempt (up to
    /// `limits.max_body_bytes`), so this bounds upstream bytes, not memory.
    pub buffer_body_max: usize,
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            retries: 2,
            buffer_body_max: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSection {
    /// Larger request bodies get 413.
    pub max_body_bytes: u64,
    /// All request bodies being buffered at once, together; a body that
    /// would pass it gets 503 with Retry-After.
    pub body_buffer_total: u64,
    /// Larger request heads (request line plus headers) get 431.
    pub max_header_bytes: usize,
    /// More header fields in one request get 431 (at most 128).
    pub max_headers: usize,
    /// Header names with an underscore: `drop` them (nginx's default),
    /// `refuse` the request with 400, or `forward` them.
    pub underscores_in_headers: Underscores,
    /// Client connections open at once, over both public listeners; more
    /// are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_streams: u32,
    /// HTTP/2 flow-control window of each stream, in bytes.
    pub h2_stream_window: u32,
    /// HTTP/2 flow-control window of each connection, in bytes.
    pub h2_connection_window: u32,
}

impl Default for LimitSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            body_buffer_total: 256 * 1024 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            underscores_in_headers: Underscores::Drop,
            max_connections: 10_000,
            max_streams: 100,
            h2_stream_window: 256 * 1024,
            h2_connection_window: 1024 * 1024,
        }
    }
}

/// Upper bound of `limits.max_headers` (and the most fields any head, a
/// backend's response included, may carry).
pub const MAX_HEADERS: usize = 128;

/// What becomes of a request header whose name has an underscore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Underscores {
    #[default]
    Drop,
    Refuse,
    Forward,
}

/// Which identifying headers are added to responses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseHeaders {
    /// `x-switchyard-pool`
    pub pool: bool,
    /// `x-switchyard-backend`
    pub backend: bool,
}

impl Default for ResponseHeaders {
    /// The backend's address is internal: telling it to every client on
    /// the internet is opt-in, as it is in nginx, HAProxy and Envoy, which
    /// name no upstream unless told to.
    fn default() -> Self {
        Self {
            pool: true,
            backend: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// What the backends' readiness looks like (another server's health
    /// and metrics endpoints, or ours).
    #[serde(default)]
    pub readiness: Readiness,
    /// A name whose addresses join `backends`, re-resolved as its TTL
    /// runs out (see [`DnsTarget`]).
    pub dns: Option<String>,
    /// Requests in flight per backend past which a pick skips it.
    pub max_in_flight: Option<u32>,
    /// Connects in progress per backend past which a pick skips it.
    pub max_connecting: Option<u32>,
}

/// How a pool's backends are checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Switchyard's JSON report on `[health] path`.
    #[default]
    Switchyard,
    /// Hugging Face text-embeddings-inference: `GET /health`, and the
    /// queue depth from `te_queue_size` on `/metrics`.
    Tei,
    /// vLLM: `GET /health`, and the queue depth from
    /// `vllm:num_requests_waiting` on `/metrics`.
    Vllm,
    /// Any server: the status of `[health] path` alone.
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// `ip:port` or `host:port`; names are resolved once, at load time.
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Overrides the pool's `max_in_flight` for this backend.
    pub max_in_flight: Option<u32>,
    /// Overrides the pool's `max_connecting` for this backend.
    pub max_connecting: Option<u32>,
    /// The socket address `address` resolved to; runtime state is keyed by it.
    #[serde(skip)]
    pub socket: Option<SocketAddr>,
}

impl BackendSpec {
    /// An address a pool's `dns` answered with: named after itself, of
    /// weight 1, with the pool's caps.
    pub fn found(addr: SocketAddr) -> Self {
        Self {
            address: addr.to_string(),
            weight: 1,
            max_in_flight: None,
            max_connecting: None,
            socket: Some(addr),
        }
    }

    /// The resolved address. Validation guarantees it is set.
    pub fn socket_addr(&self) -> SocketAddr {
        self.socket
            .expect("validated backend has a resolved address")
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Label in metrics and the admin API; defaults to `routes[<index>]`.
    pub name: Option<String>,
    /// Exact host (`api.example.com`) or wildcard (`*.example.com`, any
    /// subdomain).
    pub host: Option<String>,
    #[serde(default = "slash")]
    pub path_prefix: String,
    /// Shorthand for `split = { <pool> = 100 }`.
    pub pool: Option<String>,
    /// Pool name to weight; a pool is drawn by weight per request.
    pub split: Option<BTreeMap<String, u32>>,
    /// Keep a client on one pool, keyed by a header or a cookie.
    pub sticky: Option<Sticky>,
    /// Let a request header choose the pool, among `allow` only.
    pub force: Option<Force>,
    /// When the drawn pool has no eligible backend, serve from another
    /// pool of the split. Default: on when the split has several pools.
    pub fallback: Option<bool>,
    /// An automated canary rollout over this route's two-pool split.
    pub rollout: Option<RolloutSpec>,
    /// Per-client rate and concurrency limits, checked in order.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitSpec>,
    /// Load shedding by priority class when the route's fleet saturates.
    pub shed: Option<ShedSpec>,
}

/// `[routes.rollout]`: step the canary's weight up while each analysis
/// window passes, roll back when `max_failed_checks` fail in a row.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The pool being rolled out; the split's other pool is the baseline.
    pub canary: String,
    /// Canary weight at each step, in percent, rising to 100.
    pub steps: Vec<u32>,
    /// One analysis window per check.
    #[serde(with = "duration", default = "rollout_interval")]
    pub interval: Duration,
    /// Per arm per window; fewer makes the window inconclusive.
    #[serde(default = "rollout_min_requests")]
    pub min_requests: u64,
    /// Failed windows in a row that roll back.
    #[serde(default = "rollout_max_failed")]
    pub max_failed_checks: u32,
    /// Absolute ceiling of the canary's error rate.
    #[serde(default = "rollout_max_error_rate")]
    pub max_error_rate: f64,
    /// Canary p99 over baseline p99.
    #[serde(default = "rollout_max_latency_ratio")]
    pub max_latency_ratio: f64,
    /// One-sided significance of the statistical tests, over the rollout.
    #[serde(default = "rollout_significance")]
    pub significance: f64,
    #[serde(default)]
    pub rollback: Rollback,
    /// Output agreement: mirror a sampled share of the route's requests to
    /// the other arm and compare the two answers' embeddings.
    pub compare: Option<CompareSpec>,
    /// A request the canary fails (a 5xx, or no answer) is sent once more,
    /// to the baseline, when retries remain: the canary's window still
    /// counts the failure, the client gets the baseline's answer.
    #[serde(default = "yes")]
    pub retry_on_baseline: bool,
}

/// `compare = { sample = 0.01, min_cosine = 0.999 }`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompareSpec {
    /// Share of the route's requests mirrored, in (0, 1].
    pub sample: f64,
    /// A pair of answers whose embeddings' cosine falls below this fails
    /// the window.
    pub min_cosine: f64,
}

/// How a failed rollout returns its traffic to the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rollback {
    /// Canary weight 0 at once.
    #[default]
    Immediate,
    /// One step down per interval, so an autoscaled baseline is not hit by
    /// all of the traffic at once.
    Gradual,
}

fn rollout_interval() -> Duration {
    Duration::from_secs(30)
}
fn rollout_min_requests() -> u64 {
    100
}
fn rollout_max_failed() -> u32 {
    2
}
fn rollout_max_error_rate() -> f64 {
    0.01
}
fn rollout_max_latency_ratio() -> f64 {
    1.5
}
fn rollout_significance() -> f64 {
    0.01
}
fn yes() -> bool {
    true
}

/// Exactly one of `header` and `cookie`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    pub header: Option<String>,
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Force {
    /// e.g. `x-switchyard-pool`
    pub header: String,
    /// Pools the header may select; other values are ignored.
    pub allow: Vec<String>,
}

fn slash() -> String {
    "/".to_string()
}

impl RouteSpec {
    /// The route's label: its `name`, or `routes[<index>]`.
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("routes[{index}]"))
    }

    /// Whether requests fall back to another pool of the split.
    pub fn falls_back(&self) -> bool {
        self.fallback.unwrap_or(true) && self.effective_split().len() > 1
    }

    /// The effective split: `pool = "x"` is `split = { x = 100 }`.
    pub fn effective_split(&self) -> Vec<(String, u32)> {
        match (&self.pool, &self.split) {
            (Some(pool), _) => vec![(pool.clone(), 100)],
            (None, Some(split)) => split.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            (None, None) => Vec::new(),
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::single(ConfigError::file_level(
                path,
                format!("cannot read config file: {e}"),
            ))
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`, reporting errors against `path`.
    /// Relative paths inside are resolved against `path`'s directory.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let source = locate::Source::new(text);
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigErrors::single(ConfigError::from_toml(path, &source, &e)))?;
        config.source_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text));
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let problems = validate::validate(&mut config, base);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors::from_problems(path, &source, problems))
        }
    }

    /// A human summary for `switchyard check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let l = &self.listeners;
        let _ = writeln!(out, "https listener: {}", l.https.address);
        if let Some(http) = &l.http {
            let _ = writeln!(out, "http listener:  {} ({:?})", http.address, http.mode);
        }
        let _ = writeln!(out, "admin listener: {}", self.admin.address);
        for (name, pool) in &self.pools {
            let _ = writeln!(out, "pool {name}: {} backend(s)", pool.backends.len());
            if let Some(dns) = &pool.dns {
                let _ = writeln!(out, "  + the addresses of {dns}, from DNS");
            }
            for b in &pool.backends {
                let _ = writeln!(
                    out,
                    "  {} -> {} weight {}",
                    b.address,
                    b.socket_addr(),
                    b.weight
                );
            }
        }
        for r in &self.routes {
            let split: Vec<String> = r
                .effective_split()
                .iter()
                .map(|(p, w)| format!("{p}={w}"))
                .collect();
            let _ = write!(
                out,
                "route host={} path_prefix={} -> {}",
                r.host.as_deref().unwrap_or("*"),
                r.path_prefix,
                split.join(",")
            );
            if let Some(s) = &r.sticky {
                let key = s.header.as_deref().or(s.cookie.as_deref()).unwrap_or("");
                let _ = write!(out, " sticky={key}");
            }
            if let Some(f) = &r.force {
                let _ = write!(out, " force={}:{}", f.header, f.allow.join("|"));
            }
            let _ = writeln!(out);
        }
        out
    }
}
