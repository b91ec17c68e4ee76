#!/usr/bin/env python3
"""Side-by-side proxy benchmark: direct vs Switchyard vs nginx vs HAProxy.

Every contender fronts the same upstream (one nginx serving a fixed body on N
ports), runs one worker, logs no requests, keeps connections alive on both
sides, and is driven by the same load: wrk for HTTP/1.1, h2load for HTTP/2
over TLS. Rounds alternate the contender order so drift on a shared machine
hits all of them alike. Prints markdown tables with ratios to the best peer
and to direct.

Run it through loadtest/bench/proxy, which installs what this needs.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIGS = HERE / "configs"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = '{"object":"bench","data":"' + "x" * 172 + '"}'  # 200 bytes


def free_ports(n):
    """Reserves n distinct free loopback ports (bound then released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def render(template, out, **values):
    text = (CONFIGS / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    Path(out).write_text(text)
    return out


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_http_200(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                           capture_output=True, text=True)
        if r.stdout == "200":
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


class Proc:
    """A started server whose CPU time and peak RSS we can read from /proc."""

    def __init__(self, name, argv, log, env=None):
        self.name = name
        self.log = open(log, "wb")
        self.popen = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )

    def pids(self):
        """The process and its direct children (nginx's workers)."""
        pid = self.popen.pid
        found = [pid]
        try:
            for line in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                found.append(int(line))
        except OSError:
            pass
        return found

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
            except OSError:
                pass
        return total / CLK_TCK

    def status_mib(self, field):
        """A /proc/PID/status memory field (VmHWM, VmRSS), summed over pids()."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def peak_rss_mib(self):
        return self.status_mib("VmHWM")

    def stop(self):
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.log.close()


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": rps, "requests": total, "errors": errors, "p50": pct(50), "p99": pct(99)}


def run_wrk(url, conns, seconds, script=None):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    if script:
        argv[1:1] = ["-s", script]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_h2load(out, log):
    """h2load's summary gives req/s and counts but no percentiles, so p50/p99
    come from its per-request log (third column: microseconds from a stream's
    start to the end of its response)."""
    if not re.search(r"^Application protocol: h2$", out, re.M):
        raise RuntimeError(f"h2load did not negotiate h2:\n{out}")
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    micros = sorted(int(line.split("\t")[2]) for line in open(log))

    def pct(p):  # nearest rank
        return micros[max(0, -(-len(micros) * p // 100) - 1)] / 1000

    # done = succeeded + failed; every one not answered 2xx is an error
    return {"rps": rps, "requests": done, "errors": done - ok, "p50": pct(50), "p99": pct(99)}


def run_burst(url, args):
    """wrk on args.burst_open connections for args.duration seconds, while
    two bursts, at a third and two thirds of the way, each open
    args.burst_new new TLS connections (wrk -c for 1 s): the open
    connections' latency while the contender does the burst's handshakes.
    The bursting client runs in its own process, so its own handshakes do
    not stall the measuring client's event loop (a single wrk opening 256
    TLS connections measures mostly itself in its first tenth of a second)."""
    argv = ["wrk", "-t1", f"-c{args.burst_open}", f"-d{args.duration}s", "--latency", url]
    steady = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        time.sleep(max(0.0, args.duration / 3 - 0.5))
        subprocess.run(["wrk", "-t1", f"-c{args.burst_new}", "-d1s", url],
                       capture_output=True, check=True)
    out, _ = steady.communicate()
    return parse_wrk(out)


def run_h2load(url, args):
    """HTTP/2 only (no fallback to HTTP/1.1 by ALPN), for args.duration seconds."""
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".tsv") as log:
        argv = ["h2load", "--npn-list=h2", "-c", str(args.h2_clients),
                "-m", str(args.h2_streams), "-t", str(args.h2_threads),
                "-D", str(args.duration), "--log-file", log.name, url]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return parse_h2load(out, log.name)


def run_oha_rate(url, conns, seconds, rate):
    """Latency at a fixed offered rate (wrk cannot hold a rate)."""
    argv = ["oha", "--no-tui", "--output-format", "json", "--insecure",
            "-c", str(conns), "-z", f"{seconds}s", "-q", str(rate), url]
    data = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    pct = data["latencyPercentiles"]
    return {"rps": data["summary"]["requestsPerSec"], "p50": pct["p50"] * 1000,
            "p99": pct["p99"] * 1000}


# The ports each set of contenders listens on: plain HTTP and TLS per proxy,
# and Switchyard's admin listener.
CONTENDER_PORTS = ("nginx_h", "nginx_t", "haproxy_h", "haproxy_t", "sy_h", "sy_t", "sy_a")


def contender_commands(d, upstreams, ports, args):
    """Writes the three proxies' configs for a pool of upstream ports into d;
    returns name -> (argv, env) to start each one. args names the
    Switchyard binary and the TLS cert and key every contender serves."""
    cert, key = args.cert, args.key
    ngx = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    render("nginx.conf.tmpl", d / "nginx.conf", DIR=d, SERVERS=ngx,
           HTTP=f"127.0.0.1:{ports['nginx_h']}", TLS=f"127.0.0.1:{ports['nginx_t']}",
           CERT=cert, KEY=key)
    (d / "haproxy-cert.pem").write_text(Path(cert).read_text() + Path(key).read_text())
    hap = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))
    render("haproxy.cfg.tmpl", d / "haproxy.cfg", DIR=d, SERVERS=hap,
           HTTP=f"127.0.0.1:{ports['haproxy_h']}", TLS=f"127.0.0.1:{ports['haproxy_t']}")
    return {
        "nginx": (["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)], None),
        "haproxy": (["haproxy", "-db", "-f", str(d / "haproxy.cfg")], None),
        "switchyard": switchyard_command(d, upstreams, ports, args),
    }


def switchyard_command(d, upstreams, ports, args, extra=""):
    """Switchyard's contender config in d (ports sy_h, sy_t, sy_a) in front
    of `upstreams`, with `extra` TOML appended; returns (argv, env)."""
    sy = ",\n".join(f'  {{ address = "127.0.0.1:{p}", weight = 1 }}' for p in upstreams)
    conf = render("switchyard.toml.tmpl", d / "switchyard.toml", DIR=d, SERVERS=sy,
                  HTTP=f"127.0.0.1:{ports['sy_h']}", TLS=f"127.0.0.1:{ports['sy_t']}",
                  ADMIN=f"127.0.0.1:{ports['sy_a']}", CERT=args.cert, KEY=args.key)
    with open(conf, "a") as f:
        f.write(extra)
    return [args.switchyard, "run", "--config", str(conf)], dict(os.environ, RUST_LOG="warn")


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.work = Path(work)
        self.procs = {}
        self.ports = {}

    def start_upstream(self, n):
        ports = free_ports(n)
        listens = "\n".join(f"        listen 127.0.0.1:{p} reuseport backlog=4096;" for p in ports)
        conf = render("upstream-nginx.conf.tmpl", self.work / "upstream.conf",
                      DIR=self.work, LISTENS=listens, BODY=BODY)
        self.procs["upstream"] = Proc("upstream", ["nginx", "-c", conf, "-p", str(self.work)],
                                      self.work / "upstream.log")
        wait_port(ports[-1])
        return ports

    def start_contenders(self, upstreams, tag):
        ports = dict(zip(CONTENDER_PORTS, free_ports(len(CONTENDER_PORTS))))
        d = self.work / tag
        d.mkdir(exist_ok=True)
        procs = {name: Proc(name, argv, d / f"{name}.log", env=env)
                 for name, (argv, env) in contender_commands(d, upstreams, ports,
                                                             self.args).items()}
        for port in ports.values():
            wait_port(port)
        # Switchyard gates new backends until `rise` health checks pass.
        wait_http_200(f"http://127.0.0.1:{ports['sy_h']}/")
        time.sleep(3)  # let every backend of a large pool pass its rise checks too
        return procs, ports


def urls(ports, upstream_port, scheme):
    """Plain HTTP for "http", else the TLS listeners ("https", "h2")."""
    if scheme == "http":
        return {
            "direct": f"http://127.0.0.1:{upstream_port}/",
            "switchyard": f"http://127.0.0.1:{ports['sy_h']}/",
            "nginx": f"http://127.0.0.1:{ports['nginx_h']}/",
            "haproxy": f"http://127.0.0.1:{ports['haproxy_h']}/",
        }
    return {
        "switchyard": f"https://127.0.0.1:{ports['sy_t']}/",
        "nginx": f"https://127.0.0.1:{ports['nginx_t']}/",
        "haproxy": f"https://127.0.0.1:{ports['haproxy_t']}/",
    }


def throughput_rounds(bench, procs, ports, upstream_port, scheme, args, skip=(), label=None,
                      load=None):
    """Alternates contender order each round; returns per-contender medians.
    `load(url)` runs one contender's round, by default h2load for "h2" and
    wrk otherwise."""
    targets = urls(ports, upstream_port, scheme)
    names = [n for n in targets if n not in skip]
    samples = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            proc = procs.get(name, bench.procs["upstream"])
            cpu0 = proc.cpu_seconds()
            if load:
                res = load(targets[name])
            elif scheme == "h2":
                res = run_h2load(targets[name], args)
            else:
                res = run_wrk(targets[name], args.connections, args.duration)
            res["cpu_per_10k"] = (proc.cpu_seconds() - cpu0) / max(res["requests"], 1) * 10000
            samples[name].append(res)
            print(f"  {label or scheme} round {r + 1} {name}: {res['rps']:.0f} req/s "
                  f"p50 {res['p50']:.2f} ms p99 {res['p99']:.2f} ms errors {res['errors']}",
                  file=sys.stderr)
    out = {}
    for name, rows in samples.items():
        out[name] = {k: statistics.median(row[k] for row in rows)
                     for k in ("rps", "p50", "p99", "cpu_per_10k")}
        out[name]["errors"] = sum(row["errors"] for row in rows)
        proc = procs.get(name, bench.procs["upstream"])
        out[name]["rss"] = proc.peak_rss_mib()
    return out


def throughput_table(title, res):
    peers = [n for n in ("nginx", "haproxy") if n in res]
    best = max(peers, key=lambda n: res[n]["rps"])
    lines = [f"### {title}", "",
             f"best peer: {best}; medians of the rounds; CPU = proxy process user+sys "
             "seconds per 10k requests (for direct: the upstream's)", "",
             "| contender | req/s | vs best peer | vs direct | p50 ms | p99 ms | p99 vs best "
             "| CPU s/10k | CPU vs best | peak RSS MiB | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        direct = res.get("direct")
        vs_direct = f"{r['rps'] / direct['rps']:.3f}" if direct else "–"
        b = res[best]
        cpu_ratio = r["cpu_per_10k"] / b["cpu_per_10k"] if b["cpu_per_10k"] else float("nan")
        lines.append(
            f"| {name} | {r['rps']:.0f} | {r['rps'] / b['rps']:.3f} | {vs_direct} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['p99'] / b['p99']:.2f} | "
            f"{r['cpu_per_10k']:.3f} | {cpu_ratio:.2f} | {r['rss']:.1f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def fixed_rate(ports, upstream_port, best_rps, args):
    rate = int(best_rps * args.rate_fraction)
    targets = urls(ports, upstream_port, "http")
    lines = [f"### Added latency at a fixed {rate} req/s ({args.rate_fraction:.0%} of the best "
             "peer's plain-HTTP maximum), oha", "",
             "| contender | achieved req/s | p50 ms | p99 ms | p50 added vs direct ms "
             "| p99 added vs direct ms |", "|---|---|---|---|---|---|"]
    rows = {n: run_oha_rate(u, args.connections, args.duration, rate) for n, u in targets.items()}
    d = rows["direct"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | "
                     f"{r['p50'] - d['p50']:+.3f} | {r['p99'] - d['p99']:+.3f} |")
    return "\n".join(lines) + "\n"


def bench_parser(doc):
    """The options every bench script takes: the proxy binary and its TLS cert."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switchyard", default=str(ROOT / "target/dist/switchyard"),
                   help="the proxy binary (default: the dist profile's build)")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    return p


