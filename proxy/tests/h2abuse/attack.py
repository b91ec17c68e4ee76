#!/usr/bin/env python3
"""HTTP/2 abuse client for proxy/tests/h2_abuse.rs.

Each subcommand opens one TLS connection (ALPN h2) to the proxy, plays one
attack with frames built by the `h2` package's own layers (hyperframe for
frames, hpack for header blocks; h2 for the preface and the codes), then
reads what the server answers. It prints one JSON line: what was sent and
what came back (GOAWAY, RST_STREAM codes, response statuses, SETTINGS and
PING acks, whether and when the connection closed). The Rust test decides
pass or fail; this script only reports.
"""

import argparse
import json
import signal
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.settings
import hpack
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

READ_CHUNK = 65536


def code_name(code):
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class Conn:
    """One client connection: raw frames out, decoded frames in."""

    def __init__(self, args, settings=None, preface=True):
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        if self.sock.selected_alpn_protocol() != "h2":
            raise SystemExit("the server did not select h2")
        self.authority = "localhost:%d" % args.port
        self.path = args.path
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.inbuf = b""
        self.block = {}  # stream id -> header block still in CONTINUATIONs
        self.report = {
            "sent_frames": 0,
            "sent_bytes": 0,
            "send_blocked": False,
            "goaway": None,
            "goaway_last_stream": None,
            "closed": False,
            "closed_after_s": None,
            "rst": {},
            "status": {},
            "settings_acks": 0,
            "ping_acks": 0,
        }
        self.answered = set()  # streams that got a response or a reset
        self.ack_settings = True
        self.write_failed = False
        self.started = time.monotonic()
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True)
        )
        if settings:
            client.local_settings = h2.settings.Settings(
                client=True, initial_values=settings
            )
        client.initiate_connection()
        if preface:
            self.sock.sendall(client.data_to_send())

    # -- sending ---------------------------------------------------------
    def send(self, frames, timeout=5.0):
        """Sends serialized frames; False once the server stops reading or
        has closed the connection."""
        if self.write_failed:
            return False
        data = b"".join(frames)
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            self.report["send_blocked"] = True
            return False
        except (OSError, ssl.SSLError):
            # The server closed on us: what it said last (a GOAWAY) may
            # still wait in the receive queue.
            self.write_failed = True
            self.pump(1.0)
            self.mark_closed()
            return False
        self.report["sent_frames"] += len(frames)
        self.report["sent_bytes"] += len(data)
        return True

    def request_block(self, extra=()):
        return self.encoder.encode(
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", self.authority),
                (":path", self.path),
            ]
            + list(extra)
        )

    def headers(self, stream_id, block=None, end_headers=True, end_stream=True):
        f = HeadersFrame(stream_id, block if block is not None else self.request_block())
        if end_headers:
            f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    # -- receiving -------------------------------------------------------
    def mark_closed(self):
        if not self.report["closed"]:
            self.report["closed"] = True
            self.report["closed_after_s"] = round(time.monotonic() - self.started, 3)

    def pump(self, seconds, until=None, quiet=None):
        """Reads frames for up to `seconds`; stops early once the
        connection closes, `until()` holds, or nothing came for `quiet` s."""
        deadline = time.monotonic() + seconds
        last = time.monotonic()
        while not self.report["closed"]:
            now = time.monotonic()
            if now >= deadline or (until and until()):
                return
            if quiet is not None and now - last >= quiet:
                return
            self.sock.settimeout(min(0.2, deadline - now))
            try:
                data = self.sock.recv(READ_CHUNK)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError):
                self.mark_closed()
                return
            if not data:
                self.mark_closed()
                return
            last = time.monotonic()
            self.inbuf += data
            self.parse()

    def parse(self):
        while len(self.inbuf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.inbuf[:9]))
            if len(self.inbuf) < 9 + length:
                return
            frame.parse_body(memoryview(self.inbuf[9 : 9 + length]))
            self.inbuf = self.inbuf[9 + length :]
            self.on_frame(frame)

    def on_frame(self, frame):
        r = self.report
        kind = frame.type
        if kind == SettingsFrame.type:
            if "ACK" in frame.flags:
                r["settings_acks"] += 1
            elif self.ack_settings:
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                self.send([ack.serialize()])
        elif kind == PingFrame.type and "ACK" in frame.flags:
            r["ping_acks"] += 1
        elif kind == GoAwayFrame.type:
            r["goaway"] = code_name(frame.error_code)
            r["goaway_last_stream"] = frame.last_stream_id
        elif kind == RstStreamFrame.type:
            name = code_name(frame.error_code)
            r["rst"][name] = r["rst"].get(name, 0) + 1
            self.answered.add(frame.stream_id)
        elif kind in (HeadersFrame.type, ContinuationFrame.type):
            block = self.block.pop(frame.stream_id, b"") + frame.data
            if "END_HEADERS" not in frame.flags:
                self.block[frame.stream_id] = block
                return
            status = dict(self.decoder.decode(block, raw=False)).get(":status")
            if status is not None:
                r["status"][status] = r["status"].get(status, 0) + 1
                self.answered.add(frame.stream_id)


