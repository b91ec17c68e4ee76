//! HTTP routes: the OpenAI-compatible embeddings endpoint, health, metrics,
//! and OpenAI-style errors for everything that goes wrong.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::map_response_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batcher::Class;
use crate::cache;
use crate::health;
use crate::model::Tokens;
use crate::state::AppState;

pub const INSTANCE_HEADER: &str = "x-switchyard-instance";
pub const VERSION_HEADER: &str = "x-switchyard-version";
pub const PRIORITY_HEADER: &str = "x-switchyard-priority";

/// Requests with at most this much text are tokenised on the async worker.
const INLINE_TOKENIZE_BYTES: usize = 2048;

/// Seconds a client should wait before retrying on this backend.
const RETRY_AFTER_SECS: &str = "1";

pub fn router(state: Arc<AppState>) -> Router {
    let stamp = Arc::new(Stamp {
        instance: header_value(&state.instance),
        version: header_value(&state.config.version_label),
        state: state.clone(),
    });
    Router::new()
        .route(
            "/v1/embeddings",
            post(embeddings).fallback(method_not_allowed),
        )
        .route("/v1/models", get(models).fallback(method_not_allowed))
        .route(
            "/health/ready",
            get(health::ready).fallback(method_not_allowed),
        )
        .route(
            "/health/live",
            get(health::live).fallback(method_not_allowed),
        )
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .layer(map_response_with_state(stamp, stamp_response))
        .with_state(state)
}

struct Stamp {
    instance: HeaderValue,
    version: HeaderValue,
    state: Arc<AppState>,
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Every response, errors included, says which backend and deployment
/// answered, so blue/green/canary routing is visible to clients, and
/// carries the backend's load as it leaves, so a proxy can route on every
/// answer rather than wait for its next readiness poll.
async fn stamp_response(State(stamp): State<Arc<Stamp>>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static(INSTANCE_HEADER),
        stamp.instance.clone(),
    );
    headers.insert(
        HeaderName::from_static(VERSION_HEADER),
        stamp.version.clone(),
    );
    headers.insert(
        HeaderName::from_static(health::LOAD_HEADER),
        health::load_header(&stamp.state),
    );
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.queue_depth.set(state.batcher.depth() as i64);
    for class in Class::ALL {
        state
            .metrics
            .class_queue_depth
            .with_label_values(&[class.name()])
            .set(state.batcher.class_depth(class) as i64);
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAI model list: the one model this server serves, known from
/// the start (it answers while the model is still loading).
async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.config.effective_model_name(),
            "object": "model",
            "created": state.started_unix,
            "owned_by": "switchyard",
        }],
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorKind::InvalidRequest,
        "no such endpoint; try POST /v1/embeddings",
    )
}

/// axum adds the Allow header to this fallback's response.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::InvalidRequest,
        "method not allowed on this endpoint",
    )
}

#[derive(Debug, Clone, Copy)]
enum ErrorKind {
    InvalidRequest,
    Server,
    Overloaded,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: ErrorKind,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn invalid(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, ErrorKind::InvalidRequest, message).param("input")
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.kind {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Server => "server_error",
            ErrorKind::Overloaded => "overloaded_error",
        };
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Option<Value>,
    // Accepted for compatibility; this server has one model and names it in
    // the response.
    #[serde(rename = "model")]
    _model: Option<String>,
    encoding_format: Option<String>,
    /// Any JSON, so that every unsupported value gets the same 400 naming
    /// the parameter.
    dimensions: Option<Value>,
    truncate: Option<bool>,
}

/// A request that passed the checks which need no model.
struct Parsed {
    texts: Vec<String>,
    base64: bool,
    truncate: bool,
    dimensions: Option<Value>,
    class: Class,
}

#[derive(Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: Usage,
}

