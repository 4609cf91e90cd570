"""Encoder throughput: qeff_lab (compiled, embedded ONNX Runtime backend) vs sentence_transformers.encode.

Same sentences, same process, same batch size (32), same thread count; reported as a ratio.
Run: make bench   (or .venv/bin/python benchmarks/bench_encoder.py [--n 1024] [--repeats 3])
"""
from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = ("the a model device compiler token cache layer network fast small large graph tensor value memory "
         "river mountain city music history science language people time day night water light energy "
         "question answer result number system design table report input output").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 3 to 60 words (a spread like real short-text embedding workloads)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 5, 8, 12, 16, 24, 40, 60]))).capitalize() + "."
            for _ in range(n)]


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up (session creation, allocator)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from qeff_lab import QEFFAutoModel
    from qeff_lab.loading import resolve

    threads = torch.get_num_threads()
    os.environ["QEFF_LAB_THREADS"] = str(threads)
    texts = corpus(args.n)
    st = SentenceTransformer(str(resolve(MODEL).path), device="cpu")
    model = QEFFAutoModel.from_pretrained(MODEL, pooling="mean")
    model.compile(seq_len=[16, 24, 32, 48, 64, 96, 128], batch_size=args.batch_size)

    ours = model.embed(texts)
    ref = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)

    st_rate = best_rate(lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True), args.n, args.repeats)
    q_rate = best_rate(lambda: model.embed(texts), args.n, args.repeats)
    print(f"sentences: {args.n}, batch {args.batch_size}, threads {threads}, backend {model.compile_result.backend}")
    print(f"min cosine vs sentence-transformers: {cos.min():.6f}")
    print(f"sentence-transformers.encode: {st_rate:8.1f} sentences/s")
    print(f"qeff_lab (compiled):          {q_rate:8.1f} sentences/s")
    print(f"ratio qeff_lab / sentence-transformers: {q_rate / st_rate:.2f}x")


if __name__ == "__main__":
    main()
