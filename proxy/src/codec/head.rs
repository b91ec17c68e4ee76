//! Request and response heads: parsed in place with `httparse`, kept as
//! spans into the bytes read, so a head costs one allocation for its
//! header list and no copies of names or values.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;
use http::HeaderName;

use crate::config::{Underscores, MAX_HEADERS};
use crate::routing::RequestHeaders;

/// Most options a Connection header may list. Each named header is matched
/// against every field once per head, so the cap bounds that work (14,000
/// tokens had cost 6-7 ms of CPU per request); nginx refuses such heads too.
pub const MAX_CONNECTION_TOKENS: usize = 32;

/// Why a head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Over `max_header_bytes`, or over the header-count cap.
    TooLarge,
    Malformed(&'static str),
    /// A transfer coding the proxy does not implement (RFC 9112 §6.1: 501).
    NotImplemented(&'static str),
    /// The head did not arrive within `timeouts.client_head`.
    TimedOut,
}

/// What a request head may hold; from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_bytes: usize,
    pub max_headers: usize,
    /// Underscored names: some backends fold them into their dash-named
    /// twins (`Content_Length`), so they are dropped by default.
    pub underscores: Underscores,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Response only: the body runs to the end of the connection.
    UntilClose,
}

/// Headers the proxy acts on, recognised once per head so that later
/// passes compare a tag instead of names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Host,
    Connection,
    ContentLength,
    TransferEncoding,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XRequestId,
    /// `endpoint-load-metrics`: a backend's in-band load report (ORCA's
    /// text format), for the proxy alone.
    LoadReport,
    /// The other hop-by-hop headers of RFC 9110 §7.6.1 and their kin:
    /// Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade,
    /// Proxy-Authenticate; and any header the Connection header names.
    HopByHop,
    /// A request header the proxy drops (an underscore in its name).
    Dropped,
    Other,
}

impl Known {
    pub fn of(name: &[u8]) -> Known {
        let is = |want: &str| name.eq_ignore_ascii_case(want.as_bytes());
        // The length picks the few candidates worth comparing.
        match name.len() {
            2 if is("te") => Known::HopByHop,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::Expect,
            7 if is("trailer") || is("upgrade") => Known::HopByHop,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::HopByHop,
            12 if is("x-request-id") => Known::XRequestId,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::XForwardedFor,
            16 if is("proxy-connection") => Known::HopByHop,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            17 if is("x-forwarded-proto") => Known::XForwardedProto,
            18 if is("proxy-authenticate") => Known::HopByHop,
            21 if is("endpoint-load-metrics") => Known::LoadReport,
            _ => Known::Other,
        }
    }

    /// Never copied from one side to the other as is.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::TransferEncoding
                | Known::HopByHop
                | Known::Dropped
                | Known::LoadReport
        )
    }

    /// Headers a Connection option cannot strip: the proxy needs them to
    /// route and to frame (`Connection: Host` had removed Host upstream).
    fn is_protected(self) -> bool {
        matches!(
            self,
            Known::Host | Known::ContentLength | Known::TransferEncoding
        )
    }
}

/// One header: where its name and value lie in [`Fields::raw`].
struct Header {
    name: Range<usize>,
    value: Range<usize>,
    known: Known,
}

/// What the Connection header says, read once per head.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

/// Fields both heads have.
pub struct Fields {
    /// The whole head, request or status line through the blank line.
    pub raw: Bytes,
    headers: Vec<Header>,
    connection: ConnectionTokens,
}

fn header_spans(buf: &[u8], headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| Header {
            name: span(buf, h.name.as_bytes()),
            value: span(buf, h.value),
            known: Known::of(h.name.as_bytes()),
        })
        .collect()
}

/// Applies the underscore policy to a request's header names.
fn police_underscores(
    headers: &mut [Header],
    buf: &[u8],
    policy: Underscores,
) -> Result<(), HeadError> {
    if policy == Underscores::Forward {
        return Ok(());
    }
    for h in headers.iter_mut() {
        if drops_name(&buf[h.name.clone()], policy)? {
            h.known = Known::Dropped;
        }
    }
    Ok(())
}

