#!/usr/bin/env python3
"""Abuse battery: what hostile but cheap clients cost Switchyard, nginx and
HAProxy, each fronting the same upstream, fed the same bytes.

Each round starts fresh contenders (proxy_bench's configs and upstream) for
each measurement, so memory one test leaves behind never counts in another,
and rotates the contender order. Memory is VmRSS (peak: VmHWM) summed over
the contender's processes (nginx: master + worker); CPU is their utime +
stime from /proc. Prints markdown tables with the median of the rounds and
the ratio to nginx.

Run it through loadtest/bench/abuse, which installs what this needs.
"""

import asyncio
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

from proxy_bench import HERE, Bench, bench_parser, throughput_rounds

NAMES = ("switchyard", "nginx", "haproxy")
PLAIN = {"switchyard": "sy_h", "nginx": "nginx_h", "haproxy": "haproxy_h"}
TLS = {"switchyard": "sy_t", "nginx": "nginx_t", "haproxy": "haproxy_t"}
BIG_HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
            b"Content-Length: 8388608\r\n\r\n")
SMALL_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def token_head(tokens=14_000, lines=100, padding=9):
    """A ~29 KB head: `lines` Connection fields sharing `tokens` one-letter
    tokens, plus Host and `padding` plain fields (110 fields in all)."""
    per_line = tokens // lines
    letters = "abcdefghijklmnopqrstuvwxyz"
    value = ",".join(letters[i % 26] for i in range(per_line))
    fields = ["Host: t"] + [f"Connection: {value}"] * lines
    fields += [f"X-Pad-{i}: {i}" for i in range(padding)]
    return ("GET / HTTP/1.1\r\n" + "\r\n".join(fields) + "\r\n\r\n").encode()


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])  # the HTTP/1.x engine, for all three
    return ctx


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Battery:
    def __init__(self, args, work):
        self.args = args
        self.bench = Bench(args, work)
        self.upstreams = self.bench.start_upstream(3)
        self.starts = 0

    @contextmanager
    def contenders(self):
        """Fresh Switchyard, nginx and HAProxy processes for one measurement."""
        self.starts += 1
        procs, ports = self.bench.start_contenders(self.upstreams, f"run{self.starts}")
        try:
            yield procs, ports
        finally:
            for proc in procs.values():
                proc.stop()

    def rounds(self, label, measure):
        """measure(proc, ports, name) -> dict, per round and contender, each
        round on fresh processes in a rotated order."""
        samples = {n: [] for n in NAMES}
        for r in range(self.args.rounds):
            with self.contenders() as (procs, ports):
                order = NAMES[r % 3:] + NAMES[:r % 3]
                for name in order:
                    time.sleep(1)  # let the previous contender's sockets settle
                    res = measure(procs[name], ports, name)
                    samples[name].append(res)
                    log(f"  {label} round {r + 1} {name}: {res}")
        return samples

    # 1. heads that declare an 8 MiB body and send none of it
    def declared_bodies(self, proc, ports, name):
        n = self.args.declared
        before = proc.status_mib("VmRSS")
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", ports[PLAIN[name]]))
            s.sendall(BIG_HEAD)
            socks.append(s)
        time.sleep(self.args.settle)
        held = proc.status_mib("VmRSS")
        answer = first_status(socks[0])
        for s in socks:
            s.close()
        time.sleep(self.args.settle)
        after = proc.status_mib("VmRSS")
        return {"growth": held - before, "after_close": after - before, "answer": answer}

    # 2. idle connections, plain then (on fresh processes) TLS
    def idle(self, proc, ports, name, tls):
        port = ports[(TLS if tls else PLAIN)[name]]
        return asyncio.run(idle_growth(proc, port, self.args.idle, tls))

    # 3. the 14,000-token Connection head, and a small GET for scale
    def heads_cpu(self, proc, ports, name):
        port = ports[PLAIN[name]]
        out = {}
        for key, head in (("tokens", token_head()), ("small", SMALL_HEAD)):
            n = self.args.head_requests
            cpu0 = proc.cpu_seconds()
            answers = {}
            for _ in range(n):
                a = one_request(port, head)
                answers[a] = answers.get(a, 0) + 1
            out[key + "_ms"] = (proc.cpu_seconds() - cpu0) / n * 1000
            out[key + "_answers"] = answers
        return out

    # 4. peak RSS through proxy_bench's own throughput rounds
    def peak_rss(self):
        args = SimpleNamespace(rounds=self.args.bench_rounds, duration=self.args.bench_duration,
                               connections=64)
        with self.contenders() as (procs, ports):
            for scheme in ("http", "https"):
                throughput_rounds(self.bench, procs, ports, self.upstreams[0], scheme, args,
                                  skip=("direct",))
            return {n: procs[n].peak_rss_mib() for n in NAMES}


