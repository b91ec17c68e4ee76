//! Load shedding by priority class: when the fleet behind a route is
//! saturated past a class's limit, that class is refused at the edge with a
//! fast 503 instead of queueing at the backends until it times out. Lower
//! classes have lower limits, so they go first.

use http::HeaderName;
use prometheus::IntCounter;

use super::{clock, RequestHeaders, Split};
use crate::config::ShedSpec;
use crate::metrics::Metrics;

pub struct ShedRule {
    header: HeaderName,
    /// Index into `classes` of a request that names no known class.
    default: usize,
    /// (class, saturation limit, `switchyard_shed_requests_total`).
    classes: Vec<(String, f64, IntCounter)>,
}

impl ShedRule {
    pub fn new(route: &str, spec: &ShedSpec, metrics: &Metrics) -> Self {
        let classes: Vec<_> = spec
            .classes
            .iter()
            .map(|(class, limit)| (class.clone(), *limit, metrics.edge.shed(route, class)))
            .collect();
        Self {
            header: HeaderName::from_bytes(spec.header.as_bytes()).expect("validated header name"),
            default: classes
                .iter()
                .position(|c| c.0 == spec.default)
                .expect("validated default class"),
            classes,
        }
    }

    /// The request's class and its limit.
    fn class_of(&self, req: &impl RequestHeaders) -> &(String, f64, IntCounter) {
        let named = req
            .first(&self.header)
            .and_then(|v| self.classes.iter().find(|c| c.0.as_bytes() == v));
        named.unwrap_or(&self.classes[self.default])
    }

    /// The class refused, with the saturation, when the request's class is
    /// past its limit; counted.
    pub fn refuses(&self, req: &impl RequestHeaders, split: &Split) -> Option<(&str, f64)> {
        let (class, limit, shed) = self.class_of(req);
        let saturation = saturation(split);
        if saturation < *limit {
            return None;
        }
        shed.inc();
        Some((class, saturation))
    }
}

/// The mean saturation of the eligible backends of the split's pools with
/// weight (`Backend::saturation`); 1 when none is eligible.
pub fn saturation(split: &Split) -> f64 {
    let now = clock::now_ms();
    let (sum, n) = split
        .entries()
        .iter()
        .filter(|e| e.weight > 0)
        .map(|e| e.pool.saturation(now))
        .fold((0.0, 0), |(s, n), (ps, pn)| (s + ps, n + pn));
    if n == 0 {
        1.0
    } else {
        sum / n as f64
    }
}