/// The underscore policy's verdict on one request header name, for
/// either protocol: kept (false), dropped (true), or the request refused.
/// Some backends fold `x_foo` into `x-foo`, so an underscored name could
/// smuggle a header past the proxy.
pub fn drops_name(name: &[u8], policy: Underscores) -> Result<bool, HeadError> {
    if policy == Underscores::Forward || !name.contains(&b'_') {
        return Ok(false);
    }
    match policy {
        Underscores::Refuse => Err(HeadError::Malformed("underscore in a header name")),
        _ => Ok(true),
    }
}

/// Comma-separated list items, trimmed, empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

impl Fields {
    /// Takes the head, the first `len` bytes of `buf`, with its headers,
    /// and reads its Connection options once: the headers they name are
    /// tagged hop-by-hop here, so no later pass parses them again.
    fn split(
        buf: &mut bytes::BytesMut,
        len: usize,
        headers: Vec<Header>,
    ) -> Result<Self, HeadError> {
        let mut fields = Self {
            raw: buf.split_to(len).freeze(),
            headers,
            connection: ConnectionTokens::default(),
        };
        let mut named: [Range<usize>; MAX_CONNECTION_TOKENS] = Default::default();
        let mut count = 0;
        for h in fields
            .headers
            .iter()
            .filter(|h| h.known == Known::Connection)
        {
            for t in tokens(&fields.raw[h.value.clone()]) {
                if t.eq_ignore_ascii_case(b"close") {
                    fields.connection.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    fields.connection.keep_alive = true;
                } else if count == MAX_CONNECTION_TOKENS {
                    return Err(HeadError::Malformed("too many Connection options"));
                } else {
                    named[count] = span(&fields.raw, t);
                    count += 1;
                }
            }
        }
        for option in &named[..count] {
            let option = &fields.raw[option.clone()];
            for h in fields.headers.iter_mut() {
                if !h.known.is_protected()
                    && fields.raw[h.name.clone()].eq_ignore_ascii_case(option)
                {
                    h.known = Known::HopByHop;
                }
            }
        }
        Ok(fields)
    }

    /// How many header lines there are.
    pub fn count(&self) -> usize {
        self.headers.len()
    }

    /// Every (name, value, kind) triple, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], Known)> {
        self.headers.iter().map(|h| {
            (
                &self.raw[h.name.clone()],
                &self.raw[h.value.clone()],
                h.known,
            )
        })
    }

    /// Every value of a recognised header, in order.
    pub fn known(&self, kind: Known) -> impl Iterator<Item = &[u8]> {
        self.iter().filter(move |h| h.2 == kind).map(|h| h.1)
    }

    /// Every value of `name` (ASCII case-insensitive), in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.0.eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.1)
    }

    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.all(name).next()
    }

    /// Whether the sender lets the connection carry another message.
    fn keep_alive(&self, http10: bool) -> bool {
        if http10 {
            self.connection.keep_alive
        } else {
            !self.connection.close
        }
    }

    /// A request's framing, checked the way RFC 9112 §6.3 asks, so that a
    /// request smuggled past another hop is refused here. The only coding
    /// implemented is a lone `chunked`: anything else (`gzip, chunked`,
    /// `chunked, chunked`, a second Transfer-Encoding line) gets 501, as
    /// nginx answers, rather than being de-chunked and forwarded as plain.
    fn request_framing(&self) -> Result<Option<Framing>, HeadError> {
        let mut codings = self.known(Known::TransferEncoding);
        if let Some(first) = codings.next() {
            self.refuse_length_with_coding()?;
            let lone_chunked = first.trim_ascii().eq_ignore_ascii_case(b"chunked");
            if !lone_chunked || codings.next().is_some() {
                return Err(HeadError::NotImplemented(UNSUPPORTED_CODING));
            }
            return Ok(Some(Framing::Chunked));
        }
        self.content_length()
    }

    /// A response's framing: chunked when that is the final coding; other
    /// codings run to the close, passed through as sent.
    fn response_framing(&self) -> Result<Option<Framing>, HeadError> {
        if self.known(Known::TransferEncoding).next().is_some() {
            self.refuse_length_with_coding()?;
            let last = self.known(Known::TransferEncoding).flat_map(tokens).last();
            return Ok(Some(match last {
                Some(t) if t.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
                _ => Framing::UntilClose,
            }));
        }
        self.content_length()
    }

    fn refuse_length_with_coding(&self) -> Result<(), HeadError> {
        match self.known(Known::ContentLength).next() {
            Some(_) => Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding",
            )),
            None => Ok(()),
        }
    }

    fn content_length(&self) -> Result<Option<Framing>, HeadError> {
        let mut length = None;
        for v in self.known(Known::ContentLength) {
            let n = parse_length(v).ok_or(HeadError::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
        Ok(length.map(Framing::Length))
    }
}

const UNSUPPORTED_CODING: &str = "unsupported Transfer-Encoding";

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The head's length once complete; `None` while more bytes are needed.
fn complete(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max_bytes: usize,
    malformed: &'static str,
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > max_bytes => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > max_bytes => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed(malformed)),
    }
}

