"""The embedded ONNX Runtime backend for decoders: runs only the compiled shapes and keeps the KV cache in
ONNX Runtime's own buffers between steps (IO binding over OrtValues, never through numpy).

Two sets of KV OrtValues alternate: step n reads set A as `past_*` and writes set B as `*_RetainedState`;
step n + 1 reads B and writes A. IO bindings are prepared once per (set, batch size, logits kept), so a step only
binds input_ids and position_ids (and batch_index, or a speculative target's num_logits_to_keep) and copies the
logits out. This is what `-retained-state` does on the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qeff_lab.contracts import (BATCH_INDEX, LOGITS, NEXT_TOKENS, NUM_LOGITS_TO_KEEP, RANDOM_NUMBERS, REPETITION_BUFFER,
                                RETAINED_SUFFIX, SAMPLER_INPUTS, TOKEN_BITMASKS)
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
        self.batch_size, self.ctx_len, self.full_batch_size = kv_shapes(specializations)
        self.continuous_batching = BATCH_INDEX in self.ort.input_names
        if self.continuous_batching != (self.full_batch_size is not None):
            raise ValueError(f"{onnx_path} {'takes' if self.continuous_batching else 'does not take'} batch_index but "
                             f"the specializations {'do not name' if self.continuous_batching else 'name'} a "
                             "full_batch_size: export and compile with the same continuous_batching setting.")
        self.prefill_seq_len = max(s["seq_len"] for s in specializations)
        # a speculative-decoding target: Decode verifies num_speculative_tokens drafts (num_logits_to_keep = k + 1)
        self.num_speculative_tokens = (max(s.get(NUM_LOGITS_TO_KEEP, 1) for s in specializations) - 1
                                       if NUM_LOGITS_TO_KEEP in self.ort.input_names else None)
        kv_rows = self.full_batch_size or self.batch_size
        # retained state: the KV (past_*) and, with the in-graph sampler, its penalty buffers
        self.kv_inputs = [n for n in self.ort.input_names if n + RETAINED_SUFFIX in self.ort.output_names]
        missing = [n + RETAINED_SUFFIX for n in self.ort.input_names
                   if n.startswith("past_key") and n not in self.kv_inputs]
        self.include_sampler = NEXT_TOKENS in self.ort.output_names
        main = NEXT_TOKENS if self.include_sampler else LOGITS
        if missing or main not in self.ort.output_names:
            raise ValueError(f"{onnx_path} is not a retained-state decoder graph (missing outputs: "
                             f"{missing or [main]}).")
        self.main_outputs = [o for o in self.ort.output_names if not o.endswith(RETAINED_SUFFIX)]  # [probs,] main
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.sampler_inputs = [n for n in self.ort.input_names if n in SAMPLER_INPUTS or n == TOKEN_BITMASKS]
        if self.include_sampler:
            self.max_top_k_ids = int(inputs[RANDOM_NUMBERS].shape[1])
            self.vocab_size = int(inputs[REPETITION_BUFFER].shape[1])
        self._buffers = []
        for _ in range(2):
            bufs = {}
            for name in self.kv_inputs:
                dims = [kv_rows if axis == 0 else ctx_len_or(d, self.ctx_len) for axis, d in enumerate(inputs[name].shape)]
                dtype = np.bool_ if inputs[name].type == "tensor(bool)" else np.float32
                bufs[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, dtype))
            self._buffers.append(bufs)
        # One binding per (buffer set read, batch rows): ORT keeps the logits buffer it allocated for a binding, so
        # with continuous batching (prefill batch 1, decode full_batch_size) each batch size gets its own.
        self._bindings: dict[tuple[int, int, int], ort.IOBinding] = {}  # (set read, rows, logits kept)
        self._main_index = len(self.kv_inputs)  # outputs come back in the order they were bound
        self._current = 0  # which buffer set holds the cache now
        self.steps = 0
        self.last_probs: np.ndarray | None = None  # the in-graph sampler's probs of the last step (return_pdfs)

    def _binding(self, src: int, rows: int, keep: int = 1):
        io = self._bindings.get((src, rows, keep))
        if io is None:
            io = self._bindings[(src, rows, keep)] = self.session.io_binding()
            for name in self.kv_inputs:
                io.bind_ortvalue_input(name, self._buffers[src][name])
                io.bind_ortvalue_output(name + RETAINED_SUFFIX, self._buffers[src ^ 1][name])
            for name in self.main_outputs:
                io.bind_output(name, "cpu")
        return io

    def kv_state(self) -> dict[str, np.ndarray]:
        """A numpy copy of the retained cache (for inspection and tests)."""
        return {name: v.numpy().copy() for name, v in self._buffers[self._current].items()}

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Continuous batching, prefix reuse: KV positions [0, length) of slot `src` copied into slot `dst`."""
        for name in self.kv_inputs:
            if name.startswith(("past_key", "past_value")):
                buf = self._buffers[self._current][name]
                arr = buf.numpy()
                arr[dst, :, :length] = arr[src, :, :length]
                buf.update_inplace(arr)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, batch_index: np.ndarray | None = None,
             num_logits_to_keep: int | None = None, **sampler_inputs: np.ndarray) -> np.ndarray:
        """One call; `batch_index` [batch, 1] (the KV slot of each row) exactly when continuous batching;
        `num_logits_to_keep` (a speculative target only; default 1): logits [batch, n, vocab] for the last n
        positions. Returns the logits, or with the in-graph sampler the next_tokens [batch, 1, 1] (it then needs `sampler_inputs`,
        see runtime.sampling.sampler_feeds; probs, when compiled with return_pdfs, land in `last_probs`)."""
        input_ids, position_ids = step_ids(input_ids, position_ids)
        feeds = {"input_ids": input_ids, "position_ids": position_ids}
        bi = check_batch_index(batch_index, input_ids.shape[0], self.full_batch_size)
        if bi is not None:
            feeds[BATCH_INDEX] = bi
        keep = logits_to_keep(self.num_speculative_tokens, num_logits_to_keep)
        if keep is not None:
            feeds[NUM_LOGITS_TO_KEEP] = keep
        wanted = {n for n in self.sampler_inputs if n not in self.kv_inputs}
        if set(sampler_inputs) != wanted:
            raise ValueError(f"This graph {'has' if wanted else 'has no'} an in-graph sampler: it takes the inputs "
                             f"{sorted(wanted)}, got {sorted(sampler_inputs)}.")
        feeds.update(sampler_inputs)
        self.ort.check_shapes(feeds)
        io = self._binding(self._current, input_ids.shape[0], 1 if keep is None else len(keep))
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(io)
        # A copy: the bound output buffer is reused by the step after next, which would change what a caller kept.
        outputs = io.get_outputs()
        logits = outputs[self._main_index + len(self.main_outputs) - 1].numpy().copy()
        if len(self.main_outputs) > 1:
            self.last_probs = outputs[self._main_index].numpy().copy()
        self._current ^= 1
        self.steps += 1
        return logits

    def __repr__(self) -> str:
        if self.continuous_batching:
            return (f"<OrtKVSession full_batch_size {self.full_batch_size}, prefill {self.prefill_seq_len}, ctx "
                    f"{self.ctx_len}, {len(self.kv_inputs)} retained buffers>")
        return (f"<OrtKVSession batch {self.batch_size}, prefill {self.prefill_seq_len}, ctx {self.ctx_len}, "
                f"{len(self.kv_inputs)} retained buffers>")


