#!/usr/bin/env python3
"""In-band load reports: two queueing backends, outside load on one.

Two equal fake backends (one worker each, a FIFO queue, a fixed service
time) sit behind each contender in turn. Another client loads backend A
directly, open loop, at a share of its capacity the proxies cannot see
except through A's own reports. An open-loop client sends Poisson arrivals
through the contender and measures each request's latency from the time it
was scheduled to be sent, so a late send counts (no coordinated omission).

Contenders: Switchyard (reads the `endpoint-load-metrics` header on every
answer, and the readiness poll), Switchyard with the backends omitting that
header (the poll alone), nginx least_conn and HAProxy leastconn. Every run
starts fresh backends, outside load and contender, so no run inherits
another's queue; rounds rotate the order. Prints a markdown table.

Run it through loadtest/bench/inband. The same file is also the fake
backend (`backend`) and the outside client (`outside`), each started as its
own process so that no two of them share an event loop or a GIL.
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from http import HTTPStatus
from pathlib import Path

from proxy_bench import (CONTENDER_PORTS, Proc, bench_parser, contender_commands, free_ports,
                         wait_port)

QUEUE_CAPACITY = 256
EMBED_BODY = b'{"input":"a sentence","model":"fake"}'
ANSWER_BODY = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}]}'
# contender -> (proxy started, whether the backends send endpoint-load-metrics)
CONTENDERS = {
    "switchyard": ("switchyard", True),
    "switchyard (poll only)": ("switchyard", False),
    "nginx": ("nginx", True),
    "haproxy": ("haproxy", True),
}
HTTP_PORT = {"switchyard": "sy_h", "nginx": "nginx_h", "haproxy": "haproxy_h"}
PEERS = ("nginx", "haproxy")


# ---- HTTP/1.1, the little of it both ends need ------------------------------

async def read_message(reader):
    """(start line, lower-cased headers, body) of one message, or None when
    the peer closed between messages. Bodies are framed by Content-Length
    only: neither end here sends chunked messages."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    start, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise ValueError("chunked message: only Content-Length framing is supported")
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return start, headers, body


