//! A route's limit rules as the request path runs them: each rule finds
//! the request's client key, spends its cost (GCRA, locally or through
//! Redis) and takes an in-flight slot. The counting state of a rule lives
//! in [`Limiters`], keyed by route and rule name, so a reload that keeps a
//! rule keeps every client's budget.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;

use super::local::{stable_key, InflightGuard, InflightTable, KeyHasher, LocalStore};
use super::shared::{SharedLimiter, SharedOptions, Via};
use super::{Decision, Quota};
use crate::config::{Config, LimitKey, RateLimitSpec, RedisFailure};
use crate::metrics::Metrics;
use crate::routing::{key_value, RequestHeaders, StickyKey};

/// Limited client keys remembered per rule for the admin API.
const TOP_KEYS: usize = 256;

/// The counting state of one rule; outlives reloads.
pub struct RuleState {
    /// Salt of the rule's local keys: unique in the process (the Redis
    /// fallback keeps the keys of every route's shared rules in one store)
    /// and kept by a reload that keeps the rule.
    salt: u32,
    store: LocalStore,
    inflight: Arc<InflightTable>,
    /// Hashed key to the requests refused (or shadow-refused) for it.
    limited: Mutex<HashMap<u64, u64>>,
}

impl RuleState {
    fn new(max_keys: usize, salt: u32) -> Self {
        Self {
            salt,
            store: LocalStore::new(max_keys),
            inflight: Arc::default(),
            limited: Mutex::default(),
        }
    }

    fn note_limited(&self, key: u64) {
        let mut top = self.limited.lock().unwrap_or_else(|e| e.into_inner());
        if top.len() >= TOP_KEYS && !top.contains_key(&key) {
            // Refusals are the cold path: a scan for the least limited key
            // keeps the map bounded without a second structure.
            if let Some(min) = top.iter().min_by_key(|(_, n)| **n).map(|(k, _)| *k) {
                top.remove(&min);
            }
        }
        *top.entry(key).or_default() += 1;
    }

    /// Client keys tracked (with a rate budget in use).
    pub fn tracked(&self) -> usize {
        self.store.len()
    }

    /// The `top` most limited keys (hashed, as hex) with their counts.
    fn top_limited(&self, top: usize) -> Vec<(String, u64)> {
        let limited = self.limited.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<(String, u64)> = limited
            .iter()
            .map(|(k, n)| (format!("{k:016x}"), *n))
            .collect();
        keys.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        keys.truncate(top);
        keys
    }
}

/// Every rule's state, and the Redis limiter of `shared` rules.
pub struct Limiters {
    hasher: KeyHasher,
    states: Mutex<BTreeMap<(String, String), Arc<RuleState>>>,
    /// The salt of the next new rule state.
    next_salt: AtomicU32,
    /// The Redis limiter and the settings it was made with.
    shared: Mutex<Option<(RedisSettings, Arc<SharedLimiter>)>>,
}

/// `[rate_limits]` as far as the Redis limiter depends on it.
type RedisSettings = (String, u32, Duration, RedisFailure);

impl Default for Limiters {
    fn default() -> Self {
        Self {
            hasher: KeyHasher::new(),
            states: Mutex::default(),
            next_salt: AtomicU32::new(0),
            shared: Mutex::default(),
        }
    }
}

impl Limiters {
    /// The limits of every route of `config` with rules, by the route's
    /// position in the file; states of rules that are gone are dropped.
    pub fn build(
        self: &Arc<Self>,
        config: &Config,
        metrics: &Metrics,
    ) -> Vec<Option<Arc<RouteLimits>>> {
        let shared = self.shared_limiter(config, metrics);
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = BTreeMap::new();
        let mut out = Vec::new();
        for (i, spec) in config.routes.iter().enumerate() {
            let route = spec.label(i);
            let rules = spec.rate_limits.iter().map(|rule| {
                let id = (route.clone(), rule.name.clone());
                let state = states.get(&id).cloned().unwrap_or_else(|| {
                    let salt = self.next_salt.fetch_add(1, Ordering::Relaxed);
                    Arc::new(RuleState::new(config.rate_limits.max_keys, salt))
                });
                kept.insert(id, state.clone());
                let shared = rule.shared.then(|| shared.clone()).flatten();
                Rule::new(&route, rule, state, shared, metrics)
            });
            let rules: Vec<Rule> = rules.collect();
            out.push((!rules.is_empty()).then(|| {
                Arc::new(RouteLimits {
                    limiters: self.clone(),
                    rules,
                })
            }));
        }
        *states = kept;
        out
    }

