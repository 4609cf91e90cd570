"""KV runners for the accuracy ladder: an HF causal LM behind the same `step` interface as the compiled graph,
and a wrapper that runs any runner under emulated device numerics (fp16, MXINT8 KV cache)."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from qeff_lab.precision.emulate import Fp16Emulation
from qeff_lab.precision.mx import mxint8_qdq_cache


def hf_greedy(model: torch.nn.Module, prompt_ids, new_tokens: int, pad_token_id: int = 0) -> list[list[int]]:
    """HF `generate` as plain argmax, one prompt at a time (no padding): exactly `new_tokens` new ids each, EOS
    included as an ordinary token. The parity reference for greedy decoders. EOS is cleared on a copy of the
    model's generation_config, not by `eos_token_id=None` + `min_new_tokens`: generate would fill the id back in
    from that config and the min-length processor would then ban it, a reference that never emits EOS where a
    greedy decoder does. The model's own generation_config is left as it was."""
    import copy

    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, pad_token_id=pad_token_id)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = None
    out = []
    try:
        with torch.no_grad():
            for p in prompt_ids:
                ids = model.generate(torch.tensor([list(p)]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     generation_config=gen)
                out.append(ids[0, len(p):].tolist())
    finally:
        model.generation_config = saved
    if any(len(o) != new_tokens for o in out):
        raise RuntimeError(f"HF generate stopped early ({[len(o) for o in out]} of {new_tokens} new tokens)")
    return out


class HFCausalRunner:
    """A HuggingFace causal LM (its own dynamic cache) as a KVRunner, batch size 1: `step(ids, positions)`
    returns the logits at the last valid position; padding (position -1) is dropped; a call starting at
    position 0 starts a new sequence. `step_all` returns every valid position's logits (teacher forcing)."""

    backend = "hf"

    def __init__(self, model: torch.nn.Module, prefill_seq_len: int = 32, ctx_len: int = 1024):
        self.model, self.prefill_seq_len, self.ctx_len, self.batch_size = model.eval(), prefill_seq_len, ctx_len, 1
        self.cache = None

    @torch.no_grad()
    def step_all(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if input_ids.shape[0] != 1:
            raise ValueError("HFCausalRunner runs one sequence at a time (batch_size 1).")
        valid = position_ids[0] >= 0
        if not valid.any():
            return np.zeros((1, 0, self.model.config.vocab_size), np.float32)
        if position_ids[0, valid][0] == 0:
            self.cache = None
        ids = torch.from_numpy(np.ascontiguousarray(input_ids[:, valid]))
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits.float().numpy()

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self.step_all(input_ids, position_ids)[:, -1:]

    def __repr__(self) -> str:
        return f"<HFCausalRunner {type(self.model).__name__}>"


class RetainedStateRunner:
    """A retained-state (KV-transformed) model as a KVRunner, batch size 1, that can also return every
    valid position's logits (`step_all`): it runs the model's decoder stack and head directly, so teacher
    forcing goes a chunk per call instead of a token per call. Same blocks, cache buffers and masks as
    the model's own forward (which keeps only the last position's logits)."""

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, prefill_seq_len: int = 32, ctx_len: int = 1024):
        self.model, self.prefill_seq_len, self.ctx_len, self.batch_size = model.eval(), prefill_seq_len, ctx_len, 1
        self.cache = model.new_kv_cache(1, ctx_len)

    @torch.no_grad()
    def step_all(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        m = self.model
        hidden, self.cache = getattr(m, m.base_name)(torch.from_numpy(input_ids), torch.from_numpy(position_ids),
                                                     self.cache)
        logits = m.final_logits(getattr(m, m.head_name)(hidden)).float()
        return logits[:, torch.from_numpy(position_ids[0] >= 0)].numpy()

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self.step_all(input_ids, position_ids)[:, -1:]

    def __repr__(self) -> str:
        return f"<RetainedStateRunner {type(self.model).__name__}, ctx {self.ctx_len}>"


class EmulatedRunner:
    """Runs `inner` with every op rounded to fp16 (`fp16`) and/or its KV cache quantize-dequantized to
    MXINT8 after each call (`mxint8_kv`, as retained state kept in MXINT8 between steps)."""

    def __init__(self, inner, fp16: bool = True, mxint8_kv: bool = False, flush_subnormals: bool = False):
        self.inner, self.fp16, self.mxint8_kv, self.flush_subnormals = inner, fp16, mxint8_kv, flush_subnormals
        self.batch_size, self.prefill_seq_len, self.ctx_len = inner.batch_size, inner.prefill_seq_len, inner.ctx_len
        self.backend = f"{getattr(inner, 'backend', type(inner).__name__)}+emulated"
        if hasattr(inner, "step_all"):
            self.step_all = self._step_all

    def _run(self, fn, input_ids, position_ids):
        with Fp16Emulation(self.flush_subnormals) if self.fp16 else nullcontext():
            out = fn(input_ids, position_ids)
        if self.mxint8_kv and getattr(self.inner, "cache", None) is not None:
            mxint8_qdq_cache(self.inner.cache)
        return out

    def step(self, input_ids, position_ids):
        return self._run(self.inner.step, input_ids, position_ids)

    def _step_all(self, input_ids, position_ids):
        return self._run(self.inner.step_all, input_ids, position_ids)

    def __repr__(self) -> str:
        parts = (["fp16"] if self.fp16 else []) + (["MXINT8 KV"] if self.mxint8_kv else [])
        return f"<EmulatedRunner {'+'.join(parts) or 'fp32'} over {self.inner!r}>"


def teacher_forced_logits(runner, ids, chunk: int | None = None) -> np.ndarray:
    """[len(ids), vocab] logits, logits[i] computed from ids[:i+1]: in chunks of the runner's prefill length
    when it can return every position (`step_all`), else one token per call (as decode steps)."""
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    if n > runner.ctx_len:
        raise ValueError(f"{n} tokens do not fit the runner's ctx_len {runner.ctx_len}.")
    outs = []
    if hasattr(runner, "step_all"):
        p = chunk or runner.prefill_seq_len
        for s in range(0, n, p):
            part = ids[s:s + p]
            outs.append(np.array(runner.step_all(part[None], np.arange(s, s + len(part))[None])[0]))
    else:
        for i, tok in enumerate(ids):
            # a copy: a runner may hand back a view of an output buffer that its next call overwrites
            outs.append(np.array(runner.step(np.array([[tok]]), np.array([[i]]))[0, -1:]))
    return np.concatenate(outs, 0)
