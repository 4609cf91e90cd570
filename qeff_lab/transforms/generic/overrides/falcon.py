"""falcon: hand-written attention (no AttentionInterface); only its ALiBi builder needs an exportable twin.

The attention (multi-query, new-decoder K/V, parallel blocks; ALiBi or rotary) already calls
cache.update(k, v, layer_idx) and adds the 4D mask from create_causal_mask.

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
