//! Message bodies: the chunked coding, reading a request body whole (so
//! it can be replayed on retry), and relaying a response body as it comes.
//!
//! A request body's memory follows the bytes received, never the length a
//! head declares: 300 heads declaring 8 MiB each had reserved 676 MiB
//! before a single body byte arrived. What is buffered is charged to one
//! process-wide budget, and every allocation on the way is fallible.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::head::Framing;

/// Longest trailer section accepted after a chunked body.
const MAX_TRAILERS: usize = 8 * 1024;
/// Longest chunk extension accepted (they carry nothing the proxy uses).
const MAX_EXTENSION: usize = 1024;
/// Spare room kept in a read buffer before each read.
const READ_ROOM: usize = 16 * 1024;

#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Malformed(&'static str),
    /// The peer closed before the body was complete.
    Closed,
    TimedOut,
    /// The body-buffer budget or the allocator said no.
    Busy(&'static str),
    Io(io::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => f.write_str("body too large"),
            BodyError::Malformed(what) | BodyError::Busy(what) => f.write_str(what),
            BodyError::Closed => f.write_str("connection closed early"),
            BodyError::TimedOut => f.write_str("timed out"),
            BodyError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Request-body bytes buffered right now, over every connection.
static BUFFERED: AtomicU64 = AtomicU64::new(0);

/// Request-body bytes buffered right now (for the metrics).
pub fn buffered_bytes() -> u64 {
    BUFFERED.load(Relaxed)
}

/// A body's share of the process-wide budget, given back when dropped.
#[derive(Debug, Default)]
pub struct Charge(u64);

impl Charge {
    /// Adds `n` bytes unless that would pass `total` over all bodies.
    fn grow(&mut self, n: u64, total: u64) -> Result<(), BodyError> {
        let prior = BUFFERED.fetch_add(n, Relaxed);
        if prior + n > total {
            BUFFERED.fetch_sub(n, Relaxed);
            return Err(BodyError::Busy(
                "request bodies buffered right now fill the budget",
            ));
        }
        self.0 += n;
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.0, Relaxed);
    }
}

/// A request body read whole, holding its share of the budget.
pub struct Body {
    pub bytes: Bytes,
    _charge: Charge,
}

impl Body {
    /// A body that needed no buffering of its own (nothing to charge).
    pub fn whole(bytes: Bytes) -> Self {
        Body {
            bytes,
            _charge: Charge::default(),
        }
    }
}

/// The bounds a request body is read under.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `limits.max_body_bytes`
    pub max: u64,
    /// `limits.body_buffer_total`
    pub budget: u64,
    /// When the whole body must have arrived.
    pub deadline: Instant,
}

/// Incremental parser of the chunked coding (RFC 9112 §7.1).
#[derive(Default)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    extension_bytes: usize,
    trailer_bytes: usize,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Whitespace after the size: only a `;` extension or the CRLF may follow.
    SizeSpace,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    LastLf,
    Done,
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of `data` up to the end of the body, handing each run
    /// of payload to `payload`; returns how many bytes were consumed.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut payload: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            if self.state == State::Data {
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                payload(&data[i..i + n]);
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.step(data[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), BodyError> {
        let bad = |what| Err(BodyError::Malformed(what));
        self.state = match (self.state, b) {
            (State::Size, _) if b.is_ascii_hexdigit() => {
                if self.digits >= 15 {
                    return bad("chunk size too large");
                }
                self.digits += 1;
                self.size = self.size * 16 + u64::from(hex_value(b));
                State::Size
            }
            (State::Size, b' ' | b'\t') if self.digits > 0 => State::SizeSpace,
            (State::Size | State::SizeSpace, b';') if self.digits > 0 => State::Extension,
            (State::Size | State::SizeSpace, b'\r') if self.digits > 0 => State::SizeLf,
            (State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
            (State::Size | State::SizeSpace, _) => return bad("invalid chunk size"),
            (State::Extension, b'\r') => State::SizeLf,
            (State::Extension, b'\n') => return bad("bare LF in chunk extension"),
            (State::Extension, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes > MAX_EXTENSION {
                    return bad("chunk extension too long");
                }
                State::Extension
            }
            (State::SizeLf, b'\n') if self.size == 0 => State::TrailerStart,
            (State::SizeLf, b'\n') => State::Data,
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => {
                self.digits = 0;
                self.extension_bytes = 0;
                State::Size
            }
            (State::TrailerStart, b'\r') => State::LastLf,
            // Trailer fields are relayed as sent, so they must be fields:
            // a token, a colon and a value of visible bytes (RFC 9110 §5),
            // with no obs-fold, bare LF or control bytes.
            (State::TrailerStart | State::TrailerName, _) if is_tchar(b) => {
                self.count_trailer_byte()?;
                State::TrailerName
            }
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, _) if b == b'\t' || b == b' ' || b >= 0x21 && b != 0x7f => {
                self.count_trailer_byte()?;
                State::TrailerValue
            }
            (State::TrailerStart | State::TrailerName | State::TrailerValue, _) => {
                return bad("invalid trailer field")
            }
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::LastLf, b'\n') => State::Done,
            _ => return bad("invalid chunk framing"),
        };
        Ok(())
    }
}

