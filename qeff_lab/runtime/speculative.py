"""Speculative decoding over a retained-state KV target: a drafter proposes up to k tokens, the target (compiled
with `num_speculative_tokens=k`, QEfficient's TLM) verifies them in one step of k + 1 positions; greedy, batch 1.

Each target step feeds [last token, d_1 .. d_m] (m <= k; the rest of the k + 1 window is padding at position -1)
and gets logits for every position. The target's greedy tokens g_0 .. g_m decide: the drafts agreeing with them
(d_1 = g_0, d_2 = g_1, ...) are accepted, and the first disagreement (or g_m when all agree) is the target's own
token, so every step yields 1 .. m + 1 tokens, exactly those plain greedy decoding would produce.

The KV written at rejected positions needs no undo: the next step starts at the first position after the accepted
tokens and its k + 1 positions cover every stale one (each step scatters before it gathers), and positions beyond a
step's last are never read (the attention mask and the gather limit stop at each row's largest position).

Drafters: `PromptLookupDrafter` (n-gram match against the prompt and the text so far, no model: HF's prompt
lookup) and `DraftModelDrafter` (a smaller decoder with the same vocabulary, on its own KV runner).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from qeff_lab.runtime.generation import GenerationMetrics, check_prompts, common_prefix_len, request_limits


class Drafter(Protocol):
    """Proposes draft tokens; `start` is called once per request, `propose` before every target step."""

    name: str

    def start(self, prompt_ids: list[int]) -> None: ...

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `tokens` (the prompt and every token generated so far)."""
        ...


