//! The admin listener (loopback by default): `GET /metrics` now; the admin
//! API shares it.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::routing::strip_port;
use crate::shared::Shared;

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        self.shared.refresh_gauges();
        let body = self.shared.metrics.encode();
        reply(StatusCode::OK, "text/plain; version=0.0.4", body)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        match (&req.method, req.uri.path()) {
            (&Method::GET, "/metrics") => self.metrics(),
            (_, "/metrics") => json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            ),
            _ => json_error(StatusCode::NOT_FOUND, "not_found", "unknown admin path"),
        }
    }
}

pub fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

pub fn json_error(status: StatusCode, kind: &str, message: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({ "error": { "message": message, "type": kind } });
    reply(status, "application/json", body.to_string().into_bytes())
}

/// The plain-HTTP listener in `redirect` mode: 308 to the HTTPS URL.
pub struct Redirect {
    pub https_port: u16,
}

#[async_trait]
impl ServeHttp for Redirect {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let host = req
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .map(strip_port)
            .unwrap_or("localhost");
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let location = match self.https_port {
            443 => format!("https://{host}{path}"),
            port => format!("https://{host}:{port}{path}"),
        };
        Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header("location", location)
            .header("content-length", 0)
            .body(Vec::new())
            .expect("redirect parts are valid")
    }
}
