//! Prometheus metrics. Label lookups happen when pools and backends are
//! built, never per request: the hot path only touches resolved counters.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Status classes used as the `code_class` label; `none` means no response
/// reached the client (it went away first).
pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Index into [`CODE_CLASSES`] for an HTTP status (0 = nothing sent).
pub fn code_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// Latency buckets from 1 ms to 30 s: inference calls span that range.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    up: IntGaugeVec,
    ready: IntGaugeVec,
    queue_depth: IntGaugeVec,
    cache_hit_ratio: GaugeVec,
    retries: IntCounterVec,
    fallbacks: IntCounterVec,
    ejections: IntCounterVec,
    full_skips: IntCounterVec,
    connecting: IntGaugeVec,
    health_checks: IntCounterVec,
    reloads: IntCounterVec,
    last_reload_success: Gauge,
    split_weight: IntGaugeVec,
    rollout_state: IntGaugeVec,
    rollout_checks: IntCounterVec,
    /// Connections closed at accept by `limits.max_connections`.
    pub connections_refused: IntCounter,
    /// Set at scrape time from the listener's count.
    pub client_connections: IntGauge,
    /// Set at scrape time from the request-body budget.
    pub body_buffer_bytes: IntGauge,
    /// Rate limits and load shedding.
    pub edge: EdgeMetrics,
    /// What a replica shares with the others; set at scrape time.
    pub replica: ReplicaMetrics,
    /// Pool addresses from DNS.
    pub discovery: DiscoveryMetrics,
}

/// Lookups of pools' `dns` names and the addresses they gave.
pub struct DiscoveryMetrics {
    lookups: IntCounterVec,
    addresses: IntGaugeVec,
}

/// One pool's discovery handles, resolved once.
pub struct PoolDiscovery {
    /// Lookups that gave addresses, gave none, or failed.
    pub ok: IntCounter,
    pub empty: IntCounter,
    pub error: IntCounter,
    /// Addresses of the answer in effect.
    pub addresses: IntGauge,
}

impl DiscoveryMetrics {
    fn new(r: &Registry) -> Self {
        let addresses = IntGaugeVec::new(
            Opts::new(
                "switchyard_discovery_addresses",
                "Addresses the pool's dns name gave in the answer in effect.",
            ),
            &["pool"],
        )
        .expect("valid metric");
        Self {
            lookups: counter_vec(
                r,
                "switchyard_discovery_lookups_total",
                "DNS lookups of a pool's dns name, by result: ok, empty (no address; the last set stays), error (the last set stays).",
                &["pool", "result"],
            ),
            addresses: register(r, addresses),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolDiscovery {
        let lookups = |result: &str| self.lookups.with_label_values(&[pool, result]);
        PoolDiscovery {
            ok: lookups("ok"),
            empty: lookups("empty"),
            error: lookups("error"),
            addresses: self.addresses.with_label_values(&[pool]),
        }
    }
}

/// `[replicas]`: whether Redis answers, the state version applied, and the
/// configuration hash, to compare across replicas.
pub struct ReplicaMetrics {
    pub connected: IntGauge,
    pub version: IntGauge,
    /// 1 while this replica holds the rollout judge lease.
    pub judge: IntGauge,
    pub judge_acquired: IntCounter,
    config: IntGaugeVec,
}

impl ReplicaMetrics {
    fn new(r: &Registry) -> Self {
        let gauge =
            |name: &str, help: &str| register(r, IntGauge::new(name, help).expect("valid metric"));
        Self {
            connected: gauge(
                "switchyard_replica_state_connected",
                "1 while the Redis of [replicas] answers (drains and rollouts are shared), else 0.",
            ),
            version: gauge(
                "switchyard_replica_state_version",
                "Version of the shared state (drains and rollouts) this replica applied.",
            ),
            judge: gauge(
                "switchyard_replica_judge",
                "1 while this replica holds the lease that makes it judge the rollouts, else 0.",
            ),
            judge_acquired: register(
                r,
                IntCounter::new(
                    "switchyard_replica_judge_acquisitions_total",
                    "Times this replica took the rollout judge lease.",
                )
                .expect("valid metric"),
            ),
            config: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "switchyard_config_info",
                        "1, labelled with the SHA-256 of the configuration in effect.",
                    ),
                    &["hash"],
                )
                .expect("valid metric"),
            ),
        }
    }

    /// Labels `switchyard_config_info` with `hash` alone.
    pub fn set_config_hash(&self, hash: &str) {
        self.config.reset();
        self.config.with_label_values(&[hash]).set(1);
    }
}

/// The metrics of rate limits and load shedding.
pub struct EdgeMetrics {
    decisions: IntCounterVec,
    /// Client keys tracked per rule; set at scrape time.
    pub keys: IntGaugeVec,
    pub redis_seconds: Histogram,
    pub redis_fallbacks: IntCounter,
    shed: IntCounterVec,
    /// Saturation of each shedding route's fleet; set at scrape time.
    pub saturation: GaugeVec,
}

/// Redis round trips take well under a millisecond on a LAN.
const REDIS_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

