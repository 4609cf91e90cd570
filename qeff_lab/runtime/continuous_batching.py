"""Continuous batching: the KV cache has `full_batch_size` slots; requests wait in a queue, each is prefilled
alone into a free slot (`batch_index`), decode runs every slot at once (free slots carry position -1 and touch
nothing), and a finished request frees its slot, into which the next waiting prompt is prefilled at once.

This is the schedule of QEfficient's `run_continuous_batching_decode` (prefill batch 1 with `batch_index`
[[slot]], decode batch `full_batch_size` with `batch_index` arange), on any KV runner that takes `batch_index`
(OrtKVSession, TorchKVRunner, QaicKVRunner). Greedy tokens of a prompt are those it gets when run alone.

Prefix reuse (`prefix_caching=True`): a slot's cache holds, at positions 0..n-1, the KV of the tokens its last
request fed (prompt, then generated), and the KV at a position depends only on the tokens up to it. So a new
prompt that starts with the same m tokens as what some slot holds (a shared system prompt) takes those m
positions from that slot (`runner.copy_prefix(src, dst, m)`; nothing to copy when it is its own slot) and
prefills only the rest, from position m. At least the last prompt token is always prefilled (its logits give
the first new token). Tokens are those of a fresh run; `ServingMetrics.prefill_tokens_saved` counts the reuse.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from qeff_lab.pipeline import HtmlRepr
from qeff_lab.runtime.generation import GenerationMetrics, check_prompts, common_prefix_len, request_limits
from qeff_lab.runtime.sampling import SamplingParams, TokenChooser


@dataclass
class RequestMetrics:
    """One request's times, in seconds from the start of the run (it arrives at 0: every prompt is queued then)."""

    index: int
    prompt_tokens: int
    slot: int = -1
    prefill_start_s: float = 0.0  # = queue wait
    first_token_s: float = 0.0
    finish_s: float = 0.0
    generated_tokens: int = 0
    stopped: str = ""
    prefix_reused: int = 0  # prompt tokens whose KV came from a slot's cache (prefix_caching)
    prefix_source: int = -1  # the slot they came from

    @property
    def queue_wait_s(self) -> float:
        return self.prefill_start_s

    @property
    def ttft_s(self) -> float:
        """Arrival to first token: queue wait + prefill."""
        return self.first_token_s

    @property
    def decode_tok_s(self) -> float:
        span = self.finish_s - self.first_token_s
        return (self.generated_tokens - 1) / span if self.generated_tokens > 1 and span > 0 else float("nan")


@dataclass(repr=False)
class ServingMetrics(GenerationMetrics, HtmlRepr):
    """Run figures (GenerationMetrics; `ttft_s` is the mean TTFT of the requests, queue wait included) plus one
    RequestMetrics per request and the run's throughput (generated tokens / end-to-end seconds)."""

    full_batch_size: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    requests: list[RequestMetrics] = field(default_factory=list)

    @property
    def throughput_tok_s(self) -> float:
        return self.total_tok_s

    @property
    def prefill_tokens_saved(self) -> int:
        """Prompt tokens not prefilled because a slot's cache already held them (prefix_caching)."""
        return sum(r.prefix_reused for r in self.requests)

    def requests_frame(self) -> pd.DataFrame:
        rows = [{"request": r.index, "slot": r.slot, "prompt tokens": r.prompt_tokens, "new tokens": r.generated_tokens,
                 "queue wait s": round(r.queue_wait_s, 4), "TTFT s": round(r.ttft_s, 4),
                 "decode tok/s": round(r.decode_tok_s, 1), "stopped": r.stopped, "prefix reused": r.prefix_reused}
                for r in self.requests]
        return pd.DataFrame(rows, columns=["request", "slot", "prompt tokens", "new tokens", "queue wait s", "TTFT s",
                                           "decode tok/s", "stopped", "prefix reused"])

    def to_frame(self) -> pd.DataFrame:
        base = super().to_frame()
        extra = pd.DataFrame([("full batch size", self.full_batch_size), ("decode steps", self.decode_steps),
                              ("prefill steps", self.prefill_steps), ("prefill tokens saved", self.prefill_tokens_saved),
                              ("throughput", f"{self.throughput_tok_s:.1f} tokens/s")], columns=["metric", "value"])
        return pd.concat([base, extra], ignore_index=True)

    def report(self) -> str:
        lines = super().report().splitlines()
        lines.insert(-1, f"Continuous batching: {self.prompts} requests on {self.full_batch_size} slots, "
                         f"throughput {self.throughput_tok_s:.2f} tokens/sec")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<ServingMetrics {self.prompts} request(s) on {self.full_batch_size} slot(s), {self.generated_tokens} "
                f"tokens, mean TTFT {self.ttft_s:.3f} s, throughput {self.throughput_tok_s:.1f} tokens/s>")


