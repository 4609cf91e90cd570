"""Prefill attention alone: ONNX Runtime's GroupQueryAttention CPU kernel vs the same attention as plain ops.

SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, 30 layers), one prompt of --tokens tokens
(default 128) on an empty cache of ctx_len 256 + 1 spare slot, batch 1:
- `GroupQueryAttention` as the embedded backend's graph runs it (shared past/present buffer bound in place,
  rotary inside the op from cos/sin caches);
- plain ops: MatMul(q, k^T) -> Mul(scale) -> Add(causal mask) -> Softmax -> MatMul(., v) with the three query
  heads of each KV head folded into the rows ([kv_heads, 3 * S, D] x [kv_heads, D, S]), no rotation, no cache
  write. Its time is what the attention arithmetic costs on this CPU; the gap to GQA is what a prefill-specific
  attention could save (benchmarks/bench_causal_lm.py prints the whole prefill against its MatMuls alone).
Each layer's query is the previous layer's output, as in a model: 30 copies of one node on the same inputs would be
merged into one by ONNX Runtime's common-subexpression elimination (an earlier version of this file timed that,
one layer's work, and reported plain ops 6-7x faster than GQA).
Each figure is measured until two consecutive medians agree within 5% (benchmarks/_machine.py).
Run: .venv/bin/python benchmarks/bench_prefill_attention.py [--tokens 128] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Machine, measure_until_stable

H, KV, D, LAYERS, CTX = 9, 3, 64, 30, 256


def _session(nodes, inputs, outputs, inits, threads, opsets):
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def gqa_runner(tokens: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, "s", H * D]), helper.make_tensor_value_info("k", f, [1, "s", KV * D]),
              helper.make_tensor_value_info("v", f, [1, "s", KV * D]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    inits = [numpy_helper.from_array(rng.random((CTX + 1, D // 2), np.float32), n) for n in ("cos", "sin")]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"pk{layer}", f, [1, KV, CTX + 1, D]),
                   helper.make_tensor_value_info(f"pv{layer}", f, [1, KV, CTX + 1, D])]
        outs = [f"o{layer}", f"pk{layer}_out", f"pv{layer}_out"]
        outputs += [helper.make_tensor_value_info(o, f, None) for o in outs]
        query = "q" if layer == 0 else f"o{layer - 1}"  # chained: no two layers are the same computation
        nodes.append(helper.make_node("GroupQueryAttention", [query, "k", "v", f"pk{layer}", f"pv{layer}", "seqlens_k",
                                                              "total", "cos", "sin"], outs, domain="com.microsoft",
                                      num_heads=H, kv_num_heads=KV, do_rotary=1, scale=D ** -0.5))
    sess = _session(nodes, inputs, outputs, inits, threads, [("", 17), ("com.microsoft", 1)])
    io = sess.io_binding()
    keep = []
    for layer in range(LAYERS):
        for kind in ("pk", "pv"):
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, KV, CTX + 1, D), np.float32))
            keep.append(value)
            io.bind_ortvalue_input(f"{kind}{layer}", value)
            io.bind_ortvalue_output(f"{kind}{layer}_out", value)  # the same buffer: updated in place
        io.bind_output(f"o{layer}", "cpu")
    feeds = {"q": rng.standard_normal((1, tokens, H * D), np.float32),
             "k": rng.standard_normal((1, tokens, KV * D), np.float32),
             "v": rng.standard_normal((1, tokens, KV * D), np.float32),
             "seqlens_k": np.array([tokens - 1], np.int32), "total": np.array(tokens, np.int32)}
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)  # no copy: `keep` and `feeds` stay alive with the closure below

    def run():
        assert keep and feeds
        sess.run_with_iobinding(io)
    return run


def plain_runner(tokens: int, threads: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f, rows = TensorProto.FLOAT, (H // KV) * tokens
    inputs = [helper.make_tensor_value_info("q", f, [KV, rows, D]), helper.make_tensor_value_info("kt", f, [KV, D, tokens]),
              helper.make_tensor_value_info("v", f, [KV, tokens, D]), helper.make_tensor_value_info("mask", f, [rows, tokens])]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        query = "q" if layer == 0 else f"o{layer - 1}"  # chained: no two layers are the same computation
        nodes += [helper.make_node("MatMul", [query, "kt"], [f"s{layer}"]),
                  helper.make_node("Mul", [f"s{layer}", "scale"], [f"ss{layer}"]),
                  helper.make_node("Add", [f"ss{layer}", "mask"], [f"sm{layer}"]),
                  helper.make_node("Softmax", [f"sm{layer}"], [f"p{layer}"], axis=-1),
                  helper.make_node("MatMul", [f"p{layer}", "v"], [f"o{layer}"])]
        outputs.append(helper.make_tensor_value_info(f"o{layer}", f, None))
    sess = _session(nodes, inputs, outputs, [numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")],
                    threads, [("", 17)])
    causal = np.triu(np.full((tokens, tokens), -1e9, np.float32), 1)
    feeds = {"q": rng.standard_normal((KV, rows, D), np.float32), "kt": rng.standard_normal((KV, D, tokens), np.float32),
             "v": rng.standard_normal((KV, tokens, D), np.float32), "mask": np.tile(causal, (H // KV, 1))}
    return lambda: sess.run(None, feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not 1 <= args.tokens <= CTX:
        parser.error(f"--tokens must be between 1 and {CTX}")
    machine = Machine.start(args.threads)

    def timed(run):
        run()  # warm-up

        def sample() -> float:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
        return measure_until_stable(sample, per_round=7)

    gqa, plain = gqa_runner(args.tokens, args.threads), plain_runner(args.tokens, args.threads)
    t_gqa, t_plain = timed(gqa), timed(plain)
    machine.finish()
    print(machine)
    print(f"{LAYERS} layers of attention, {H} query / {KV} KV heads, head_dim {D}, a {args.tokens}-token prompt, ctx_len {CTX}")
    print(f"  GroupQueryAttention (rotary inside, cache written in place): {t_gqa.value * 1e3:7.2f} ms  [{t_gqa.note}]")
    print(f"  plain MatMul / Softmax ops (no rotation, no cache write):     {t_plain.value * 1e3:7.2f} ms  [{t_plain.note}]")
    print(f"ratio GroupQueryAttention / plain ops: {t_gqa.value / t_plain.value:.1f}x")


if __name__ == "__main__":
    main()
