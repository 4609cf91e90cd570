"""The embedded backend's KV runner over its own compile result: the graph in which GroupQueryAttention updates the
KV cache in place (qeff_lab.compile.ort_rewrite). Same interface and same results as OrtKVSession.

The cache is one buffer per past_* input, [batch, kv_heads, ctx_len + 1, head_dim], bound as both past_X and
X_RetainedState (GQA's shared-buffer mode: nothing is copied between steps). Slot ctx_len is a spare slot:
a row that sits out a decode step (position -1) writes there, which nothing reads, so it changes nothing.
With continuous batching (specializations with full_batch_size) the cache has full_batch_size rows and row r is
KV slot r: the graph has no batch_index; a prefill (one row, batch_index [[s]]) runs on the view of row s, a decode
(every slot, one token) on the whole cache with its rows put in slot order; free slots (position -1) write the
spare slot. Prefix reuse (`copy_prefix`) copies between rows of the same numpy buffers.

GQA needs contiguous positions per row and ONNX Runtime's CPU kernel takes several rows only one token at a
time, so a call is run as
- one call for all rows when seq_len is 1 (decode) or there is one row (each row's padding cut off; with continuous
  batching on the view of its slot's row);
- one call per row otherwise (padded batched prefill), on a view of that row's cache; rows with nothing to do
  are skipped and get zero logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qeff_lab.contracts import INPUT_IDS, LOGITS, POSITION_IDS, RETAINED_SUFFIX
from qeff_lab.runtime.kv_session import check_batch_index, kv_shapes, step_ids
from qeff_lab.runtime.session import OrtSession

SEQLENS_K = "seqlens_k"  # the rewritten graph's extra input (qeff_lab.compile.ort_rewrite.SEQLENS_K)


class OrtGqaKVSession:
    """A KVRunner (see runtime.generation) over the GroupQueryAttention graph of a compile folder; `weights_dir`
    is where its external data lives (the export folder). With full_batch_size in the specializations it serves
    continuous batching (runtime.continuous_batching): one cache row per slot."""

    backend = "onnxruntime"

    def __init__(self, graph_path: Path, specializations: list[dict[str, int]], threads: int | None = None,
                 weights_dir: Path | None = None):
        if not specializations:
            raise ValueError("OrtGqaKVSession needs the compiled specializations (prefill and decode shapes).")
        self.ort = OrtSession(graph_path, specializations, threads, external_data_dir=weights_dir)
        self.session = self.ort.session
        self.specializations = specializations
        self.batch_size, self.ctx_len, self.full_batch_size = kv_shapes(specializations)
        self.continuous_batching = self.full_batch_size is not None
        if SEQLENS_K not in self.ort.input_names:
            raise ValueError(f"{graph_path} is not a GroupQueryAttention graph (no {SEQLENS_K} input): run the exported "
                             "graph with OrtKVSession.")
        self.prefill_seq_len = max(s["seq_len"] for s in specializations)
        self.kv_inputs = [n for n in self.ort.input_names if n.startswith("past_")]
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self._cache = {n: np.zeros((self.batch_size, shapes[n][1], self.ctx_len + 1, shapes[n][3]), np.float32)
                       for n in self.kv_inputs}
        self._values = {None: {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._cache.items()}}
        for row in range(self.batch_size):  # views of one row (slot), for per-row prefill (no copy)
            self._values[row] = {n: ort.OrtValue.ortvalue_from_numpy(a[row:row + 1]) for n, a in self._cache.items()}
        self._bindings: dict = {}
        self.steps = 0
        self.calls = 0  # session runs (a padded batched prefill chunk takes one per row)

    def _binding(self, row: int | None) -> ort.IOBinding:
        io = self._bindings.get(row)
        if io is None:
            io = self._bindings[row] = self.session.io_binding()
            for name, value in self._values[row].items():
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(name + RETAINED_SUFFIX, value)  # the same buffer: updated in place
            io.bind_output(LOGITS, "cpu")
        return io

    def _run(self, row: int | None, ids: np.ndarray, pos: np.ndarray, seqlens: np.ndarray) -> np.ndarray:
        io = self._binding(row)
        # bind_cpu_input does not copy: these arrays must stay alive until the run is over
        feeds = {INPUT_IDS: np.ascontiguousarray(ids), POSITION_IDS: np.ascontiguousarray(pos),
                 SEQLENS_K: np.ascontiguousarray(seqlens, dtype=np.int32)}
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(io)
        self.calls += 1
        return io.get_outputs()[len(self.kv_inputs)].numpy().copy()  # outputs come back in the order bound

    def kv_state(self) -> dict[str, np.ndarray]:
        """A numpy copy of the retained cache, [batch, kv_heads, ctx_len, head_dim] per input (spare slot left out)."""
        return {name: a[:, :, :self.ctx_len].copy() for name, a in self._cache.items()}

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Continuous batching, prefix reuse: KV positions [0, length) of slot `src` copied into slot `dst` (the
        bound OrtValues share these numpy buffers)."""
        for a in self._cache.values():
            a[dst, :, :length] = a[src, :, :length]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, batch_index: np.ndarray | None = None) -> np.ndarray:
        """One call; `batch_index` [batch, 1] (the KV slot of each row) exactly when continuous batching."""
        input_ids, position_ids = step_ids(input_ids, position_ids)
        bi = check_batch_index(batch_index, input_ids.shape[0], self.full_batch_size)
        self.ort.check_shapes({INPUT_IDS: input_ids, POSITION_IDS: position_ids})
        rows, seq = input_ids.shape
        slots = list(range(rows)) if bi is None else bi[:, 0].tolist()  # the cache row of each row
        lengths = [_valid_length(position_ids[r], self.ctx_len) for r in range(rows)]
        if seq == 1 and rows == self.batch_size:  # decode: every row at once; a row sitting out writes the spare slot
            # continuous batching: cache row r is slot r, so rows go in slot order (the scheduler sends arange)
            order = None if slots == sorted(slots) else np.argsort(slots)
            if order is not None:
                input_ids, position_ids = input_ids[order], position_ids[order]
            seqlens = np.where(position_ids[:, 0] >= 0, position_ids[:, 0], self.ctx_len)
            logits = self._run(None, input_ids, position_ids, seqlens)
            if order is not None:
                logits[order] = logits.copy()
        elif rows == 1:
            n = lengths[0]
            logits = (self._run(None if bi is None else slots[0], input_ids[:, :n], position_ids[:, :n],
                                position_ids[:, n - 1]) if n else None)
        else:
            logits = None
            for r, n in enumerate(lengths):
                if n:
                    out = self._run(slots[r], input_ids[r:r + 1, :n], position_ids[r:r + 1, :n],
                                    position_ids[r, n - 1:n])
                    if logits is None:
                        logits = np.zeros((rows, *out.shape[1:]), out.dtype)
                    logits[r] = out[0]
        if logits is None:  # no row had a token: nothing ran, nothing changed
            logits = np.zeros((rows, 1, self.session.get_outputs()[0].shape[-1]), np.float32)
        self.steps += 1
        return logits

    def __repr__(self) -> str:
        if self.continuous_batching:
            return (f"<OrtGqaKVSession full_batch_size {self.full_batch_size}, prefill {self.prefill_seq_len}, ctx "
                    f"{self.ctx_len}, {len(self.kv_inputs)} retained buffers updated in place>")
        return (f"<OrtGqaKVSession batch {self.batch_size}, prefill {self.prefill_seq_len}, ctx {self.ctx_len}, "
                f"{len(self.kv_inputs)} retained buffers updated in place>")


def _valid_length(pos: np.ndarray, ctx_len: int) -> int:
    """How many leading tokens of a row are real (positions p0, p0+1, ... then only -1 padding); a clear error for
    what GroupQueryAttention cannot express."""
    n = int((pos >= 0).sum())
    if n and (not (pos[:n] >= 0).all() or (pos[:n] != pos[0] + np.arange(n)).any() or pos[n - 1] >= ctx_len):
        raise ValueError(f"positions {pos.tolist()}: the embedded backend's GroupQueryAttention graph needs each row's "
                         f"positions consecutive from the start of the call, then only -1 padding, all below ctx_len "
                         f"{ctx_len} (generation.generate_ids always calls it so). Compile with "
                         "QEFF_LAB_ORT_GRAPH=exported to run the exported graph instead.")
    return n


__all__ = ["OrtGqaKVSession"]
