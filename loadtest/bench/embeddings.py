"""Embedding throughput and latency: switchyard-backend over HTTP against
ONNX Runtime (the anchor) and sentence-transformers on PyTorch, both
in-process, on the same inputs, in the same run.

Run through loadtest/bench/embeddings, which builds and starts the backend
and prepares the venv. Prints one table per cell with every engine's ratio
to ONNX Runtime fp32.

ONNX Runtime runs a graph exported here from the same weights
(torch.onnx.export of the model directory's BertModel), fused by ORT's
transformer optimiser and run with full graph optimisation, with as many
intra-op threads as the backend has (--threads) and with one, keeping the
faster in each round (PyTorch likewise with its default and one thread),
tokenised by the same fast tokenizer and mean-pooled and normalised in
numpy, as sentence-transformers' ONNX backend does. Its int8 variant
(dynamic quantisation, per-channel int8 weights) is a reference row, with
its cosine to fp32.

The in-process engines are measured as a perfect batching server would run
them: at concurrency c every call encodes c inputs and each of them waits
the whole call. They pay no HTTP, JSON or queueing cost, so the comparison
is tilted in their favour. Two modes for ours:

- concurrent: c clients, one input per request (the service as deployed,
  batching left to the backend; the Python clients share the CPU with it);
- wrk: the same load from wrk (c connections on one C thread, every input
  distinct), a client that leaves the backend most of the CPU;
- batched: one client sending c inputs per request (the model path at batch
  size c, the closest match to what the in-process engines are given).

Each cell runs --rounds rounds; every round measures every engine once, in
turn, so a burst of other load on the machine hits all of them alike, and
each figure is the median over the rounds.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np

from proxy_bench import run_wrk

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
ANCHOR = "ORT fp32"


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


def median_of(rounds):
    figures = {key: statistics.median(r[key] for r in rounds) for key in ("eps", "p50_ms", "p99_ms")}
    extra = [r["threads"] for r in rounds if "threads" in r]
    if extra:
        figures["threads"] = "/".join(str(t) for t in extra)
    return figures


def embed_http(host, port, texts):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/embeddings", json.dumps({"input": texts}),
                 {"content-type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise SystemExit(f"backend answered {response.status}: {body}")
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


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


# wrk script: one input per request, numbered by a counter so that every
# input is distinct, as in bench_http.
WRK_SCRIPT = '''
local i = 0
request = function()
  i = i + 1
  local body = string.format(%s, i)
  return wrk.format("POST", "/v1/embeddings", {["content-type"] = "application/json"}, body)
end
'''


def bench_wrk(host, port, template, concurrency, seconds):
    """`concurrency` wrk connections, one input per request; every input
    gets its request's latency."""
    assert "%" not in template, "the template becomes a Lua format string"
    body = json.dumps({"input": template.replace("{i}", "%d")})
    lua_format = '"' + body.replace("\\", "\\\\").replace('"', '\\"') + '"'
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % lua_format)
        script.flush()
        result = run_wrk(f"http://{host}:{port}/v1/embeddings", concurrency,
                         max(1, round(seconds)), script.name)
    if result["errors"]:
        raise SystemExit(f"wrk saw {result['errors']} failed requests")
    return {"eps": result["rps"], "p50_ms": result["p50"], "p99_ms": result["p99"]}


def bench_in_process(encode, template, concurrency, seconds):
    """Calls `encode(texts)` on `concurrency` fresh inputs at a time, back
    to back; each input's latency is its call's."""
    latencies = []
    round_no = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        texts = [template.format(i=round_no * concurrency + j) for j in range(concurrency)]
        t0 = time.perf_counter()
        encode(texts)
        took = time.perf_counter() - t0
        latencies.extend([took] * concurrency)
        round_no += 1
    return summarise(latencies, time.perf_counter() - started)


def faster(result, figures, threads):
    figures["threads"] = threads
    return figures if result is None or figures["eps"] > result["eps"] else result


