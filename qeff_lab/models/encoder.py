"""QEFFAutoModel: text encoders with pooling, exported, compiled and run (declares only what differs from the base)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from qeff_lab.contracts import ATTENTION_MASK, INPUT_IDS, Step
from qeff_lab.models.base import CompilePlan, ExportSpec, QEFFBaseModel, UnsupportedModelError
from qeff_lab.pipeline import StepReport
from qeff_lab.transforms.encoders import (
    PooledEncoder,
    Pooling,
    encoder_obstacle,
    encoder_transform,
    pooling_fn,
    pooling_key,
)


class SeqLenTooLongError(ValueError):
    """Input longer than every compiled seq_len."""


class QEFFAutoModel(QEFFBaseModel):
    """An encoder prepared for Cloud AI 100 (or the embedded ONNX Runtime backend).

    >>> model = QEFFAutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", pooling="mean")
    >>> model.compile(num_cores=16)
    >>> model.generate(tokenizer("My name is", return_tensors="pt"))["output"].shape
    (1, 384)
    """

    _hf_auto_class = "AutoModel"
    _kind = "encoder"

    def __init__(self, model: torch.nn.Module, resolved, pooling: Pooling = None):
        super().__init__(model, resolved)
        pooling_fn(pooling)  # validate early
        self.pooling = pooling

    # ------------------------------------------------------------------ what differs
    @classmethod
    def check_supported(cls, config, what: str) -> None:
        reason = encoder_obstacle(config)
        if reason is not None:
            raise UnsupportedModelError(f"{what}: {reason}")

    @classmethod
    def _check_kind_options(cls, pooling: Pooling = None) -> None:
        pooling_fn(pooling)

    def _load_details(self, config) -> dict:
        pooling = self.pooling
        return {"pooling": getattr(pooling, "__name__", "callable") if callable(pooling) else pooling_key(pooling)}

    def _pytorch_transforms(self):
        return [encoder_transform]

    def export_spec(self) -> ExportSpec:
        """Encoder + pooling: (input_ids, attention_mask) -> output, dynamic batch_size and seq_len."""
        out_axes = {0: "batch_size"} if self.pooling is not None else {0: "batch_size", 1: "seq_len"}
        return ExportSpec(
            PooledEncoder(self.model, self.pooling),
            {INPUT_IDS: torch.ones(1, 8, dtype=torch.long), ATTENTION_MASK: torch.ones(1, 8, dtype=torch.long)},
            ["output"],
            {INPUT_IDS: {0: "batch_size", 1: "seq_len"}, ATTENTION_MASK: {0: "batch_size", 1: "seq_len"},
             "output": out_axes},
            {"pooling": pooling_key(self.pooling)})

    def _output_name(self) -> str:
        return "output"

    @property
    def _per_token(self) -> bool:
        """True when the graph returns one row per token (no pooling): outputs are cut back to the input length."""
        return self.pooling is None

    # ------------------------------------------------------------------ compile
    def compile(self, num_cores: int = 16, seq_len: int | list[int] = 32, batch_size: int = 1,
                backend: str | None = None, **compiler_options: Any):
        """Compile for each `seq_len` (one specialization each). backend None: qaic when the SDK is present,
        else ONNX Runtime. Returns the compile folder. Other options (mxfp6_matmul, num_devices, npi, mos,
        dry_run, extra_flags, ...) are validated by qeff_lab.compile.options: an unknown one is an error."""
        seq_lens = sorted({seq_len} if isinstance(seq_len, int) else set(seq_len))
        if not seq_lens or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in seq_lens):
            raise ValueError(f"seq_len must be a positive int or a list of them, got {seq_len!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        plan = CompilePlan([{"batch_size": batch_size, "seq_len": s} for s in seq_lens],
                           f"seq_len {seq_lens}, batch {batch_size}",
                           model_info={"pooling": pooling_key(self.pooling)})
        return self._compile(plan, backend=backend, num_cores=num_cores, options=compiler_options)

    @property
    def seq_lens(self) -> list[int]:
        return [s["seq_len"] for s in self.compile_result.specializations] if self.compile_result else []

    # ------------------------------------------------------------------ run
    def _pick_seq_len(self, length: int) -> int:
        """The smallest compiled seq_len that holds `length` tokens."""
        fits = [s for s in self.seq_lens if s >= length]
        if not fits:
            raise SeqLenTooLongError(
                f"Input has {length} tokens but the largest compiled seq_len is {max(self.seq_lens)}. "
                f"Compile with a larger one, e.g. model.compile(seq_len={self.seq_lens + [_next_pow2(length)]}), "
                "or truncate the input (tokenizer(..., truncation=True, max_length=...)).")
        return fits[0]

    def generate(self, inputs, runtime: str | None = None, device_ids: list[int] | None = None) -> dict[str, np.ndarray]:
        """Run tokenized `inputs` (input_ids, attention_mask) on the compiled graph.

        Each batch is padded to the smallest compiled seq_len that fits and split into the compiled
        batch size. Returns {"output": [batch, hidden]} (pooled) or [batch, seq, hidden] (no pooling)."""
        session = self.session(device_ids)
        start_time = time.perf_counter()
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        if ids.ndim == 1:
            ids, mask = ids[None], mask[None]
        if ids.shape[0] == 0:
            raise ValueError("generate() got an empty batch.")
        length = int(mask.sum(1).max()) if mask.any() else ids.shape[1]
        seq = self._pick_seq_len(length)
        ids, mask = _pad_to(ids[:, :length], seq), _pad_to(mask[:, :length], seq)
        bs = self.compile_result.specializations[0]["batch_size"]
        outs = []
        for start in range(0, ids.shape[0], bs):
            chunk_ids, chunk_mask = ids[start:start + bs], mask[start:start + bs]
            real = chunk_ids.shape[0]
            if real < bs:  # a device runs only the compiled batch size: pad with empty rows, drop them after
                chunk_ids = np.concatenate([chunk_ids, np.zeros((bs - real, seq), np.int64)])
                chunk_mask = np.concatenate([chunk_mask, np.zeros((bs - real, seq), np.int64)])
            out = session.run({"input_ids": chunk_ids, "attention_mask": chunk_mask})[self._output_name()]
            outs.append(out[:real])
        output = np.concatenate(outs)
        if self._per_token:
            output = output[:, :length]
        n_batches = len(outs)
        self._record(StepReport(
            Step.GENERATE, "done", time.perf_counter() - start_time,
            f"{ids.shape[0]} input(s) of up to {length} tokens -> seq_len {seq}, {n_batches} batch(es) of {bs}; "
            f"output {tuple(output.shape)}",
            {"inputs": ids.shape[0], "tokens": length, "seq_len": seq, "batch_size": bs, "batches": n_batches,
             "output_shape": tuple(output.shape), "backend": self.compile_result.backend}))
        return {self._output_name(): output}

    def embed(self, texts: list[str] | str, normalize: bool = False) -> np.ndarray:
        """Tokenize `texts` with the model's tokenizer (truncated to the largest compiled seq_len) and run.

        Texts are grouped by length (as sentence-transformers does), so each batch is padded only to the
        smallest compiled seq_len its longest member needs; results come back in the input order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("embed() needs at least one text.")
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) before embed(...): nothing is compiled yet.")
        if self._per_token:
            raise ValueError("embed() needs a pooling (rows differ in length); use generate() for per-token states.")
        pad = self.tokenizer.pad_token_id or 0
        out = None
        for rows, batch_ids in zip(*self._grouped(texts)):
            width = max(map(len, batch_ids))
            batch = np.full((len(rows), width), pad, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for r, x in enumerate(batch_ids):
                batch[r, :len(x)], mask[r, :len(x)] = x, 1
            emb = self.generate({"input_ids": batch, "attention_mask": mask})[self._output_name()]
            if out is None:
                out = np.zeros((len(texts), emb.shape[-1]), emb.dtype)
            out[rows] = emb
        if normalize:
            out = out / np.linalg.norm(out, axis=-1, keepdims=True).clip(min=1e-12)
        return out

    def length_batches(self, texts: list[str]) -> list[list[list[int]]]:
        """The token ids of `texts` as embed() runs them: truncated to the largest compiled seq_len, longest first,
        in batches of the compiled batch size (a benchmark sizes its work from these)."""
        return self._grouped(list(texts))[1]

    def _grouped(self, texts: list[str]) -> tuple[list[np.ndarray], list[list[list[int]]]]:
        """(the input indices of each batch, the token ids of each batch): embed()'s grouping by length."""
        ids = self.tokenizer(texts, truncation=True, max_length=max(self.seq_lens))["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        bs = self.compile_result.specializations[0]["batch_size"]
        rows = [order[start:start + bs] for start in range(0, len(order), bs)]
        return rows, [[ids[i] for i in r] for r in rows]


def _pad_to(a: np.ndarray, n: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, n - a.shape[1]))) if a.shape[1] < n else a


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()