/// `s`, a slice of `buf`, as a range of it.
fn span(buf: &[u8], s: &[u8]) -> Range<usize> {
    // httparse hands out a static "" for an empty or non-ASCII reason
    // phrase: a slice from outside the buffer stands for nothing.
    let start = (s.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    if s.is_empty() || start > buf.len() || buf.len() - start < s.len() {
        return 0..0;
    }
    start..start + s.len()
}

/// A parsed request head.
pub struct RequestHead {
    pub fields: Fields,
    method: Range<usize>,
    /// The target without an absolute form's scheme and authority.
    origin: Range<usize>,
    /// An absolute-form target's authority.
    absolute: Option<Range<usize>>,
    /// HTTP/1.0 rather than HTTP/1.1.
    pub http10: bool,
    pub framing: Framing,
}

impl RequestHead {
    pub fn method(&self) -> &str {
        // httparse accepts only token characters in a method.
        std::str::from_utf8(&self.fields.raw[self.method.clone()]).unwrap_or("")
    }

    /// The target in origin form as (path, `?query` or empty): an
    /// absolute form's scheme and authority dropped, an empty path made `/`.
    pub fn origin_form(&self) -> (&[u8], &[u8]) {
        let t = &self.fields.raw[self.origin.clone()];
        let end = t.iter().position(|b| *b == b'?').unwrap_or(t.len());
        let (path, query) = t.split_at(end);
        (if path.is_empty() { b"/" } else { path }, query)
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        // httparse accepts only visible ASCII in a target, so this holds.
        std::str::from_utf8(self.origin_form().0).unwrap_or("/")
    }

    /// The authority of an absolute-form target (which then replaces the
    /// Host header, RFC 9112 §3.2.2), else the Host header.
    pub fn authority(&self) -> Option<&[u8]> {
        match &self.absolute {
            Some(authority) => Some(&self.fields.raw[authority.clone()]),
            None => self.fields.known(Known::Host).next(),
        }
    }

    pub fn is_absolute_form(&self) -> bool {
        self.absolute.is_some()
    }

    pub fn host(&self) -> Option<&str> {
        std::str::from_utf8(self.authority()?).ok()
    }

    /// A body follows the head.
    pub fn has_body(&self) -> bool {
        !matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    pub fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }

    /// Whether the client lets the connection carry another request. An
    /// HTTP/1.0 message with Transfer-Encoding has faulty framing (RFC 9112
    /// §6.1): served, then the connection closes.
    pub fn keep_alive(&self) -> bool {
        self.fields.keep_alive(self.http10) && !(self.http10 && self.framing == Framing::Chunked)
    }

    /// The client waits for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        self.fields
            .known(Known::Expect)
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
    }
}

