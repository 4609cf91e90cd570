"""The embedded ONNX Runtime backend for decoders: runs only the compiled shapes and keeps the KV cache in
ONNX Runtime's own buffers between steps (IO binding over OrtValues, never through numpy).

Two sets of KV OrtValues alternate: step n reads set A as `past_*` and writes set B as `*_RetainedState`;
step n + 1 reads B and writes A. Two IO bindings are prepared once, so a step only binds input_ids and
position_ids and copies the logits out. This is what `-retained-state` does on the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qeff_lab.contracts import RETAINED_SUFFIX
from qeff_lab.runtime.session import OrtSession, ShapeNotCompiledError


class OrtKVSession:
    """A KVRunner (see runtime.generation) over an exported decoder and its compiled specializations."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, specializations: list[dict[str, int]], threads: int | None = None):
        if not specializations:
            raise ValueError("OrtKVSession needs the compiled specializations (prefill and decode shapes).")
        self.ort = OrtSession(onnx_path, specializations, threads)
        self.session = self.ort.session
        self.specializations = specializations
        batches = {s["batch_size"] for s in specializations}
        ctxs = {s["ctx_len"] for s in specializations}
        if len(batches) != 1 or len(ctxs) != 1:
            raise ValueError(f"Specializations must share batch_size and ctx_len, got {specializations}")
        self.batch_size, self.ctx_len = batches.pop(), ctxs.pop()
        self.prefill_seq_len = max(s["seq_len"] for s in specializations)
        self.kv_inputs = [n for n in self.ort.input_names if n.startswith("past_")]
        missing = [n + RETAINED_SUFFIX for n in self.kv_inputs if n + RETAINED_SUFFIX not in self.ort.output_names]
        if missing or "logits" not in self.ort.output_names:
            raise ValueError(f"{onnx_path} is not a retained-state decoder graph (missing outputs: "
                             f"{missing or ['logits']}).")
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self._buffers = []
        for _ in range(2):
            bufs = {}
            for name in self.kv_inputs:
                _, heads, _, dim = shapes[name]
                bufs[name] = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((self.batch_size, heads, self.ctx_len, dim), np.float32))
            self._buffers.append(bufs)
        self._bindings = []
        for src, dst in ((0, 1), (1, 0)):
            io = self.session.io_binding()
            for name in self.kv_inputs:
                io.bind_ortvalue_input(name, self._buffers[src][name])
                io.bind_ortvalue_output(name + RETAINED_SUFFIX, self._buffers[dst][name])
            io.bind_output("logits", "cpu")
            self._bindings.append(io)
        self._logits_index = len(self.kv_inputs)  # outputs come back in the order they were bound
        self._current = 0  # which buffer set holds the cache now
        self.steps = 0

    def kv_state(self) -> dict[str, np.ndarray]:
        """A numpy copy of the retained cache (for inspection and tests)."""
        return {name: v.numpy().copy() for name, v in self._buffers[self._current].items()}

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        if input_ids.shape != position_ids.shape:
            raise ValueError(f"input_ids {input_ids.shape} and position_ids {position_ids.shape} differ in shape.")
        self.ort.check_shapes({"input_ids": input_ids, "position_ids": position_ids})
        io = self._bindings[self._current]
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("position_ids", position_ids)
        self.session.run_with_iobinding(io)
        # A copy: the bound output buffer is reused by the step after next, which would change what a caller kept.
        logits = io.get_outputs()[self._logits_index].numpy().copy()
        self._current ^= 1
        self.steps += 1
        return logits

    def __repr__(self) -> str:
        return (f"<OrtKVSession batch {self.batch_size}, prefill {self.prefill_seq_len}, ctx {self.ctx_len}, "
                f"{len(self.kv_inputs)} retained buffers>")


__all__ = ["OrtKVSession", "ShapeNotCompiledError"]