impl Chunked {
    fn count_trailer_byte(&mut self) -> Result<(), BodyError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(BodyError::Malformed("trailers too large"));
        }
        Ok(())
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Reads more into `buf`; `Closed` at end of stream.
pub async fn read_some(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<(), BodyError> {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    match io.read_buf(buf).await {
        Ok(0) => Err(BodyError::Closed),
        Ok(_) => Ok(()),
        Err(e) => Err(BodyError::Io(e)),
    }
}

/// [`read_some`] within `wait`.
pub async fn read_more(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    wait: Duration,
) -> Result<(), BodyError> {
    tokio::time::timeout(wait, read_some(io, buf))
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

/// A request body being collected: grown as bytes arrive, charged to the
/// budget first and allocated fallibly, so neither a declared length nor
/// a crowd of senders can abort the process.
pub struct Collector {
    body: Vec<u8>,
    charge: Charge,
    limits: BodyLimits,
}

impl Collector {
    pub fn new(limits: BodyLimits) -> Self {
        Self {
            body: Vec::new(),
            charge: Charge::default(),
            limits,
        }
    }

    /// Makes room for `want` more bytes, doubling as the body grows so
    /// that the copies stay linear in its size.
    fn room(&mut self, want: usize) -> Result<(), BodyError> {
        let len = self.body.len();
        if self.body.capacity() - len >= want {
            return Ok(());
        }
        let target = (len + want).max(len * 2).max(READ_ROOM);
        let target = target.min(self.limits.max as usize).max(len + want);
        let more = target - len;
        self.charge
            .grow((target - self.body.capacity()) as u64, self.limits.budget)?;
        self.body
            .try_reserve_exact(more)
            .map_err(|_| BodyError::Busy("out of memory for the request body"))
    }

    pub fn push(&mut self, data: &[u8]) -> Result<(), BodyError> {
        if (self.body.len() + data.len()) as u64 > self.limits.max {
            return Err(BodyError::TooLarge);
        }
        self.room(data.len())?;
        self.body.extend_from_slice(data);
        Ok(())
    }

    /// Reads at most `left` more bytes from `io` straight into the body.
    async fn read_from(
        &mut self,
        io: &mut (impl AsyncRead + Unpin),
        left: usize,
    ) -> Result<(), BodyError> {
        self.room(left.min(READ_ROOM))?;
        let spare = self.body.capacity() - self.body.len();
        let mut room = (&mut self.body).limit(left.min(spare));
        match tokio::time::timeout_at(self.limits.deadline, io.read_buf(&mut room)).await {
            Err(_) => Err(BodyError::TimedOut),
            Ok(Ok(0)) => Err(BodyError::Closed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BodyError::Io(e)),
        }
    }

    pub fn finish(self) -> Body {
        Body {
            bytes: Bytes::from(self.body),
            _charge: self.charge,
        }
    }
}

/// Reads a whole request body (decoded) within `limits`; `buf` holds what
/// was read past the head, and keeps what follows the body.
pub async fn read_request(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    framing: Framing,
    limits: BodyLimits,
) -> Result<Body, BodyError> {
    let whole = Body::whole;
    match framing {
        Framing::Empty | Framing::UntilClose => Ok(whole(Bytes::new())),
        Framing::Length(n) if n > limits.max => Err(BodyError::TooLarge),
        // Already in the connection's buffer: no copy, nothing to charge.
        Framing::Length(n) if n as usize <= buf.len() => {
            Ok(whole(buf.split_to(n as usize).freeze()))
        }
        Framing::Length(n) => {
            let mut body = Collector::new(limits);
            body.push(&buf.split())?;
            while (body.body.len() as u64) < n {
                body.read_from(io, n as usize - body.body.len()).await?;
            }
            Ok(body.finish())
        }
        Framing::Chunked => read_chunked(io, buf, limits).await,
    }
}

async fn read_chunked(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    limits: BodyLimits,
) -> Result<Body, BodyError> {
    let mut parser = Chunked::default();
    let mut body = Collector::new(limits);
    loop {
        let mut pushed = Ok(());
        let used = parser.feed(buf, |p| {
            if pushed.is_ok() {
                pushed = body.push(p);
            }
        })?;
        pushed?;
        buf.advance(used);
        if parser.is_done() {
            return Ok(body.finish());
        }
        let wait = limits.deadline.saturating_duration_since(Instant::now());
        read_more(io, buf, wait).await?;
    }
}

/// A response body read piece by piece and decoded, for a client that
/// takes the payload rather than HTTP/1.1 framing (h2).
pub struct Reader {
    framing: Framing,
    remaining: u64,
    chunked: Chunked,
}

impl Reader {
    pub fn new(framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            remaining,
            chunked: Chunked::default(),
        }
    }

    /// The next piece of payload (possibly empty) and whether the body
    /// has ended. Reads from `up` only when `up_buf` holds nothing usable.
    pub async fn next(
        &mut self,
        up: &mut (impl AsyncRead + Unpin),
        up_buf: &mut BytesMut,
        wait: Duration,
    ) -> Result<(Bytes, bool), BodyError> {
        loop {
            match self.framing {
                Framing::Empty => return Ok((Bytes::new(), true)),
                Framing::Length(_) if self.remaining == 0 => return Ok((Bytes::new(), true)),
                Framing::Length(_) if !up_buf.is_empty() => {
                    let n = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(up_buf.len());
                    self.remaining -= n as u64;
                    // Handed on without a copy.
                    return Ok((up_buf.split_to(n).freeze(), self.remaining == 0));
                }
                Framing::Chunked if !up_buf.is_empty() => {
                    let mut payload = BytesMut::new();
                    let used = self
                        .chunked
                        .feed(up_buf, |p| payload.extend_from_slice(p))?;
                    up_buf.advance(used);
                    let done = self.chunked.is_done();
                    if done || !payload.is_empty() {
                        return Ok((payload.freeze(), done));
                    }
                }
                Framing::UntilClose if !up_buf.is_empty() => {
                    return Ok((up_buf.split().freeze(), false));
                }
                _ => {}
            }
            match read_more(up, up_buf, wait).await {
                Err(BodyError::Closed) if self.framing == Framing::UntilClose => {
                    return Ok((Bytes::new(), true));
                }
                r => r?,
            }
        }
    }
}

/// Where relaying a response failed.
#[derive(Debug)]
pub enum RelayError {
    /// The backend failed or closed early.
    Upstream(BodyError),
    /// The client went away.
    Client(io::Error),
}

/// How a relay ended.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    /// Body bytes written to the client.
    pub bytes_out: usize,
    /// Nothing had reached the client when it failed, so an error answer
    /// can still be sent.
    pub untouched: bool,
}

