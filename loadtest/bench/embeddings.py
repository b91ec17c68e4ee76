"""Embedding throughput and latency: switchyard-backend over HTTP against
sentence-transformers (PyTorch, CPU) in-process, on the same inputs.

Run through loadtest/bench/embeddings, which builds and starts the backend
and prepares the venv. Prints one table with our/PyTorch ratios.

PyTorch is measured as a perfect batching server would run it: at
concurrency c every round encodes c inputs in one call and each of them
waits the whole round, with whichever of its default thread count and one
thread is faster. It pays no HTTP, JSON or queueing cost, so the
comparison is tilted in its favour. Two modes for ours:

- concurrent: c clients, one input per request (the service as deployed,
  batching left to the backend; the Python clients share the CPU with it);
- batched: one client sending c inputs per request (the model path at batch
  size c, the closest match to what PyTorch is given).
"""

import argparse
import http.client
import json
import os
import statistics
import threading
import time

SHORT = "request {i} asks for a short embedding"
LONG = (
    "Request {i} carries a longer passage. A load balancer spreads incoming "
    "requests across a pool of servers, and when one of them slows down a "
    "least-connections policy sends new work to the others. Health checks take "
    "a failing server out of the pool until it recovers, and draining lets an "
    "operator remove a server without dropping the requests it is still "
    "serving. Canary releases shift a small share of traffic to a new version "
    "first and watch its error rate and latency before going further, rolling "
    "back on their own when the new version misbehaves in production."
)


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarise(latencies, elapsed):
    return {
        "eps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def best(a, b):
    return b if a is None or b["eps"] > a["eps"] else a


def bench_http(host, port, template, concurrency, seconds, per_request=1):
    """`concurrency` clients, each sending `per_request` inputs per request
    back to back. Every input in a request gets the request's latency."""
    latencies = []
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.2
    stop_at = start_at + seconds
    errors = []

    def client(worker):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        i = 0
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while True:
            texts = [template.format(i=(worker * 1_000_000 + i) * per_request + j)
                     for j in range(per_request)]
            body = json.dumps({"input": texts[0] if per_request == 1 else texts})
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            took = time.perf_counter() - t0
            if response.status != 200:
                errors.append((response.status, payload[:200]))
                break
            with lock:
                latencies.extend([took] * per_request)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"backend answered {errors[0][0]}: {errors[0][1]!r}")
    return summarise(latencies, seconds)


def bench_torch_best_threads(model, template, concurrency, seconds):
    """PyTorch with its default thread count and with one thread, keeping
    the faster: on a busy 2-core machine its spinning OpenMP threads can
    collapse, and a single thread is then the better PyTorch."""
    import torch

    default = torch.get_num_threads()
    result = None
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        figures = bench_torch(model, template, concurrency, seconds)
        figures["threads"] = threads
        result = best(result, figures)
    torch.set_num_threads(default)
    return result


def bench_torch(model, template, concurrency, seconds):
    latencies = []
    round_no = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        texts = [template.format(i=round_no * concurrency + j) for j in range(concurrency)]
        t0 = time.perf_counter()
        model.encode(texts, batch_size=concurrency, convert_to_numpy=True)
        took = time.perf_counter() - t0
        latencies.extend([took] * concurrency)
        round_no += 1
    return summarise(latencies, time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure each cell this many times and keep the best")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model_dir, device="cpu")
    tokens = {
        name: len(model.tokenizer(template.format(i=12345))["input_ids"])
        for name, template in (("short", SHORT), ("long", LONG))
    }
    model.encode([SHORT.format(i=0)] * 8)  # warm-up

    rows = []
    for name, template in (("short", SHORT), ("long", LONG)):
        bench_http("127.0.0.1", args.port, template, 4, 1.0)  # warm-up
        for c in levels:
            modes = [("concurrent", c, 1)] + ([("batched", 1, c)] if c > 1 else [])
            # Rounds alternate between the two sides, and each keeps its best
            # round, so a burst of other load on the machine hurts neither.
            torch_figures, ours = None, {}
            for _ in range(args.rounds):
                torch_figures = best(torch_figures,
                                     bench_torch_best_threads(model, template, c, args.seconds))
                for mode, clients, per_request in modes:
                    ours[mode] = best(ours.get(mode), bench_http(
                        "127.0.0.1", args.port, template, clients, args.seconds, per_request))
            for mode, _, _ in modes:
                rows.append({"input": name, "tokens": tokens[name], "concurrency": c,
                             "mode": mode, "ours": ours[mode], "torch": torch_figures})
                print_row(rows[-1], flush=True)

    print()
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, best of {args.rounds} rounds of {args.seconds:g}s per cell")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


HEADER_PRINTED = False


def print_row(row, flush=False):
    global HEADER_PRINTED
    if not HEADER_PRINTED:
        print(f"{'input':<6} {'tok':>4} {'conc':>4} {'mode':<10} | {'ours emb/s':>10} {'p50 ms':>7} "
              f"{'p99 ms':>7} | {'torch emb/s':>11} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'emb/s ours/pt':>13} {'p50 ours/pt':>11}")
        HEADER_PRINTED = True
    o, t = row["ours"], row["torch"]
    print(f"{row['input']:<6} {row['tokens']:>4} {row['concurrency']:>4} {row['mode']:<10} | "
          f"{o['eps']:>10.1f} {o['p50_ms']:>7.2f} {o['p99_ms']:>7.2f} | "
          f"{t['eps']:>11.1f} {t['p50_ms']:>7.2f} {t['p99_ms']:>7.2f} | "
          f"{o['eps'] / t['eps']:>12.2f}x {o['p50_ms'] / t['p50_ms']:>10.2f}x"
          f"  (torch threads {t['threads']})", flush=flush)


if __name__ == "__main__":
    main()
