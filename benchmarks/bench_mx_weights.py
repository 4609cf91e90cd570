"""MXFP6 weights on ONNX Runtime's CPU: would a device-emulating precision make the embedded backend faster?

The device's MXFP6 weights are exactly int8 x a per-32-block power-of-two scale (every fp6 e2m3 value times 8 is
an integer of magnitude <= 60), which ONNX Runtime's `com.microsoft.MatMulNBits` (bits 8, block_size 32) holds
without loss. This times it against the fp32 MatMul of the same (dequantized) weights, on SmolLM2-135M's layer
shapes and its LM head, for one row (a decode step) and 128 rows (a prefill):
- accuracy_level 0: fp32 activations and arithmetic, i.e. exact MXFP6-weight emulation (relative error ~1e-7);
- accuracy_level 4: activations quantized to int8 per block as well (relative error ~5e-3): not what the device
  does with MXFP6 weights, so not an emulation the speed goals of the issue may use; shown for comparison.
Each figure is a median of --repeats calls, both sides in the same process, same threads.
Run: .venv/bin/python benchmarks/bench_mx_weights.py [--threads N] [--repeats 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Machine

SHAPES = [(576, 1536, "gate / up projection"), (1536, 576, "down projection"), (576, 49152, "LM head")]
BLOCK = 32


def _session(node, init, k: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def mx_weights(k: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [n, k] in [-60, 60], per-block scales [n, k / 32] = 2^e / 8): MXFP6 e2m3 weights."""
    codes = rng.integers(-60, 61, (n, k))
    scales = 2.0 ** rng.integers(-12, -6, (n, k // BLOCK)) / 8
    return codes, scales


def sessions(k: int, n: int, threads: int, rng):
    from onnx import helper, numpy_helper

    codes, scales = mx_weights(k, n, rng)
    dense = (codes.reshape(n, k // BLOCK, BLOCK) * scales[..., None]).reshape(n, k).T.astype(np.float32).copy()
    fp32 = _session(helper.make_node("MatMul", ["a", "w"], ["y"]), [numpy_helper.from_array(dense, "w")], k, threads)
    packed = (codes + 128).astype(np.uint8).reshape(n, k // BLOCK, BLOCK)  # MatMulNBits' default zero point 128
    init = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "s")]
    nbits = {level: _session(helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n,
                                              bits=8, block_size=BLOCK, accuracy_level=level), init, k, threads)
             for level in (0, 4)}
    return fp32, nbits


def median_ms(session, a: np.ndarray, repeats: int) -> float:
    session.run(None, {"a": a})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    machine = Machine.start(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for k, n, what in SHAPES:
        fp32, nbits = sessions(k, n, args.threads, rng)
        for m in (1, 128):
            a = rng.standard_normal((m, k)).astype(np.float32)
            reference = fp32.run(None, {"a": a})[0]
            base = median_ms(fp32, a, args.repeats)
            for level, session in nbits.items():
                err = float(np.abs(session.run(None, {"a": a})[0] - reference).max() / np.abs(reference).max())
                rows.append((what, k, n, m, level, base, median_ms(session, a, args.repeats), err))
    machine.finish()
    print(machine)
    print(f"{'weights':22s} {'K x N':>12s} {'rows':>4s} {'level':>5s} {'fp32 ms':>9s} {'MXFP6 ms':>9s} {'speed':>7s}  rel. err")
    for what, k, n, m, level, base, t, err in rows:
        print(f"{what:22s} {f'{k}x{n}':>12s} {m:4d} {level:5d} {base:9.3f} {t:9.3f} {base / t:6.2f}x  {err:.1e}")
    print("level 0 = exact MXFP6-weight emulation (fp32 activations); level 4 also quantizes activations to int8.")


if __name__ == "__main__":
    main()