class PromptLookupDrafter:
    """Prompt-lookup decoding (HF's `prompt_lookup_num_tokens`): the last n tokens (n = max_matching_ngram_size
    down to 1) are looked up earlier in the sequence and the tokens that followed the first match are proposed.
    Free to run, and accurate where the answer repeats its input (summaries, rewrites, extraction, code edits)."""

    name = "prompt lookup"

    def __init__(self, max_matching_ngram_size: int = 2):
        if not isinstance(max_matching_ngram_size, int) or isinstance(max_matching_ngram_size, bool) \
                or max_matching_ngram_size < 1:
            raise ValueError(f"max_matching_ngram_size must be a positive int, got {max_matching_ngram_size!r}")
        self.max_matching_ngram_size = max_matching_ngram_size

    def start(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, tokens: list[int], k: int) -> list[int]:
        seq = np.asarray(tokens, np.int64)
        for n in range(min(self.max_matching_ngram_size, len(seq) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # excludes the n-gram itself
            starts = np.flatnonzero((windows == seq[-n:]).all(axis=1)) + n
            if len(starts):
                return seq[starts[0]:starts[0] + k].tolist()
        return []

    def __repr__(self) -> str:
        return f"<PromptLookupDrafter max_matching_ngram_size {self.max_matching_ngram_size}>"


class DraftModelDrafter:
    """A draft decoder on its own KV runner (batch 1, decode seq_len 1): greedy, k single steps per proposal. It
    remembers which tokens its cache holds, so after a verification it re-feeds only what differs (the target's
    own token and, when all k were accepted, the last draft)."""

    name = "draft model"

    def __init__(self, runner, pad_token_id: int = 0):
        if getattr(runner, "batch_size", 1) != 1 or getattr(runner, "full_batch_size", None) \
                or getattr(runner, "num_speculative_tokens", None):
            raise ValueError("The draft model must be compiled as a plain decoder with batch_size=1 (no continuous "
                             "batching, not a speculative target).")
        self.runner, self.pad_token_id = runner, pad_token_id
        self.ctx_len = runner.ctx_len  # the positions it can hold: at least the target's
        self.cached: list[int] = []  # the tokens whose KV the draft's cache holds, at positions 0 ..

    def start(self, prompt_ids: list[int]) -> None:
        self.cached = []  # stale entries are overwritten as positions are fed again, and never read beyond them

    def propose(self, tokens: list[int], k: int) -> list[int]:
        # the last token is always fed: its logits give the first draft
        same = min(common_prefix_len(self.cached, tokens), len(tokens) - 1)
        logits = feed(self.runner, tokens[same:], same, self.pad_token_id, single_steps=True)
        self.cached[same:] = tokens[same:]
        drafts = [int(logits.argmax())]
        while len(drafts) < k:
            pos = len(self.cached)
            logits = self.runner.step(np.array([[drafts[-1]]], np.int64), np.array([[pos]], np.int64))[0, -1]
            self.cached.append(drafts[-1])
            drafts.append(int(logits.argmax()))
        return drafts

    def __repr__(self) -> str:
        return f"<DraftModelDrafter {self.runner!r}>"


def feed(runner, tokens: Sequence[int], start: int, pad_token_id: int = 0, single_steps: bool = False) -> np.ndarray:
    """Run `tokens` at positions start, start + 1, .. on batch-1 `runner`; the logits [vocab] after the last one.
    Chunks of prefill_seq_len (padding at position -1, as generation's prefill), or, with `single_steps` and fewer
    than 4 tokens, decode steps of 1 (cheaper than a padded chunk)."""
    if single_steps and len(tokens) < 4:
        for i, t in enumerate(tokens):
            logits = runner.step(np.array([[t]], np.int64), np.array([[start + i]], np.int64))
        return logits[0, -1]
    P = runner.prefill_seq_len
    for c in range(0, len(tokens), P):
        part = tokens[c:c + P]
        ids = np.full((1, P), pad_token_id, np.int64)
        pos = np.full((1, P), -1, np.int64)
        ids[0, :len(part)] = part
        pos[0, :len(part)] = np.arange(start + c, start + c + len(part))
        logits = runner.step(ids, pos)
    return logits[0, -1]


@dataclass
class SpeculativeMetrics(GenerationMetrics):
    """GenerationMetrics plus the speculation: draft tokens proposed and accepted, target (verify) steps. The decode
    rate counts every token after the first, so it compares directly with plain decode."""

    drafter: str = ""
    num_speculative_tokens: int = 0
    target_steps: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else float("nan")

    @property
    def mean_tokens_per_step(self) -> float:
        """Decode tokens per target step (1 means no gain; at most num_speculative_tokens + 1)."""
        return self.decode_tokens / self.target_steps if self.target_steps else float("nan")

    def summary(self) -> str:
        return (f"{self.drafter}, k={self.num_speculative_tokens}: acceptance rate {self.acceptance_rate:.1%} "
                f"({self.accepted_tokens}/{self.proposed_tokens} draft tokens), {self.mean_tokens_per_step:.2f} "
                f"tokens per target step ({self.target_steps} steps)")

    def to_frame(self) -> pd.DataFrame:
        extra = pd.DataFrame([("drafter", self.drafter), ("num speculative tokens", self.num_speculative_tokens),
                              ("draft tokens proposed", self.proposed_tokens),
                              ("draft tokens accepted", self.accepted_tokens),
                              ("acceptance rate", f"{self.acceptance_rate:.1%}"), ("target steps", self.target_steps),
                              ("tokens per target step", f"{self.mean_tokens_per_step:.2f}")],
                             columns=["metric", "value"])
        return pd.concat([super().to_frame(), extra], ignore_index=True)

    def report(self) -> str:
        lines = super().report().splitlines()
        lines.insert(-1, f"Speculative decoding ({self.summary()})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<SpeculativeMetrics {self.prompts} prompt(s), {self.generated_tokens} tokens, {self.drafter} "
                f"k={self.num_speculative_tokens}, acceptance {self.acceptance_rate:.1%}, "
                f"{self.mean_tokens_per_step:.2f} tokens/step>")


def generate_speculative(
    runner,
    prompt_ids: Sequence[Sequence[int]],
    generation_len: int | Sequence[int | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    drafter: Drafter | None = None,
    num_speculative_tokens: int | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    pad_token_id: int = 0,
) -> tuple[list[list[int]], list[str], SpeculativeMetrics]:
    """Greedy generation of each prompt (one after another, batch 1) on a speculative target `runner`, `drafter`
    proposing up to `num_speculative_tokens` (default: the compiled k) per step; no drafter: one token per step.
    Returns (new ids per prompt, why each stopped, SpeculativeMetrics); the ids are plain greedy's."""
    k_compiled = getattr(runner, "num_speculative_tokens", None)
    if not k_compiled:
        raise ValueError(f"{runner!r} cannot verify draft tokens: speculative decoding needs a target (load the model "
                         "with qaic_config={'speculative_model_type': 'target'}, compile with num_speculative_tokens=k) "
                         "run by the embedded ONNX Runtime backend or runtime='pytorch' (not yet the qaic runtime).")
    k = k_compiled if num_speculative_tokens is None else num_speculative_tokens
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= k_compiled:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens!r}: the target verifies at most the "
                         f"{k_compiled} it was compiled for (compile(num_speculative_tokens=...)); give 1 .. {k_compiled}.")
    if drafter is not None and getattr(drafter, "ctx_len", runner.ctx_len) < runner.ctx_len:
        raise ValueError(f"The draft model was compiled with ctx_len={drafter.ctx_len}, less than the target's "
                         f"{runner.ctx_len}: compile it with ctx_len >= {runner.ctx_len}.")
    if runner.batch_size != 1:
        raise ValueError(f"Speculative decoding runs batch 1 here; this target was compiled with batch_size="
                         f"{runner.batch_size}. Compile it with batch_size=1 (prompts run one after another).")
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    check_prompts(prompt_ids, runner.ctx_len)
    limits = request_limits(prompt_ids, generation_len, runner.ctx_len)
    eos = set(eos_token_ids or [])
    window = k_compiled + 1
    metrics = SpeculativeMetrics(prompts=len(prompt_ids), batches=len(prompt_ids),
                                 backend=getattr(runner, "backend", type(runner).__name__),
                                 prompt_tokens=sum(map(len, prompt_ids)),
                                 drafter=drafter.name if drafter else "none", num_speculative_tokens=k)
    outputs, stopped = [], []
    start = time.perf_counter()
    for index, prompt in enumerate(prompt_ids):
        t0 = time.perf_counter()
        if drafter:
            drafter.start(prompt)
        new = [int(feed(runner, prompt, 0, pad_token_id).argmax())]
        t1 = time.perf_counter()
        metrics.ttft_s = metrics.ttft_s or t1 - t0
        metrics.prefill_s += t1 - t0
        if on_tokens:
            on_tokens(index, new)
        done = new[-1] in eos or len(new) >= limits[index]
        while not done:
            tokens = prompt + new
            room = limits[index] - len(new)  # drafts beyond room - 1 could never be kept
            drafts = drafter.propose(tokens, min(k, room - 1)) if drafter and room > 1 else []
            m = len(drafts)
            ids = np.full((1, window), pad_token_id, np.int64)
            pos = np.full((1, window), -1, np.int64)
            ids[0, :m + 1] = [new[-1], *drafts]
            pos[0, :m + 1] = np.arange(len(tokens) - 1, len(tokens) + m)
            greedy = runner.step(ids, pos, num_logits_to_keep=window)[0, :m + 1].argmax(-1)
            accepted = 0
            while accepted < m and drafts[accepted] == greedy[accepted]:
                accepted += 1
            metrics.target_steps += 1
            metrics.proposed_tokens += m
            metrics.accepted_tokens += accepted
            for t in [*drafts[:accepted], int(greedy[accepted])]:
                new.append(t)
                metrics.decode_tokens += 1
                if t in eos or len(new) >= limits[index]:
                    done = True
                    break
            if on_tokens:
                on_tokens(index, new)
        metrics.decode_s += time.perf_counter() - t1
        outputs.append(new)
        stopped.append("eos" if new[-1] in eos else "length")
    metrics.e2e_s = time.perf_counter() - start
    metrics.generated_tokens = sum(map(len, outputs))
    return outputs, stopped, metrics


__all__ = ["DraftModelDrafter", "Drafter", "PromptLookupDrafter", "SpeculativeMetrics", "feed",
           "generate_speculative"]
