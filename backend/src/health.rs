//! Liveness and the readiness report the proxy routes by (shared README,
//! section 1).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

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
    pub in_flight: i64,
    pub cache_hit_rate: Option<f64>,
    pub cache: CacheStatus,
    pub uptime_s: f64,
}

pub fn report(state: &AppState) -> Readiness {
    let phase = state.lifecycle.phase();
    let queue_depth = state.batcher.depth();
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
        in_flight: state.metrics.in_flight.get(),
        cache_hit_rate: state.cache.hit_rate(),
        cache: state.cache.status(),
        uptime_s: (state.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }
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
