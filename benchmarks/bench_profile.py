"""Range-profiling overhead: one SmolLM2-135M forward over 64 tokens, profiled vs plain.

Time: same process, same input, alternating plain and profiled forwards, median of --repeats each,
reported as a ratio (goal: at most 3x). Memory: in a fresh process per mode (model loaded and warmed up), the peak resident memory
during the forward (sampled every ms) above what it was just before; profiled minus plain is what profiling
adds (goal: a few MB, not a copy of the activations).
Run: .venv/bin/python benchmarks/bench_profile.py [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def load(tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qeff_lab.accuracy import shipped_text
    from qeff_lab.loading import resolve

    path = resolve(MODEL).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(shipped_text(), return_tensors="pt")["input_ids"][:, :tokens]
    return model, ids


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples resident memory every millisecond in a thread; `peak` is the highest value seen."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mib(), False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, rss_mib())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def worker(mode: str, tokens: int) -> None:
    """One forward in a fresh process; prints resident memory before it and its peak during it (MiB)."""
    from qeff_lab.precision import RangeProfiler

    model, ids = load(tokens)
    with torch.no_grad():
        model(ids)  # warm up kernels and the allocator outside the measurement
    before = rss_mib()
    sites = 0
    with torch.no_grad(), PeakRSS() as peak:
        if mode == "profiled":
            with RangeProfiler(model) as prof:
                model(ids)
            sites = len(prof.profile().records)
        else:
            model(ids)
    print(json.dumps({"mode": mode, "before_mib": before, "peak_mib": peak.peak, "sites": sites}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["plain", "profiled"])
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.tokens)

    from qeff_lab.precision import RangeProfiler

    model, ids = load(args.tokens)
    plain, profiled = [], []
    with torch.no_grad():
        model(ids)  # warm-up
        with RangeProfiler(model):
            model(ids)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids)
            plain.append(time.perf_counter() - t0)
            with RangeProfiler(model) as prof:
                t0 = time.perf_counter()
                model(ids)
                profiled.append(time.perf_counter() - t0)
    p, q = statistics.median(plain), statistics.median(profiled)
    sites = len(prof.profile().records)
    print(f"SmolLM2-135M forward over {ids.shape[1]} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}:")
    print(f"  plain     {p * 1e3:8.1f} ms")
    print(f"  profiled  {q * 1e3:8.1f} ms   ({sites} (module, op) sites)")
    print(f"  overhead ratio: {q / p:.2f}x   (goal: <= 3x)")

    mem = {}
    for mode in ("plain", "profiled"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {m: v["peak_mib"] - v["before_mib"] for m, v in mem.items()}
    extra = grow["profiled"] - grow["plain"]
    print(f"  peak RSS during the forward: plain +{grow['plain']:.1f} MiB, profiled +{grow['profiled']:.1f} MiB "
          f"over the loaded model")
    print(f"  peak extra memory from profiling: {extra:+.1f} MiB   (goal: a few MB)")


if __name__ == "__main__":
    main()
