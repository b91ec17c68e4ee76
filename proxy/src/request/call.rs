//! One request's state, from its head to its access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus::IntCounter;
use tokio::time::Instant as Deadline;

use super::answer::Refusal;
use super::log::Finished;
use super::{headers, Head};
use crate::codec::body::BodyLimits;
use crate::codec::head::Known;
use crate::config::Config;
use crate::ratelimit::InflightGuard;
use crate::routing::{Lease, Pool, RouteWindows};
use crate::shared::Active;

pub struct Call<H> {
    /// The configuration in effect when the head arrived, for the whole request.
    pub active: Arc<Active>,
    pub head: H,
    pub request_id: String,
    pub start: Instant,
    pub pool: Option<Arc<Pool>>,
    /// The member of the current (latest) attempt.
    pub member: Option<usize>,
    pub lease: Option<Lease>,
    pub tried: Vec<SocketAddr>,
    pub attempts: u32,
    pub refusal: Option<Refusal>,
    /// 0 until a response head is written.
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
    /// The request body has been read off the connection.
    pub body_read: bool,
    pub error: Option<String>,
    /// The client connection can carry another request after this one
    /// (HTTP/1.x; an h2 stream ignores it).
    pub keep: bool,
    /// On a route under rollout: its windows and the arm of the pool.
    pub arm: Option<(Arc<RouteWindows>, usize)>,
    /// In-flight slots of the client's key, held until the request ends.
    pub slots: Vec<InflightGuard>,
    /// The limit rule that refused the request, for the access log.
    pub limited: Option<String>,
    /// A shadow rule that would have refused it.
    pub shadow_limited: Option<String>,
}

impl<H> Call<H> {
    pub fn config(&self) -> &Config {
        &self.active.config
    }

    pub fn backend_name(&self) -> &str {
        self.lease
            .as_ref()
            .map_or("", |l| l.backend().name.as_str())
    }

    pub fn pool_name(&self) -> &str {
        self.pool.as_ref().map_or("", |p| p.name.as_str())
    }

    /// Bounds of the request body: `client_body` from now, never past the
    /// request's `timeouts.total`.
    pub fn body_limits(&self) -> BodyLimits {
        let (limits, timeouts) = (&self.config().limits, &self.config().timeouts);
        let deadline = (Instant::now() + timeouts.client_body).min(self.start + timeouts.total);
        BodyLimits {
            max: limits.max_body_bytes,
            budget: limits.body_buffer_total,
            deadline: Deadline::from_std(deadline),
        }
    }
}

impl<H: Head> Call<H> {
    pub fn new(active: Arc<Active>, head: H, keep: bool) -> Self {
        let request_id = headers::request_id(head.known(Known::XRequestId).next());
        Call {
            active,
            request_id,
            head,
            start: Instant::now(),
            pool: None,
            member: None,
            lease: None,
            tried: Vec::new(),
            attempts: 0,
            refusal: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            body_read: false,
            error: None,
            keep,
            arm: None,
            slots: Vec::new(),
            limited: None,
            shadow_limited: None,
        }
    }

    /// Counts the request, writes its access line and gives its lease back.
    pub fn finish(&mut self, unrouted: &[IntCounter; 6]) {
        Finished {
            request_id: &self.request_id,
            method: self.head.method(),
            path: self.head.path(),
            status: self.status,
            pool: self.pool.as_deref(),
            served_by: self.member.filter(|_| self.refusal.is_none()),
            backend: self.backend_name(),
            elapsed: self.start.elapsed(),
            attempts: self.attempts,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            error: self.error.as_deref(),
            limited: self.limited.as_deref(),
            shadow_limited: self.shadow_limited.as_deref(),
        }
        .record(unrouted);
        if let Some((windows, arm)) = &self.arm {
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            windows.arms[*arm].record(self.status >= 500, ms);
        }
        self.lease = None;
        self.slots.clear();
    }
}