    /// The rule states, for the admin API: (route, rule) to state.
    pub fn states(&self) -> BTreeMap<(String, String), Arc<RuleState>> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One limiter per Redis setting: a reload that changes none keeps the
    /// connection.
    fn shared_limiter(&self, config: &Config, metrics: &Metrics) -> Option<Arc<SharedLimiter>> {
        let s = &config.rate_limits;
        let url = s.redis_url.clone()?;
        let wanted: RedisSettings = (url.clone(), s.replicas, s.redis_timeout, s.on_redis_failure);
        let mut slot = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((settings, limiter)) = slot.as_ref() {
            if *settings == wanted {
                return Some(limiter.clone());
            }
        }
        let opts = SharedOptions {
            timeout: s.redis_timeout,
            replicas: s.replicas,
            fail_closed: s.on_redis_failure == RedisFailure::Refuse,
            rtt: metrics.edge.redis_seconds.clone(),
            fallbacks: metrics.edge.redis_fallbacks.clone(),
        };
        match SharedLimiter::new(&url, opts) {
            Ok(limiter) => {
                let limiter = Arc::new(limiter);
                *slot = Some((wanted, limiter.clone()));
                Some(limiter)
            }
            Err(e) => {
                tracing::error!(target: "switchyard::ratelimit", "{e}; shared rules decide locally");
                None
            }
        }
    }
}

/// One rule, compiled.
struct Rule {
    spec: RateLimitSpec,
    name: String,
    key: Key,
    quota: Option<Quota>,
    cost_per_bytes: Option<u64>,
    max_in_flight: Option<u32>,
    shadow: bool,
    state: Arc<RuleState>,
    /// The Redis limiter, and the route for its stable keys.
    shared: Option<(Arc<SharedLimiter>, String)>,
    /// allowed, limited, shadow_limited
    decisions: [IntCounter; 3],
    /// The `RateLimit-Policy` value.
    policy: String,
}

enum Key {
    Ip,
    IpPrefix,
    Named(StickyKey),
}

impl Rule {
    fn new(
        route: &str,
        spec: &RateLimitSpec,
        state: Arc<RuleState>,
        shared: Option<Arc<SharedLimiter>>,
        metrics: &Metrics,
    ) -> Self {
        let quota = spec.rate.map(|r| Quota::new(r, spec.effective_burst()));
        let policy = match &quota {
            Some(q) => format!(
                "\"{}\";q={};w={}",
                spec.name,
                q.burst(),
                q.window_secs().ceil().max(1.0)
            ),
            None => format!("\"{}\";q={}", spec.name, spec.max_in_flight.unwrap_or(0)),
        };
        let key = match &spec.key {
            LimitKey::Ip => Key::Ip,
            LimitKey::IpPrefix => Key::IpPrefix,
            LimitKey::Header(h) => {
                Key::Named(StickyKey::Header(h.parse().expect("validated header name")))
            }
            LimitKey::Cookie(c) => Key::Named(StickyKey::Cookie(c.clone())),
        };
        Self {
            spec: spec.clone(),
            name: spec.name.clone(),
            key,
            quota,
            cost_per_bytes: spec.cost_per_bytes,
            max_in_flight: spec.max_in_flight,
            shadow: spec.shadow,
            state,
            shared: shared.map(|s| (s, route.to_string())),
            decisions: metrics.edge.decisions(route, &spec.name),
            policy,
        }
    }

    /// The client key's bytes: a named key's value, else the address (or
    /// its prefix), so leaving the header out never escapes the limit.
    fn key_bytes<'r>(
        &'r self,
        req: &'r impl RequestHeaders,
        client: Option<IpAddr>,
        buf: &'r mut [u8; 16],
    ) -> &'r [u8] {
        if let Key::Named(named) = &self.key {
            if let Some(value) = key_value(named, req) {
                return value;
            }
        }
        let prefix = matches!(self.key, Key::IpPrefix);
        match client {
            Some(IpAddr::V4(a)) => {
                let n = if prefix { 3 } else { 4 };
                buf[..n].copy_from_slice(&a.octets()[..n]);
                &buf[..n]
            }
            Some(IpAddr::V6(a)) => {
                let n = if prefix { 8 } else { 16 };
                buf[..n].copy_from_slice(&a.octets()[..n]);
                &buf[..n]
            }
            None => &[],
        }
    }

    fn cost(&self, body: usize) -> u64 {
        self.cost_per_bytes
            .map_or(1, |per| (body as u64).div_ceil(per).max(1))
    }
}

/// A route's rules.
pub struct RouteLimits {
    limiters: Arc<Limiters>,
    rules: Vec<Rule>,
}

/// Why a request was refused: the answer's status, message and headers.
pub struct Limited {
    pub rule: String,
    pub message: String,
    /// (name, value) headers of the 429.
    pub headers: Vec<(&'static [u8], String)>,
}

/// Which rules a check covers: those whose cost is known before the body
/// (every request costs 1), or those priced by the body's size.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Head,
    Body(usize),
}

impl RouteLimits {
    /// Whether a rule prices requests by their body, so that a second
    /// check follows the body.
    pub fn prices_bodies(&self) -> bool {
        self.rules.iter().any(|r| r.cost_per_bytes.is_some())
    }