# -- attacks -------------------------------------------------------------


def rapid_reset(args):
    """CVE-2023-44487: HEADERS then RST_STREAM(CANCEL), thousands at once."""
    c = Conn(args)
    frames = []
    for i in range(args.streams):
        sid = 2 * i + 1
        frames.append(c.headers(sid))
        frames.append(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
    for at in range(0, len(frames), 512):
        if not c.send(frames[at : at + 512]):
            break
    c.pump(args.seconds)
    return c.report


def continuation(args):
    """HEADERS without END_HEADERS, then CONTINUATION frames forever, each
    carrying fresh literal fields, until the server reacts or time is up."""
    c = Conn(args)
    c.send([c.headers(1, end_headers=False)])
    n = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not c.report["closed"]:
        fields = [("x-flood-%d" % (n + k), "v" * 100) for k in range(128)]
        block = c.encoder.encode(fields, huffman=False)
        n += 128
        if not c.send([ContinuationFrame(1, block).serialize()], timeout=1.0):
            break
        c.pump(0.0)  # notice a GOAWAY or a close without waiting
    c.report["fields_sent"] = n
    c.pump(3.0, quiet=1.0)
    return c.report


def hpack_bomb(args):
    """Inserts a 4 KB field in the server's HPACK table, then references it
    thousands of times in one small header block (about 1 byte each), on
    `streams` streams: a few KB on the wire, tens of MB once decoded."""
    c = Conn(args)
    refs = b"\xbe" * 12000  # indexed field 62: the newest dynamic entry
    frames = []
    for i in range(args.streams):
        block = c.request_block([("x-bomb", "b" * 4000)]) + refs
        frames.append(c.headers(2 * i + 1, block))
    for at in range(0, len(frames), 8):
        if not c.send(frames[at : at + 8]):
            break
    c.pump(args.seconds, until=lambda: len(c.answered) >= args.streams)
    c.report["decoded_bytes_per_stream"] = 12000 * (4000 + 6)
    return c.report


def flood(args, make):
    """Writes control frames nonstop for `seconds` without reading, so every
    answer the server owes has to wait; then reads what it answered."""
    c = Conn(args)
    c.ack_settings = False  # read nothing during the flood
    batch = [make(i) for i in range(1000)]
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        if not c.send(batch, timeout=1.0):
            break
    c.pump(10.0, quiet=1.5)
    return c.report


def settings_flood(args):
    def make(i):
        f = SettingsFrame(0, settings={SettingCodes.MAX_CONCURRENT_STREAMS: 100 + i % 7})
        return f.serialize()

    return flood(args, make)


def ping_flood(args):
    return flood(args, lambda i: PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())


def zero_window(args):
    """Advertises a stream window of 0, opens `streams` requests and never
    sends WINDOW_UPDATE: every response body is stuck at the server."""
    c = Conn(args, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    c.send([c.headers(2 * i + 1) for i in range(args.streams)])
    c.pump(args.seconds)
    c.report["streams_reset"] = sum(c.report["rst"].values())
    return c.report


def excess_streams(args):
    """Opens `streams` requests at once, more than the server's
    SETTINGS_MAX_CONCURRENT_STREAMS, without waiting for any answer."""
    c = Conn(args)
    c.pump(1.0, until=lambda: c.report["settings_acks"] > 0)
    c.send([c.headers(2 * i + 1) for i in range(args.streams)])
    c.pump(args.seconds, until=lambda: len(c.answered) >= args.streams)
    return c.report


def idle(args):
    """Completes the preface, then says nothing: how long until closed."""
    c = Conn(args)
    c.pump(args.seconds)
    return c.report


def silent(args):
    """Negotiates h2 in the TLS handshake, then never sends the preface."""
    c = Conn(args, preface=False)
    c.ack_settings = False  # an ACK would be a (bad) preface
    c.pump(args.seconds)
    return c.report


ATTACKS = {
    f.__name__.replace("_", "-"): f
    for f in (
        rapid_reset,
        continuation,
        hpack_bomb,
        settings_flood,
        ping_flood,
        zero_window,
        excess_streams,
        idle,
        silent,
    )
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="CA certificate to trust")
    p.add_argument("--path", default="/v1/embeddings")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    # Never outlive the test, whatever the server does.
    signal.alarm(int(args.seconds) + 30)
    report = ATTACKS[args.attack](args)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
