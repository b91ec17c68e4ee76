//! One h2 stream: its head as the core reads it, its body collected under
//! the same limits as HTTP/1.x, answers sent as flow control allows.

use std::future::{poll_fn, Future};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use prometheus::IntCounter;

use crate::codec::body::{Body, BodyError, BodyLimits, Collector, Reader, RelayError, Relayed};
use crate::codec::head::{drops_name, valid_authority, HeadError, Known, ResponseHead};
use crate::config::Underscores;
use crate::listener::Frontend;
use crate::request::headers::response_fields;
use crate::request::{self, Call, Front, Head, Reply};
use crate::routing::RequestHeaders;
use crate::upstream::Conn;

/// An h2 request head.
pub struct H2Head {
    parts: http::request::Parts,
    underscores: Underscores,
    /// DATA frames follow the HEADERS frame.
    body: bool,
}

impl H2Head {
    /// What the h2 crate leaves to the application, checked as the
    /// HTTP/1.x parser checks it: the target is a path, the authority is
    /// valid, and underscored header names follow the policy.
    fn check(&self) -> Result<(), HeadError> {
        let path = self.parts.uri.path();
        let asterisk = path == "*" && self.parts.method == http::Method::OPTIONS;
        if !path.starts_with('/') && !asterisk {
            return Err(HeadError::Malformed("request target is not a path"));
        }
        match self.host() {
            Some(host) if valid_authority(host.as_bytes()) => {}
            Some(_) => return Err(HeadError::Malformed("invalid authority")),
            None => return Err(HeadError::Malformed("missing :authority and Host")),
        }
        for name in self.parts.headers.keys() {
            drops_name(name.as_str().as_bytes(), self.underscores)?;
        }
        Ok(())
    }

    fn kind(&self, name: &HeaderName) -> Known {
        match drops_name(name.as_str().as_bytes(), self.underscores) {
            Ok(false) => Known::of(name.as_str().as_bytes()),
            _ => Known::Dropped,
        }
    }
}

impl RequestHeaders for H2Head {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.parts
            .headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
    }
}

impl Head for H2Head {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }

    fn path(&self) -> &str {
        self.parts.uri.path()
    }

    fn host(&self) -> Option<&str> {
        match self.parts.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => self.parts.headers.get(HOST).and_then(|v| v.to_str().ok()),
        }
    }

    fn target(&self) -> (&[u8], &[u8]) {
        let target = self
            .parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let end = target.find('?').unwrap_or(target.len());
        let (path, query) = target.as_bytes().split_at(end);
        (path, query)
    }

    fn target_authority(&self) -> Option<&[u8]> {
        self.parts.uri.authority().map(|a| a.as_str().as_bytes())
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], Known)> {
        self.parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes(), self.kind(n)))
    }

    fn declared_length(&self) -> Option<u64> {
        let value = self.parts.headers.get(CONTENT_LENGTH)?;
        value.to_str().ok()?.trim().parse().ok()
    }

    fn has_body(&self) -> bool {
        self.body
    }

    fn header_count(&self) -> usize {
        self.parts.headers.len()
    }

    fn size(&self) -> usize {
        let line = self.parts.method.as_str().len() + self.parts.uri.path().len() + 12;
        (self.parts.headers.iter()).fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
    }
}

/// The h2 side of one request.
struct H2Stream {
    app: Arc<Frontend>,
    client: Option<IpAddr>,
    respond: SendResponse<Bytes>,
    body: Option<RecvStream>,
}

/// Serves one stream from its HEADERS to its last DATA frame.
pub async fn serve(
    app: Arc<Frontend>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    client: Option<IpAddr>,
) {
    let active = app.shared.active();
    let (parts, body) = req.into_parts();
    let head = H2Head {
        parts,
        underscores: active.config.limits.underscores_in_headers,
        body: !body.is_end_stream(),
    };
    let max_head = active.config.limits.max_header_bytes;
    let mut call = Call::new(active, head, true);
    let mut front = H2Stream {
        app,
        client,
        respond,
        body: Some(body),
    };
    match call.head.check() {
        Ok(()) => request::serve(&mut front, &mut call).await,
        Err(e) => {
            let (status, kind, msg) = request::refuse_head(e, max_head);
            call.error = Some(msg.clone());
            request::respond(&mut front, &mut call, status, kind, &msg).await;
            call.finish(&front.app.unrouted);
        }
    }
}

impl Front for H2Stream {
    type Head = H2Head;

    fn client(&self) -> Option<IpAddr> {
        self.client
    }

    fn tls(&self) -> bool {
        // h2 is offered only through ALPN, on the TLS listener.
        true
    }

    fn unrouted(&self) -> &[IntCounter; 6] {
        &self.app.unrouted
    }

    fn closing(&self) -> bool {
        self.app.closing()
    }

