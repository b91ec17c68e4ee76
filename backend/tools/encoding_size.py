"""What encoding_format "base64" saves over JSON floats, against a running
backend: response bytes per request, and the server's own time per request
(from switchyard_embed_request_duration_seconds) with every input a cache
hit, so that the time is lookup plus serialisation rather than inference.

Run through backend/tools/encoding-bench, which starts Redis and the
backend. Standard library only.
"""

import argparse
import http.client
import json
import re
import time
import urllib.parse

DURATION = re.compile(
    r"^switchyard_embed_request_duration_seconds_(sum|count) (\S+)$", re.M
)


def server_totals(conn):
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    found = dict(DURATION.findall(text))
    return float(found["sum"]), float(found["count"])


def one_request(conn, body):
    started = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise SystemExit(f"status {response.status}: {payload[:200]!r}")
    return len(payload), elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:9100")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks")
    parser.add_argument("--per-round", type=int, default=20, help="requests per block")
    args = parser.parse_args()

    url = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    texts = [f"request {i} asks for a short embedding" for i in range(args.inputs)]
    bodies = {
        fmt: json.dumps({"input": texts, "encoding_format": fmt})
        for fmt in ("float", "base64")
    }
    # The first request fills the cache; the rest are all hits.
    for body in bodies.values():
        one_request(conn, body)

    stats = {fmt: {"bytes": 0, "client": [], "server": 0.0, "n": 0} for fmt in bodies}
    for _ in range(args.rounds):
        for fmt, body in bodies.items():
            before = server_totals(conn)
            for _ in range(args.per_round):
                size, elapsed = one_request(conn, body)
                stats[fmt]["bytes"] = size
                stats[fmt]["client"].append(elapsed)
            after = server_totals(conn)
            stats[fmt]["server"] += after[0] - before[0]
            stats[fmt]["n"] += int(after[1] - before[1])

    print(f"{args.inputs} inputs per request, all cache hits, "
          f"{args.rounds} x {args.per_round} requests per format")
    print("| encoding_format | response bytes | server ms/request (mean) | client ms/request (median) |")
    print("|---|---|---|---|")
    rows = {}
    for fmt, s in stats.items():
        client = sorted(s["client"])[len(s["client"]) // 2] * 1e3
        server = s["server"] / s["n"] * 1e3
        rows[fmt] = (s["bytes"], server, client)
        print(f"| {fmt} | {s['bytes']} | {server:.3f} | {client:.3f} |")
    f, b = rows["float"], rows["base64"]
    print(f"base64/float: bytes {b[0] / f[0]:.3f}x, server time {b[1] / f[1]:.3f}x, "
          f"client time {b[2] / f[2]:.3f}x")


if __name__ == "__main__":
    main()