impl EdgeMetrics {
    fn new(r: &Registry) -> Self {
        let redis_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_ratelimit_redis_seconds",
                "Round trips of shared rate-limit decisions to Redis that answered.",
            )
            .buckets(REDIS_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let saturation = GaugeVec::new(
            Opts::new(
                "switchyard_route_saturation",
                "Saturation of the fleet behind a route with [routes.shed]: queued and in-flight work over reported capacity.",
            ),
            &["route"],
        )
        .expect("valid metric");
        Self {
            decisions: counter_vec(
                r,
                "switchyard_ratelimit_decisions_total",
                "Rate and concurrency limit decisions by route, rule and result (allowed, limited, shadow_limited).",
                &["route", "rule", "result"],
            ),
            keys: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "switchyard_ratelimit_keys",
                        "Client keys a rule tracks in this process.",
                    ),
                    &["route", "rule"],
                )
                .expect("valid metric"),
            ),
            redis_seconds: register(r, redis_seconds),
            redis_fallbacks: register(
                r,
                IntCounter::new(
                    "switchyard_ratelimit_redis_fallbacks_total",
                    "Shared rate-limit decisions made without Redis (slow, failing or down).",
                )
                .expect("valid metric"),
            ),
            shed: counter_vec(
                r,
                "switchyard_shed_requests_total",
                "Requests refused with a fast 503 because the route's fleet was saturated, by priority class.",
                &["route", "class"],
            ),
            saturation: register(r, saturation),
        }
    }

    /// allowed, limited and shadow_limited decisions of one rule.
    pub fn decisions(&self, route: &str, rule: &str) -> [IntCounter; 3] {
        ["allowed", "limited", "shadow_limited"]
            .map(|result| self.decisions.with_label_values(&[route, rule, result]))
    }

    pub fn shed(&self, route: &str, class: &str) -> IntCounter {
        self.shed.with_label_values(&[route, class])
    }
}

/// Per-backend handles, resolved once.
pub struct BackendMetrics {
    pub in_flight: IntGauge,
    pub up: IntGauge,
    pub ready: IntGauge,
    pub queue_depth: IntGauge,
    pub cache_hit_ratio: Gauge,
    pub ejections: IntCounter,
    pub checks_pass: IntCounter,
    pub checks_fail: IntCounter,
    pub checks_not_ready: IntCounter,
}

/// Per-pool handles, resolved once.
pub struct PoolMetrics {
    pub duration: Histogram,
    pub retries: IntCounter,
    /// Requests answered without a backend (`backend="none"`), by class.
    pub unserved: [IntCounter; 6],
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(r, vec)
}

