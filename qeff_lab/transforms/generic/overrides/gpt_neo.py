"""gpt_neo: its causal / local-window mask buffer is sliced as if the queries were the last key slots.

GPT-Neo's attention (no AttentionInterface) calls cache.update(k, v, layer_idx), but `_attn` takes rows
`key_length - query_length:` of a [max_positions, max_positions] band buffer; on the retained cache the keys span
ctx_len and the queries sit at position_ids. This applies the window at the real positions instead.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

from qeff_lab.contracts import MASK_VALUE


class RetainedGPTNeoSelfAttention(GPTNeoSelfAttention):
    """The model's own projections and softmax; the mask is the retained causal mask (position_ids against
    arange(ctx_len)), narrowed to the last `window_size` positions on local layers."""

    def forward(self, hidden_states, attention_mask=None, layer_past=None, **kwargs):
        if self.attention_type == "local" and layer_past is not None and attention_mask is not None:
            query = layer_past.get_query_offset()[:, None, :, None]  # [B, 1, S, 1] real positions
            keys = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
            attention_mask = attention_mask.masked_fill(keys <= query - self.config.window_size, MASK_VALUE)
        return super().forward(hidden_states, attention_mask=attention_mask, layer_past=layer_past, **kwargs)

    def _attn(self, query, key, value, attention_mask=None):  # GPTNeoSelfAttention._attn without the bias slice
        attn_weights = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(-1, -2))
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1).to(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value), attn_weights


SWAPS = {GPTNeoSelfAttention: RetainedGPTNeoSelfAttention}
