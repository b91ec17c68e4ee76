//! Prometheus metrics. Each server owns its registry, so several servers can
//! run in one test process without their counters mixing.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "switchyard_embed";

/// Request-scale latencies: sub-millisecond cache hits up to multi-second
/// overloads.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    /// By priority class.
    pub queue_wait: HistogramVec,
    pub inference_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub class_queue_depth: IntGaugeVec,
    pub class_requests: IntCounterVec,
    pub bulk_promoted: IntCounter,
    pub queue_capacity: IntGauge,
    pub in_flight: IntGauge,
    pub ready: IntGauge,
    pub rejected: IntCounterVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(format!("{PREFIX}_{name}"), help);
        let histogram_opts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(buckets.to_vec())
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h =
                Histogram::with_opts(histogram_opts(name, help, buckets)).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let histogram_vec = |name: &str, help: &str, buckets: &[f64], label: &str| {
            let h = HistogramVec::new(histogram_opts(name, help, buckets), &[label])
                .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(opts(name, help), &[label]).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help)).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(opts(name, help)).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(opts(name, help), &[label]).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };

        Metrics {
            requests: counter_vec(
                "requests_total",
                "Embedding requests answered, by HTTP status code.",
                "status",
            ),
            request_duration: histogram(
                "request_duration_seconds",
                "Time from receiving an embedding request to sending its response.",
                LATENCY_BUCKETS,
            ),
            queue_wait: histogram_vec(
                "queue_wait_seconds",
                "Time an input waited in the queue before its batch started, by priority class.",
                LATENCY_BUCKETS,
                "class",
            ),
            inference_duration: histogram(
                "inference_duration_seconds",
                "Time one batch spent in the model forward pass and pooling.",
                LATENCY_BUCKETS,
            ),
            batch_size: histogram("batch_size", "Inputs per inference batch.", BATCH_BUCKETS),
            queue_depth: gauge("queue_depth", "Inputs waiting for a batch slot."),
            class_queue_depth: gauge_vec(
                "class_queue_depth",
                "Inputs waiting for a batch slot, by priority class.",
                "class",
            ),
            class_requests: counter_vec(
                "class_requests_total",
                "Valid embedding requests received, by priority class (x-switchyard-priority).",
                "class",
            ),
            bulk_promoted: counter(
                "bulk_promoted_total",
                "Bulk inputs served ahead of waiting interactive ones because they had waited \
                 --bulk-promote-after longer.",
            ),
            queue_capacity: gauge(
                "queue_capacity",
                "Inputs the queue holds before new work is refused with 503.",
            ),
            in_flight: gauge(
                "in_flight_requests",
                "Embedding requests being served right now.",
            ),
            ready: gauge(
                "ready",
                "1 when the backend reports ready for traffic, 0 while warming up or draining.",
            ),
            rejected: counter_vec(
                "rejected_total",
                "Embedding requests refused before inference, by reason.",
                "reason",
            ),
            cache_hits: counter("cache_hits_total", "Inputs answered from the Redis cache."),
            cache_misses: counter(
                "cache_misses_total",
                "Inputs looked up in the Redis cache and not found (errors included).",
            ),
            cache_errors: counter(
                "cache_errors_total",
                "Redis operations that failed or ran past their time budget.",
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