def message(start, headers, body=b""):
    lines = [start, *(f"{k}: {v}" for k, v in headers), f"content-length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


# ---- the fake backend -------------------------------------------------------

class Backend:
    """One worker serving a FIFO queue with a fixed service time, so its
    capacity is exactly 1 / service time."""

    def __init__(self, name, service_s, load_header):
        self.name = name
        self.service_s = service_s
        self.load_header = load_header
        self.queue = asyncio.Queue()
        self.serving = 0
        self.served = 0

    def load(self):
        """(waiting, in flight) right now: waiting excludes the request in
        service, and a request being answered is no longer counted."""
        waiting = self.queue.qsize()
        return waiting, waiting + self.serving

    async def work(self):
        loop = asyncio.get_running_loop()
        free_at = 0.0
        while True:
            done = await self.queue.get()
            self.serving = 1
            # Service ends on the worker's own clock: a late wake-up delays
            # this answer but does not lower the worker's capacity.
            free_at = max(loop.time(), free_at) + self.service_s
            await asyncio.sleep(free_at - loop.time())
            self.serving = 0
            self.served += 1
            if not done.done():
                done.set_result(None)

    async def answer(self, method, path):
        """(status, extra headers, body) for one request."""
        if (method, path) == ("GET", "/health/ready"):
            waiting, in_flight = self.load()
            report = {"status": "ready", "ready": True, "queue_depth": waiting,
                      "queue_capacity": QUEUE_CAPACITY, "in_flight": in_flight}
            return 200, [], json.dumps(report, separators=(",", ":")).encode()
        if (method, path) == ("POST", "/v1/embeddings"):
            if self.queue.qsize() >= QUEUE_CAPACITY:
                return 503, [("retry-after", "1")], b'{"error":{"message":"queue full"}}'
            done = asyncio.get_running_loop().create_future()
            self.queue.put_nowait(done)
            await done
            return 200, [], ANSWER_BODY
        return 404, [], b'{"error":{"message":"not found"}}'

    def headers(self):
        """Headers on every answer: which backend served it (the client counts
        shares by it) and, unless switched off, the in-band load report as the
        answer leaves."""
        out = [("content-type", "application/json"), ("x-bench-backend", self.name)]
        if self.load_header:
            waiting, in_flight = self.load()
            out.append(("endpoint-load-metrics",
                        f"TEXT named_metrics.queue_depth={waiting}, "
                        f"named_metrics.queue_capacity={QUEUE_CAPACITY}, "
                        f"named_metrics.in_flight={in_flight}"))
        return out

    async def connection(self, reader, writer):
        try:
            while (msg := await read_message(reader)) is not None:
                start, headers, _ = msg
                method, path, _ = start.split(" ", 2)
                status, extra, body = await self.answer(method, path)
                status_line = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
                writer.write(message(status_line, self.headers() + extra, body))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a peer that breaks HTTP or hangs up loses its connection
        finally:
            writer.close()


async def serve_backend(args):
    backend = Backend(args.name, args.service_ms / 1000, not args.no_load_header)
    server = await asyncio.start_server(backend.connection, "127.0.0.1", args.port, backlog=1024)
    worker = asyncio.create_task(backend.work())
    await until_signalled()
    server.close()
    worker.cancel()
    print(json.dumps({"backend": args.name, "served": backend.served}), flush=True)


async def until_signalled():
    """Returns on SIGINT or SIGTERM: Proc.stop sends SIGINT, and the roles
    print their summary on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ---- the open-loop clients --------------------------------------------------

class Client:
    """Keep-alive HTTP/1.1 client. A request takes an idle connection or opens
    a new one, so it never waits behind another request."""

    def __init__(self, port):
        self.port = port
        self.idle = []
        self.busy = self.most_busy = 0
        self.request = message("POST /v1/embeddings HTTP/1.1",
                               [("host", f"127.0.0.1:{port}"),
                                ("content-type", "application/json")], EMBED_BODY)

    async def post(self):
        """(status, the backend that answered) of one POST."""
        # Oldest idle connection first: every pooled connection is used now
        # and then, so none sits idle into a proxy's keep-alive timeout.
        if self.idle:
            reader, writer = self.idle.pop(0)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            writer.write(self.request)
            await writer.drain()
            msg = await read_message(reader)
            if msg is None:
                raise ConnectionError("connection closed before an answer")
        except BaseException:  # cancelled by a timeout too: the connection is spent
            writer.close()
            raise
        finally:
            self.busy -= 1
        start, headers, _ = msg
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(start.split()[1]), headers.get("x-bench-backend")


async def open_loop(client, rate, seed, until, record, timeout=10.0):
    """POSTs at Poisson arrivals (`rate` per second, drawn from `seed`) until
    loop time `until`. record(scheduled, latency s, status, backend) follows
    each one; status is None for a failure or a timeout. Latency runs from
    the scheduled send time, so a send the event loop makes late counts."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    pending = set()

    async def one(scheduled):
        try:
            status, backend = await asyncio.wait_for(client.post(), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            status, backend = None, None
        record(scheduled, loop.time() - scheduled, status, backend)

    at = loop.time()
    try:
        while (at := at + rng.expovariate(rate)) < until:
            await asyncio.sleep(at - loop.time())
            task = loop.create_task(one(at))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        await asyncio.gather(*pending, return_exceptions=True)


async def outside_load(args):
    """Loads one backend directly until signalled, then prints what it got."""
    client = Client(args.port)
    latencies, errors = [], 0

    def record(_, latency, status, __):
        nonlocal errors
        if status == 200:
            latencies.append(latency)
        else:
            errors += 1

    started = time.monotonic()
    load = asyncio.create_task(open_loop(client, args.rate, args.seed, float("inf"), record))
    await until_signalled()
    load.cancel()
    await asyncio.gather(load, return_exceptions=True)
    seconds = time.monotonic() - started
    print(json.dumps({"rps": (len(latencies) + errors) / seconds, "errors": errors,
                      "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}),
          flush=True)


async def measure(port, args, seed):
    """The contender's client: warm-up, then args.duration seconds counted.
    Returns (samples, most connections busy at once)."""
    loop = asyncio.get_running_loop()
    client = Client(port)
    counted_from = loop.time() + args.warmup
    samples = []

    def record(scheduled, latency, status, backend):
        if scheduled >= counted_from:
            samples.append((latency, status, backend))

    await open_loop(client, args.rate, seed, counted_from + args.duration, record)
    return samples, client.most_busy


def percentile(values, p):
    """Nearest rank, in milliseconds; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)] * 1000


# ---- the runs ---------------------------------------------------------------

def run_one(args, work, contender, rnd):
    """One contender for one round on fresh backends; returns its samples, the
    most client connections busy at once and the outside client's summary."""
    proxy, load_header = CONTENDERS[contender]
    d = Path(work) / f"{re.sub(r'[^a-z]+', '-', contender)}-{rnd}"
    d.mkdir()
    me = [sys.executable, str(Path(__file__).resolve())]
    a, b = free_ports(2)
    procs = []
    try:
        for name, port in (("a", a), ("b", b)):
            argv = me + ["backend", "--name", name, "--port", str(port),
                         "--service-ms", str(args.service_ms)]
            procs.append(Proc(name, argv + ([] if load_header else ["--no-load-header"]),
                              d / f"backend-{name}.log"))
            wait_port(port)
        procs.append(Proc("outside", me + ["outside", "--port", str(a),
                                           "--rate", str(args.outside_rate),
                                           "--seed", str(args.seed + 1000 + rnd)],
                          d / "outside.log"))
        ports = dict(zip(CONTENDER_PORTS, free_ports(len(CONTENDER_PORTS))))
        argv, env = contender_commands(d, [a, b], ports, args)[proxy]
        if proxy == "switchyard":
            # Stated, not left to the default: the poll is the fallback the
            # in-band reports are measured against.
            with open(d / "switchyard.toml", "a") as f:
                f.write('\n[health]\ninterval = "1s"\n')
        procs.append(Proc(proxy, argv, d / f"{proxy}.log", env=env))
        # Switchyard opens its listeners only after its first health rounds.
        wait_port(ports[HTTP_PORT[proxy]])
        samples, most_busy = asyncio.run(measure(ports[HTTP_PORT[proxy]], args,
                                                 args.seed + rnd))
    finally:
        for proc in reversed(procs):
            proc.stop()
    summary = json.loads((d / "outside.log").read_text().splitlines()[-1])
    return samples, most_busy, summary


def summarize(samples):
    ok = [lat for lat, status, _ in samples if status == 200]
    to_a = sum(1 for _, status, backend in samples if status == 200 and backend == "a")
    return {"requests": len(samples), "errors": len(samples) - len(ok),
            "p50": percentile(ok, 50), "p90": percentile(ok, 90), "p99": percentile(ok, 99),
            "max": max(ok, default=0) * 1000, "to_a": to_a / max(len(ok), 1)}


def report(args, runs, loads, outside, most_busy):
    """The markdown table: percentiles over all rounds' requests pooled, and
    each round's p99 to show the spread."""
    title = (f"### Two queueing backends ({args.service_ms:g} ms service, one worker), outside "
             f"load {args.outside_rate:g} req/s on A, {args.rate:g} req/s Poisson through each "
             f"contender ({time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, "
             f"{args.rounds} rounds x {args.duration}s after {args.warmup}s warm-up)")
    lines = [title, "",
             "| contender | requests | p50 ms | p90 ms | p99 ms | p99 per round ms | max ms "
             "| errors | to A |", "|---|---|---|---|---|---|---|---|---|"]
    res = {}
    for name, rounds in runs.items():
        r = res[name] = summarize([s for samples in rounds for s in samples])
        per_round = ", ".join(f"{summarize(samples)['p99']:.1f}" for samples in rounds)
        lines.append(f"| {name} | {r['requests']} | {r['p50']:.1f} | {r['p90']:.1f} | "
                     f"{r['p99']:.1f} | {per_round} | {r['max']:.1f} | {r['errors']} | "
                     f"{r['to_a']:.1%} |")
    lines.append("")
    best = min((n for n in PEERS if n in res), key=lambda n: res[n]["p99"], default=None)
    if best:
        for name in (n for n in CONTENDERS if n.startswith("switchyard") and n in res):
            ratio = res[name]["p99"] / res[best]["p99"]
            verdict = "met" if ratio <= 0.6 else "not met"
            lines.append(f"- {name} p99 / best peer's ({best}) p99: **{ratio:.2f}** "
                         f"(goal <= 0.6: {verdict})")
    rps = sorted(o["rps"] for o in outside)
    lines += [f"- outside client on A: {rps[len(rps) // 2]:.1f} req/s achieved (median of runs), "
              f"{sum(o['errors'] for o in outside)} errors",
              f"- the client had at most {most_busy} requests in flight at once",
              "- load average (1 min) at the end of each run: "
              f"{min(loads):.2f} to {max(loads):.2f}"]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("backend", "outside"):
        return role_main(sys.argv[1], sys.argv[2:])
    p = bench_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=30, help="seconds counted per run")
    p.add_argument("--warmup", type=float, default=5, help="seconds sent but not counted")
    p.add_argument("--rate", type=float, default=60, help="req/s through the contender")
    p.add_argument("--outside-rate", type=float, default=85, help="req/s straight to backend A")
    p.add_argument("--service-ms", type=float, default=10, help="each backend's service time")
    p.add_argument("--seed", type=int, default=1, help="arrivals of round r use seed + r")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated, from: " + ", ".join(CONTENDERS))
    args = p.parse_args()
    names = [n.strip() for n in args.contenders.split(",")]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    runs = {n: [] for n in names}
    loads, outside, most_busy = [], [], 0
    with tempfile.TemporaryDirectory(prefix="switchyard-inband-") as work:
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                samples, busy, summary = run_one(args, work, name, rnd)
                runs[name].append(samples)
                outside.append(summary)
                most_busy = max(most_busy, busy)
                loads.append(os.getloadavg()[0])
                r = summarize(samples)
                print(f"  round {rnd + 1} {name}: p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms "
                      f"max {r['max']:.1f} ms errors {r['errors']} to A {r['to_a']:.1%}; "
                      f"outside {summary['rps']:.1f} req/s p99 {summary['p99']:.1f} ms; "
                      f"load {loads[-1]:.2f}", file=sys.stderr)
    print(report(args, runs, loads, outside, most_busy))


def role_main(role, argv):
    p = argparse.ArgumentParser(prog=f"inband_bench.py {role}")
    p.add_argument("--port", type=int, required=True)
    if role == "backend":
        p.add_argument("--name", required=True, help="sent back in x-bench-backend")
        p.add_argument("--service-ms", type=float, default=10)
        p.add_argument("--no-load-header", action="store_true",
                       help="omit endpoint-load-metrics: the proxy has only the poll")
        asyncio.run(serve_backend(p.parse_args(argv)))
    else:
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--seed", type=int, required=True)
        asyncio.run(outside_load(p.parse_args(argv)))


if __name__ == "__main__":
    main()