def first_status(sock, timeout=2.0):
    """The status code the contender answered on sock, or what it did instead."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed" if not data else "short"
            data += chunk
    except socket.timeout:
        return "waits"
    except OSError:
        return "reset"
    return data.split(b" ", 2)[1].decode()


def one_request(port, head):
    """Sends head on a new connection and returns the answer's status."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(head)
        except OSError:
            return "reset"
        return first_status(s, timeout=5.0)


async def idle_growth(proc, port, n, tls):
    """Opens n connections (TLS: handshake done) that send nothing; RSS
    growth per connection still open a moment later."""
    ctx = tls_context() if tls else None
    gate = asyncio.Semaphore(64)

    async def connect():
        async with gate:
            return await asyncio.open_connection("127.0.0.1", port, ssl=ctx)

    await asyncio.sleep(0)
    before = proc.status_mib("VmRSS")
    t0 = time.time()
    conns = await asyncio.gather(*(connect() for _ in range(n)))
    opened = time.time() - t0
    await asyncio.sleep(1)  # the contender finishes its side (TLS 1.3 tickets)
    held = proc.status_mib("VmRSS")
    alive = sum(not r.at_eof() for r, _ in conns)
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    return {"kib_per_conn": (held - before) * 1024 / max(alive, 1), "alive": alive,
            "open_s": round(opened, 1)}


def callgrind(args):
    """Instructions per request of the h1 path: the old build against HEAD,
    alternated, plus nginx once as the anchor."""
    script = HERE / "proxy_callgrind"
    runs = [("nginx", None)] + [(tag, binary) for _ in range(args.rounds)
                                for tag, binary in (("before", args.before_bin),
                                                    ("head", args.switchyard))]
    per = {"before": [], "head": [], "nginx": []}
    for tag, binary in runs:
        env = dict(os.environ, SWITCHYARD=binary or "")
        who = "nginx" if tag == "nginx" else "switchyard"
        out = subprocess.run([str(script), who, "http", str(args.callgrind_requests)],
                             capture_output=True, text=True, env=env, check=True).stdout
        m = re.search(r"(\d+) requests \((\d+) failed\), \d+ instructions, (\d+)/request", out)
        per[tag].append(int(m.group(3)))
        log(f"  callgrind {tag}: {m.group(0)}")
    return per


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "–"


def answers(rows, key):
    seen = {}
    for r in rows:
        for a, c in (r[key].items() if isinstance(r[key], dict) else [(r[key], 1)]):
            seen[a] = seen.get(a, 0) + c
    return " ".join(sorted(seen))


