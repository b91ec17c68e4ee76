//! Properties of the parsers that read untrusted bytes, one function per
//! cargo-fuzz target in `fuzz/`. The fuzzer and the stable replay of the
//! checked-in corpora (`tests/fuzz_corpus.rs`) call the same functions, so
//! CI asserts what the long runs asserted. Each panics on a broken property.

use std::path::Path;

use bytes::BytesMut;

use crate::codec::body::Chunked;
use crate::codec::head::{
    self, Fields, Framing, HeadError, Known, RequestLimits, MAX_CONNECTION_TOKENS,
};
use crate::config::{Config, Underscores, MAX_HEADERS};

/// Small enough for the fuzzer's default 4 KiB inputs to pass it.
const MAX_HEAD: usize = 2048;
/// Below `MAX_HEADERS`, so the request limit is reached as well.
const MAX_FIELDS: usize = 16;

/// What a head parse came to: the bytes it took, its framing, its field count.
type Outcome = Result<Option<(usize, Framing, usize)>, HeadError>;

/// `parse_request`: a head takes a prefix of the input within the limits,
/// every proper prefix of it waits for more, its framing is what its
/// headers say, and nothing the Connection header names goes upstream.
pub fn request_head(data: &[u8]) {
    let drop = request_outcome(data, Underscores::Drop, true);
    // The underscore policy tags or refuses names; it never reframes.
    assert_eq!(request_outcome(data, Underscores::Forward, false), drop);
    let refuse = request_outcome(data, Underscores::Refuse, false);
    let underscore = Err(HeadError::Malformed("underscore in a header name"));
    assert!(
        refuse == drop || refuse == underscore,
        "{refuse:?} vs {drop:?}"
    );
    if let Ok(Some((len, ..))) = drop {
        for cut in [len - 1, len / 2] {
            let wait = request_outcome(&data[..cut], Underscores::Drop, false);
            assert_eq!(wait, Ok(None), "a prefix of {cut} bytes");
        }
    }
}

fn request_outcome(data: &[u8], underscores: Underscores, check: bool) -> Outcome {
    let limits = RequestLimits {
        max_bytes: MAX_HEAD,
        max_headers: MAX_FIELDS,
        underscores,
    };
    let mut buf = BytesMut::from(data);
    let head = match settled(head::parse_request(&mut buf, &limits), data, &buf) {
        Ok(head) => head,
        Err(outcome) => return outcome,
    };
    let fields = &head.fields;
    let len = taken(data, &buf, fields);
    assert!(fields.iter().count() <= MAX_FIELDS);
    if check {
        let coded = fields.known(Known::TransferEncoding).collect::<Vec<_>>();
        match head.framing {
            Framing::Chunked => assert!(matches!(&coded[..], [c] if is_chunked(c))),
            _ => assert!(coded.is_empty()),
        }
        assert_eq!(declared_length(fields), framed_length(head.framing));
        // HTTP/1.1 needs exactly one Host; HTTP/1.0 may send one.
        let hosts = fields.known(Known::Host).count();
        assert!(
            hosts == 1 || (head.http10 && hosts == 0),
            "{hosts} Host fields"
        );
        if let Some(authority) = head.authority() {
            assert!(head::valid_authority(authority.trim_ascii()));
        }
        assert_connection_options_stay(fields);
        for (name, _, known) in fields.iter() {
            assert!(!name.contains(&b'_') || known.is_hop_by_hop());
        }
    }
    Ok(Some((len, head.framing, fields.iter().count())))
}

/// `parse_response`, for a GET and for a HEAD: the same checks as a
/// request's; bodiless answers have no body whatever they declare, and a
/// HEAD answer parses wherever the GET answer does.
pub fn response_head(data: &[u8]) {
    let get = response_outcome(data, false);
    let head = response_outcome(data, true);
    match (&get, &head) {
        (Ok(Some(g)), Ok(Some(h))) => assert_eq!((g.0, g.2), (h.0, h.2)),
        (Err(_), _) | (Ok(None), Ok(None)) => {}
        _ => panic!("GET {get:?}, HEAD {head:?}"),
    }
    if let Err(e) = head {
        assert_eq!(get, Err(e));
    }
    if let Ok(Some((len, ..))) = get {
        for cut in [len - 1, len / 2] {
            assert_eq!(response_outcome(&data[..cut], false), Ok(None));
        }
    }
}

fn response_outcome(data: &[u8], head_request: bool) -> Outcome {
    let mut buf = BytesMut::from(data);
    let resp = match settled(
        head::parse_response(&mut buf, MAX_HEAD, head_request),
        data,
        &buf,
    ) {
        Ok(resp) => resp,
        Err(outcome) => return outcome,
    };
    let fields = &resp.fields;
    let len = taken(data, &buf, fields);
    assert!(fields.iter().count() <= MAX_HEADERS);
    let bodiless = head_request || resp.status < 200 || matches!(resp.status, 204 | 304);
    let last_coding = fields
        .known(Known::TransferEncoding)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .last();
    match resp.framing {
        Framing::Empty => assert!(bodiless),
        Framing::Chunked => {
            assert!(last_coding.is_some_and(is_chunked) && declared_length(fields).is_none())
        }
        Framing::Length(n) => assert_eq!(declared_length(fields), Some(n)),
        Framing::UntilClose => {
            assert!(!last_coding.is_some_and(is_chunked) && !resp.keep_alive())
        }
    }
    // A length never frames a body that also names a coding.
    let coded = fields.known(Known::TransferEncoding).next().is_some();
    assert!(!coded || !matches!(resp.framing, Framing::Length(_)));
    assert_connection_options_stay(fields);
    Ok(Some((len, resp.framing, fields.iter().count())))
}

