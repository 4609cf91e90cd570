"""falcon: hand-written attention (no AttentionInterface); an exportable ALiBi twin, grouped K/V for new-decoder models.

The attention (multi-query, new-decoder K/V, parallel blocks; ALiBi or rotary) already calls
cache.update(k, v, layer_idx) and adds the 4D mask from create_causal_mask; with the new decoder architecture it
broadcasts K/V to every query head first, so `RetainedFalconAttention` keeps the cache at num_kv_heads instead.

`modeling_falcon.build_alibi_tensor` multiplies bfloat16 slopes by int64 positions; the TorchScript exporter casts
the implicitly promoted operand to complex128 (ONNX Runtime: "Type 'tensor(complex128)' ... of operator (Mul) is
invalid"). `build_alibi_tensor` below writes the same product with explicit casts: bfloat16 slopes times bfloat16
positions, multiplied in fp32 (exact: two 8-bit mantissas) and rounded to bfloat16, which is what torch's bfloat16
multiply does; the same values bit for bit (tests/transforms/test_generic_overrides.py). It replaces the module
function once, globally (like onnx_symbolics' registrations); the model keeps building ALiBi over every ctx_len slot
(the retained cache's get_seq_length() makes the all-ones mask span the buffer: slot = position).
"""
from __future__ import annotations

import math

import torch
from transformers.models.falcon import modeling_falcon

ORIGINAL = modeling_falcon.build_alibi_tensor


def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    batch_size, seq_length = attention_mask.shape
    device = attention_mask.device
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest_power_of_2, device=device, dtype=torch.int32))
    if closest_power_of_2 != num_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), device=device,
                                dtype=torch.float32)
        remaining = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * remaining, 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    bf16 = torch.bfloat16
    alibi = (slopes[..., None].to(bf16).float() * positions.to(bf16).float()).to(bf16)
    return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)


def install() -> None:
    modeling_falcon.build_alibi_tensor = build_alibi_tensor


class RetainedFalconAttention(modeling_falcon.FalconAttention):
    """New decoder architecture (falcon-40b / 180b), rotary: the cache keeps the num_kv_heads keys / values, not the
    copies `_split_heads` broadcasts to every query head (num_heads / num_kv_heads times the memory); each query head
    reads its group's key / value, as the broadcast gave it. Every other variant: the model's own forward."""

    def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                output_attentions=False, position_embeddings=None, **kwargs):
        if not self.new_decoder_architecture or alibi is not None:
            return super().forward(hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                   output_attentions, position_embeddings, **kwargs)
        batch, length, _ = hidden_states.shape
        group = self.num_heads // self.num_kv_heads
        qkv = self.query_key_value(hidden_states).view(batch, length, self.num_kv_heads, group + 2, self.head_dim)
        query = qkv[:, :, :, :-2].flatten(2, 3).transpose(1, 2)  # [B, heads, S, D], heads grouped by KV head
        key, value = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)  # [B, kv_heads, S, D]
        query, key = modeling_falcon.apply_rotary_pos_emb(query, key, *position_embeddings)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        shape = (batch, self.num_heads, key.shape[2], self.head_dim)
        key = key[:, :, None].expand(batch, self.num_kv_heads, group, *key.shape[2:]).reshape(shape)
        value = value[:, :, None].expand(batch, self.num_kv_heads, group, *value.shape[2:]).reshape(shape)
        scores = query @ key.transpose(-1, -2)
        scores /= math.sqrt(self.head_dim)
        probs = torch.softmax(scores + attention_mask, dim=-1, dtype=hidden_states.dtype)
        out = (probs @ value).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.dense(out), probs


SWAPS = {modeling_falcon.FalconAttention: RetainedFalconAttention}