fn gauge_vec(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), &["backend"]).expect("valid metric");
    register(r, vec)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from request start to the end of the response, by pool.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["pool"],
        )
        .expect("valid metric");
        let cache_hit_ratio = GaugeVec::new(
            Opts::new(
                "switchyard_upstream_cache_hit_ratio",
                "Cache hit rate from the backend's latest readiness report.",
            ),
            &["backend"],
        )
        .expect("valid metric");
        Self {
            requests: counter_vec(
                &r,
                "switchyard_requests_total",
                "Requests answered, by pool, backend and status class.",
                &["pool", "backend", "code_class"],
            ),
            duration: register(&r, duration),
            in_flight: gauge_vec(
                &r,
                "switchyard_upstream_in_flight_requests",
                "Requests in flight through this proxy, per backend.",
            ),
            up: gauge_vec(
                &r,
                "switchyard_upstream_up",
                "1 when the backend passes its active health checks.",
            ),
            ready: gauge_vec(
                &r,
                "switchyard_upstream_ready",
                "1 when the backend's latest readiness report says ready.",
            ),
            queue_depth: gauge_vec(
                &r,
                "switchyard_upstream_queue_depth",
                "Queue depth from the backend's latest readiness report.",
            ),
            cache_hit_ratio: register(&r, cache_hit_ratio),
            retries: counter_vec(
                &r,
                "switchyard_retries_total",
                "Requests sent to another backend after a failed attempt, by pool.",
                &["pool"],
            ),
            fallbacks: counter_vec(
                &r,
                "switchyard_pool_fallbacks_total",
                "Requests served by another pool of the split because the drawn pool had no eligible backend.",
                &["route", "from", "to"],
            ),
            ejections: counter_vec(
                &r,
                "switchyard_upstream_ejections_total",
                "Passive-check ejections, per backend.",
                &["backend"],
            ),
            full_skips: counter_vec(
                &r,
                "switchyard_backend_full_skips_total",
                "Picks that passed over a backend because it was at its max_in_flight or max_connecting (retry checks included).",
                &["pool", "backend"],
            ),
            connecting: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "switchyard_backend_connecting",
                        "Connects to the backend in progress, under each pool it is a member of.",
                    ),
                    &["pool", "backend"],
                )
                .expect("valid metric"),
            ),
            health_checks: counter_vec(
                &r,
                "switchyard_health_checks_total",
                "Active health checks by result (pass, not_ready, fail).",
                &["backend", "result"],
            ),
            reloads: counter_vec(
                &r,
                "switchyard_config_reloads_total",
                "Configuration reload attempts by result (ok, error).",
                &["result"],
            ),
            last_reload_success: register(
                &r,
                Gauge::new(
                    "switchyard_config_last_reload_success_timestamp_seconds",
                    "Unix time the active configuration was loaded.",
                )
                .expect("valid metric"),
            ),
            rollout_state: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "switchyard_rollout_state",
                        "Phase of the route's rollout: 0 progressing, 1 paused, 2 holding, 3 promoted, 4 rolled back.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            rollout_checks: counter_vec(
                &r,
                "switchyard_rollout_checks_total",
                "Checks of rollout analysis windows, by check and result (pass, fail, inconclusive).",
                &["route", "check", "result"],
            ),
            split_weight: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "switchyard_route_split_weight",
                        "Weight of each pool in each route's split, as in effect.",
                    ),
                    &["route", "pool"],
                )
                .expect("valid metric"),
            ),
            connections_refused: register(
                &r,
                IntCounter::new(
                    "switchyard_client_connections_refused_total",
                    "Client connections closed at accept because limits.max_connections were open.",
                )
                .expect("valid metric"),
            ),
            client_connections: register(
                &r,
                IntGauge::new(
                    "switchyard_client_connections",
                    "Client connections open on the public listeners, TLS handshakes included.",
                )
                .expect("valid metric"),
            ),
            body_buffer_bytes: register(
                &r,
                IntGauge::new(
                    "switchyard_request_body_buffer_bytes",
                    "Bytes of request bodies buffered right now, against limits.body_buffer_total.",
                )
                .expect("valid metric"),
            ),
            edge: EdgeMetrics::new(&r),
            replica: ReplicaMetrics::new(&r),
            discovery: DiscoveryMetrics::new(&r),
            registry: r,
        }
    }

    /// Counts a reload attempt; a success also stamps the time.
    pub fn record_reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.mark_config_loaded();
        }
    }

    /// Stamps the time the active configuration was loaded.
    pub fn mark_config_loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload_success.set(now);
    }

    /// Replaces the published split weights with `weights` (route, pool, weight).
    pub fn set_split_weights(&self, weights: &[(&str, &str, u32)]) {
        self.split_weight.reset();
        for (route, pool, w) in weights {
            self.split_weight
                .with_label_values(&[route, pool])
                .set(i64::from(*w));
        }
    }

    /// Sets `switchyard_rollout_state`; `None` removes the route's series.
    pub fn set_rollout_state(&self, route: &str, code: Option<i64>) {
        match code {
            Some(code) => self.rollout_state.with_label_values(&[route]).set(code),
            None => {
                let _ = self.rollout_state.remove_label_values(&[route]);
            }
        }
    }

    pub fn count_rollout_check(&self, route: &str, check: &str, result: &str) {
        self.rollout_checks
            .with_label_values(&[route, check, result])
            .inc();
    }

    pub fn backend(&self, backend: &str) -> BackendMetrics {
        let checks = |result| self.health_checks.with_label_values(&[backend, result]);
        BackendMetrics {
            in_flight: self.in_flight.with_label_values(&[backend]),
            up: self.up.with_label_values(&[backend]),
            ready: self.ready.with_label_values(&[backend]),
            queue_depth: self.queue_depth.with_label_values(&[backend]),
            cache_hit_ratio: self.cache_hit_ratio.with_label_values(&[backend]),
            ejections: self.ejections.with_label_values(&[backend]),
            checks_pass: checks("pass"),
            checks_fail: checks("fail"),
            checks_not_ready: checks("not_ready"),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            duration: self.duration.with_label_values(&[pool]),
            retries: self.retries.with_label_values(&[pool]),
            unserved: self.requests_by_class(pool, "none"),
        }
    }

    /// `switchyard_backend_full_skips_total` for one pool member.
    pub fn full_skips(&self, pool: &str, backend: &str) -> IntCounter {
        self.full_skips.with_label_values(&[pool, backend])
    }

    /// Replaces the published connect counts with `counts` (pool,
    /// backend, count), so that a pool gone in a reload leaves no series.
    pub fn set_connecting<'a>(&self, counts: impl Iterator<Item = (&'a str, &'a str, u32)>) {
        self.connecting.reset();
        for (pool, backend, n) in counts {
            self.connecting
                .with_label_values(&[pool, backend])
                .set(i64::from(n));
        }
    }

    /// `switchyard_pool_fallbacks_total` for one route and pair of pools.
    pub fn fallback(&self, route: &str, from: &str, to: &str) -> IntCounter {
        self.fallbacks.with_label_values(&[route, from, to])
    }

    /// `switchyard_requests_total` handles for one (pool, backend) pair.
    pub fn requests_by_class(&self, pool: &str, backend: &str) -> [IntCounter; 6] {
        CODE_CLASSES.map(|class| self.requests.with_label_values(&[pool, backend, class]))
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}
