#!/usr/bin/env python3
"""Latency that a rate-limit rule adds, local or shared through Redis.

One Switchyard (proxy_bench's contender config, one worker thread) fronts
one fast upstream (proxy_bench's nginx) with three routes: `/` with no rule,
`/local` with a local rule and `/shared` with a shared rule whose state
lives in a redis-server on loopback. The limits are far above the load, so
every request is admitted and what differs is the cost of the decision.
Each route is driven over HTTP/2 + TLS at a fixed request rate by h2load
(`--rps` per client: an open loop as long as the streams per connection
suffice), the routes' order rotating between rounds, so drift on a shared
machine hits all three alike. Prints a markdown table of the medians of
the rounds (and the range of the p50s), with the deltas to the route
without a rule.

Run it through loadtest/bench/ratelimit, which installs what this needs.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from proxy_bench import (Bench, Proc, bench_parser, free_ports, parse_h2load, switchyard_command,
                         wait_http_200, wait_port)

ROUTES = {"none": "/", "local": "/local", "shared": "/shared"}
# Far above any rate this bench offers: nothing is refused.
RULE = 'key = "ip"\nrate = 1000000\nburst = 1000000\n'
FALLBACKS = "switchyard_ratelimit_redis_fallbacks_total"


def rules(redis_port):
    """The routes with a rule, and [rate_limits], appended to the contender
    config (whose last table is the route without a rule)."""
    return (f'\n[[routes]]\nname = "local"\npath_prefix = "/local"\npool = "pool"\n'
            f'[[routes.rate_limits]]\nname = "local"\n{RULE}'
            f'\n[[routes]]\nname = "shared"\npath_prefix = "/shared"\npool = "pool"\n'
            f'[[routes.rate_limits]]\nname = "shared"\n{RULE}shared = true\n'
            f'\n[rate_limits]\nredis_url = "redis://127.0.0.1:{redis_port}"\n'
            # Past the timeout (5 ms by default) a decision is made locally
            # for a second: a busy machine would then time the fallback, not
            # Redis. A generous one keeps every decision on Redis.
            f'redis_timeout = "250ms"\n')


def metric(admin, name):
    """A sample of the proxy's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)} ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start(bench, args):
    """Redis, the upstream and the proxy; returns the proxy's TLS base URL
    and its admin address."""
    redis_port, = free_ports(1)
    bench.procs["redis"] = Proc("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                          "127.0.0.1", "--save", "", "--appendonly", "no"],
                                bench.work / "redis.log")
    wait_port(redis_port)
    upstreams = bench.start_upstream(1)
    ports = dict(zip(["sy_h", "sy_t", "sy_a"], free_ports(3)))
    argv, env = switchyard_command(bench.work, upstreams, ports, bench.args,
                                   extra=rules(redis_port))
    bench.procs["switchyard"] = Proc("switchyard", argv, bench.work / "switchyard.log", env=env)
    for port in ports.values():
        wait_port(port)
    admin = f"127.0.0.1:{ports['sy_a']}"
    for path in ROUTES.values():
        wait_http_200(f"http://127.0.0.1:{ports['sy_h']}{path}")
    return f"https://127.0.0.1:{ports['sy_t']}", admin


def h2load(url, args, seconds):
    """`args.rate` requests/s over `args.clients` h2 connections."""
    per_client = max(1, round(args.rate / args.clients))
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".tsv") as log:
        argv = ["h2load", "--npn-list=h2", "-c", str(args.clients), "-m", str(args.streams),
                "-t", "1", "--rps", str(per_client), "-D", str(seconds),
                "--log-file", log.name, url]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return parse_h2load(out, log.name)


def rounds(base, admin, args):
    """Per route, the rounds' results; and the shared decisions made without
    Redis during them."""
    samples = {name: [] for name in ROUTES}
    fallbacks = metric(admin, FALLBACKS)
    names = list(ROUTES)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            res = h2load(base + ROUTES[name], args, args.duration)
            samples[name].append(res)
            print(f"  round {r + 1} {name}: {res['rps']:.0f} req/s p50 {res['p50']:.3f} ms "
                  f"p99 {res['p99']:.3f} ms errors {res['errors']}", file=sys.stderr)
    return samples, metric(admin, FALLBACKS) - fallbacks


def table(samples, fallbacks, redis_rtt, args):
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("rps", "p50", "p99")}
           for name, rows in samples.items()}
    none = med["none"]
    spread = {name: (min(r["p50"] for r in rows), max(r["p50"] for r in rows))
              for name, rows in samples.items()}
    lines = [f"## Rate-limit rule latency ({time.strftime('%Y-%m-%d %H:%M')} UTC, "
             f"{os.cpu_count()} CPUs, HTTP/2 over TLS, {args.rate} req/s by h2load -c "
             f"{args.clients} -m {args.streams}, {args.duration}s x {args.rounds} rounds)", "",
             "| route | achieved req/s | p50 ms | p50 range ms | p99 ms | p50 − none ms "
             "| p99 − none ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in med.items():
        errors = sum(row["errors"] for row in samples[name])
        low, high = spread[name]
        lines.append(f"| {name} | {r['rps']:.0f} | {r['p50']:.3f} | {low:.3f}–{high:.3f} | "
                     f"{r['p99']:.3f} | "
                     f"{r['p50'] - none['p50']:+.3f} | {r['p99'] - none['p99']:+.3f} | {errors} |")
    lines += ["", f"Redis round trip (mean over the runs): {redis_rtt * 1000:.3f} ms; shared "
              f"decisions made without Redis (fallbacks): {fallbacks:.0f}"]
    return "\n".join(lines) + "\n"


def main():
    p = bench_parser(__doc__)
    p.add_argument("--rate", type=int, default=1000, help="requests/s offered to each route")
    p.add_argument("--clients", type=int, default=4, help="h2load -c: connections")
    p.add_argument("--streams", type=int, default=16,
                   help="h2load -m: streams per connection (the open loop's headroom)")
    p.add_argument("--duration", type=int, default=5, help="seconds per run")
    # Many short rounds: a route's p50 on a shared 2-core machine moves
    # between levels ~0.2 ms apart from one run to the next.
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="switchyard-ratelimit-bench-") as work:
        bench = Bench(args, work)
        try:
            base, admin = start(bench, args)
            # Warm-up: TLS sessions, and the shared rule's Redis connection,
            # which the first decisions set up (deciding locally meanwhile).
            for path in ROUTES.values():
                h2load(base + path, args, 2)
            count = metric(admin, "switchyard_ratelimit_redis_seconds_count")
            total = metric(admin, "switchyard_ratelimit_redis_seconds_sum")
            samples, fallbacks = rounds(base, admin, args)
            count = metric(admin, "switchyard_ratelimit_redis_seconds_count") - count
            rtt = (metric(admin, "switchyard_ratelimit_redis_seconds_sum") - total) / max(count, 1)
        finally:
            for proc in bench.procs.values():
                proc.stop()
        print(table(samples, fallbacks, rtt, args))


if __name__ == "__main__":
    main()