def report(args, res):
    lines = [f"## Abuse battery ({time.strftime('%Y-%m-%d %H:%M')} UTC, "
             f"{socket.gethostname()}, {args.rounds} rounds, medians; ratio = "
             "Switchyard / nginx)", "",
             "| figure | goal | switchyard | nginx | haproxy | ratio to nginx | goal met |",
             "|---|---|---|---|---|---|---|"]

    def row(label, goal, values, fmt, met):
        cells = " | ".join(fmt.format(values[n]) for n in NAMES)
        lines.append(f"| {label} | {goal} | {cells} | "
                     f"{ratio(values['switchyard'], values['nginx'])} | {met} |")

    if "declared" in res:
        s = res["declared"]
        g = {n: med(s[n], "growth") for n in NAMES}
        row(f"{args.declared} heads declaring 8 MiB: RSS growth MiB", "< 32 MiB", g, "{:.1f}",
            yes(g["switchyard"] < 32))
        a = {n: med(s[n], "after_close") for n in NAMES}
        row("  the same, after they close: MiB kept", "–", a, "{:.1f}", "–")
        lines.append("|  answer while the body is owed | – | " +
                     " | ".join(answers(s[n], "answer") for n in NAMES) + " | | |")
    for key, label, goal in (("idle_plain", "plain", 8), ("idle_tls", "TLS", 32)):
        if key in res:
            s = res[key]
            k = {n: med(s[n], "kib_per_conn") for n in NAMES}
            row(f"{args.idle} idle {label} connections: RSS KiB per connection",
                f"≤ {goal} KiB", k, "{:.1f}", yes(k["switchyard"] <= goal))
    if "heads" in res:
        s = res["heads"]
        t = {n: med(s[n], "tokens_ms") for n in NAMES}
        refused = all(a != "200" for r in s["switchyard"] for a in r["tokens_answers"])
        row(f"14,000-token Connection head ({len(token_head())} B): CPU ms/request",
            "< 0.5 ms or refused", t, "{:.3f}", yes(t["switchyard"] < 0.5 or refused))
        lines.append("|  its answers | – | " +
                     " | ".join(answers(s[n], "tokens_answers") for n in NAMES) + " | | |")
        small = {n: med(s[n], "small_ms") for n in NAMES}
        row("  for scale: `GET /` on a new connection, CPU ms/request", "–", small, "{:.3f}",
            "–")
    if "peak" in res:
        p = {n: statistics.median(r[n] for r in res["peak"]) for n in NAMES}
        best = min(p["nginx"], p["haproxy"])
        row("peak RSS, proxy bench rounds (plain + TLS): MiB", "≤ best peer", p, "{:.1f}",
            yes(p["switchyard"] <= best))
    if "callgrind" in res:
        c = {k: statistics.median(v) for k, v in res["callgrind"].items()}
        change = c["head"] / c["before"] - 1
        lines += ["", "| h1 path, instructions/request (callgrind) | goal | before "
                  f"({args.before_rev}) | HEAD | HEAD / before | nginx | HEAD / nginx | goal met |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| plain HTTP/1.1, {args.callgrind_requests} requests, runs "
                  f"{res['callgrind']['before']} / {res['callgrind']['head']} | within 3 % | "
                  f"{c['before']:.0f} | {c['head']:.0f} | {change:+.1%} | {c['nginx']:.0f} | "
                  f"{ratio(c['head'], c['nginx'])} | {yes(abs(change) <= 0.03)} |"]
    return "\n".join(lines) + "\n"


def yes(ok):
    return "yes" if ok else "**no**"


TESTS = ("declared", "idle", "heads", "peak", "callgrind")


def main():
    p = bench_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="repeats of every measurement")
    p.add_argument("--only", default=",".join(TESTS), help=f"comma list of {', '.join(TESTS)}")
    p.add_argument("--declared", type=int, default=300, help="connections declaring 8 MiB")
    p.add_argument("--idle", type=int, default=2000, help="idle connections per protocol")
    p.add_argument("--head-requests", type=int, default=2000,
                   help="requests per head shape for the CPU figure")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    p.add_argument("--bench-rounds", type=int, default=2)
    p.add_argument("--bench-duration", type=int, default=5)
    p.add_argument("--before-bin", help="switchyard built at --before-rev, for callgrind")
    p.add_argument("--before-rev", default="6680fa9")
    p.add_argument("--callgrind-requests", type=int, default=5000)
    args = p.parse_args()
    tests = args.only.split(",")

    # 2,000 idle connections per contender, and as many client sockets here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * args.idle + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    res = {}
    with tempfile.TemporaryDirectory(prefix="switchyard-abuse-") as work:
        battery = Battery(args, work)
        try:
            if "declared" in tests:
                res["declared"] = battery.rounds("declared", battery.declared_bodies)
            if "idle" in tests:
                res["idle_plain"] = battery.rounds(
                    "idle plain", lambda *a: battery.idle(*a, tls=False))
                res["idle_tls"] = battery.rounds(
                    "idle tls", lambda *a: battery.idle(*a, tls=True))
            if "heads" in tests:
                res["heads"] = battery.rounds("heads", battery.heads_cpu)
            if "peak" in tests:
                res["peak"] = []
                for r in range(args.rounds):
                    res["peak"].append(battery.peak_rss())
                    log(f"  peak RSS round {r + 1}: {res['peak'][-1]}")
        finally:
            for proc in battery.bench.procs.values():
                proc.stop()
    if "callgrind" in tests and args.before_bin:
        res["callgrind"] = callgrind(args)
    print(report(args, res))


if __name__ == "__main__":
    main()
