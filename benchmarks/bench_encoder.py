"""Encoder throughput: qeff_lab (compiled, embedded ONNX Runtime backend) vs sentence_transformers.encode.

Same sentences (a mix of lengths), same process, same batch size (32), same thread count; qeff_lab compiled with
device-style seq_len buckets (each batch padded to the smallest bucket that fits). Reported as a ratio, each
rate measured until two consecutive medians agree within 5% (benchmarks/_machine.py) or saying it could not,
with the machine line (CPU, threads, load average before and after), and the bound on this machine: the graph's
weight MatMuls alone in ONNX Runtime on the same rows (benchmarks/_floors.py).
Run: make bench   (or .venv/bin/python benchmarks/bench_encoder.py [--n 1024] [--per-round 3] [--max-rounds 5])
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _floors import MatMulFloor
from _machine import Machine, measure_until_stable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SEQ_LENS = [16, 24, 32, 48, 64, 96, 128]  # the device-style seq_len buckets each batch is padded to
WORDS = ("the a model device compiler token cache layer network fast small large graph tensor value memory "
         "river mountain city music history science language people time day night water light energy "
         "question answer result number system design table report input output").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 3 to 60 words (a spread like real short-text embedding workloads)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 5, 8, 12, 16, 24, 40, 60]))).capitalize() + "."
            for _ in range(n)]


def rate(fn, n: int):
    """One sample: sentences/s of one call of fn over the n sentences."""
    def sample() -> float:
        t = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t)
    return sample


def matmul_rows(model, texts: list[str], packed: bool) -> list[int]:
    """The rows each batch of model.embed(texts) gives its weight MatMuls (embed's own batches): the batch's real
    tokens on the packed-token graph, else the compiled batch size x the seq_len bucket it is padded to."""
    batches = model.length_batches(texts)
    if packed:
        return [sum(map(len, b)) for b in batches]
    size = model.compile_result.specializations[0]["batch_size"]
    return [size * model._pick_seq_len(max(map(len, b))) for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-round", type=int, default=3, help="samples per round (a median each)")
    parser.add_argument("--max-rounds", type=int, default=5, help="rounds before giving up on stability")
    args = parser.parse_args()
    # the load average before this benchmark's own heavy imports (torch, sentence-transformers), which would
    # otherwise count as another process competing; the thread count is filled in once torch says it
    machine = Machine.start(os.cpu_count() or 1)

    import torch
    from sentence_transformers import SentenceTransformer

    from qeff_lab import QEFFAutoModel
    from qeff_lab.loading import resolve

    threads = machine.threads = torch.get_num_threads()
    os.environ["QEFF_LAB_THREADS"] = str(threads)
    texts = corpus(args.n)
    st = SentenceTransformer(str(resolve(MODEL).path), device="cpu")
    model = QEFFAutoModel.from_pretrained(MODEL, pooling="mean")
    model.compile(seq_len=SEQ_LENS, batch_size=args.batch_size)

    ours = model.embed(texts)
    ref = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)

    def stable(fn):
        return measure_until_stable(rate(fn, args.n), per_round=args.per_round, max_rounds=args.max_rounds)

    st_rate = stable(lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True))
    q_rate = stable(lambda: model.embed(texts))
    # the bound: the graph's weight MatMuls alone, on the rows embed() gives them batch by batch (real tokens
    # only on the packed-token graph, the padded bucket otherwise)
    result = model.compile_result
    packed = (result.ort_graph or {}).get("graph") == "packed"
    mm = MatMulFloor(result.folder / result.ort_graph["path"] if packed else result.onnx_path,
                     None if packed else result.onnx_path.parent, threads)
    rows = matmul_rows(model, texts, packed)
    mm_rate = stable(lambda: args.n / sum(mm.seconds(r) for r in rows))
    machine.finish()
    print(machine)
    print(f"sentences: {args.n}, batch {args.batch_size}, threads {threads}, backend {model.compile_result.backend}, "
          f"seq_len buckets {model.seq_lens}")
    print(f"compile: {model.compile_result.reason}")
    print(f"min cosine vs sentence-transformers: {cos.min():.6f}")
    print(f"sentence-transformers.encode: {st_rate.value:8.1f} sentences/s  [{st_rate.note}]")
    print(f"qeff_lab (compiled):          {q_rate.value:8.1f} sentences/s  [{q_rate.note}]")
    print(f"ratio qeff_lab / sentence-transformers: {q_rate.value / st_rate.value:.2f}x (goal >= 1.2x)")
    flops = sum(mm.flops(r) for r in rows)
    print(f"ONNX Runtime's fp32 MatMuls alone ({mm.describe()}, {sum(rows)} rows in {len(rows)} batches, "
          f"{flops / 1e9:.0f} GFLOP): {mm_rate.value:8.1f} sentences/s [{mm_rate.note}] "
          f"({flops * mm_rate.value / args.n / 1e9:.0f} GFLOP/s); qeff_lab runs at {q_rate.value / mm_rate.value:.0%} "
          f"of it. Bound on this machine: at most {mm_rate.value / st_rate.value:.2f}x sentence-transformers")


if __name__ == "__main__":
    main()