/// Relays one response body from `up` (`up_buf`: bytes already read past
/// the head) to `client`, after `out`, the head already built. `decode`
/// strips the chunked coding for a client that cannot take it.
pub struct Relay<'a, U, C> {
    pub up: &'a mut U,
    pub up_buf: &'a mut BytesMut,
    pub client: &'a mut C,
    pub out: &'a mut Vec<u8>,
    pub framing: Framing,
    pub decode: bool,
    pub wait: Duration,
}

impl<U, C> Relay<'_, U, C>
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    pub async fn run(self) -> Result<Relayed, (RelayError, Relayed)> {
        let Relay {
            up,
            up_buf,
            client,
            out,
            framing,
            decode,
            wait,
        } = self;
        let head_len = out.len();
        let mut progress = Relayed {
            bytes_out: 0,
            untouched: true,
        };
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        let mut chunked = Chunked::default();
        loop {
            let done = match framing {
                Framing::Empty => true,
                Framing::Length(_) => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(up_buf.len());
                    out.extend_from_slice(&up_buf[..n]);
                    up_buf.advance(n);
                    remaining -= n as u64;
                    remaining == 0
                }
                Framing::Chunked => {
                    let used = match chunked.feed(up_buf, |p| {
                        if decode {
                            out.extend_from_slice(p);
                        }
                    }) {
                        Ok(used) => used,
                        Err(e) => return Err((RelayError::Upstream(e), progress)),
                    };
                    if !decode {
                        out.extend_from_slice(&up_buf[..used]);
                    }
                    up_buf.advance(used);
                    chunked.is_done()
                }
                Framing::UntilClose => {
                    out.extend_from_slice(up_buf);
                    up_buf.clear();
                    false
                }
            };
            // What has come is written before waiting for more, so a
            // streamed body reaches the client as the backend sends it.
            if done || !out.is_empty() {
                deliver(client, out, &mut progress, head_len, wait).await?;
            }
            if done {
                return Ok(progress);
            }
            match read_more(up, up_buf, wait).await {
                Ok(()) => {}
                Err(BodyError::Closed) if framing == Framing::UntilClose => {
                    deliver(client, out, &mut progress, head_len, wait).await?;
                    return Ok(progress);
                }
                Err(e) => return Err((RelayError::Upstream(e), progress)),
            }
        }
    }
}

