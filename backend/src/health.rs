//! Liveness and the readiness report the proxy routes by (shared README,
//! section 1).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::batcher::Class;
use crate::cache::CacheStatus;
use crate::state::{AppState, Phase};

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub status: &'static str,
    pub ready: bool,
    pub version: String,
    pub model: String,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// Optional in the contract: `queue_depth` split by priority class.
    pub queue_depth_by_class: DepthByClass,
    pub in_flight: i64,
    pub cache_hit_rate: Option<f64>,
    pub cache: CacheStatus,
    pub uptime_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DepthByClass {
    pub interactive: usize,
    pub bulk: usize,
}

pub fn report(state: &AppState) -> Readiness {
    let phase = state.lifecycle.phase();
    let queue_depth_by_class = DepthByClass {
        interactive: state.batcher.class_depth(Class::Interactive),
        bulk: state.batcher.class_depth(Class::Bulk),
    };
    let queue_depth = queue_depth_by_class.interactive + queue_depth_by_class.bulk;
    let queue_capacity = state.batcher.capacity();
    let status = match phase {
        Phase::WarmingUp => "warming_up",
        Phase::Draining => "draining",
        // Overloaded still counts as ready: the backend is healthy and its
        // queue drains by itself; the proxy should just prefer others.
        Phase::Ready if queue_depth >= queue_capacity => "overloaded",
        Phase::Ready => "ready",
    };
    Readiness {
        status,
        ready: phase == Phase::Ready,
        version: state.config.version_label.clone(),
        model: state.config.effective_model_name(),
        queue_depth,
        queue_capacity,
        queue_depth_by_class,
        in_flight: state.metrics.in_flight.get(),
        cache_hit_rate: state.cache.hit_rate(),
        cache: state.cache.status(),
        uptime_s: (state.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }
}

/// The in-band load report on every response, in the ORCA text format
/// that Envoy and vLLM use (named metrics only).
pub const LOAD_HEADER: &str = "endpoint-load-metrics";

/// The load as this response leaves: the same queue figures as the
/// readiness report, and requests in flight besides the one answered.
pub fn load_header(state: &AppState) -> HeaderValue {
    let report = format!(
        "TEXT named_metrics.queue_depth={}, named_metrics.queue_capacity={}, \
         named_metrics.in_flight={}",
        state.batcher.depth(),
        state.batcher.capacity(),
        state.metrics.in_flight.get(),
    );
    HeaderValue::try_from(report).expect("digits and ASCII make a valid header value")
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let report = report(&state);
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

/// 200 whenever the process answers; the body is the same report, which
/// helps a person looking at a backend that is live but not ready.
pub async fn live(State(state): State<Arc<AppState>>) -> Response {
    Json(report(&state)).into_response()
}
