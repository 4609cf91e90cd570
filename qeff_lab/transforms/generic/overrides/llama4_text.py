"""llama4_text: complex rotary (no ONNX lowering) and a NoPE temperature taken at cache.get_seq_length().

Its rotary embedding is torch.polar / view_as_complex, and its NoPE layers' attention temperature is computed at
arange(new tokens) + cache.get_seq_length(), one length for the whole batch. This rotates real (cos, sin) pairs
(tabulated by rope_tables.py like any rotary) and takes the temperature at each row's position_ids.
"""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama4.modeling_llama4 import (Llama4TextAttention, Llama4TextRotaryEmbedding,
                                                        eager_attention_forward)


class RealLlama4TextRotaryEmbedding(Llama4TextRotaryEmbedding):
    """(cos, sin) [B, S, head_dim / 2]: the real and imaginary parts of the model's freqs_cis (polar(1, angle) *
    attention_scaling). Of the usual (x, position_ids) -> (cos, sin) shape, so rope_tables.py tabulates it."""

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.cos(freqs) * self.attention_scaling, torch.sin(freqs) * self.attention_scaling


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb's complex product (a + ib)(c + is) on interleaved (a, b) pairs, in real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


class RetainedLlama4TextAttention(Llama4TextAttention):
    """Llama4TextAttention.forward with real rotary pairs and the NoPE temperature at the real positions."""

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = position_embeddings
            query, key = rotate_pairs(query, cos, sin), rotate_pairs(key, cos, sin)
        if hasattr(self, "qk_norm"):
            query, key = self.qk_norm(query), self.qk_norm(key)
        if self.attn_temperature_tuning and not self.use_rope:
            positions = cache.get_query_offset().float()  # [B, S]: each row's position_ids (padding at 0)
            scales = torch.log1p(torch.floor((positions + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            query = (query * scales[..., None, None]).to(query.dtype)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


SWAPS = {Llama4TextRotaryEmbedding: RealLlama4TextRotaryEmbedding, Llama4TextAttention: RetainedLlama4TextAttention}
