#!/usr/bin/env python3
"""End-to-end overhead a client pays: embeddings through Switchyard over TLS
against the same backend called directly over plain HTTP.

One switchyard-backend (real model, cache off) behind one Switchyard whose
pool holds just that backend; wrk drives both paths with the same POST, at
each concurrency, in alternating order. Run it through loadtest/bench/e2e.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import os

from proxy_bench import CONFIGS, ROOT, Proc, free_ports, render, run_wrk, wait_http_200, wait_port


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--switchyard", default=str(ROOT / "target/dist/switchyard"))
    p.add_argument("--backend", default=str(ROOT / "target/release/switchyard-backend"))
    p.add_argument("--model-dir", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    p.add_argument("--concurrency", default="8,32")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="switchyard-e2e-") as work:
        work = Path(work)
        backend_port, tls, http, admin = free_ports(4)
        quiet = dict(os.environ, RUST_LOG="warn")  # no access log on either path
        procs = [Proc("backend", [args.backend, "--listen", f"127.0.0.1:{backend_port}",
                                  "--model-dir", args.model_dir, "--version", "bench"],
                      work / "backend.log", env=quiet)]
        try:
            wait_http_200(f"http://127.0.0.1:{backend_port}/health/ready", timeout=180)
            render("switchyard.toml.tmpl", work / "switchyard.toml", DIR=work,
                   SERVERS=f'  {{ address = "127.0.0.1:{backend_port}", weight = 1 }}',
                   HTTP=f"127.0.0.1:{http}", TLS=f"127.0.0.1:{tls}",
                   ADMIN=f"127.0.0.1:{admin}", CERT=args.cert, KEY=args.key)
            procs.append(Proc("switchyard", [args.switchyard, "run", "--config",
                                             str(work / "switchyard.toml")],
                              work / "switchyard.log", env=quiet))
            wait_port(tls)
            print(table(args, backend_port, tls))
        finally:
            for proc in reversed(procs):
                proc.stop()


def table(args, backend_port, tls):
    urls = {"direct (http)": f"http://127.0.0.1:{backend_port}/v1/embeddings",
            "switchyard (https)": f"https://127.0.0.1:{tls}/v1/embeddings"}
    script = str(CONFIGS / "post-embedding.lua")
    lines = ["### Embeddings end to end: through Switchyard over TLS vs direct", "",
             "| concurrency | path | req/s | vs direct | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for conns in (int(c) for c in args.concurrency.split(",")):
        samples = {name: [] for name in urls}
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                res = run_wrk(urls[name], conns, args.duration, script=script)
                samples[name].append(res)
                print(f"  c={conns} round {r + 1} {name}: {res['rps']:.0f} req/s", file=sys.stderr)
        med = {n: {k: statistics.median(s[k] for s in rows) for k in ("rps", "p50", "p99")}
               for n, rows in samples.items()}
        direct = med["direct (http)"]["rps"]
        for name, m in med.items():
            errors = sum(s["errors"] for s in samples[name])
            lines.append(f"| {conns} | {name} | {m['rps']:.0f} | {m['rps'] / direct:.3f} | "
                         f"{m['p50']:.2f} | {m['p99']:.2f} | {errors} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