/// Writes what `out` holds (the head first time round) and counts it.
async fn deliver(
    client: &mut (impl AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    progress: &mut Relayed,
    head_len: usize,
    wait: Duration,
) -> Result<(), (RelayError, Relayed)> {
    let body = out.len() - if progress.untouched { head_len } else { 0 };
    if let Err(e) = write_out(client, out, wait).await {
        return Err((RelayError::Client(e), *progress));
    }
    progress.untouched = false;
    progress.bytes_out += body;
    Ok(())
}

/// Writes and flushes `out` within `wait`, leaving it empty.
pub async fn write_out(
    client: &mut (impl AsyncWrite + Unpin),
    out: &mut Vec<u8>,
    wait: Duration,
) -> io::Result<()> {
    let write = async {
        client.write_all(out).await?;
        client.flush().await
    };
    let result = tokio::time::timeout(wait, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    out.clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8]) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut parser = Chunked::default();
        let mut body = Vec::new();
        let used = parser.feed(wire, |p| body.extend_from_slice(p))?;
        Ok((body, used, parser.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let wire = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (body, used, done) = decode(wire).unwrap();
        assert_eq!(body, b"Wikipedia");
        assert!(done);
        assert_eq!(&wire[used..], b"NEXT");
    }

    #[test]
    fn chunked_bodies_decode_byte_by_byte() {
        let wire = b"A\r\n0123456789\r\n0\r\n\r\n";
        let mut parser = Chunked::default();
        let mut body = Vec::new();
        for b in wire.chunks(1) {
            assert_eq!(parser.feed(b, |p| body.extend_from_slice(p)).unwrap(), 1);
        }
        assert!(parser.is_done());
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        let long_extension = format!("1;{}\r\n", "x".repeat(2000));
        for wire in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"3\n",
            b"fffffffffffffffff\r\n",
            b"5 garbage\r\n",
            long_extension.as_bytes(),
            b"0\r\nBad Name: 1\r\n\r\n",
            b"0\r\n folded: 1\r\n\r\n",
            b"0\r\nX: a\x01b\r\n\r\n",
            b"0\r\nX: a\nY: b\r\n\r\n",
            b"0\r\nnocolon\r\n\r\n",
        ] {
            assert!(decode(wire).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let (_, _, done) = decode(b"3\r\nab").unwrap();
        assert!(!done);
        let (body, _, done) = decode(b"3 ;x=1\r\nabc\r\n0 \r\n\r\n").unwrap();
        assert_eq!((body.as_slice(), done), (&b"abc"[..], true));
    }

    fn limits(max: u64, budget: u64) -> BodyLimits {
        BodyLimits {
            max,
            budget,
            deadline: Instant::now() + Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn request_bodies_are_read_whole_within_the_limit() {
        let mut rest = BytesMut::from(&b"ab"[..]);
        let mut io: &[u8] = b"cdef";
        let body = read_request(&mut io, &mut rest, Framing::Length(4), limits(10, u64::MAX)).await;
        assert_eq!(&body.unwrap().bytes[..], b"abcd");
        assert_eq!(io, b"ef", "bytes past the body are not read");

        let mut whole = BytesMut::from(&b"abcdNEXT"[..]);
        let body = read_request(&mut &b""[..], &mut whole, Framing::Length(4), limits(10, 0)).await;
        assert_eq!(
            &body.unwrap().bytes[..],
            b"abcd",
            "a buffered body costs no budget"
        );
        assert_eq!(&whole[..], b"NEXT");

        let mut io: &[u8] = b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
        let mut buf = BytesMut::new();
        let small = read_request(&mut io, &mut buf, Framing::Chunked, limits(4, u64::MAX)).await;
        assert!(matches!(small, Err(BodyError::TooLarge)));

        let mut io: &[u8] = b"ab";
        let short = read_request(
            &mut io,
            &mut BytesMut::new(),
            Framing::Length(4),
            limits(10, u64::MAX),
        )
        .await;
        assert!(matches!(short, Err(BodyError::Closed)));
    }

    #[tokio::test]
    async fn a_declared_length_reserves_only_what_arrives() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"xy").await.unwrap();
        let mut limits = limits(8 << 20, u64::MAX);
        limits.deadline = Instant::now() + Duration::from_millis(50);
        let mut body = Collector::new(limits);
        let read = body.read_from(&mut server, 8 << 20).await;
        assert!(read.is_ok());
        assert_eq!(body.body.len(), 2);
        assert!(
            body.body.capacity() <= READ_ROOM,
            "{}",
            body.body.capacity()
        );
        assert!(matches!(
            body.read_from(&mut server, 8 << 20).await,
            Err(BodyError::TimedOut)
        ));
    }

    #[tokio::test]
    async fn bodies_past_the_budget_are_refused() {
        let mut io: &[u8] = &[b'x'; 5000];
        let over = read_request(
            &mut io,
            &mut BytesMut::new(),
            Framing::Length(5000),
            limits(10_000, 1000),
        )
        .await;
        assert!(matches!(over, Err(BodyError::Busy(_))));
    }

    #[tokio::test]
    async fn relays_pass_chunks_through_or_decode_them() {
        let wire = b"3\r\nabc\r\n0\r\n\r\n";
        for (decode, want) in [(false, &wire[..]), (true, &b"abc"[..])] {
            let mut up: &[u8] = &wire[2..];
            let mut up_buf = BytesMut::from(&wire[..2]);
            let mut client = Vec::new();
            let mut out = b"HEAD|".to_vec();
            let done = Relay {
                up: &mut up,
                up_buf: &mut up_buf,
                client: &mut client,
                out: &mut out,
                framing: Framing::Chunked,
                decode,
                wait: Duration::from_secs(1),
            }
            .run()
            .await
            .map_err(|(e, _)| e)
            .unwrap();
            assert_eq!(client, [&b"HEAD|"[..], want].concat());
            assert_eq!(done.bytes_out, want.len());
        }
    }

    #[tokio::test]
    async fn a_short_upstream_body_fails_the_relay_after_what_came_was_streamed() {
        let mut up: &[u8] = b"abc";
        let mut client = Vec::new();
        let err = Relay {
            up: &mut up,
            up_buf: &mut BytesMut::new(),
            client: &mut client,
            out: &mut b"HEAD|".to_vec(),
            framing: Framing::Length(10),
            decode: false,
            wait: Duration::from_secs(1),
        }
        .run()
        .await
        .err()
        .unwrap();
        assert!(matches!(err.0, RelayError::Upstream(BodyError::Closed)));
        assert!(!err.1.untouched);
        assert_eq!(client, b"HEAD|abc");
        assert_eq!(err.1.bytes_out, 3);
    }
}
