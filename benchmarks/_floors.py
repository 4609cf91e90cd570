"""How fast a graph could go on this machine with ONNX Runtime's own fp32 kernels: its weight MatMuls alone.

Every forward of the embedded backend's graph does the work of its weight MatMuls (x @ W with W an initializer:
the projections, the MLP, the LM head) plus everything else (attention, norms, activations, bookkeeping).
`MatMulFloor` runs those MatMuls alone, with the same initializers, shapes and session options (threads,
prepacking), in one ONNX Runtime session: no graph built on ONNX Runtime's fp32 MatMul can beat that time. The
benchmarks print it next to their figures, so a goal that lies beyond it on this machine shows as such (the
other floor they print, an ideal matrix-vector product over 256 MiB, is a memory-bandwidth figure that layer-sized
MatMuls do not reach).

Only MatMul(x, W) with W an initializer is counted (the in-memory export and the packed encoder graph; the streamed
export's MatMul(x, Transpose(W)) is not read here).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


class MatMulFloor:
    """The weight MatMuls of `graph_path` alone. `one_row(K, N)` picks weights that run on one row whatever the
    prompt (a causal LM's head, which sees only the last position); the others run on `rows` rows."""

    def __init__(self, graph_path: Path, weights_dir: Path | None = None, threads: int | None = None,
                 one_row: Callable[[int, int], bool] = lambda k, n: False):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from qeff_lab.compile.ort_rewrite import session_options

        graph = onnx.load(str(graph_path), load_external_data=False).graph
        weights = {w.name: w for w in graph.initializer if len(w.dims) == 2}
        nodes, inits, outputs, self.inputs = [], [], [], {}
        self.flops_per_row: dict[str, int] = {}  # per input: 2 * K * N summed over the MatMuls that read it
        for node in graph.node:
            if node.op_type != "MatMul" or node.input[1] not in weights:
                continue
            w = weights[node.input[1]]
            k, n = int(w.dims[0]), int(w.dims[1])
            x = f"x{k}_{'one' if one_row(k, n) else 'rows'}"
            self.inputs[x] = k
            self.flops_per_row[x] = self.flops_per_row.get(x, 0) + 2 * k * n
            y = f"y{len(nodes)}"
            nodes.append(helper.make_node("MatMul", [x, w.name], [y]))
            inits.append(w)
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
        if not nodes:
            raise ValueError(f"{graph_path} has no MatMul with an initializer weight")
        self.count = len(nodes)
        self.weight_bytes = sum(int(np.prod(w.dims)) * 4 for w in inits)
        ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["rows" if x.endswith("rows") else 1, k])
               for x, k in self.inputs.items()]
        model = helper.make_model(helper.make_graph(nodes, "weight_matmuls", ins, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        folder = Path(weights_dir) if weights_dir is not None else Path(graph_path).parent
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads, folder),
                                            providers=["CPUExecutionProvider"])
        self._feeds: dict[int, dict] = {}

    def feeds(self, rows: int) -> dict[str, np.ndarray]:
        if rows not in self._feeds:
            rng = np.random.default_rng(0)
            self._feeds[rows] = {x: rng.standard_normal((rows if x.endswith("rows") else 1, k), np.float32)
                                 for x, k in self.inputs.items()}
        return self._feeds[rows]

    def seconds(self, rows: int) -> float:
        """One sample: seconds of one run with `rows` rows (tokens)."""
        feeds = self.feeds(rows)
        start = time.perf_counter()
        self.session.run(None, feeds)
        return time.perf_counter() - start

    def flops(self, rows: int) -> int:
        """The MatMuls' floating-point operations for one run with `rows` rows."""
        return sum(f * (rows if x.endswith("rows") else 1) for x, f in self.flops_per_row.items())

    def describe(self) -> str:
        return f"{self.count} weight MatMuls, {self.weight_bytes / 2**20:.0f} MiB of fp32 weights"
