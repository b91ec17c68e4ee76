//! Edge protection settings: per-client rate and concurrency limits on a
//! route (`[[routes.rate_limits]]`), where their shared state lives
//! (`[rate_limits]`), and load shedding by priority class
//! (`[routes.shed]`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;
use super::error::Problem;
use super::locate::KeyPath;

/// `[rate_limits]`: process-wide settings of the limit rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Redis holding the state of `shared = true` rules, e.g.
    /// `redis://127.0.0.1:6379`.
    pub redis_url: Option<String>,
    /// Proxy replicas sharing the limits: while Redis cannot answer, each
    /// replica enforces its share, the limit divided by this.
    pub replicas: u32,
    /// Longest wait for Redis's decision before the fallback decides.
    #[serde(with = "duration")]
    pub redis_timeout: Duration,
    /// Without Redis: `local` (the divided limit; no request fails because
    /// Redis did) or `refuse` (429 until Redis answers again).
    pub on_redis_failure: RedisFailure,
    /// Client keys each local rule tracks at most (memory bound: about 32
    /// bytes a key); past it the key closest to refilled is forgotten.
    pub max_keys: usize,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            redis_url: None,
            replicas: 1,
            redis_timeout: Duration::from_millis(5),
            on_redis_failure: RedisFailure::Local,
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    #[default]
    Local,
    Refuse,
}

/// `[[routes.rate_limits]]`: one rule, counted per client key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Label in metrics, logs and the `RateLimit-Policy` header.
    pub name: String,
    /// Whose budget a request spends.
    pub key: LimitKey,
    /// Sustained requests (cost units) per second; GCRA, rolling.
    pub rate: Option<f64>,
    /// Units a client may spend at once [default: the rate, at least 1].
    pub burst: Option<u32>,
    /// Cost of a request: one unit per this many body bytes (at least 1)
    /// [default: every request costs 1].
    pub cost_per_bytes: Option<u64>,
    /// Requests of one key in flight at once.
    pub max_in_flight: Option<u32>,
    /// Count and log what would be refused; refuse nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Keep the state in Redis (`[rate_limits] redis_url`), so that the
    /// limit holds across replicas.
    #[serde(default)]
    pub shared: bool,
}

impl RateLimitSpec {
    /// The burst in effect.
    pub fn effective_burst(&self) -> u32 {
        let rate = self
            .rate
            .unwrap_or(1.0)
            .ceil()
            .clamp(1.0, f64::from(u32::MAX));
        self.burst.unwrap_or(rate as u32)
    }
}

/// `key = "ip" | "ip_prefix" | "header:NAME" | "cookie:NAME"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum LimitKey {
    /// The client's address.
    Ip,
    /// The client's IPv4 /24 or IPv6 /64: one budget for a subnet, which
    /// one host can hold many addresses of.
    IpPrefix,
    /// A header's value (an API key, say), hashed; never logged in clear.
    /// A request without it is counted by its address instead.
    Header(String),
    /// A cookie's value, hashed; without it, by address.
    Cookie(String),
}

impl TryFrom<String> for LimitKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let named = |rest: &str, what: &str| {
            let ok = !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            ok.then(|| rest.to_ascii_lowercase())
                .ok_or_else(|| format!("'{s}': the {what} name must be a token like x-api-key"))
        };
        match s.split_once(':') {
            None if s == "ip" => Ok(LimitKey::Ip),
            None if s == "ip_prefix" => Ok(LimitKey::IpPrefix),
            Some(("header", rest)) => Ok(LimitKey::Header(named(rest, "header")?)),
            Some(("cookie", rest)) => Ok(LimitKey::Cookie(named(rest, "cookie")?)),
            _ => Err(format!(
                "'{s}' is not a key: use \"ip\", \"ip_prefix\", \"header:NAME\" or \"cookie:NAME\""
            )),
        }
    }
}

impl From<LimitKey> for String {
    fn from(k: LimitKey) -> String {
        match k {
            LimitKey::Ip => "ip".into(),
            LimitKey::IpPrefix => "ip_prefix".into(),
            LimitKey::Header(h) => format!("header:{h}"),
            LimitKey::Cookie(c) => format!("cookie:{c}"),
        }
    }
}

/// `[routes.shed]`: when the fleet behind the route saturates, refuse
/// lower classes first, with a fast 503.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShedSpec {
    /// The request header naming its class; values not in `classes` get
    /// `default`.
    #[serde(default = "priority_header")]
    pub header: String,
    /// The class of a request that names none (or an unknown one).
    pub default: String,
    /// Class to the saturation (0 to 1, or more) at which it is refused.
    pub classes: BTreeMap<String, f64>,
}

fn priority_header() -> String {
    "x-switchyard-priority".into()
}

/// The rules of `[rate_limits]`, a route's `rate_limits` and `shed`.
pub(super) fn validate(
    section: &RateLimitSection,
    routes: &[(KeyPath, &[RateLimitSpec], Option<&ShedSpec>)],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut fail = |path: KeyPath, message: String| problems.push(Problem { path, message });
    let root = KeyPath::root().key("rate_limits");
    if section.replicas == 0 {
        fail(root.key("replicas"), "must be at least 1".into());
    }
    if section.max_keys == 0 {
        fail(root.key("max_keys"), "must be at least 1".into());
    }
    if let Some(url) = &section.redis_url {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            fail(
                root.key("redis_url"),
                format!("'{url}' is not a redis:// URL"),
            );
        }
    }
    for (path, rules, shed) in routes {
        let mut names = std::collections::HashSet::new();
        for (i, rule) in rules.iter().enumerate() {
            let at = path.key("rate_limits").index(i);
            for (key, msg) in rule_problems(rule, section, &mut names) {
                fail(at.key(key), msg);
            }
        }
        if let Some(shed) = shed {
            let at = path.key("shed");
            if !shed.classes.contains_key(&shed.default) {
                let msg = format!("'{}' is not one of the classes", shed.default);
                fail(at.key("default"), msg);
            }
            for (class, limit) in &shed.classes {
                if !(limit.is_finite() && *limit > 0.0) {
                    fail(at.key("classes").key(class), "must be above 0".into());
                }
            }
        }
    }
    problems
}

fn rule_problems(
    rule: &RateLimitSpec,
    section: &RateLimitSection,
    names: &mut std::collections::HashSet<String>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let name_ok = !rule.name.is_empty()
        && rule
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !name_ok {
        out.push(("name", "may only use letters, digits, '-' and '_'".into()));
    } else if !names.insert(rule.name.clone()) {
        out.push((
            "name",
            format!("'{}' is used twice on this route", rule.name),
        ));
    }
    match rule.rate {
        Some(r) if !(r.is_finite() && r > 0.0) => out.push(("rate", "must be above 0".into())),
        None if rule.max_in_flight.is_none() => out.push((
            "rate",
            "a rule needs a rate, a max_in_flight, or both".into(),
        )),
        None if rule.burst.is_some() || rule.cost_per_bytes.is_some() || rule.shared => out.push((
            "rate",
            "burst, cost_per_bytes and shared need a rate".into(),
        )),
        _ => {}
    }
    if rule.burst == Some(0) {
        out.push(("burst", "must be at least 1".into()));
    }
    if rule.cost_per_bytes == Some(0) {
        out.push(("cost_per_bytes", "must be at least 1".into()));
    }
    if rule.max_in_flight == Some(0) {
        out.push(("max_in_flight", "must be at least 1".into()));
    }
    if rule.shared && section.redis_url.is_none() {
        out.push(("shared", "needs [rate_limits] redis_url".into()));
    }
    out
}