/// The parsed head, or the outcome to return as it is: a head still
/// incomplete is within the size limit and has left the buffer alone.
fn settled<T>(
    parsed: Result<Option<T>, HeadError>,
    data: &[u8],
    rest: &[u8],
) -> Result<T, Outcome> {
    match parsed {
        Ok(Some(head)) => Ok(head),
        Ok(None) => {
            assert!(data.len() <= MAX_HEAD && rest.len() == data.len());
            Err(Ok(None))
        }
        Err(e) => Err(Err(e)),
    }
}

/// How many bytes a parsed head took off the buffer, checked against its
/// raw bytes and the size limit.
fn taken(data: &[u8], rest: &[u8], fields: &Fields) -> usize {
    let len = data.len() - rest.len();
    assert!(len <= MAX_HEAD);
    assert_eq!(&fields.raw[..], &data[..len]);
    len
}

fn is_chunked(coding: &[u8]) -> bool {
    coding.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// The value every Content-Length header agrees on.
fn declared_length(fields: &Fields) -> Option<u64> {
    let mut values = fields.known(Known::ContentLength).map(|v| {
        let v = std::str::from_utf8(v.trim_ascii()).expect("an accepted length is ASCII");
        v.parse::<u64>().expect("an accepted length is a number")
    });
    let first = values.next()?;
    assert!(values.all(|v| v == first), "conflicting lengths accepted");
    Some(first)
}

fn framed_length(framing: Framing) -> Option<u64> {
    match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    }
}

/// Every header a Connection option names is hop-by-hop, except those the
/// proxy needs to route and frame (RFC 9110 §7.6.1 lets it keep them).
fn assert_connection_options_stay(fields: &Fields) {
    let options: Vec<&[u8]> = fields
        .known(Known::Connection)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        })
        .collect();
    assert!(options.len() <= MAX_CONNECTION_TOKENS);
    for (name, _, known) in fields.iter() {
        let named = options.iter().any(|o| o.eq_ignore_ascii_case(name));
        let protected = matches!(
            known,
            Known::Host | Known::ContentLength | Known::TransferEncoding
        );
        assert!(
            !named || protected || known.is_hop_by_hop(),
            "{} is named by Connection but forwarded",
            String::from_utf8_lossy(name)
        );
    }
}

/// `Chunked::feed`: the decoded payload is never longer than the bytes
/// consumed, and feeding the same bytes whole, byte by byte or in uneven
/// pieces gives the same payload, the same end and the same error.
pub fn chunked(data: &[u8]) {
    let whole = decode(data, std::iter::once(data.len()));
    if let (Ok(used), payload, done) = &whole {
        assert!(*used <= data.len() && payload.len() <= *used);
        assert!(*done || *used == data.len());
    }
    assert_eq!(decode(data, std::iter::repeat(1)), whole);
    let uneven = data.iter().cycle().map(|b| 1 + usize::from(b % 61));
    assert_eq!(decode(data, uneven), whole);
}

/// Feeds `data` in pieces of the given sizes until the body ends or fails:
/// (bytes consumed or the error, payload, whether it ended).
fn decode(
    data: &[u8],
    sizes: impl Iterator<Item = usize>,
) -> (Result<usize, String>, Vec<u8>, bool) {
    let mut parser = Chunked::default();
    let mut payload = Vec::new();
    let mut used = 0;
    for size in sizes {
        let piece = &data[used..(used + size).min(data.len())];
        match parser.feed(piece, |p| payload.extend_from_slice(p)) {
            Ok(n) => {
                assert!(n == piece.len() || (parser.is_done() && n < piece.len()));
                used += n;
            }
            Err(e) => return (Err(e.to_string()), payload, false),
        }
        if parser.is_done() || used == data.len() {
            break;
        }
    }
    if parser.is_done() {
        assert_eq!(
            parser
                .feed(b"more", |_| panic!("payload after the end"))
                .ok(),
            Some(0)
        );
    }
    (Ok(used), payload, parser.is_done())
}

/// Where the fuzzed configuration claims to live: nothing exists below it,
/// so its relative paths name no file.
const CONFIG_PATH: &str = "/nonexistent/switchyard-fuzz/switchyard.toml";

/// `Config::parse`: it fails with located errors or succeeds with values
/// inside the validated bounds.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if toml::from_str::<toml::Table>(text).is_ok_and(|t| reaches_outside(&toml::Value::Table(t))) {
        return;
    }
    let path = Path::new(CONFIG_PATH);
    match Config::parse(path, text) {
        Ok(config) => {
            assert!((1..=MAX_HEADERS).contains(&config.limits.max_headers));
            assert!(!config.pools.is_empty());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let lines = text.matches('\n').count() + 1;
            for e in &errors.0 {
                assert!(e.file == path && !e.message.is_empty(), "{e}");
                assert!(e.line.is_some() || !e.key.is_empty(), "unlocated: {e}");
                assert!(e.line.is_none_or(|l| (1..=lines).contains(&l)), "{e}");
            }
        }
    }
}

/// Whether validating `value` would read a device or process file (a read
/// of `/dev/zero` never ends), or resolve a backend name through DNS, which
/// would make every run wait on the network. Both are the operator's
/// choice, not input the proxy has to survive.
fn reaches_outside(value: &toml::Value) -> bool {
    match value {
        toml::Value::String(s) => {
            ["/dev", "/proc", "/sys"].iter().any(|p| s.starts_with(p))
                || s.contains(':') && s.parse::<std::net::SocketAddr>().is_err()
        }
        toml::Value::Array(items) => items.iter().any(reaches_outside),
        toml::Value::Table(t) => t.values().any(reaches_outside),
        _ => false,
    }
}