    async fn read_body(
        &mut self,
        _call: &Call<H2Head>,
        limits: BodyLimits,
    ) -> Result<Body, BodyError> {
        let Some(mut recv) = self.body.take() else {
            return Ok(Body::whole(Bytes::new()));
        };
        let mut body = Collector::new(limits);
        loop {
            let data = tokio::time::timeout_at(limits.deadline, recv.data()).await;
            let chunk = match data {
                Err(_) => return Err(BodyError::TimedOut),
                Ok(None) => return Ok(body.finish()),
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(e))) => return Err(BodyError::Io(io::Error::other(e))),
            };
            // The window reopens as bytes arrive: memory is bounded by the
            // body limits and the budget, which the collector charges.
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.push(&chunk)?;
        }
    }

    async fn answer(&mut self, call: &Call<H2Head>, reply: &Reply<'_>) -> io::Result<()> {
        let mut resp = Response::new(());
        *resp.status_mut() = http::StatusCode::from_u16(reply.status).map_err(io::Error::other)?;
        let none = Bytes::new();
        reply.headers(|name, value| put(resp.headers_mut(), &none, name, value));
        let done = reply.body.is_empty();
        let mut send = self
            .respond
            .send_response(resp, done)
            .map_err(io::Error::other)?;
        if !done {
            let wait = call.config().timeouts.read;
            send_data(&mut send, Bytes::copy_from_slice(reply.body), true, wait).await?;
        }
        Ok(())
    }

    async fn relay(
        &mut self,
        call: &mut Call<H2Head>,
        conn: &mut Conn,
        resp: &ResponseHead,
    ) -> Result<Relayed, (RelayError, Relayed)> {
        let wait = call.config().timeouts.read;
        let mut progress = Relayed {
            bytes_out: 0,
            untouched: true,
        };
        let mut reader = Reader::new(resp.framing);
        // The first piece of the body before the head: a backend that
        // fails before its body can still be answered with a 502.
        let mut piece = reader.next(&mut conn.io, &mut conn.buf, wait).await;
        let (first, mut done) = piece.map_err(|e| (RelayError::Upstream(e), progress))?;
        let mut head = Response::new(());
        head.headers_mut().reserve(resp.fields.count() + 3);
        *head.status_mut() = http::StatusCode::from_u16(resp.status).map_err(|e| {
            (
                RelayError::Upstream(BodyError::Io(io::Error::other(e))),
                progress,
            )
        })?;
        let raw = &resp.fields.raw;
        response_fields(call, resp, |name, value| {
            put(head.headers_mut(), raw, name, value)
        });
        let client = |e: h2::Error| RelayError::Client(io::Error::other(e));
        let end = done && first.is_empty();
        let mut send =
            (self.respond.send_response(head, end)).map_err(|e| (client(e), progress))?;
        progress.untouched = false;
        let mut data = first;
        loop {
            if !data.is_empty() || (done && !end) {
                let n = data.len();
                send_data(&mut send, data, done, wait)
                    .await
                    .map_err(|e| (RelayError::Client(e), progress))?;
                progress.bytes_out += n;
            }
            if done {
                return Ok(progress);
            }
            piece = reader.next(&mut conn.io, &mut conn.buf, wait).await;
            (data, done) = piece.map_err(|e| (RelayError::Upstream(e), progress))?;
        }
    }

    async fn unless_cancelled<T: Send>(
        &mut self,
        work: impl Future<Output = T> + Send,
    ) -> Option<T> {
        let respond = &mut self.respond;
        tokio::select! {
            biased;
            done = work => Some(done),
            _ = poll_fn(|cx| respond.poll_reset(cx)) => None,
        }
    }
}

/// Adds a header the h2 way (lower-case names); one that h2 cannot carry
/// is left out. A value lying in `raw` (the backend's head) is shared,
/// not copied.
fn put(headers: &mut HeaderMap, raw: &Bytes, name: &[u8], value: &[u8]) {
    let Some(name) = header_name(name) else {
        return;
    };
    let outside = value.is_empty() || !raw.as_ptr_range().contains(&value.as_ptr());
    let bytes = if outside {
        Bytes::copy_from_slice(value)
    } else {
        raw.slice_ref(value)
    };
    let Ok(mut value) = HeaderValue::from_maybe_shared(bytes) else {
        return;
    };
    if name == REQUEST_ID {
        // A fresh id per response: indexing it in the HPACK table had
        // cost about 9 % of an h2 request's instructions, searching and
        // evicting entries that never match again.
        value.set_sensitive(true);
    }
    headers.append(name, value);
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static POOL: HeaderName = HeaderName::from_static("x-switchyard-pool");
static BACKEND: HeaderName = HeaderName::from_static("x-switchyard-backend");

/// The proxy's own names without parsing them again for every response.
fn header_name(name: &[u8]) -> Option<HeaderName> {
    match name {
        b"x-request-id" => Some(REQUEST_ID.clone()),
        b"x-switchyard-pool" => Some(POOL.clone()),
        b"x-switchyard-backend" => Some(BACKEND.clone()),
        _ => HeaderName::from_bytes(name).ok(),
    }
}

/// Sends `data` as the client's flow-control windows allow, waiting at
/// most `wait` for each opening: a client that never opens its window
/// would otherwise hold the stream, and the response, for ever.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    wait: Duration,
) -> io::Result<()> {
    loop {
        if data.is_empty() {
            return send.send_data(data, end).map_err(io::Error::other);
        }
        send.reserve_capacity(data.len());
        let mut room = send.capacity();
        if room == 0 {
            let opened = tokio::time::timeout(wait, poll_fn(|cx| send.poll_capacity(cx))).await;
            room = match opened {
                Ok(Some(Ok(n))) => n,
                Ok(Some(Err(e))) => return Err(io::Error::other(e)),
                Ok(None) => return Err(io::ErrorKind::BrokenPipe.into()),
                Err(_) => {
                    send.send_reset(h2::Reason::CANCEL);
                    return Err(io::ErrorKind::TimedOut.into());
                }
            };
        }
        let piece = data.split_to(room.min(data.len()));
        let last = data.is_empty();
        send.send_data(piece, end && last)
            .map_err(io::Error::other)?;
        if last {
            return Ok(());
        }
    }
}