class Torch:
    """sentence-transformers on PyTorch, with whichever of its default
    thread count and one thread is faster in each round: on a busy 2-core
    machine its spinning OpenMP threads can collapse, and a single thread is
    then the better PyTorch."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.default_threads = torch.get_num_threads()

    def bench(self, template, concurrency, seconds):
        result = None
        for threads in sorted({self.default_threads, 1}, reverse=True):
            self.torch.set_num_threads(threads)
            result = faster(result, bench_in_process(
                lambda texts: self.model.encode(texts, batch_size=concurrency, convert_to_numpy=True),
                template, concurrency, seconds), threads)
        self.torch.set_num_threads(self.default_threads)
        return result


class Onnx:
    """One graph in two ONNX Runtime sessions, with the backend's thread
    budget and with one thread, keeping the faster in each round, for the
    same reason as PyTorch: never more threads than ours, never a collapse
    that would flatter us."""

    def __init__(self, path, tokenizer, max_length, threads):
        self.sessions = {n: OnnxModel(path, tokenizer, max_length, n) for n in sorted({threads, 1}, reverse=True)}
        self.main = self.sessions[threads]

    def encode(self, texts):
        return self.main.encode(texts)

    def bench(self, template, concurrency, seconds):
        result = None
        for threads, session in self.sessions.items():
            result = faster(result, bench_in_process(session.encode, template, concurrency, seconds), threads)
        return result


class OnnxModel:
    """One ONNX graph in an ONNX Runtime session, tokenised and pooled as
    sentence-transformers does (mean over real tokens, L2-normalised)."""

    def __init__(self, path, tokenizer, max_length, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Keeps the optimised graph, to report which fusions ORT applied.
        self.optimized_path = path + ".optimized.onnx"
        options.optimized_model_filepath = self.optimized_path
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, texts):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        feeds = {name: batch[name].astype(np.int64) for name in self.inputs}
        hidden = self.session.run(None, feeds)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def fused_ops(self):
        import onnx

        graph = onnx.load(self.optimized_path).graph
        counts = {}
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class LastHiddenState:
    """BertModel with positional inputs and one output, for the exporter."""

    def __new__(cls, model):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        return Wrapped().eval()


def export_onnx(model_dir, out_dir):
    """fp32: the model directory's weights as they are, fused by ORT's
    transformer optimiser; int8: the same graph
    with dynamic quantisation (int8 weights per output channel, activations
    quantised at run time), ORT's usual CPU recipe. The eager attention
    exports as the MatMul/Softmax pattern that ORT's attention fusion
    recognises."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    from onnxruntime.transformers.optimizer import optimize_model

    exported = os.path.join(out_dir, "model-exported.onnx")
    fp32 = os.path.join(out_dir, "model-fp32.onnx")
    int8 = os.path.join(out_dir, "model-int8.onnx")
    model = LastHiddenState(AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval())
    ids = torch.ones((2, 8), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), exported,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    # ORT's offline transformer fusions (attention, skip layer norm, bias
    # GELU, embedding layer norm), as optimum's O2-O3 levels apply them; the
    # session then adds its own (ORT_ENABLE_ALL).
    config = model.model.config
    optimize_model(exported, model_type="bert", num_heads=config.num_attention_heads,
                   hidden_size=config.hidden_size).save_model_to_file(fp32)
    # The quantiser takes the unfused graph (it cannot type the fused ops).
    quantize_dynamic(exported, int8, weight_type=QuantType.QInt8, per_channel=True)
    return fp32, int8


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def agreement(engines, st_model, host, port, texts):
    """Every engine's cosine to ORT fp32 and to sentence-transformers on
    `texts`, each encoded one at a time and as one batch."""
    reference = {
        "ST": np.stack([st_model.encode([t], convert_to_numpy=True)[0] for t in texts]),
        ANCHOR: np.concatenate([engines[ANCHOR].encode([t]) for t in texts]),
    }
    candidates = {
        "ours single": np.concatenate([embed_http(host, port, [t]) for t in texts]),
        "ours batched": embed_http(host, port, texts),
        "ORT fp32 batched": engines[ANCHOR].encode(texts),
        "ORT int8": np.concatenate([engines["ORT int8"].encode([t]) for t in texts]),
    }
    lines = {}
    for name, vectors in candidates.items():
        lines[name] = {ref: {"min": float(cosines(vectors, r).min()), "mean": float(cosines(vectors, r).mean())}
                       for ref, r in reference.items()}
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="ONNX Runtime's intra-op threads: the backend's --threads")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measure each cell this many times, alternating engines; report medians")
    parser.add_argument("--reference", help="JSON file with a 'sentences' list of {text} for the agreement check")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(args.model_dir, device="cpu")
    onnx_dir = tempfile.mkdtemp(prefix="switchyard-onnx-")
    try:
        run(args, levels, st_model, onnx_dir)
    finally:
        shutil.rmtree(onnx_dir, ignore_errors=True)


