"""Embed a fixed set of sentences with sentence-transformers and write them,
with their token counts, as the reference for backend/tests/real_model.rs.

Run through scripts/record-reference, which prepares the venv and model.
"""

import argparse
import json
import platform

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

# Short and long, ASCII and not, and one far past max_seq_length (256) so the
# reference pins truncation too.
SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Switchyard routes embedding requests to the least busy backend.",
    "Café au lait, naïve résumé, déjà vu: 東京 and Zürich are cities.",
    "UPPERCASE and MiXeD case TEXT with numbers 12345 and symbols #@!",
    (
        "A load balancer spreads incoming requests across a pool of servers. "
        "When one of them slows down, a least-connections policy sends new work "
        "to the others, and a health check takes a failing server out of the "
        "pool until it recovers. Draining lets an operator remove a server "
        "without dropping the requests it is still serving."
    ),
    " ".join(
        f"Sentence number {i} talks about trains, tracks, signals and the "
        f"yard where carriages number {i * 7} are sorted."
        for i in range(40)
    ),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = SentenceTransformer(args.model_dir, device="cpu")
    embeddings = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    encoded = model.tokenizer(SENTENCES, truncation=True, max_length=model.max_seq_length)

    record = {
        "model": "all-MiniLM-L6-v2",
        "max_seq_length": model.max_seq_length,
        "recorded_with": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "sentences": [
            {
                "text": text,
                "tokens": len(ids),
                "embedding": [float(x) for x in vector],
            }
            for text, ids, vector in zip(SENTENCES, encoded["input_ids"], embeddings)
        ],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False, indent=1)
        f.write("\n")
    lengths = ", ".join(str(s["tokens"]) for s in record["sentences"])
    print(f"wrote {len(SENTENCES)} reference vectors to {args.out} (tokens: {lengths})")


if __name__ == "__main__":
    main()
