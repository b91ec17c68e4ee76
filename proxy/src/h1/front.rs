//! The HTTP/1.x side of a request: the head as the core reads it, the
//! body read off the connection, answers written in HTTP/1.x framing.
//! Every rule of the request is the core's ([`crate::request`]).

use std::future::Future;
use std::io;
use std::net::IpAddr;

use prometheus::IntCounter;

use super::Connection;
use crate::codec::body::{self, Body, BodyError, BodyLimits, Relay, RelayError, Relayed};
use crate::codec::head::{self, Framing, Known, RequestHead, ResponseHead};
use crate::request::headers::{put_header, response_fields};
use crate::request::{self, Call, Front, Head, Reply};
use crate::upstream::Conn;

impl Head for RequestHead {
    fn method(&self) -> &str {
        RequestHead::method(self)
    }

    fn path(&self) -> &str {
        RequestHead::path(self)
    }

    fn host(&self) -> Option<&str> {
        RequestHead::host(self)
    }

    fn target(&self) -> (&[u8], &[u8]) {
        self.origin_form()
    }

    fn target_authority(&self) -> Option<&[u8]> {
        self.authority().filter(|_| self.is_absolute_form())
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], Known)> {
        self.fields.iter()
    }

    fn declared_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    fn has_body(&self) -> bool {
        RequestHead::has_body(self)
    }

    fn header_count(&self) -> usize {
        self.fields.count()
    }

    fn size(&self) -> usize {
        self.fields.raw.len()
    }
}

impl Front for Connection {
    type Head = RequestHead;

    fn client(&self) -> Option<IpAddr> {
        self.client
    }

    fn tls(&self) -> bool {
        self.tls
    }

    fn unrouted(&self) -> &[IntCounter; 6] {
        &self.app.unrouted
    }

    fn closing(&self) -> bool {
        Connection::closing(self)
    }

    async fn read_body(
        &mut self,
        call: &Call<RequestHead>,
        limits: BodyLimits,
    ) -> Result<Body, BodyError> {
        let head = &call.head;
        if head.framing != Framing::Empty
            && head.expects_continue()
            && !head.http10
            && self.buf.is_empty()
        {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            let wait = call.config().timeouts.read;
            body::write_out(&mut self.io, &mut self.out, wait)
                .await
                .map_err(BodyError::Io)?;
        }
        body::read_request(&mut self.io, &mut self.buf, head.framing, limits).await
    }

    async fn answer(&mut self, call: &Call<RequestHead>, reply: &Reply<'_>) -> io::Result<()> {
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        put_status(&mut self.out, reply.status, b"");
        reply.headers(|name, value| put_header(&mut self.out, name, value));
        self.end_head(call);
        self.out.extend_from_slice(reply.body);
        let wait = call.config().timeouts.read;
        body::write_out(&mut self.io, &mut self.out, wait).await
    }

    async fn relay(
        &mut self,
        call: &mut Call<RequestHead>,
        conn: &mut Conn,
        resp: &ResponseHead,
    ) -> Result<Relayed, (RelayError, Relayed)> {
        // An HTTP/1.0 client cannot take the chunked coding.
        let decode = resp.framing == Framing::Chunked && call.head.http10;
        call.keep &= resp.framing != Framing::UntilClose && !decode;
        self.response_head(call, resp, decode);
        let relayed = Relay {
            up: &mut conn.io,
            up_buf: &mut conn.buf,
            client: &mut self.io,
            out: &mut self.out,
            framing: resp.framing,
            decode,
            wait: call.config().timeouts.read,
        }
        .run()
        .await;
        if relayed.as_ref().is_err_and(|(_, done)| done.untouched) {
            self.out.clear();
        }
        relayed
    }

    async fn unless_cancelled<T: Send>(
        &mut self,
        work: impl Future<Output = T> + Send,
    ) -> Option<T> {
        // An HTTP/1.x client cancels by closing, which the relay notices.
        Some(work.await)
    }
}

impl Connection {
    /// Serves one request; whether the connection may carry another.
    pub(super) async fn serve_request(&mut self, head: RequestHead) -> bool {
        let keep = head.keep_alive() && !self.closing();
        let mut call = Call::new(self.app.shared.active(), head, keep);
        request::serve(self, &mut call).await;
        // A large body left the buffer grown; do not hold that while idle.
        if self.buf.is_empty() && self.buf.capacity() > 4 * super::CLIENT_BUFFER {
            self.buf = bytes::BytesMut::with_capacity(super::CLIENT_BUFFER);
        }
        if !call.keep && call.head.has_body() && !call.body_read {
            self.linger().await;
        }
        call.keep
    }

    /// The response head for the client, into `self.out`.
    fn response_head(&mut self, call: &Call<RequestHead>, resp: &ResponseHead, decode: bool) {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        put_status(out, resp.status, resp.reason());
        response_fields(call, resp, |name, value| put_header(out, name, value));
        // A body passed through as coded names every coding as sent (a
        // close-delimited one may carry codings other than chunked).
        let coded =
            resp.framing == Framing::UntilClose || (resp.framing == Framing::Chunked && !decode);
        if coded {
            for coding in resp.fields.known(Known::TransferEncoding) {
                put_header(out, b"transfer-encoding", coding);
            }
        }
        self.end_head(call);
    }

    /// The connection header and the blank line.
    fn end_head(&mut self, call: &Call<RequestHead>) {
        if !call.keep {
            self.out.extend_from_slice(b"connection: close\r\n");
        } else if call.head.http10 {
            self.out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }
}

/// Answers a head that could not be parsed, then closes.
pub(super) async fn refuse_unparsed(conn: &mut Connection, e: head::HeadError, max_head: usize) {
    let (status, kind, msg) = request::refuse_head(e, max_head);
    let mut call = Call::new(conn.app.shared.active(), head::placeholder(), false);
    call.error = Some(msg.clone());
    request::respond(conn, &mut call, status, kind, &msg).await;
    call.finish(&conn.app.unrouted);
    conn.linger().await;
}

/// `200 OK\r\n`; the standard reason when the backend gave none.
fn put_status(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    let standard = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(if reason.is_empty() {
        standard.as_bytes()
    } else {
        reason
    });
    out.extend_from_slice(b"\r\n");
}
