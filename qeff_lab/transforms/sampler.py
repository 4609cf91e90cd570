"""The in-graph sampler (QEfficient's `qaic_config={"include_sampler": True}`): the decoder's export wrapper gains
the sampling parameters, the random numbers (and optionally a token bitmask) as inputs and returns the next token
ids (and optionally the probabilities) instead of the logits, so only ids cross the host boundary.

The body is the host reference of runtime.sampling (`penalize`, then `sample_top_k_ids` over the top
`max_top_k_ids` candidates), so the same random numbers give the same tokens on both sides. The penalty history
lives in two retained-state buffers `[slots, vocab]` bool, QEfficient's names:
- `past_repetition_penalty_buffer`: every token fed to the row (prompt and generated) since its request started;
- `past_presence_penalty_buffer`: every token passed as `last_accepted_output_tokens` (the generated ones; the
  host passes -1 during prefill).
A row whose first position is 0 starts a new request: its slot's buffers are cleared first (only that slot:
QEfficient clears every slot's presence buffer on any prefill, which loses the history of the other slots under
continuous batching).
"""
from __future__ import annotations

import torch
from torch import nn

from qeff_lab.contracts import (LAST_ACCEPTED_OUTPUT_TOKENS, MAX_TOP_K_IDS, NEXT_TOKENS, PRESENCE_BUFFER, PROBS,
                                QAIC_CONFIG_KEYS, RANDOM_NUMBERS, REPETITION_BUFFER, SAMPLER_INPUTS, TOKEN_BITMASKS,
                                retained)
from qeff_lab.runtime.sampling import penalize, sample_top_k_ids


def check_qaic_config(qaic_config: dict | None, vocab_size: int | None = None) -> dict:
    """The validated `qaic_config` (QEfficient's keys), with max_top_k_ids filled in; a clear error otherwise."""
    if qaic_config is None:
        return {}
    if not isinstance(qaic_config, dict):
        raise ValueError(f"qaic_config must be a dict such as {{'include_sampler': True}}, got {qaic_config!r}")
    unknown = set(qaic_config) - set(QAIC_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"Unknown qaic_config key(s) {sorted(unknown)}; known: {list(QAIC_CONFIG_KEYS)}.")
    config = dict(qaic_config)
    kind = config.get("speculative_model_type")
    if kind is not None and kind != "target":
        raise ValueError(f"qaic_config {{'speculative_model_type': {kind!r}}} is not supported; supported: 'target' "
                         "(a draft model is a plain model).")
    for key in ("include_sampler", "return_pdfs", "include_guided_decoding"):
        if not isinstance(config.setdefault(key, False), bool):
            raise ValueError(f"qaic_config[{key!r}] must be True or False, got {config[key]!r}")
    if not config["include_sampler"] and (config["return_pdfs"] or config["include_guided_decoding"]):
        raise ValueError("qaic_config: return_pdfs and include_guided_decoding need include_sampler=True.")
    if kind and config["include_sampler"]:
        raise ValueError("qaic_config: speculative_model_type='target' with include_sampler is not supported "
                         "(speculative decoding is greedy): load the target without the sampler.")
    k = config.setdefault("max_top_k_ids", MAX_TOP_K_IDS)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"qaic_config['max_top_k_ids'] must be a positive int, got {k!r}")
    if vocab_size is not None:
        config["max_top_k_ids"] = min(k, vocab_size)
    return config


