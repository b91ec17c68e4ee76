//! Headers the proxy writes: the request id, the forwarding headers and
//! the request as sent upstream; the response headers a client gets.

use std::io::Write;
use std::net::IpAddr;

use bytes::Bytes;

use super::{Call, Head};
use crate::codec::head::{Known, ResponseHead};
use crate::routing::fastrand;

/// Longest client-supplied request id that is propagated as is.
const MAX_REQUEST_ID: usize = 128;

/// The client's request id if it is sane, else a fresh random one.
pub fn request_id(given: Option<&[u8]>) -> String {
    let given = given
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && is_visible_ascii(v));
    match given {
        Some(id) => id.to_string(),
        None => random_id(),
    }
}

/// A header value that can be copied into a response unchanged.
fn is_visible_ascii(v: &str) -> bool {
    v.bytes()
        .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

/// 32 lowercase hex digits from the per-thread generator: an id needs to
/// be unique in the logs, not unpredictable, and `format!("{:032x}")`
/// over `rand::random` cost several times the instructions.
fn random_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 32];
    for half in digits.chunks_mut(16) {
        let n = fastrand::next();
        for (i, d) in half.iter_mut().enumerate() {
            *d = HEX[(n >> (i * 4)) as usize & 0xf];
        }
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// Appends the X-Forwarded-For value to `out`: earlier hops (every value
/// given), then the client.
pub fn forwarded_for<'a>(
    out: &mut Vec<u8>,
    previous: impl Iterator<Item = &'a [u8]>,
    client: IpAddr,
) {
    for prev in previous {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    push_ip(out, client);
}

/// An address as `Display` writes it; IPv4 by hand because `Display`'s
/// padding-aware formatting was about 1 % of a request's instructions.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, n) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if n >= 100 {
            out.push(b'0' + n / 100);
        }
        if n >= 10 {
            out.push(b'0' + n / 10 % 10);
        }
        out.push(b'0' + n % 10);
    }
}

/// A request as written to a backend: the head, with a small body inline
/// so that one write carries both, or a large body apart so that it is
/// never copied.
#[derive(Clone)]
pub struct Wire {
    pub head: Vec<u8>,
    pub body: Bytes,
    body_len: usize,
}

impl Wire {
    /// The request body's length, inline or apart.
    pub fn body_len(&self) -> usize {
        self.body_len
    }
}

/// Bodies up to this size are copied into the head's write.
const INLINE_BODY: usize = 16 * 1024;

/// The request as sent to a backend, always HTTP/1.1: hop-by-hop headers
/// dropped, the forwarding headers set, the body framed by length.
pub fn upstream_request<H: Head>(
    call: &Call<H>,
    body: Bytes,
    client: Option<IpAddr>,
    tls: bool,
) -> Wire {
    let head = &call.head;
    let inline = body.len() <= INLINE_BODY;
    let room = if inline { body.len() } else { 0 };
    let mut wire = Vec::with_capacity(head.size() + 160 + room);
    wire.extend_from_slice(head.method().as_bytes());
    wire.push(b' ');
    let (path, query) = head.target();
    wire.extend_from_slice(path);
    wire.extend_from_slice(query);
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    // The target's own authority replaces the Host header.
    let authority = head.target_authority();
    if let Some(host) = authority {
        put_header(&mut wire, b"host", host);
    }
    for (name, value, known) in head.fields() {
        // The proxy frames the body and sets the forwarding headers.
        let own = match known {
            Known::Host => authority.is_some(),
            Known::ContentLength
            | Known::Expect
            | Known::XForwardedFor
            | Known::XForwardedProto
            | Known::XRequestId => true,
            _ => false,
        };
        if !own && !known.is_hop_by_hop() {
            put_header(&mut wire, name, value);
        }
    }
    if let Some(ip) = client {
        wire.extend_from_slice(b"x-forwarded-for: ");
        forwarded_for(&mut wire, head.known(Known::XForwardedFor), ip);
        wire.extend_from_slice(b"\r\n");
    }
    let proto: &[u8] = if tls { b"https" } else { b"http" };
    put_header(&mut wire, b"x-forwarded-proto", proto);
    put_header(&mut wire, b"x-request-id", call.request_id.as_bytes());
    if head.has_body() || head.declared_length().is_some() || !body.is_empty() {
        let _ = write!(wire, "content-length: {}\r\n", body.len());
    }
    wire.extend_from_slice(b"\r\n");
    let body_len = body.len();
    if inline {
        wire.extend_from_slice(&body);
        return Wire {
            head: wire,
            body: Bytes::new(),
            body_len,
        };
    }
    Wire {
        head: wire,
        body,
        body_len,
    }
}

/// The response headers a client gets: the backend's, less hop-by-hop
/// ones and its request id, then the proxy's identity headers.
pub fn response_fields<H>(call: &Call<H>, resp: &ResponseHead, mut put: impl FnMut(&[u8], &[u8])) {
    for (name, value, known) in resp.fields.iter() {
        if known != Known::XRequestId && !known.is_hop_by_hop() {
            put(name, value);
        }
    }
    let shown = &call.config().response_headers;
    if shown.pool {
        if let Some(pool) = &call.pool {
            put(b"x-switchyard-pool", pool.name.as_bytes());
        }
    }
    if shown.backend {
        put(b"x-switchyard-backend", call.backend_name().as_bytes());
    }
    put(b"x-request-id", call.request_id.as_bytes());
}

/// `name: value\r\n`
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_id_is_32_lowercase_hex_digits() {
        let id = random_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(id, random_id());
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.100.255", "::1", "fe80::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        assert_eq!(request_id(Some(b"")).len(), 32);
        assert_eq!(request_id(Some(&[b'x'; 129])).len(), 32);
        assert_eq!(request_id(Some(b"a\x01b")).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let value = |earlier: &[&[u8]]| {
            let mut out = Vec::new();
            forwarded_for(&mut out, earlier.iter().copied(), ip);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(value(&[]), "10.0.0.7");
        assert_eq!(
            value(&[b"1.2.3.4", b"5.6.7.8"]),
            "1.2.3.4, 5.6.7.8, 10.0.0.7"
        );
    }
}
