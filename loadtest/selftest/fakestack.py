#!/usr/bin/env python3
"""A stand-in for the Switchyard stack, used only to test the load-test
harness itself (loadtest/selftest/run): the k6 thresholds and the drivers in
loadtest/lib.sh. It is not the product and proves nothing about it.

  fakestack.py backend --listen 127.0.0.1:PORT --instance blue-1 --version blue-v1
  fakestack.py proxy --listen 127.0.0.1:PORT --admin 127.0.0.1:PORT \
      --config FILE.toml --cert server.pem --key server.key \
      --upgrade-sock PATH [--upgrade]

The fake proxy speaks just enough of the real one's contract for the
scenarios: TLS, the route split and pools from the TOML (re-read when the
file changes), x-switchyard-pool / x-switchyard-backend headers, retries on
connect failures, health checks on /health/ready, the admin drain/undrain
calls, the switchyard_route_split_weight gauge, and a graceful upgrade that
hands the listening socket to a new process over a unix socket on SIGQUIT.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs


def parse_addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle plus
    # delayed ACKs add 40 ms to every response.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # keep k6 runs' logs short
        pass

    def send_json(self, code: int, obj, extra: dict | None = None):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def read_body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients vanishing mid-connection (k6 stopping, a killed peer) are
        # part of every scenario, not errors worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


# --- backend -----------------------------------------------------------------

def run_backend(args):
    started = time.time()
    vec = [round(random.uniform(-0.1, 0.1), 6) for _ in range(384)]

    class Backend(QuietHandler):
        def do_GET(self):
            if self.path.startswith("/health/live"):
                self.send_json(200, {"status": "live"})
            elif self.path.startswith("/health/ready"):
                self.send_json(200, {"status": "ready", "ready": True, "version": args.version,
                                     "model": "fake", "queue_depth": 0, "queue_capacity": 256,
                                     "in_flight": 0, "cache_hit_rate": None, "cache": "disabled",
                                     "uptime_s": time.time() - started})
            else:
                self.send_json(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.read_body() or b"{}")
            if self.path != "/v1/embeddings":
                self.send_json(404, {"error": "not found"})
                return
            inputs = body.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            if args.latency_ms:
                time.sleep(args.latency_ms / 1000)
            self.send_json(200, {"object": "list", "model": "fake",
                                 "data": [{"object": "embedding", "index": i, "embedding": vec}
                                          for i in range(len(inputs))]},
                           {"x-switchyard-instance": args.instance, "x-switchyard-version": args.version})

    srv = QuietServer(parse_addr(args.listen), Backend)
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    srv.serve_forever(poll_interval=0.1)


# --- proxy -------------------------------------------------------------------

class State:
    def __init__(self, config_path: str):
        self.path = config_path
        self.mtime = None
        self.lock = threading.Lock()
        self.split: dict[str, int] = {}
        self.pools: dict[str, list[str]] = {}
        self.drained: set[str] = set()
        self.healthy: dict[str, bool] = {}
        self.in_flight: dict[str, int] = {}
        self.reload()

    def reload(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        key = (st.st_mtime_ns, st.st_ino, st.st_size)
        if key == self.mtime:
            return
        try:
            cfg = tomllib.loads(open(self.path).read())
        except (OSError, tomllib.TOMLDecodeError) as e:
            print(f"fake proxy: keeping old config, reload failed: {e}", file=sys.stderr)
            self.mtime = key
            return
        with self.lock:
            self.mtime = key
            route = cfg["routes"][0]
            self.split = dict(route.get("split") or {route["pool"]: 100})
            self.pools = {n: [b["address"] for b in p["backends"]] for n, p in cfg["pools"].items()}
            for addrs in self.pools.values():
                for a in addrs:
                    self.healthy.setdefault(a, True)
                    self.in_flight.setdefault(a, 0)

    def choose_pool(self) -> str:
        with self.lock:
            items = [(p, w) for p, w in self.split.items() if w > 0]
        r = random.uniform(0, sum(w for _, w in items))
        for p, w in items:
            r -= w
            if r <= 0:
                return p
        return items[-1][0]

    def choose_backend(self, pool: str, tried: set[str]) -> str | None:
        with self.lock:
            cands = [a for a in self.pools.get(pool, [])
                     if a not in tried and a not in self.drained and self.healthy.get(a, False)]
            if not cands:
                return None
            least = min(self.in_flight[a] for a in cands)
            return random.choice([a for a in cands if self.in_flight[a] == least])


def health_loop(state: State, stop: threading.Event):
    while not stop.is_set():
        state.reload()
        for addr in [a for addrs in list(state.pools.values()) for a in addrs]:
            try:
                c = http.client.HTTPConnection(*parse_addr(addr), timeout=0.5)
                c.request("GET", "/health/ready")
                ok = c.getresponse().status == 200
                c.close()
            except OSError:
                ok = False
            state.healthy[addr] = ok
        stop.wait(0.3)


def run_proxy(args):
    state = State(args.config)
    stop = threading.Event()
    quitting = threading.Event()
    local = threading.local()
    active = [0]   # requests being forwarded
    open_conns = [0]  # client connections, idle keep-alive ones included
    active_lock = threading.Lock()

    def conn(addr: str) -> http.client.HTTPConnection:
        pool = getattr(local, "conns", None)
        if pool is None:
            pool = local.conns = {}
        c = pool.get(addr)
        if c is None:
            c = pool[addr] = http.client.HTTPConnection(*parse_addr(addr), timeout=30)
        return c

    class Proxy(QuietHandler):
        def setup(self):
            with active_lock:
                open_conns[0] += 1
            super().setup()

        def finish(self):
            try:
                super().finish()
            finally:
                with active_lock:
                    open_conns[0] -= 1

        def do_POST(self):
            with active_lock:
                active[0] += 1
            try:
                self.forward()
            finally:
                with active_lock:
                    active[0] -= 1

        def forward(self):
            body = self.read_body()
            pool = state.choose_pool()
            tried: set[str] = set()
            for _ in range(3):
                addr = state.choose_backend(pool, tried)
                if addr is None:
                    break
                tried.add(addr)
                with state.lock:
                    state.in_flight[addr] += 1
                try:
                    c = conn(addr)
                    try:
                        c.request("POST", self.path, body, {"content-type": "application/json"})
                        r = c.getresponse()
                    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                        # A reused keep-alive connection the backend closed: reconnect once.
                        c.close()
                        c.request("POST", self.path, body, {"content-type": "application/json"})
                        r = c.getresponse()
                    data = r.read()
                except OSError:
                    conn(addr).close()
                    state.healthy[addr] = False
                    continue
                finally:
                    with state.lock:
                        state.in_flight[addr] -= 1
                self.send_response(r.status)
                for k in ("content-type", "x-switchyard-instance", "x-switchyard-version"):
                    if r.getheader(k):
                        self.send_header(k, r.getheader(k))
                self.send_header("content-length", str(len(data)))
                self.send_header("x-switchyard-pool", pool)
                self.send_header("x-switchyard-backend", addr)
                if quitting.is_set():
                    # Tell keep-alive clients to reconnect to the new process.
                    self.send_header("connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_json(503, {"error": {"message": f"no eligible backend in pool {pool}"}})

    class Admin(QuietHandler):
        def do_GET(self):
            if self.path.startswith("/metrics"):
                with state.lock:
                    lines = [f'switchyard_route_split_weight{{route="0",pool="{p}"}} {w}' for p, w in state.split.items()]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_json(404, {"error": "not found"})

        def do_POST(self):
            self.read_body()
            u = urlparse(self.path)
            parts = u.path.strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["admin", "backends"] and parts[3] in ("drain", "undrain"):
                addr = parts[2]
                if addr not in state.healthy:
                    self.send_json(404, {"error": f"unknown backend {addr}"})
                    return
                if parts[3] == "drain":
                    with state.lock:
                        state.drained.add(addr)
                    wait = float(parse_qs(u.query).get("wait", ["0s"])[0].rstrip("s") or 0)
                    deadline = time.time() + wait
                    while state.in_flight[addr] > 0 and time.time() < deadline:
                        time.sleep(0.02)
                    self.send_json(200, {"address": addr, "state": "drained", "in_flight": state.in_flight[addr]})
                else:
                    with state.lock:
                        state.drained.discard(addr)
                    self.send_json(200, {"address": addr, "state": "healthy"})
            else:
                self.send_json(404, {"error": "not found"})

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    if args.upgrade:
        # Like Pingora's --upgrade: receive the listening socket from the
        # old process instead of binding, so no connection is refused.
        if os.path.exists(args.upgrade_sock):
            os.unlink(args.upgrade_sock)
        us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        us.bind(args.upgrade_sock)
        us.listen(1)
        us.settimeout(30)
        c, _ = us.accept()
        _, fds, _, _ = socket.recv_fds(c, 16, 1)
        c.close()
        us.close()
        os.unlink(args.upgrade_sock)
        lsock = socket.socket(fileno=fds[0])
    else:
        lsock = socket.create_server(parse_addr(args.listen), backlog=128)

    srv = QuietServer(parse_addr(args.listen), Proxy, bind_and_activate=False)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(lsock, server_side=True, do_handshake_on_connect=False)

    # A handshake error must not stop the accept loop.
    def get_request():
        s, a = srv.socket.accept()
        s.settimeout(10)
        s.do_handshake()
        s.settimeout(None)
        return s, a
    srv.get_request = get_request

    admin = None
    if not args.upgrade:
        admin = QuietServer(parse_addr(args.admin), Admin)
        admin.daemon_threads = True
        threading.Thread(target=admin.serve_forever, daemon=True).start()
    threading.Thread(target=health_loop, args=(state, stop), daemon=True).start()

    def cert_watch():
        # New handshakes get a rotated pair; open connections keep theirs.
        seen = None
        while not stop.is_set():
            try:
                key = (os.stat(args.cert).st_mtime_ns, os.stat(args.key).st_mtime_ns)
                if seen is not None and key != seen:
                    ctx.load_cert_chain(args.cert, args.key)
                seen = key
            except (OSError, ssl.SSLError) as e:
                print(f"fake proxy: keeping the old certificate: {e}", file=sys.stderr)
            stop.wait(0.2)
    threading.Thread(target=cert_watch, daemon=True).start()

    def on_quit(*_):
        def handover():
            quitting.set()
            try:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                for _ in range(100):
                    try:
                        c.connect(args.upgrade_sock)
                        break
                    except OSError:
                        time.sleep(0.05)
                socket.send_fds(c, [b"x"], [srv.socket.fileno()])
                c.close()
            except OSError as e:
                print(f"fake proxy: handover failed: {e}", file=sys.stderr)
            srv.shutdown()
            # Every open connection gets its next response with
            # "connection: close"; wait for them to go before exiting.
            deadline = time.time() + 20
            while (active[0] > 0 or open_conns[0] > 0) and time.time() < deadline:
                time.sleep(0.05)
            if admin:
                admin.shutdown()
                admin.server_close()
            stop.set()
        threading.Thread(target=handover).start()

    def on_term(*_):
        threading.Thread(target=srv.shutdown).start()
        if admin:
            threading.Thread(target=admin.shutdown).start()

    signal.signal(signal.SIGQUIT, on_quit)
    signal.signal(signal.SIGTERM, on_term)
    if args.upgrade:
        # Take over the admin listener once the old process has let it go.
        def admin_later():
            nonlocal admin
            for _ in range(600):
                try:
                    a = QuietServer(parse_addr(args.admin), Admin)
                    a.daemon_threads = True
                    admin = a
                    a.serve_forever()
                    return
                except OSError:
                    time.sleep(0.05)
        threading.Thread(target=admin_later, daemon=True).start()
    srv.serve_forever(poll_interval=0.05)
    time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--listen", required=True)
    b.add_argument("--instance", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--latency-ms", type=float, default=2)
    p = sub.add_parser("proxy")
    p.add_argument("--listen", required=True)
    p.add_argument("--admin", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--upgrade-sock", required=True)
    p.add_argument("--upgrade", action="store_true")
    args = ap.parse_args()
    (run_backend if args.cmd == "backend" else run_proxy)(args)


if __name__ == "__main__":
    main()
