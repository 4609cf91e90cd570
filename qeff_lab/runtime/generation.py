"""The generation loop over a retained-state KV runner: chunked prefill, decode (greedy, or sampled per request by
runtime.sampling), metrics.

One loop drives every runner: `TorchKVRunner` (the transformed PyTorch model, no export) and
`OrtKVSession` (the compiled graph on the embedded ONNX Runtime backend), so the two are compared on the
exact same schedule of calls.

Schedule (as a device runs it): prompts are right-padded; prefill runs in chunks of `prefill_seq_len`
whose padding carries position -1; each row's first token comes from the chunk that holds its last prompt
token; then decode feeds one token per row per step at position + 1. A row stops at EOS or after
`min(generation_len, ctx_len - prompt_len)` tokens (then it gets position -1: it touches nothing).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from qeff_lab.pipeline import HtmlRepr
from qeff_lab.runtime.sampling import SamplingParams, TokenChooser


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in the compiled context for a new token."""


class KVRunner(Protocol):
    """Runs one call of the compiled shapes; keeps the KV cache between calls."""

    batch_size: int
    prefill_seq_len: int
    ctx_len: int

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """input_ids, position_ids [batch_size, seq_len] int64 -> logits [batch_size, 1, vocab] fp32."""
        ...


class TorchKVRunner:
    """The transformed PyTorch model as a KVRunner: same shapes and schedule as the compiled graph."""

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, batch_size: int, prefill_seq_len: int, ctx_len: int,
                 full_batch_size: int | None = None, num_speculative_tokens: int | None = None):
        self.model, self.batch_size, self.prefill_seq_len, self.ctx_len = model, batch_size, prefill_seq_len, ctx_len
        self.num_speculative_tokens = num_speculative_tokens  # a speculative target: steps take num_logits_to_keep
        self.full_batch_size = full_batch_size  # continuous batching: this many KV slots, steps name theirs
        self.continuous_batching = full_batch_size is not None
        if self.continuous_batching:
            self.batch_size = full_batch_size
        self.cache = model.new_kv_cache(full_batch_size or batch_size, ctx_len)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Continuous batching, prefix reuse: KV positions [0, length) of slot `src` copied into slot `dst`."""
        for key, value in self.cache:
            key[dst, :, :length] = key[src, :, :length]
            value[dst, :, :length] = value[src, :, :length]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, batch_index: np.ndarray | None = None,
             num_logits_to_keep: int | None = None) -> np.ndarray:
        from qeff_lab.runtime.kv_session import check_batch_index, logits_to_keep

        keep = logits_to_keep(self.num_speculative_tokens, num_logits_to_keep)
        bi = check_batch_index(batch_index, input_ids.shape[0], self.full_batch_size)
        bi = torch.from_numpy(bi) if bi is not None else None
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, np.int64))
        pos = torch.from_numpy(np.ascontiguousarray(position_ids, np.int64))
        extra = {"num_logits_to_keep": torch.from_numpy(keep)} if keep is not None else {}
        with torch.no_grad():  # batch_index only for continuous batching: other models take three arguments
            logits, self.cache = (self.model(ids, pos, self.cache, bi) if bi is not None
                                  else self.model(ids, pos, self.cache, **extra))
        return logits.numpy()

    def __repr__(self) -> str:
        if self.continuous_batching:
            return (f"<TorchKVRunner full_batch_size {self.full_batch_size}, prefill {self.prefill_seq_len}, "
                    f"ctx {self.ctx_len}>")
        return f"<TorchKVRunner batch {self.batch_size}, prefill {self.prefill_seq_len}, ctx {self.ctx_len}>"


# ----------------------------------------------------------------------------- results
@dataclass
class GenerationMetrics:
    """Figures as QEfficient reports them. TTFT: the first batch's prefill. Decode rate counts the tokens
    produced by decode steps (each row's first token comes from prefill)."""

    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    e2e_s: float = 0.0
    backend: str = ""

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def total_tok_s(self) -> float:
        return self.generated_tokens / self.e2e_s if self.e2e_s > 0 else float("nan")

    def to_frame(self) -> pd.DataFrame:
        rows = [("backend", self.backend), ("prompts", self.prompts), ("batches", self.batches),
                ("prompt tokens", self.prompt_tokens), ("generated tokens", self.generated_tokens),
                ("time to first token", f"{self.ttft_s:.3f} s"), ("decode", f"{self.decode_tok_s:.1f} tokens/s"),
                ("total", f"{self.total_tok_s:.1f} tokens/s"), ("end to end", f"{self.e2e_s:.3f} s")]
        return pd.DataFrame(rows, columns=["metric", "value"])

    def report(self) -> str:
        bar = "=" * 25
        return (f"{bar} Performance Stats {bar}\n"
                f"Average Prefill time a.k.a TTFT is= {self.ttft_s:.4f} sec\n"
                f"Decode is= {self.decode_tok_s:.2f} tokens/sec\n"
                f"Total is= {self.total_tok_s:.2f} tokens/sec\n"
                f"Total (E2E) inference time is= {self.e2e_s:.4f} sec\n" + "=" * (2 * len(bar) + 19))

    def __repr__(self) -> str:
        return (f"<GenerationMetrics {self.prompts} prompt(s), {self.generated_tokens} tokens, "
                f"TTFT {self.ttft_s:.3f} s, decode {self.decode_tok_s:.1f} tokens/s>")


@dataclass
class GenerationResult(HtmlRepr):
    """What generate returns: the new tokens per prompt (ids, and texts when a tokenizer was given)."""

    ids: list[list[int]]
    prompt_ids: list[list[int]]
    metrics: GenerationMetrics
    texts: list[str] | None = None
    prompts: list[str] | None = None
    stopped: list[str] = field(default_factory=list)  # "eos" | "length" per prompt

    @property
    def generated_texts(self) -> list[str] | None:
        return self.texts

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for i, ids in enumerate(self.ids):
            rows.append({"prompt": (self.prompts[i] if self.prompts else str(self.prompt_ids[i][:8]))[:60],
                         "prompt tokens": len(self.prompt_ids[i]), "new tokens": len(ids),
                         "stopped": self.stopped[i] if self.stopped else "",
                         "text": self.texts[i] if self.texts else str(ids[:16])})
        return pd.DataFrame(rows, columns=["prompt", "prompt tokens", "new tokens", "stopped", "text"])

    def __getitem__(self, key: str):  # dict-style access, as QEfficient's CloudAI100ExecInfo is read
        return getattr(self, key)

    def __repr__(self) -> str:
        return f"<GenerationResult {len(self.ids)} prompt(s), {sum(map(len, self.ids))} new tokens>"


# ----------------------------------------------------------------------------- the loop
def check_prompts(prompt_ids: Sequence[Sequence[int]], ctx_len: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("generate() got no prompts: pass a non-empty list of prompts.")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"Prompt {i} is empty (no tokens): a causal LM needs at least one prompt token.")
        if len(ids) >= ctx_len:
            raise PromptTooLongError(
                f"Prompt {i} has {len(ids)} tokens but the compiled ctx_len is {ctx_len}: a prompt must leave room "
                f"for at least one new token. Compile with ctx_len > {len(ids)} (e.g. "
                f"compile(ctx_len={1 << len(ids).bit_length()})) or shorten the prompt.")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (a cache holding `a` serves `b` up to there)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def request_limits(prompt_ids: Sequence[Sequence[int]], generation_len, ctx_len: int) -> list[int]:
    """The number of new tokens each prompt may get: `generation_len` (one int or None for all, or one per
    prompt), clamped to `ctx_len - prompt_len` with a warning (None: as many as the context allows)."""
    n = len(prompt_ids)
    wanted = list(generation_len) if isinstance(generation_len, (list, tuple)) else [generation_len] * n
    if len(wanted) != n:
        raise ValueError(f"generation_len has {len(wanted)} value(s) for {n} prompt(s): give one int (or None) for all, "
                         "or one per prompt.")
    for g in wanted:
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"generation_len must be a positive int or None, got {g!r}")
    room = [ctx_len - len(p) for p in prompt_ids]
    limits = [r if g is None else min(g, r) for g, r in zip(wanted, room)]
    clamped = [i for i, (g, r) in enumerate(zip(wanted, room)) if g is not None and g > r]
    if clamped:
        shown = generation_len if not isinstance(generation_len, (list, tuple)) else [wanted[i] for i in clamped]
        warnings.warn(f"generation_len={shown} does not fit ctx_len={ctx_len} for prompt(s) {clamped}: clamped to "
                      f"ctx_len - prompt_len ({[limits[i] for i in clamped]} tokens). Compile with a larger ctx_len "
                      "for longer answers.", stacklevel=4)
    return limits