    /// Each rule's settings, decisions so far, tracked keys and the `top`
    /// most limited keys (hashed), for the admin API.
    pub fn report(&self, top: usize) -> Vec<serde_json::Value> {
        let rule = |r: &Rule| {
            let [allowed, limited, shadow] = r.decisions.each_ref().map(IntCounter::get);
            let top: Vec<_> = r
                .state
                .top_limited(top)
                .into_iter()
                .map(|(key, count)| serde_json::json!({ "key": key, "count": count }))
                .collect();
            serde_json::json!({
                "settings": r.spec,
                "policy": r.policy,
                "decisions": { "allowed": allowed, "limited": limited, "shadow_limited": shadow },
                "tracked_keys": r.state.tracked(),
                "keys_in_flight": r.state.inflight.len(),
                "top_limited_keys": top,
            })
        };
        self.rules.iter().map(rule).collect()
    }

    /// Runs the rules of `phase` in order. On a pass, the in-flight slots
    /// taken (held until the request ends) go into `slots`; on a refusal,
    /// the first rule that refused says why. Shadow rules count and log
    /// what they would refuse (returned in `shadowed`) and refuse nothing.
    pub async fn check(
        &self,
        req: &impl RequestHeaders,
        client: Option<IpAddr>,
        now: u64,
        phase: Phase,
        slots: &mut Vec<InflightGuard>,
        shadowed: &mut Option<String>,
    ) -> Result<(), Limited> {
        for rule in &self.rules {
            let body = match phase {
                Phase::Head if rule.cost_per_bytes.is_none() => 0,
                Phase::Body(n) if rule.cost_per_bytes.is_some() => n,
                _ => continue,
            };
            let mut buf = [0u8; 16];
            let key_bytes = rule.key_bytes(req, client, &mut buf);
            let key = self.limiters.hasher.hash(rule.state.salt, key_bytes);
            let refused = match self.spend(rule, key, key_bytes, body, now).await {
                Some(d) if !d.allowed => Some(rate_refusal(rule, &d)),
                _ => self.take_slot(rule, key, slots),
            };
            let Some(limited) = refused else {
                rule.decisions[0].inc();
                continue;
            };
            rule.state.note_limited(key);
            if rule.shadow {
                rule.decisions[2].inc();
                *shadowed = Some(rule.name.clone());
                continue;
            }
            rule.decisions[1].inc();
            return Err(limited);
        }
        Ok(())
    }

    /// The rate decision, if the rule has a rate.
    async fn spend(
        &self,
        rule: &Rule,
        key: u64,
        bytes: &[u8],
        body: usize,
        now: u64,
    ) -> Option<Decision> {
        let quota = rule.quota.as_ref()?;
        let cost = rule.cost(body);
        Some(match &rule.shared {
            // Boxed: the Redis client's future is large, and held inline it
            // would be moved with every request's future, shared rule or
            // not (about 400 instructions of memcpy per request).
            Some(shared) => {
                Box::pin(shared_decision(
                    shared,
                    rule,
                    (key, bytes),
                    quota,
                    cost,
                    now,
                ))
                .await
            }
            None => rule.state.store.check(key, quota, cost, now),
        })
    }

    /// An in-flight slot, if the rule caps concurrency; the refusal if the
    /// key has none left.
    #[inline] // a rule without a cap pays only the test (proxy_callgrind)
    fn take_slot(&self, rule: &Rule, key: u64, slots: &mut Vec<InflightGuard>) -> Option<Limited> {
        let max = rule.max_in_flight?;
        match rule.state.inflight.acquire(key, max) {
            Some(slot) => {
                slots.push(slot);
                None
            }
            None => Some(Limited {
                rule: rule.name.clone(),
                message: format!(
                    "more than {max} requests in flight for one client (rule '{}')",
                    rule.name
                ),
                headers: vec![
                    (b"retry-after", "1".to_string()),
                    (b"ratelimit-policy", rule.policy.clone()),
                ],
            }),
        }
    }
}

/// A decision by Redis (or its fallback) for a `shared` rule; `key` is
/// (the local key, the client key's bytes).
async fn shared_decision(
    (limiter, route): &(Arc<SharedLimiter>, String),
    rule: &Rule,
    (key, bytes): (u64, &[u8]),
    quota: &Quota,
    cost: u64,
    now: u64,
) -> Decision {
    let redis_key = stable_key(route, &rule.name, bytes);
    let (decision, via) = limiter.check(&redis_key, key, quota, cost, now).await;
    if via == Via::Closed {
        tracing::warn!(target: "switchyard::ratelimit", rule = %rule.name, "Redis unavailable: refused (on_redis_failure = \"refuse\")");
    }
    decision
}

fn rate_refusal(rule: &Rule, d: &Decision) -> Limited {
    let secs = |t: Duration| t.as_secs() + u64::from(t.subsec_nanos() > 0);
    let retry = secs(d.retry_after).max(1);
    Limited {
        rule: rule.name.clone(),
        message: format!("rate limit '{}' exceeded: retry in {retry} s", rule.name),
        headers: vec![
            (b"retry-after", retry.to_string()),
            (b"ratelimit-policy", rule.policy.clone()),
            (
                b"ratelimit",
                format!("\"{}\";r={};t={}", rule.name, d.remaining, secs(d.reset)),
            ),
        ],
    }
}
