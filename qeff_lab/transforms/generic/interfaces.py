"""What the generic path registers in transformers' interfaces: attention, mask, and (for MoE) dense experts.

- `retained_attention` (AttentionInterface): calls the attention module's *own* `eager_attention_forward` (found in
  the module's modeling file), so soft-capping, sinks, scaling rules and GQA stay the model's code; it only ever
  sees the gathered `[B, kv_heads, ctx_len, D]` context and an additive float mask.
- `retained_mask` (AttentionMaskInterface): the model's own `mask_function` (causal, sliding window, chunked) at
  the query's real positions (`q_offset` is the `[B, S]` position tensor the cache hands out) against
  `arange(ctx_len)`; masked = MASK_VALUE (finite in fp16; a query row is never fully masked: padding rows sit at 0).
- `dense_experts_forward` (ExpertsInterface): every expert on every token, weighted by the router's top-k weights
  (zero elsewhere). No data-dependent loop (eager experts), no per-token weight gather (batched_mm): static MatMuls,
  what a device compiler takes well and what the TorchScript exporter can trace.
Registration uses the class methods (`*Interface.register`): a name missing from `AttentionMaskInterface`'s
global mapping makes `masking_utils` silently return mask=None.
"""
from __future__ import annotations

import sys

import torch
from transformers.integrations.moe import ExpertsInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from qeff_lab.contracts import MASK_VALUE

ATTENTION_NAME = "qeff_retained"
EXPERTS_NAME = "qeff_dense"

_EAGER: dict[type, object] = {}


def eager_for(module) -> tuple[object, str]:
    """The attention module's own eager attention function and where it came from."""
    cls = type(module)
    if cls not in _EAGER:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        _EAGER[cls] = (fn, f"{cls.__module__}.eager_attention_forward") if fn else (generic_eager_attention, "generic")
    return _EAGER[cls]


def generic_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                            **kwargs):
    """Fallback for a modeling file without `eager_attention_forward`: GQA by shape, optional soft-capping."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def retained_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    fn, _ = eager_for(module)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def retained_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, dtype: torch.dtype = torch.float32, device=None, **kwargs) -> torch.Tensor:
    """Additive float mask [B, 1, S, kv_length]: 0 where the model's mask_function allows, MASK_VALUE elsewhere."""
    from transformers.masking_utils import and_masks, causal_mask_function, padding_mask_function, prepare_padding_mask

    mask_function = mask_function or causal_mask_function
    if isinstance(q_offset, torch.Tensor) and q_offset.dim() == 2:
        q_pos = q_offset  # [B, S] real positions (the retained cache)
        device = q_pos.device
    else:  # called with an ordinary cache or none: positions are offset + arange, as in masking_utils
        q_pos = (torch.arange(q_length, device=device) + q_offset)[None].expand(batch_size, -1)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    allowed = mask_function(b, h, q_pos[:, None, :, None], kv).expand(batch_size, 1, q_length, kv_length)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), MASK_VALUE, dtype=dtype, device=device))


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], top_k_index / top_k_weights [T, K] -> [T, H]; every expert runs, non-selected weigh 0."""
    experts = torch.arange(self.num_experts, device=hidden_states.device)
    routing = ((top_k_index[..., None] == experts).to(top_k_weights.dtype) * top_k_weights[..., None]).sum(1)  # [T, E]
    up_w = self.gate_up_proj if self.has_gate else self.up_proj
    up = torch.matmul(hidden_states[None], up_w if self.is_transposed else up_w.transpose(1, 2))  # [E, T, *]
    if self.has_bias:
        up = up + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[:, None]
    act = self._apply_gate(up) if self.has_gate else self.act_fn(up)
    out = torch.matmul(act, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))  # [E, T, H]
    if self.has_bias:
        out = out + self.down_proj_bias[:, None]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return (out * routing.transpose(0, 1)[..., None].to(out.dtype)).sum(0).to(hidden_states.dtype)


def register() -> None:
    """Idempotent: class-level registration, seen by every model and every interface instance."""
    AttentionInterface.register(ATTENTION_NAME, retained_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, retained_mask)
    ExpertsInterface.register(EXPERTS_NAME, dense_experts_forward)