def generate_ids(
    runner: KVRunner,
    prompt_ids: Sequence[Sequence[int]],
    generation_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    pad_token_id: int = 0,
    progress: bool | None = None,
    sampling: Sequence[SamplingParams] | None = None,
    token_bitmasks=None,
) -> tuple[list[list[int]], list[str], GenerationMetrics]:
    """Generation of `prompt_ids` on `runner`, in batches of `runner.batch_size`: greedy, or per prompt as
    `sampling` says (one SamplingParams per prompt; runtime.sampling), optionally restricted by
    `token_bitmasks` ([vocab] bool for all prompts, or one per prompt: guided decoding).

    Returns (new ids per prompt, why each stopped, metrics). `generation_len=None` means as many as the
    context allows; a larger value is clamped per prompt to `ctx_len - prompt_len` with a warning.
    `on_tokens(row, new_ids)` is called after each step for the rows of the current batch (streaming)."""
    from tqdm.auto import tqdm

    B, P, C = runner.batch_size, runner.prefill_seq_len, runner.ctx_len
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    check_prompts(prompt_ids, C)
    eos = set(eos_token_ids or [])
    chooser = TokenChooser.for_runner(runner, prompt_ids, sampling, token_bitmasks)
    limits = request_limits(prompt_ids, generation_len, C)
    metrics = GenerationMetrics(prompts=len(prompt_ids), backend=getattr(runner, "backend", type(runner).__name__),
                                prompt_tokens=sum(map(len, prompt_ids)))
    outputs: list[list[int]] = []
    stopped: list[str] = []
    batches = [list(range(s, min(s + B, len(prompt_ids)))) for s in range(0, len(prompt_ids), B)]
    metrics.batches = len(batches)
    start = time.perf_counter()
    # progress=None: a bar only for long runs (several batches); short ones stay quiet (clean notebook output)
    bar = tqdm(batches, desc="generate", unit="batch", disable=not (progress if progress is not None else len(batches) > 3))
    for batch in bar:
        rows = [prompt_ids[i] for i in batch]
        row_limits = [limits[i] for i in batch] + [0] * (B - len(batch))  # filler rows run with position -1 only
        lengths = [len(r) for r in rows] + [0] * (B - len(batch))
        longest = max(lengths)
        t0 = time.perf_counter()
        # --- prefill, in chunks of P; each row's logits come from the chunk holding its last prompt token
        next_tok = np.zeros(B, np.int64)
        n_chunks = -(-longest // P)
        for c in range(n_chunks):
            ids = np.full((B, P), pad_token_id, np.int64)
            pos = np.full((B, P), -1, np.int64)
            for r, row in enumerate(rows):
                part = row[c * P:(c + 1) * P]
                ids[r, :len(part)] = part
                pos[r, :len(part)] = np.arange(c * P, c * P + len(part))
            finishing = [r < len(rows) and (lengths[r] - 1) // P == c for r in range(B)]
            tokens = chooser.step(runner, ids, pos, None, [batch[r] if f else None for r, f in enumerate(finishing)],
                                  decode=False)
            next_tok = np.where(finishing, tokens, next_tok)
        t1 = time.perf_counter()
        if not metrics.ttft_s:
            metrics.ttft_s = t1 - t0
        metrics.prefill_s += t1 - t0
        new = [[int(next_tok[r])] for r in range(len(rows))]
        done = [r >= len(rows) or row_limits[r] <= 1 or new[r][0] in eos for r in range(B)]
        if on_tokens:
            for r in range(len(rows)):
                on_tokens(batch[r], new[r])
        # --- decode, one token per row per step
        steps = 0
        while not all(done):
            ids = np.full((B, 1), pad_token_id, np.int64)
            pos = np.full((B, 1), -1, np.int64)
            for r in range(len(rows)):
                if not done[r]:
                    ids[r, 0] = new[r][-1]
                    pos[r, 0] = lengths[r] + len(new[r]) - 1
            active = [r for r in range(len(rows)) if not done[r]]
            tokens = chooser.step(runner, ids, pos, None, [batch[r] if r in active else None for r in range(B)],
                                  decode=True)
            chosen = {r: tokens[r] for r in active}
            steps += 1
            for r in active:
                new[r].append(int(chosen[r]))
                metrics.decode_tokens += 1
                if on_tokens:
                    on_tokens(batch[r], new[r])
                if new[r][-1] in eos or len(new[r]) >= row_limits[r]:
                    done[r] = True
        metrics.decode_s += time.perf_counter() - t1
        for r in range(len(rows)):
            outputs.append(new[r])
            stopped.append("eos" if new[r][-1] in eos else "length")
    metrics.e2e_s = time.perf_counter() - start
    metrics.generated_tokens = sum(map(len, outputs))
    return outputs, stopped, metrics
