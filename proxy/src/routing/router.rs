//! Route matching and the weighted split between pools.
//!
//! Precedence: exact host beats wildcard host beats no host; within that,
//! the longest `path_prefix` wins; remaining ties go to the earlier route
//! in the file.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderName;
use prometheus::IntCounter;

use super::{fastrand, Lease, Overrides, Pool, RouteWindows, ShedRule};
use crate::config::{RouteSpec, Sticky};
use crate::metrics::Metrics;

/// Splits are resolved over this many buckets (0.01 % granularity).
pub const BUCKETS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`: any subdomain, not the apex.
    Suffix(String),
}

impl HostMatch {
    fn parse(host: Option<&str>) -> Self {
        match host {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    /// `host` has no port and any case.
    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(want), Some(h)) => h.eq_ignore_ascii_case(want),
            (HostMatch::Suffix(suffix), Some(h)) => {
                h.len() > suffix.len()
                    && h.is_char_boundary(h.len() - suffix.len())
                    && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            (_, None) => false,
        }
    }

    /// Sort key: exact first, then longer wildcards, then any host.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        }
    }
}

/// Pools with their weights, laid out as consecutive bucket ranges in
/// a fixed order (by pool name), so the same bucket keeps landing on the
/// same pool while weights are unchanged.
pub struct Split {
    entries: Vec<SplitEntry>,
}

pub struct SplitEntry {
    pub pool: Arc<Pool>,
    pub weight: u32,
    /// Exclusive end of this pool's bucket range.
    bucket_end: u32,
}

impl Split {
    fn new(weights: &[(Arc<Pool>, u32)]) -> Self {
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut cumulative = 0u64;
        let entries = weights
            .iter()
            .map(|(pool, weight)| {
                cumulative += u64::from(*weight);
                let end = cumulative * u64::from(BUCKETS) / total.max(1);
                SplitEntry {
                    pool: pool.clone(),
                    weight: *weight,
                    bucket_end: u32::try_from(end).unwrap_or(BUCKETS),
                }
            })
            .collect();
        Self { entries }
    }

    pub fn entries(&self) -> &[SplitEntry] {
        &self.entries
    }

    /// The pool owning `bucket` (in `0..BUCKETS`).
    pub fn pool_for_bucket(&self, bucket: u32) -> &Arc<Pool> {
        let entry = self
            .entries
            .iter()
            .find(|e| bucket < e.bucket_end)
            .or(self.entries.last())
            .expect("a validated split has at least one pool");
        &entry.pool
    }

    /// A pool drawn at random by weight.
    pub fn draw(&self) -> &Arc<Pool> {
        if let [only] = self.entries.as_slice() {
            return &only.pool;
        }
        let bucket = fastrand::below(u64::from(BUCKETS)) as u32;
        self.pool_for_bucket(bucket)
    }
}

pub struct Route {
    /// The route's `name` or `routes[i]`: its label in metrics and the API.
    pub name: String,
    /// Its position in the file, which indexes per-route state elsewhere.
    pub index: usize,
    pub host: HostMatch,
    pub path_prefix: String,
    pub split: Split,
    pub sticky: Option<StickyKey>,
    pub force: Option<ForceRule>,
    pub fallback: Option<Fallback>,
    /// The traffic windows of a route under rollout.
    pub windows: Option<Arc<RouteWindows>>,
    pub shed: Option<ShedRule>,
}

/// The other pools of a split, tried when the drawn pool has no eligible
/// backend, so that a drained-out or failing pool never fails a request
/// while another pool of the route can serve it.
pub struct Fallback {
    /// Split entry indices, heaviest first.
    order: Vec<usize>,
    /// `switchyard_pool_fallbacks_total`, by (from, to) entry index.
    counters: Vec<Vec<IntCounter>>,
}

impl Fallback {
    fn new(route: &str, split: &Split, metrics: &Metrics) -> Self {
        let entries = split.entries();
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(entries[i].weight));
        let counters = entries
            .iter()
            .map(|from| {
                entries
                    .iter()
                    .map(|to| metrics.fallback(route, &from.pool.name, &to.pool.name))
                    .collect()
            })
            .collect();
        Self { order, counters }
    }
}

/// Where a sticky route finds the key that pins a client to a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
}

/// A request header that may choose the pool, among `allow` only.
pub struct ForceRule {
    pub header: HeaderName,
    pub allow: Vec<Arc<Pool>>,
}

/// Header lookup over either engine's parsed request.
pub trait RequestHeaders {
    /// Every value of header `name`, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of header `name`.
    fn first<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Route {
    /// The pool for this request: a permitted forced pool, else the pool of
    /// the sticky key's bucket, else a weighted draw. True when forced.
    pub fn choose_pool(&self, req: &impl RequestHeaders) -> (&Arc<Pool>, bool) {
        if let Some(pool) = self.forced_pool(req) {
            return (pool, true);
        }
        let pool = match self.sticky.as_ref().and_then(|k| key_value(k, req)) {
            Some(key) => self.split.pool_for_bucket(bucket_of(key)),
            None => self.split.draw(),
        };
        (pool, false)
    }

    /// When the drawn pool `from` has no eligible backend: the heaviest
    /// other pool of the split that has one, and its lease, counted.
    pub fn fall_back(&self, from: &Pool) -> Option<(Arc<Pool>, usize, Lease)> {
        let fallback = self.fallback.as_ref()?;
        let entries = self.split.entries();
        let from_i = entries.iter().position(|e| std::ptr::eq(&*e.pool, from))?;
        fallback
            .order
            .iter()
            .filter(|&&i| i != from_i)
            .find_map(|&i| {
                let pool = &entries[i].pool;
                let (member, lease) = pool.lease(&[])?;
                fallback.counters[from_i][i].inc();
                Some((pool.clone(), member, lease))
            })
    }

    fn forced_pool(&self, req: &impl RequestHeaders) -> Option<&Arc<Pool>> {
        let rule = self.force.as_ref()?;
        let wanted = req.first(&rule.header)?;
        rule.allow.iter().find(|p| p.name.as_bytes() == wanted)
    }
}

static COOKIE: HeaderName = http::header::COOKIE;

/// The value of a header, or of a cookie, that keys a request.
pub fn key_value<'r>(key: &'r StickyKey, req: &'r impl RequestHeaders) -> Option<&'r [u8]> {
    match key {
        StickyKey::Header(name) => req.first(name),
        StickyKey::Cookie(name) => req
            .values(&COOKIE)
            .flat_map(|v| v.split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|b| *b == b'=')?;
                (&pair[..eq] == name.as_bytes()).then_some(&pair[eq + 1..])
            }),
    }
}

/// A stable bucket in `0..BUCKETS` for a sticky key (FNV-1a: the same key
/// maps to the same bucket in every process and version).
pub fn bucket_of(key: &[u8]) -> u32 {
    let hash = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(BUCKETS)) as u32
}

pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Builds the routes of a validated configuration over built pools.
    pub fn build(
        specs: &[RouteSpec],
        pools: &BTreeMap<String, Arc<Pool>>,
        metrics: &Metrics,
        overrides: &Overrides,
    ) -> Self {
        let mut routes: Vec<Route> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let name = spec.label(i);
                let weights: Vec<(Arc<Pool>, u32)> = effective_split(spec, &name, overrides)
                    .into_iter()
                    .map(|(pool, w)| (pools[&pool].clone(), w))
                    .collect();
                let split = Split::new(&weights);
                let fallback = spec
                    .falls_back()
                    .then(|| Fallback::new(&name, &split, metrics));
                let windows = overrides.windows.get(&name).cloned();
                let shed = spec.shed.as_ref().map(|s| ShedRule::new(&name, s, metrics));
                Route {
                    name,
                    index: i,
                    host: HostMatch::parse(spec.host.as_deref()),
                    path_prefix: spec.path_prefix.clone(),
                    split,
                    fallback,
                    windows,
                    shed,
                    sticky: spec.sticky.as_ref().map(sticky_key),
                    force: spec.force.as_ref().map(|f| ForceRule {
                        header: HeaderName::from_bytes(f.header.as_bytes())
                            .expect("validated header name"),
                        allow: f.allow.iter().map(|p| pools[p].clone()).collect(),
                    }),
                }
            })
            .collect();
        // Stable sort keeps file order among equals.
        routes.sort_by_key(|r| (r.host.rank(), usize::MAX - r.path_prefix.len()));
        Self { routes }
    }

    /// The first route, in precedence order, matching `host` and `path`.
    /// `host` may carry a port, which is ignored.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && path.starts_with(&r.path_prefix))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// The file's split, or, while a rollout owns the route, its canary
/// weight against the rest for the baseline.
fn effective_split(spec: &RouteSpec, name: &str, overrides: &Overrides) -> Vec<(String, u32)> {
    let split = spec.effective_split();
    let (Some(rollout), Some(weight)) = (&spec.rollout, overrides.weights.get(name)) else {
        return split;
    };
    split
        .into_iter()
        .map(|(pool, _)| {
            let w = if pool == rollout.canary {
                *weight
            } else {
                100 - weight
            };
            (pool, w)
        })
        .collect()
}

fn sticky_key(s: &Sticky) -> StickyKey {
    match (&s.header, &s.cookie) {
        (Some(h), _) => {
            StickyKey::Header(HeaderName::from_bytes(h.as_bytes()).expect("validated header name"))
        }
        (None, c) => StickyKey::Cookie(c.clone().expect("validated: header or cookie")),
    }
}

/// `example.com:8443` -> `example.com`; `[::1]:8443` -> `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let exact = HostMatch::parse(Some("API.example.com"));
        assert!(exact.matches(Some("api.EXAMPLE.com")));
        assert!(!exact.matches(Some("x.api.example.com")));
        let wild = HostMatch::parse(Some("*.example.com"));
        assert!(wild.matches(Some("a.example.com")));
        assert!(wild.matches(Some("a.b.example.com")));
        assert!(!wild.matches(Some("example.com")));
        assert!(!wild.matches(None));
        assert!(HostMatch::Any.matches(None));
    }

    #[test]
    fn buckets_are_stable() {
        assert_eq!(bucket_of(b"user-1"), bucket_of(b"user-1"));
        assert!(bucket_of(b"user-1") < BUCKETS);
    }

    /// A header map stands in for a request head.
    impl RequestHeaders for http::HeaderMap {
        fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
            self.get_all(name).iter().map(|v| v.as_bytes())
        }
    }

    #[test]
    fn sticky_keys_come_from_headers_or_cookies() {
        let mut req = http::HeaderMap::new();
        req.insert("x-user", "u1".parse().expect("value"));
        req.append("cookie", "a=1; sid=abc".parse().expect("value"));
        let header = StickyKey::Header(HeaderName::from_static("x-user"));
        assert_eq!(key_value(&header, &req), Some(&b"u1"[..]));
        let cookie = StickyKey::Cookie("sid".to_string());
        assert_eq!(key_value(&cookie, &req), Some(&b"abc"[..]));
        let missing = StickyKey::Cookie("other".to_string());
        assert_eq!(key_value(&missing, &req), None);
    }

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