/// The head of an answer to bytes that did not parse as a request.
pub fn placeholder() -> RequestHead {
    RequestHead {
        fields: Fields {
            raw: Bytes::new(),
            headers: Vec::new(),
            connection: ConnectionTokens::default(),
        },
        method: 0..0,
        origin: 0..0,
        absolute: None,
        http10: false,
        framing: Framing::Empty,
    }
}

impl RequestHeaders for RequestHead {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields.all(name.as_str())
    }
}

/// Whether `v` is an authority the proxy will route and forward: RFC 3986
/// `host [":" port]` without userinfo, where host is a bracketed IP literal
/// or a non-empty reg-name (IPv4 is a reg-name's subset). Spaces, slashes,
/// `@` and control bytes are refused, as both peers refuse them.
pub fn valid_authority(v: &[u8]) -> bool {
    let (host, port) = match v.iter().rposition(|b| *b == b':') {
        // A colon inside brackets belongs to an IPv6 literal.
        Some(i) if !v[i..].contains(&b']') => (&v[..i], &v[i + 1..]),
        _ => (v, &b""[..]),
    };
    let port_ok = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        }
        _ => !host.is_empty() && reg_name(host),
    };
    host_ok && port_ok
}

/// RFC 3986 reg-name: unreserved, sub-delims and `%HH` escapes.
fn reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        let b = host[i];
        let ok = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
        if b == b'%' {
            let escaped = host.get(i + 1..i + 3);
            if !escaped.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !ok {
            return false;
        }
        i += 1;
    }
    true
}

/// `http://host:port/path` -> (`host:port`, `/path`); the scheme in any case.
fn absolute_parts(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let scheme_len = [&b"http://"[..], b"https://"]
        .into_iter()
        .find(|p| target.len() >= p.len() && target[..p.len()].eq_ignore_ascii_case(p))?
        .len();
    let rest = &target[scheme_len..];
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    Some((&rest[..end], &rest[end..]))
}

/// RFC 9112 §3.2: origin-form, or asterisk-form for OPTIONS only.
fn origin_or_asterisk(method: &str, target: &[u8]) -> bool {
    target.first() == Some(&b'/') || (target == b"*" && method == "OPTIONS")
}

/// Parses a request head at the start of `buf`: `Ok(None)` until it is
/// complete. On success the head's bytes are split off `buf`.
pub fn parse_request(
    buf: &mut bytes::BytesMut,
    limits: &RequestLimits,
) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.min(MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, slots);
    let malformed = "malformed request head";
    let Some(len) = complete(parsed, buf.len(), limits.max_bytes, malformed)? else {
        return Ok(None);
    };
    let method = span(buf, req.method.unwrap_or_default().as_bytes());
    let target = req.path.unwrap_or_default().as_bytes();
    let (absolute, origin) = match absolute_parts(target) {
        Some((authority, _)) if !valid_authority(authority) => {
            return Err(HeadError::Malformed(
                "invalid authority in the request target",
            ))
        }
        Some((authority, rest)) => (Some(span(buf, authority)), span(buf, rest)),
        None if origin_or_asterisk(req.method.unwrap_or_default(), target) => {
            (None, span(buf, target))
        }
        // Authority-form (CONNECT) and bare words: nothing here tunnels,
        // and nginx and HAProxy both answer 400.
        None => return Err(HeadError::Malformed("request target is not a path")),
    };
    let http10 = req.version == Some(0);
    let mut headers = header_spans(buf, req.headers);
    police_underscores(&mut headers, buf, limits.underscores)?;
    let fields = Fields::split(buf, len, headers)?;
    let framing = fields.request_framing()?.unwrap_or(Framing::Empty);
    check_host(&fields, http10)?;
    Ok(Some(RequestHead {
        fields,
        method,
        origin,
        absolute,
        http10,
        framing,
    }))
}