#[derive(Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    /// Little-endian f32 bytes, as the OpenAI clients request by default.
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// Counts a request in flight for as long as it is being served, including
/// when the client goes away and the handler is dropped.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&state.metrics.in_flight);
    let response = match serve_embeddings(&state, &headers, body).await {
        Ok(response) => Json(response).into_response(),
        Err(error) => error.into_response(),
    };
    let status = response.status();
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        tracing::warn!(status = status.as_u16(), "embedding request failed");
    }
    state
        .metrics
        .requests
        .with_label_values(&[status.as_str()])
        .inc();
    state
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn serve_embeddings(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<EmbeddingsResponse, ApiError> {
    let reject = |error: ApiError| {
        let reason = error.code.unwrap_or("invalid");
        state.metrics.rejected.with_label_values(&[reason]).inc();
        error
    };
    let Parsed {
        texts,
        base64,
        truncate,
        dimensions,
        class,
    } = parse_request(state, headers, body).map_err(reject)?;
    state
        .metrics
        .class_requests
        .with_label_values(&[class.name()])
        .inc();

    let Some(loaded) = state.loaded.get() else {
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded,
            "the model is still loading; retry shortly",
        )
        .code("warming_up");
        return Err(reject(error));
    };
    check_dimensions(dimensions, loaded.info.dimensions).map_err(reject)?;

    inject_faults(state).await?;
    let arrival = state.batcher.arrival();
    let text_bytes: usize = texts.iter().map(String::len).sum();

    let tokenizer = loaded.tokenizer.clone();
    let fingerprint = state
        .cache
        .enabled()
        .then(|| loaded.info.fingerprint.clone());
    let prepare = move || {
        let tokens = texts
            .iter()
            .map(|t| tokenizer.encode(t, truncate))
            .collect::<anyhow::Result<Vec<Tokens>>>();
        let keys: Vec<String> = match &fingerprint {
            Some(fp) => texts.iter().map(|t| cache::key(fp, t)).collect(),
            None => Vec::new(),
        };
        (tokens, keys)
    };
    // A few short texts tokenise in microseconds, less than a hop to the
    // blocking pool costs; a full request can take milliseconds, which must
    // not stall an async worker.
    let (tokens, keys) = if text_bytes <= INLINE_TOKENIZE_BYTES {
        prepare()
    } else {
        tokio::task::spawn_blocking(prepare)
            .await
            .map_err(|e| server_error(format!("tokenizer task failed: {e}")))?
    };
    let tokens = tokens.map_err(|e| server_error(format!("tokenizing failed: {e}")))?;
    if !truncate {
        check_lengths(&tokens, loaded.info.max_seq_length).map_err(reject)?;
    }
    let prompt_tokens = tokens.iter().map(|t| t.ids.len()).sum();

    let mut vectors = if keys.is_empty() {
        vec![None; tokens.len()]
    } else {
        state.cache.lookup(&keys, loaded.info.dimensions).await
    };

    let missing: Vec<usize> = (0..vectors.len())
        .filter(|&i| vectors[i].is_none())
        .collect();
    if !missing.is_empty() {
        let inputs = tokens
            .into_iter()
            .zip(&vectors)
            .filter_map(|(tokens, cached)| cached.is_none().then_some(tokens))
            .collect();
        let replies = state.batcher.submit(arrival, class, inputs).map_err(|_| {
            reject(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorKind::Overloaded,
                    "the inference queue is full; retry shortly or on another backend",
                )
                .code("queue_full"),
            )
        })?;
        for (&i, reply) in missing.iter().zip(replies) {
            let vector = reply
                .await
                .map_err(|_| server_error("the inference thread stopped".into()))?
                .map_err(|e| server_error(e.to_string()))?;
            vectors[i] = Some(vector);
        }
        if !keys.is_empty() {
            state.cache.store(
                missing
                    .iter()
                    .map(|&i| (keys[i].clone(), vectors[i].as_deref().unwrap_or_default()))
                    .collect(),
            );
        }
    }

    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            let vector = vector.unwrap_or_default();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingValue::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingValue::Float(vector)
            };
            EmbeddingObject {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    Ok(EmbeddingsResponse {
        object: "list",
        data,
        model: loaded.info.name.clone(),
        usage: Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
}

fn server_error(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Server,
        message,
    )
}

/// `dimensions` may only restate the model's own size: MiniLM was not
/// trained to keep its meaning in a prefix of the vector (Matryoshka), so
/// cutting it would silently give poor embeddings.
fn check_dimensions(dimensions: Option<Value>, native: usize) -> Result<(), ApiError> {
    match dimensions {
        None => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(native as u64) => Ok(()),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::InvalidRequest,
            format!(
                "dimensions must be omitted or {native}, not {}: this model gives \
                 {native}-dimensional embeddings and was not trained for shortened ones \
                 (Matryoshka)",
                // Numbers are echoed; anything else could be large.
                match other {
                    Value::Number(n) => n.to_string(),
                    _ => "a non-number".to_owned(),
                }
            ),
        )
        .param("dimensions")
        .code("unsupported_dimensions")),
    }
}