def generate_continuous(
    runner,
    prompt_ids: Sequence[Sequence[int]],
    generation_len: int | Sequence[int | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    pad_token_id: int = 0,
    sampling: Sequence[SamplingParams] | None = None,
    token_bitmasks=None,
    prefix_caching: bool = False,
    on_event: Callable[[str, int, int, float], None] | None = None,
) -> tuple[list[list[int]], list[str], ServingMetrics]:
    """Serve `prompt_ids` (any number) on a continuous-batching KV runner (`runner.full_batch_size` slots).
    `generation_len`: one limit for all, or one per prompt (None: as long as the context allows; clamped to
    `ctx_len - prompt_len` with a warning). Returns (new ids per prompt, why each stopped, ServingMetrics)."""
    F, P, C = getattr(runner, "full_batch_size", None), runner.prefill_seq_len, runner.ctx_len
    if not F:
        raise ValueError(f"{runner!r} has no continuous batching: compile with full_batch_size (and load with "
                         "continuous_batching=True).")
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    check_prompts(prompt_ids, C)
    limits = request_limits(prompt_ids, generation_len, C)
    eos = set(eos_token_ids or [])
    chooser = TokenChooser.for_runner(runner, prompt_ids, sampling, token_bitmasks)
    if prefix_caching and (chooser.in_graph or not hasattr(runner, "copy_prefix")):
        why = "has an in-graph sampler, whose penalty history starts at position 0" if chooser.in_graph else "cannot"
        raise ValueError(f"prefix_caching needs a runner that can copy a slot's cache ({type(runner).__name__} {why}); "
                         "run without prefix_caching, or on the ONNX Runtime / PyTorch runner without the sampler.")
    metrics = ServingMetrics(prompts=len(prompt_ids), backend=getattr(runner, "backend", type(runner).__name__),
                             prompt_tokens=sum(map(len, prompt_ids)), full_batch_size=F)
    metrics.requests = [RequestMetrics(i, len(p)) for i, p in enumerate(prompt_ids)]
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    stopped = [""] * len(prompt_ids)
    queue = deque(range(len(prompt_ids)))
    slot_request: list[int | None] = [None] * F
    slot_last: list[int | None] = [None] * F  # the request whose tokens the slot's cache holds
    start = time.perf_counter()

    def event(kind: str, i: int, slot: int) -> None:
        if on_event:
            on_event(kind, i, slot, time.perf_counter() - start)

    def finish(i: int) -> None:
        rm = metrics.requests[i]
        rm.finish_s = time.perf_counter() - start
        rm.generated_tokens = len(outputs[i])
        stopped[i] = rm.stopped = "eos" if outputs[i][-1] in eos else "length"
        event("finish", i, rm.slot)

    def cached_prefix(row: list[int]) -> tuple[int, int]:
        """(slot, length) of the longest prefix of `row` some slot's cache holds (never the whole row)."""
        best = (-1, 0)
        for s, r in enumerate(slot_last):
            if r is None:
                continue
            m = common_prefix_len(prompt_ids[r] + outputs[r][:-1], row[:-1])  # the last new token was never fed
            if m > best[1]:
                best = (s, m)
        return best

    def done(i: int) -> bool:
        return outputs[i][-1] in eos or len(outputs[i]) >= limits[i]

    def prefill(slot: int) -> None:
        """Prefill waiting prompts into `slot` until one stays there (or the queue is empty)."""
        while queue:
            i = queue.popleft()
            rm = metrics.requests[i]
            t0 = time.perf_counter()
            rm.prefill_start_s, rm.slot = t0 - start, slot
            event("prefill", i, slot)
            row = prompt_ids[i]
            reused = 0
            if prefix_caching:
                src, reused = cached_prefix(row)
                if reused and src != slot:
                    runner.copy_prefix(src, slot, reused)
                rm.prefix_reused, rm.prefix_source = reused, src if reused else -1
            slot_last[slot] = i
            batch_index = np.array([[slot]], np.int64)
            rest = row[reused:]
            chunks = -(-len(rest) // P)
            for c in range(chunks):
                part = rest[c * P:(c + 1) * P]
                ids = np.full((1, P), pad_token_id, np.int64)
                pos = np.full((1, P), -1, np.int64)
                ids[0, :len(part)] = part
                pos[0, :len(part)] = np.arange(reused + c * P, reused + c * P + len(part))
                token = chooser.step(runner, ids, pos, batch_index, [i if c == chunks - 1 else None], decode=False)
                metrics.prefill_steps += 1
            outputs[i].append(int(token[0]))
            t1 = time.perf_counter()
            rm.first_token_s = t1 - start
            metrics.prefill_s += t1 - t0
            metrics.batches += 1
            if on_tokens:
                on_tokens(i, outputs[i])
            event("token", i, slot)
            if done(i):
                finish(i)
                continue
            slot_request[slot] = i
            return

    for slot in range(F):
        prefill(slot)
    batch_index = np.arange(F, dtype=np.int64)[:, None]
    while any(r is not None for r in slot_request):
        ids = np.full((F, 1), pad_token_id, np.int64)
        pos = np.full((F, 1), -1, np.int64)
        active = [s for s in range(F) if slot_request[s] is not None]
        for s in active:
            i = slot_request[s]
            ids[s, 0] = outputs[i][-1]
            pos[s, 0] = len(prompt_ids[i]) + len(outputs[i]) - 1
        t0 = time.perf_counter()
        tokens = chooser.step(runner, ids, pos, batch_index, slot_request, decode=True)
        metrics.decode_s += time.perf_counter() - t0
        metrics.decode_steps += 1
        for s, token in zip(active, tokens[active]):
            i = slot_request[s]
            outputs[i].append(int(token))
            metrics.decode_tokens += 1
            if on_tokens:
                on_tokens(i, outputs[i])
            event("token", i, s)
            if done(i):
                finish(i)
                slot_request[s] = None
                prefill(s)  # the next waiting prompt takes the slot at once
    metrics.e2e_s = time.perf_counter() - start
    metrics.generated_tokens = sum(map(len, outputs))
    metrics.ttft_s = float(np.mean([r.ttft_s for r in metrics.requests]))
    return outputs, stopped, metrics