def main():
    p = bench_parser(__doc__)
    p.add_argument("--connections", type=int, default=64, help="wrk -c (the HTTP/1.1 runs)")
    p.add_argument("--duration", type=int, default=10, help="seconds per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate-fraction", type=float, default=0.5)
    p.add_argument("--scale", default="3,30,300", help="pool sizes for the selection-cost runs")
    p.add_argument("--skip-rate", action="store_true", help="skip the oha fixed-rate runs")
    p.add_argument("--h2-clients", type=int, default=16, help="h2load -c: connections")
    p.add_argument("--h2-streams", type=int, default=4,
                   help="h2load -m: concurrent streams per connection")
    p.add_argument("--h2-threads", type=int, default=1, help="h2load -t: client threads")
    p.add_argument("--h2-only", action="store_true",
                   help="only the HTTP/2 over TLS table (no HTTP/1.1, fixed-rate or "
                   "pool-size runs)")
    p.add_argument("--tls-burst-only", action="store_true",
                   help="only the TLS-burst table: latency on open TLS connections while "
                   "another client opens new ones")
    p.add_argument("--burst-open", type=int, default=32,
                   help="the burst table's open connections (wrk -c)")
    p.add_argument("--burst-new", type=int, default=256,
                   help="new TLS connections per burst (wrk -c for 1 s, twice per run)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="switchyard-bench-") as work:
        bench = Bench(args, work)
        sizes = [int(s) for s in args.scale.split(",")]
        few = args.h2_only or args.tls_burst_only
        upstreams = bench.start_upstream(3 if few else max(sizes))
        wrk = "" if few else f"{args.connections} wrk connections, "
        report = [f"## Proxy benchmark ({time.strftime('%Y-%m-%d %H:%M')} UTC, "
                  f"{os.cpu_count()} CPUs, {wrk}{args.duration}s x {args.rounds} rounds, "
                  f"{len(BODY)}-byte body)", ""]
        try:
            if args.tls_burst_only:
                report.append(burst_runs(bench, upstreams, args))
            else:
                if not args.h2_only:
                    report += http1_runs(bench, upstreams, sizes, args)
                report.append(h2_runs(bench, upstreams, args))
        finally:
            for proc in bench.procs.values():
                proc.stop()
        print("\n".join(report))


def http1_runs(bench, upstreams, sizes, args):
    """The HTTP/1.1 tables: plain, TLS, fixed rate, pool size."""
    report = []
    procs, ports = bench.start_contenders(upstreams[:3], "pool3")
    try:
        plain = throughput_rounds(bench, procs, ports, upstreams[0], "http", args)
        report.append(throughput_table("Plain HTTP/1.1, 3 backends", plain))
        tls = throughput_rounds(bench, procs, ports, upstreams[0], "https", args)
        report.append(throughput_table("TLS (HTTP/1.1 over TLS), 3 backends", tls))
        if not args.skip_rate:
            best = max(plain["nginx"]["rps"], plain["haproxy"]["rps"])
            report.append(fixed_rate(ports, upstreams[0], best, args))
    finally:
        for proc in procs.values():
            proc.stop()
    report.append(scale_runs(bench, upstreams, sizes, args))
    return report


def h2_runs(bench, upstreams, args):
    """HTTP/2 over TLS against fresh contenders, so peak RSS is the h2 runs' own."""
    procs, ports = bench.start_contenders(upstreams[:3], "pool3-h2")
    try:
        res = throughput_rounds(bench, procs, ports, upstreams[0], "h2", args)
    finally:
        for proc in procs.values():
            proc.stop()
    return throughput_table(f"HTTP/2 over TLS, 3 backends (h2load -c {args.h2_clients} "
                            f"-m {args.h2_streams} -t {args.h2_threads})", res)


def burst_runs(bench, upstreams, args):
    """TLS handshake bursts against fresh contenders ([`run_burst`])."""
    procs, ports = bench.start_contenders(upstreams[:3], "pool3-burst")
    try:
        res = throughput_rounds(bench, procs, ports, upstreams[0], "https", args,
                                label="burst", load=lambda url: run_burst(url, args))
    finally:
        for proc in procs.values():
            proc.stop()
    return throughput_table(f"Open TLS connections during handshake bursts, 3 backends "
                            f"(wrk -c {args.burst_open}; twice, {args.burst_new} new TLS "
                            f"connections for 1 s)", res)


def scale_runs(bench, upstreams, sizes, args):
    """Selection cost as the pool grows: the same rounds per size."""
    names = ("switchyard", "nginx", "haproxy")
    lines = ["### Pool size (plain HTTP, medians of the rounds; ratio to the same "
             f"contender at {sizes[0]} backends)", "",
             "| backends | " + " | ".join(f"{n} req/s | {n} CPU s/10k" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    base = {}
    for n in sizes:
        procs, ports = bench.start_contenders(upstreams[:n], f"pool{n}-scale")
        try:
            res = throughput_rounds(bench, procs, ports, upstreams[0], "http", args,
                                    skip=("direct",), label=f"pool {n}")
        finally:
            for proc in procs.values():
                proc.stop()
        cells = []
        for name in names:
            rps, cpu = res[name]["rps"], res[name]["cpu_per_10k"]
            b_rps, b_cpu = base.setdefault(name, (rps, cpu))
            cells += [f"{rps:.0f} ({rps / b_rps:.2f})", f"{cpu:.3f} ({cpu / b_cpu:.2f})"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