/// With truncation off, the first input over the model's limit fails the
/// request (413, as TEI answers it), naming its index and length.
fn check_lengths(tokens: &[Tokens], max: usize) -> Result<(), ApiError> {
    match tokens.iter().position(|t| t.ids.len() > max) {
        None => Ok(()),
        Some(i) => Err(ApiError::invalid(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "input[{i}] is {} tokens long, more than this model's maximum of {max}; \
                 shorten it or send \"truncate\": true",
                tokens[i].ids.len()
            ),
        )
        .code("input_too_long")),
    }
}

fn parse_priority(headers: &HeaderMap) -> Result<Class, ApiError> {
    let Some(value) = headers.get(PRIORITY_HEADER) else {
        return Ok(Class::Interactive);
    };
    value.to_str().ok().and_then(Class::parse).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::InvalidRequest,
            format!(
                "the {PRIORITY_HEADER} header must be \"interactive\" or \"bulk\", not {:?}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
        .param(PRIORITY_HEADER)
    })
}

fn parse_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Parsed, ApiError> {
    let class = parse_priority(headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::InvalidRequest,
                format!(
                    "request body is larger than the limit of {} bytes",
                    state.config.max_body
                ),
            )
            .code("body_too_large")
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                format!("could not read the request body: {rejection}"),
            )
        }
    })?;
    let request: EmbeddingsRequest = serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorKind::InvalidRequest,
                format!("request has a field of the wrong type: {e}"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                format!("request body is not valid JSON: {e}"),
            )
        }
    })?;

    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::InvalidRequest,
                format!("encoding_format must be \"float\" or \"base64\", not {other:?}"),
            )
            .param("encoding_format"))
        }
    };

    let texts = match request.input {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                StatusCode::BAD_REQUEST,
                "missing required parameter: input",
            ))
        }
        Some(Value::String(text)) => vec![text],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text),
                _ => Err(ApiError::invalid(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("input[{i}] must be a string; token arrays are not supported"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                StatusCode::UNPROCESSABLE_ENTITY,
                "input must be a string or an array of strings",
            ))
        }
    };
    if texts.is_empty() {
        return Err(ApiError::invalid(
            StatusCode::BAD_REQUEST,
            "input must not be an empty array",
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            StatusCode::BAD_REQUEST,
            format!("input[{i}] must not be an empty string"),
        ));
    }
    if texts.len() > state.config.max_inputs {
        return Err(ApiError::invalid(
            StatusCode::BAD_REQUEST,
            format!(
                "too many inputs: {} given, at most {} per request",
                texts.len(),
                state.config.max_inputs
            ),
        )
        .code("too_many_inputs"));
    }
    Ok(Parsed {
        texts,
        base64,
        truncate: request.truncate.unwrap_or(true),
        dimensions: request.dimensions,
        class,
    })
}

/// Test and demo faults; both are off unless configured.
async fn inject_faults(state: &AppState) -> Result<(), ApiError> {
    let config = &state.config;
    if !config.fault_latency.is_zero() {
        tokio::time::sleep(config.fault_latency).await;
    }
    if config.fault_error_rate > 0.0 && rand::random::<f64>() < config.fault_error_rate {
        return Err(server_error("injected fault (--fault-error-rate)".into()));
    }
    Ok(())
}
