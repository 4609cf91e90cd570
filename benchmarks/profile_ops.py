"""Where the embedded backend's time goes: ONNX Runtime's profiler over the compiled graph, summed by op type.

- `--decoder` (default): SmolLM2-135M compiled as bench_causal_lm.py compiles it (prefill 128, ctx_len 256), a
  --tokens-token prefill on an empty cache (--tokens 1: one decode step after a 16-token prompt), --runs times;
- `--encoder`: all-MiniLM-L6-v2 compiled as bench_encoder.py compiles it, embed() over --runs x 256 of its
  sentences.
Prints each op type's kernel time per run and its share, the sum of kernel times and the wall time per run (the
difference is ONNX Runtime's own bookkeeping between kernels and the Python call). Use it to see where a ratio of
bench_causal_lm.py / bench_encoder.py comes from; the ratios themselves come from those benchmarks.
Run: .venv/bin/python benchmarks/profile_ops.py [--decoder | --encoder] [--tokens 128] [--runs 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def op_times(profile: str) -> tuple[Counter, Counter]:
    """(microseconds, calls) per op type from an ONNX Runtime profile file."""
    micros, calls = Counter(), Counter()
    for event in json.loads(Path(profile).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            calls[event["args"]["op_name"]] += 1
    return micros, calls


def decoder_runs(tokens: int):
    from bench_causal_lm import MODEL

    from qeff_lab import QEFFAutoModelForCausalLM

    model = QEFFAutoModelForCausalLM.from_pretrained(MODEL)
    model.compile(prefill_seq_len=128, ctx_len=256, batch_size=1)
    runner = model.session()
    ids = np.random.default_rng(0).integers(100, 40000, (1, 128))

    def prompt(n: int):  # padded to the compiled prefill_seq_len, padding at position -1 (as generate() sends it)
        return ids, np.where(np.arange(128) < n, np.arange(128), -1)[None]

    what = f"SmolLM2-135M, {model.compile_result.ort_graph['graph']} graph, "
    if tokens == 1:  # a decode step after a 16-token prompt, the same position each run
        runner.step(*prompt(16))
        step = lambda: runner.step(ids[:, :1], np.array([[16]]))  # noqa: E731
        what += "one decode step (position 16)"
    else:
        step = lambda: runner.step(*prompt(tokens))  # noqa: E731
        what += f"a {tokens}-token prefill"
    return runner.session, step, what


def encoder_runs():
    from bench_encoder import MODEL, SEQ_LENS, corpus

    from qeff_lab import QEFFAutoModel

    model = QEFFAutoModel.from_pretrained(MODEL, pooling="mean")
    model.compile(batch_size=32, seq_len=SEQ_LENS)
    texts = corpus(256)
    graph = model.compile_result.ort_graph.get("graph", "exported")
    return model.session().session, lambda: model.embed(texts), f"all-MiniLM-L6-v2, {graph} graph, embed() of 256 sentences"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--decoder", action="store_true", help="SmolLM2-135M (default)")
    kind.add_argument("--encoder", action="store_true", help="all-MiniLM-L6-v2")
    parser.add_argument("--tokens", type=int, default=128, help="decoder: prompt tokens (1: a decode step)")
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    if not 1 <= args.tokens <= 128:
        parser.error("--tokens must be between 1 and 128 (the compiled prefill_seq_len)")
    machine = Machine.start(os.cpu_count() or 1)
    prefix = Path(tempfile.mkdtemp(prefix="qeff_lab_profile_")) / "ort"
    os.environ["QEFF_LAB_ORT_PROFILE"] = str(prefix)  # every session the model opens writes a profile
    session, step, what = encoder_runs() if args.encoder else decoder_runs(args.tokens)
    step()  # warm-up, counted out below by its share of the profile
    walls = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    micros, calls = op_times(session.end_profiling())
    machine.finish()
    total_runs = args.runs + 1
    kernel_ms = sum(micros.values()) / total_runs / 1e3
    print(machine)
    print(f"{what}: ONNX Runtime profile of {args.runs} runs (+1 warm-up), per run:")
    for op, us in micros.most_common():
        share = us / sum(micros.values())
        if share >= 0.002:
            print(f"  {op:32s} {us / total_runs / 1e3:8.2f} ms  {share:6.1%}  ({calls[op] // total_runs} kernels)")
    print(f"  {'all kernels':32s} {kernel_ms:8.2f} ms")
    print(f"wall time per run (median, profiler on): {np.median(walls) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