def ctx_len_or(dim, ctx_len: int):
    """A retained buffer's size along a graph axis: ctx_len for the symbolic context axis, else the fixed size."""
    return ctx_len if isinstance(dim, str) else int(dim)


def kv_shapes(specializations: list[dict[str, int]]) -> tuple[int, int, int | None]:
    """(batch_size, ctx_len, full_batch_size or None) of a decoder's specializations. Without continuous
    batching every specialization has the same batch_size; with it, each names the same full_batch_size (the KV
    slots) and batch_size is the decode batch (full_batch_size; prefill runs batch 1)."""
    ctxs = {s["ctx_len"] for s in specializations}
    fbs = {s.get("full_batch_size") for s in specializations}
    batches = {s["batch_size"] for s in specializations}
    if len(ctxs) != 1 or len(fbs) != 1 or (None in fbs and len(batches) != 1):
        raise ValueError(f"Specializations must share ctx_len and batch_size (or full_batch_size), got {specializations}")
    full = fbs.pop()
    return (full if full is not None else batches.pop()), ctxs.pop(), full


def logits_to_keep(num_speculative_tokens: int | None, num_logits_to_keep: int | None) -> np.ndarray | None:
    """The `num_logits_to_keep` feed ([n, 1], QEfficient's: only its shape is read) of a speculative target's step
    (n defaults to 1), None for other graphs; a clear error when asked of a graph that has no such input."""
    if num_speculative_tokens is None:
        if num_logits_to_keep not in (None, 1):
            raise ValueError(f"num_logits_to_keep={num_logits_to_keep} needs a speculative-decoding target (load with "
                             "qaic_config={'speculative_model_type': 'target'}, compile with num_speculative_tokens=k).")
        return None
    n = 1 if num_logits_to_keep is None else num_logits_to_keep
    return np.arange(n, dtype=np.int64).reshape(n, 1)


def step_ids(input_ids, position_ids) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and position_ids of one step as contiguous int64 arrays of the same shape, or a clear error."""
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
    if input_ids.shape != position_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and position_ids {position_ids.shape} differ in shape.")
    return input_ids, position_ids


def check_batch_index(batch_index, rows: int, full_batch_size: int | None) -> np.ndarray | None:
    """batch_index as the graph takes it ([rows, 1] int64, distinct slots in [0, full_batch_size)), None for a
    runner without continuous batching (full_batch_size None), or a clear error."""
    if full_batch_size is None:
        if batch_index is not None:
            raise ValueError("batch_index was given but this runner has no continuous batching (load with "
                             "continuous_batching=True, compile with full_batch_size=N).")
        return None
    if batch_index is None:
        raise ValueError("This graph has continuous batching: each step needs batch_index [batch, 1], the KV slot of "
                         "each row.")
    bi = np.ascontiguousarray(batch_index, dtype=np.int64).reshape(-1, 1)
    if bi.shape[0] != rows or bi.min() < 0 or bi.max() >= full_batch_size or len(set(bi[:, 0])) != rows:
        raise ValueError(f"batch_index {bi[:, 0].tolist()} must name {rows} distinct slot(s) in [0, {full_batch_size}).")
    return bi


__all__ = ["OrtKVSession", "ShapeNotCompiledError", "check_batch_index", "kv_shapes", "logits_to_keep", "step_ids"]