/// Exactly one valid Host header, or none in HTTP/1.0.
fn check_host(fields: &Fields, http10: bool) -> Result<(), HeadError> {
    let mut hosts = fields.known(Known::Host);
    match (hosts.next(), hosts.next()) {
        (None, _) if !http10 => Err(HeadError::Malformed("missing Host header")),
        (Some(_), Some(_)) => Err(HeadError::Malformed("more than one Host header")),
        (Some(host), None) if !valid_authority(host.trim_ascii()) => {
            Err(HeadError::Malformed("invalid Host header"))
        }
        _ => Ok(()),
    }
}

/// A parsed response head.
pub struct ResponseHead {
    pub fields: Fields,
    pub status: u16,
    reason: Range<usize>,
    pub http10: bool,
    pub framing: Framing,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        &self.fields.raw[self.reason.clone()]
    }

    /// Whether the backend lets the connection carry another request.
    pub fn keep_alive(&self) -> bool {
        self.fields.keep_alive(self.http10) && self.framing != Framing::UntilClose
    }
}

/// Parses a response head at the start of `buf`, as for [`parse_request`].
/// `head_request`: the request was HEAD, so no body follows whatever the
/// headers say.
pub fn parse_response(
    buf: &mut bytes::BytesMut,
    max_bytes: usize,
    head_request: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let Some(len) = complete(parsed, buf.len(), max_bytes, "malformed response head")? else {
        return Ok(None);
    };
    let status = resp.code.unwrap_or(0);
    let reason = span(buf, resp.reason.unwrap_or_default().as_bytes());
    let http10 = resp.version == Some(0);
    let headers = header_spans(buf, resp.headers);
    let fields = Fields::split(buf, len, headers)?;
    let bodiless = head_request || status < 200 || status == 204 || status == 304;
    let framing = match fields.response_framing() {
        _ if bodiless => Framing::Empty,
        Ok(Some(f)) => f,
        Ok(None) => Framing::UntilClose,
        Err(e) => return Err(e),
    };
    Ok(Some(ResponseHead {
        fields,
        status,
        reason,
        http10,
        framing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    const LIMITS: RequestLimits = RequestLimits {
        max_bytes: 1024,
        max_headers: 8,
        underscores: Underscores::Drop,
    };

    fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(text), &LIMITS)
    }

    fn kinds(head: &RequestHead) -> Vec<(String, Known)> {
        head.fields
            .iter()
            .map(|(n, _, k)| (String::from_utf8_lossy(n).into_owned(), k))
            .collect()
    }

    #[test]
    fn parses_a_request_and_leaves_the_body() {
        let mut buf = BytesMut::from(
            "POST /v1/e?x=1 HTTP/1.1\r\nHost: a:8443\r\nContent-Length: 3\r\n\r\nabc",
        );
        let head = parse_request(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(head.method(), "POST");
        assert_eq!(head.path(), "/v1/e");
        assert_eq!(head.host(), Some("a:8443"));
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keep_alive());
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn absolute_form_targets_give_host_and_path() {
        let head = request("GET http://b.example/x/y?q HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.host(), Some("b.example"));
        assert_eq!(head.origin_form(), (&b"/x/y"[..], &b"?q"[..]));
        assert_eq!(head.path(), "/x/y");
        let bare = request("GET HTTP://b.example?q HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(bare.origin_form(), (&b"/"[..], &b"?q"[..]));
        assert_eq!(bare.host(), Some("b.example"));
    }

    #[test]
    fn targets_must_be_paths_or_absolute_or_options_asterisk() {
        for bad in ["GET nowhere", "CONNECT a.example:443", "GET *"] {
            let head = format!("{bad} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(
                matches!(request(&head), Err(HeadError::Malformed(_))),
                "{bad}"
            );
        }
        let star = request("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(star.origin_form().0, b"*");
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_fail() {
        assert!(request("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(request(&long).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(request(both), Err(HeadError::Malformed(_))));
        let twice = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(request(twice), Err(HeadError::Malformed(_))));
        let junk = "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n";
        assert!(matches!(request(junk), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn only_a_lone_chunked_coding_is_implemented() {
        for te in [
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: ,chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        ] {
            let text = format!("POST / HTTP/1.1\r\nHost: a\r\n{te}\r\n\r\n");
            assert!(
                matches!(request(&text), Err(HeadError::NotImplemented(_))),
                "{te}"
            );
        }
        let ok = request("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n");
        assert_eq!(ok.unwrap().unwrap().framing, Framing::Chunked);
    }

    #[test]
    fn hosts_and_authorities_are_checked() {
        for bad in [
            "GET https://user:pw@other:99/p HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http:///p HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:99999x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
        for good in [
            "a",
            "a.example:8443",
            "[::1]:8443",
            "127.0.0.1",
            "x_y.z",
            "a%41",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
    }

    #[test]
    fn connection_options_cannot_strip_host_and_are_capped() {
        let head = request("GET / HTTP/1.1\r\nHost: a\r\nConnection: Host, content-length\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&head)[0], ("Host".to_string(), Known::Host));
        let many: Vec<String> = (0..=MAX_CONNECTION_TOKENS)
            .map(|i| format!("x{i}"))
            .collect();
        let text = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\n\r\n",
            many.join(",")
        );
        assert!(matches!(request(&text), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn underscore_names_follow_the_policy() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n";
        let head = request(text).unwrap().unwrap();
        assert_eq!(kinds(&head)[1].1, Known::Dropped);
        let refuse = RequestLimits {
            underscores: Underscores::Refuse,
            ..LIMITS
        };
        let refused = parse_request(&mut BytesMut::from(text), &refuse);
        assert!(matches!(refused, Err(HeadError::Malformed(_))));
        let forward = RequestLimits {
            underscores: Underscores::Forward,
            ..LIMITS
        };
        let head = parse_request(&mut BytesMut::from(text), &forward)
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&head)[1].1, Known::Other);
    }

    #[test]
    fn the_header_count_is_capped() {
        let headers: String = (0..LIMITS.max_headers)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        assert_eq!(request(&text).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn http11_requests_need_exactly_one_host() {
        let none = request("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            none.err(),
            Some(HeadError::Malformed("missing Host header"))
        );
        let two = request("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
        assert_eq!(
            two.err(),
            Some(HeadError::Malformed("more than one Host header"))
        );
        assert!(request("GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
    }

    #[test]
    fn http10_chunked_requests_close_the_connection() {
        let text =
            "POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!request(text).unwrap().unwrap().keep_alive());
    }

    #[test]
    fn http10_keeps_alive_only_when_asked() {
        let plain = request("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!plain.keep_alive());
        let asked = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(asked.keep_alive());
    }

    #[test]
    fn response_framing_follows_status_and_method() {
        let parse = |text: &str, head: bool| {
            parse_response(&mut BytesMut::from(text), 1024, head)
                .unwrap()
                .unwrap()
        };
        let ok = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert_eq!((ok.status, ok.reason()), (200, &b"OK"[..]));
        for no_reason in [
            "HTTP/1.1 200\r\n\r\n",
            "HTTP/1.1 200 Tr\u{e8}s bien\r\n\r\n",
        ] {
            assert_eq!(parse(no_reason, false).reason(), b"", "{no_reason:?}");
        }
        assert_eq!(ok.framing, Framing::Length(5));
        assert!(ok.keep_alive());
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert_eq!(
            parse("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            Framing::Empty
        );
        let open = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(open.framing, Framing::UntilClose);
        assert!(!open.keep_alive());
        let chunked = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
    }

    #[test]
    fn connection_lists_extra_hop_by_hop_names() {
        let head = request(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Hop\r\nx-hop: 1\r\nx-other: 2\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let kinds = kinds(&head);
        assert!(kinds[2].1.is_hop_by_hop(), "{kinds:?}");
        assert!(!kinds[3].1.is_hop_by_hop(), "{kinds:?}");
        assert!(!head.keep_alive());
        assert_eq!(Known::of(b"Transfer-Encoding"), Known::TransferEncoding);
        assert!(Known::of(b"keep-alive").is_hop_by_hop());
        assert_eq!(Known::of(b"x-request-ids"), Known::Other);
    }
}