def run(args, levels, st_model, onnx_dir):
    import onnxruntime
    import torch

    tokenizer, max_length = st_model.tokenizer, st_model.max_seq_length
    tokens = {
        name: len(tokenizer(template.format(i=12345))["input_ids"])
        for name, template in (("short", SHORT), ("long", LONG))
    }
    fp32_path, int8_path = export_onnx(args.model_dir, onnx_dir)
    engines = {
        ANCHOR: Onnx(fp32_path, tokenizer, max_length, args.threads),
        "ORT int8": Onnx(int8_path, tokenizer, max_length, args.threads),
    }
    for name, engine in engines.items():
        top = ", ".join(f"{op} {n}" for op, n in list(engine.main.fused_ops().items())[:8])
        print(f"{name} graph after optimisation: {top}")
    torch_engine = Torch(st_model)

    texts = [SHORT.format(i=7), LONG.format(i=7)]
    if args.reference:
        with open(args.reference) as f:
            texts += [s["text"] for s in json.load(f)["sentences"]]
    agree = agreement(engines, st_model, "127.0.0.1", args.port, texts)
    print(f"\ncosine on {len(texts)} texts (min / mean):")
    for name, refs in agree.items():
        print(f"  {name:<17} " + "   ".join(
            f"vs {ref}: {v['min']:.7f} / {v['mean']:.7f}" for ref, v in refs.items()))
    print()

    contenders = {
        ANCHOR: lambda template, c: engines[ANCHOR].bench(template, c, args.seconds),
        "ORT int8": lambda template, c: engines["ORT int8"].bench(template, c, args.seconds),
        "PyTorch": lambda template, c: torch_engine.bench(template, c, args.seconds),
        "ours concurrent": lambda template, c: bench_http(
            "127.0.0.1", args.port, template, c, args.seconds, 1),
        "ours wrk": lambda template, c: bench_wrk(
            "127.0.0.1", args.port, template, c, args.seconds),
        "ours batched": lambda template, c: bench_http(
            "127.0.0.1", args.port, template, 1, args.seconds, c),
    }

    rows = []
    for name, template in (("short", SHORT), ("long", LONG)):
        bench_http("127.0.0.1", args.port, template, 4, 1.0)  # warm-up
        for engine in engines.values():
            for session in engine.sessions.values():
                session.encode([template.format(i=0)] * 8)
        for c in levels:
            names = [n for n in contenders if not (n == "ours batched" and c == 1)]
            rounds = {n: [] for n in names}
            for _ in range(args.rounds):
                for n in names:
                    rounds[n].append(contenders[n](template, c))
            figures = {n: median_of(rounds[n]) for n in names}
            for n in names:
                rows.append({"input": name, "tokens": tokens[name], "concurrency": c, "engine": n,
                             **figures[n], "vs_anchor_eps": figures[n]["eps"] / figures[ANCHOR]["eps"],
                             "vs_anchor_p50": figures[n]["p50_ms"] / figures[ANCHOR]["p50_ms"],
                             "rounds": rounds[n]})
                print_row(rows[-1])
            print(flush=True)

    ort_threads = " or ".join(str(n) for n in engines[ANCHOR].sessions)
    print(f"cores: {os.cpu_count()}, backend threads: {args.threads}, ORT intra-op threads: "
          f"{ort_threads}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__} "
          f"(threads {torch_engine.default_threads} or 1), "
          f"median of {args.rounds} alternating rounds of {args.seconds:g}s per cell")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "cosine": agree}, f, indent=1)


HEADER_PRINTED = False


def print_row(row):
    global HEADER_PRINTED
    if not HEADER_PRINTED:
        print(f"{'input':<6} {'tok':>4} {'conc':>4} {'engine':<16} | {'emb/s':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} | {'emb/s vs ORT':>12} {'p50 vs ORT':>10}")
        HEADER_PRINTED = True
    threads = f"  (threads {row['threads']})" if "threads" in row else ""
    print(f"{row['input']:<6} {row['tokens']:>4} {row['concurrency']:>4} {row['engine']:<16} | "
          f"{row['eps']:>8.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} | "
          f"{row['vs_anchor_eps']:>11.2f}x {row['vs_anchor_p50']:>9.2f}x{threads}")


if __name__ == "__main__":
    main()