def _mark(rows: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """rows [B,V] bool with the valid `ids` [B,S] set."""
    vocab = torch.arange(rows.shape[1], dtype=ids.dtype)
    hits = (ids[:, :, None] == vocab[None, None, :]) & valid[:, :, None]
    return rows | hits.any(dim=1)


class SamplerWrapper(nn.Module):
    """Wraps a decoder export wrapper `(input_ids, position_ids, *past[, batch_index]) -> (logits, *past_out)`:
    inputs `(input_ids, position_ids, *past[, batch_index], last_accepted_output_tokens, past_repetition_penalty_
    buffer, repetition_penalties, past_presence_penalty_buffer, presence_penalties, temperatures, top_ks, top_ps,
    min_ps, random_numbers[, token_bitmasks])`, outputs `([probs,] next_tokens, *past_out, past_repetition_penalty_
    buffer_RetainedState, past_presence_penalty_buffer_RetainedState)`."""

    def __init__(self, inner: nn.Module, num_past: int, continuous_batching: bool, qaic_config: dict):
        super().__init__()
        self.inner, self.num_past, self.continuous_batching = inner, num_past, continuous_batching
        self.return_pdfs = qaic_config["return_pdfs"]
        self.guided = qaic_config["include_guided_decoding"]

    def forward(self, input_ids, position_ids, *rest):
        n = self.num_past + (1 if self.continuous_batching else 0)
        kv_args, (last_accepted, rep_buffer, repetition_penalties, pres_buffer, presence_penalties, temperatures,
                  top_ks, top_ps, min_ps, random_numbers, *bitmask) = rest[:n], rest[n:]
        logits, *past_out = self.inner(input_ids, position_ids, *kv_args)
        logits = logits[:, -1].to(torch.float32)  # [B, V]
        rows = input_ids.shape[0]
        batch_index = kv_args[-1].reshape(-1) if self.continuous_batching else torch.arange(rows)
        # the penalty history of each row's slot, cleared where a request starts (position 0), then updated
        new_request = (position_ids[:, :1] == 0)
        seen = rep_buffer[batch_index] & ~new_request
        generated = pres_buffer[batch_index] & ~new_request
        seen = _mark(seen, input_ids, position_ids >= 0)
        generated = _mark(generated, last_accepted, last_accepted >= 0)
        slots = batch_index[:, None].expand(-1, rep_buffer.shape[1])
        rep_out = rep_buffer.scatter(0, slots, seen)
        pres_out = pres_buffer.scatter(0, slots, generated)
        params = {"temperatures": temperatures.reshape(-1), "top_ks": top_ks.reshape(-1).to(torch.int64),
                  "top_ps": top_ps.reshape(-1), "min_ps": min_ps.reshape(-1),
                  "repetition_penalties": repetition_penalties.reshape(-1),
                  "presence_penalties": presence_penalties.reshape(-1)}
        scores = penalize(logits, params["repetition_penalties"], params["presence_penalties"], seen, generated,
                          bitmask[0] if self.guided else None)
        greedy = scores.argmax(dim=-1)
        sampled, candidates, warped = sample_top_k_ids(scores, params, random_numbers)
        next_tokens = torch.where(params["temperatures"] > 0, sampled, greedy).reshape(rows, 1, 1)
        outputs = (next_tokens, *past_out, rep_out, pres_out)
        if self.return_pdfs:  # the distribution the token was drawn from (zero outside the warped candidates)
            probs = torch.zeros_like(logits).scatter(1, candidates, torch.softmax(warped, dim=-1))
            outputs = (probs[:, None], *outputs)
        return outputs


def add_sampler(module: nn.Module, example_inputs: dict, output_names: list[str], dynamic_axes: dict,
                num_past: int, vocab_size: int, continuous_batching: bool, qaic_config: dict):
    """A decoder's export (module, example inputs, output names, axes) with the in-graph sampler added."""
    batch = example_inputs["input_ids"].shape[0]
    slots = example_inputs[next(k for k in example_inputs if k.startswith("past_"))].shape[0]
    k = qaic_config["max_top_k_ids"]
    g = torch.Generator().manual_seed(0)
    example = dict(example_inputs)
    example[LAST_ACCEPTED_OUTPUT_TOKENS] = torch.full(example_inputs["input_ids"].shape, -1, dtype=torch.long)
    example[REPETITION_BUFFER] = torch.zeros(slots, vocab_size, dtype=torch.bool)
    example["repetition_penalties"] = torch.full((batch, 1), 1.2)
    example[PRESENCE_BUFFER] = torch.zeros(slots, vocab_size, dtype=torch.bool)
    example["presence_penalties"] = torch.full((batch, 1), 0.5)
    example["temperatures"] = torch.full((batch, 1), 0.8)
    example["top_ks"] = torch.full((batch, 1), 5, dtype=torch.int32)
    example["top_ps"] = torch.full((batch, 1), 0.9)
    example["min_ps"] = torch.full((batch, 1), 0.05)
    example[RANDOM_NUMBERS] = torch.rand(batch, k, generator=g)
    axes = dict(dynamic_axes)
    axes[LAST_ACCEPTED_OUTPUT_TOKENS] = {0: "batch_size", 1: "seq_len"}
    kv_axis = "full_batch_size" if continuous_batching else "batch_size"
    for name in SAMPLER_INPUTS[1:]:
        axes[name] = {0: kv_axis} if name in (REPETITION_BUFFER, PRESENCE_BUFFER) else {0: "batch_size"}
    if qaic_config["include_guided_decoding"]:
        example[TOKEN_BITMASKS] = torch.ones(batch, vocab_size, dtype=torch.bool)
        axes[TOKEN_BITMASKS] = {0: "batch_size"}
    kv_outputs = [o for o in output_names if o != "logits"]
    outputs = ([PROBS] if qaic_config["return_pdfs"] else []) + [NEXT_TOKENS, *kv_outputs, retained(REPETITION_BUFFER),
                                                                   retained(PRESENCE_BUFFER)]
    axes.pop("logits", None)
    axes[NEXT_TOKENS] = {0: "batch_size"}
    if qaic_config["return_pdfs"]:
        axes[PROBS] = {0: "batch_size"}
    for name in (REPETITION_BUFFER, PRESENCE_BUFFER):
        axes[retained(name)] = {0: kv_axis}
    wrapper = SamplerWrapper(module, num_past, continuous_batching, qaic_config)
    return wrapper, example, outputs, axes


__all__ = ["SamplerWrapper", "add_sampler", "check_qaic_config"]
