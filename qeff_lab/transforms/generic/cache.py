"""RetainedStateCache: a transformers `Cache` over fixed `[batch, kv_heads, ctx_len, head_dim]` buffers.

`update()` writes the new keys/values with `CtxScatter` at the call's `position_ids` (padding, -1, writes nothing)
and returns the whole context read back with `CtxGather` (slots beyond each row's last position are exact zeros).
With a `batch_index` [B, 1] (continuous batching) the buffers hold `full_batch_size` slots and row b writes and reads
slot `batch_index[b]` (`CtxScatterCB` / `CtxGatherCB`); the mask is per row as ever (each row's own positions).
The writes are out of place: after the forward, `layer.keys` / `layer.values` are the new buffers, which the
caller returns as graph outputs. Position ids live on the cache, not in `update()`'s kwargs, because some
models (gpt_neox) call `update(k, v, layer_idx)` without them.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from qeff_lab.ops import ctx_gather, ctx_scatter
from qeff_lab.ops.ctx_cb import ctx_gather_cb, ctx_scatter_cb
from qeff_lab.transforms.kv_cache import UnsupportedConfigError


class UnsupportedArchitectureError(UnsupportedConfigError):
    """A model the generic retained-state path cannot run exactly; the message names the type, the obstacle and what to do."""


class RetainedStateLayer(CacheLayerMixin):
    """One layer's retained buffers; `update` = CtxScatter at the cache's positions, then CtxGather of the context
    (the batch_index variants when the cache has one)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "RetainedStateCache", keys: torch.Tensor, values: torch.Tensor, sliding: bool = False):
        super().__init__()
        self.owner, self.keys, self.values, self.is_sliding = owner, keys, values, sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers come from the caller
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        pos, ctx, bi = self.owner.position_ids, self.owner.ctx_indices, self.owner.batch_index
        if bi is None:
            self.keys = ctx_scatter(self.keys, pos, key_states)
            self.values = ctx_scatter(self.values, pos, value_states)
            return ctx_gather(self.keys, ctx), ctx_gather(self.values, ctx)
        self.keys = ctx_scatter_cb(self.keys, bi, pos, key_states)
        self.values = ctx_scatter_cb(self.values, bi, pos, value_states)
        return ctx_gather_cb(self.keys, bi, ctx), ctx_gather_cb(self.values, bi, ctx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0  # the mask spans every slot; the model's mask_function decides per position

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RetainedStateCache(Cache):
    """Built per forward from explicit buffers (no Cache object crosses the graph boundary).

    - `position_ids` [B, S]: where each new token is written (-1: padding, writes nothing).
    - `batch_index` [B, 1] or None: continuous batching, the buffers' first axis is `full_batch_size` and row b
      uses slot `batch_index[b]`; everything else (positions, ctx_indices, mask) stays per batch row.
    - `ctx_indices` [B, ctx_len]: slot k, or -1 beyond the row's largest position (read as zeros).
    - `get_query_offset()` returns the query positions [B, S] (padding mapped to 0 so no mask row is empty):
      `masking_utils` hands it to the registered mask function as `q_offset`, which evaluates the model's own
      `mask_function` (causal, sliding, chunked) at real positions against `arange(ctx_len)`.
    """

    def __init__(self, past_key_values, position_ids: torch.Tensor, sliding: list[bool] | None = None,
                 model_type: str = "model", batch_index: torch.Tensor | None = None):
        sliding = sliding or [False] * len(past_key_values)
        super().__init__(layers=[RetainedStateLayer(self, k, v, s) for (k, v), s in zip(past_key_values, sliding)])
        self.model_type = model_type
        self.position_ids, self.batch_index = position_ids, batch_index
        ctx_len = past_key_values[0][0].shape[2]
        slots = torch.arange(ctx_len, device=position_ids.device)
        limit = position_ids.max(dim=1, keepdim=True).values
        self.ctx_indices = torch.where(slots[None, :] > limit, torch.full_like(limit, -1), slots[None, :])
        self.query_positions = position_ids.clamp(min=0)

    def get_query_offset(self, layer_idx: int = 0):
        return self.query_positions

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """ctx_len - new tokens: the "past" length for which past + new spans the whole buffer. A model that sizes a
        [B, past + new] padding mask or ALiBi key positions from it then covers every slot (slot = position); the
        causal / sliding mask still comes from position_ids. A model that derives positions from it is refused by
        support.py (its source is read) or caught by the matrix's parity check."""
        return self.layers[0].keys.shape[2] - self.position_ids.shape[1]

    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]


class _ProbeLayer(CacheLayerMixin):
    """Records the key/value shapes a layer writes (one probe forward at transform time)."""

    def __init__(self):
        super().__init__()
        self.key_shape = self.value_shape = None

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.key_shape, self.value_shape = tuple(key_states.shape), tuple(value_states.shape)
        self.is_initialized = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0  # the probe's one token has no past

    def get_max_length(self) -> int:
        return -1


class ProbeCache(Cache):
    """Lazily grows one `_ProbeLayer` per `update(layer_idx)`; get_seq_length is 0 (one token, no past)."""

    def __init__(self, position_ids: torch.Tensor, model_type: str):
        super().__init__(layer_class_to_replicate=_ProbeLayer)
        self.model_type, self.query_positions = model_type, position_ids.clamp(min=0)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            layer = _ProbeLayer()
            layer.model_type = self.model_type
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states)

    def get_query_offset(self, layer_idx: int = 0):
        return self.query_positions

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
