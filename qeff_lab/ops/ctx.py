"""CtxScatter / CtxGather: the write into and the read from a fixed-size retained KV cache.

Semantics (both definitions):
- `ctx_scatter(data [B,H,C,D], position_ids [B,S], updates [B,H,S,D])` returns `data` with row b's
  `updates[b, :, s]` written at slot `position_ids[b, s]`. A position outside [0, C) (padding carries -1)
  writes nothing.
- `ctx_gather(data [B,H,C,D], ctx_indices [B,K])` returns `[B,H,K,D]`: slot `ctx_indices[b, k]` of row b, or
  exact zeros where the index is negative (invalid). Zeros come from `where`, never from multiplying, so a
  stale or NaN value in an unused slot cannot leak.

ONNX function note: ScatterND cannot skip an index, so an invalid position repeats its row's first valid
write (the same slot and the same value, so the order of duplicate writes cannot matter), or, in a row with
no valid position, rewrites slot 0 with its current value. Either way it changes nothing: exact, like the
eager reference, which sends invalid writes to a spare slot and cuts it off.
"""
from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset17 as op

CTX_DOMAIN = onnxscript.values.Opset("com.qualcomm.cloud", 1)


# ----------------------------------------------------------------------------- eager references
def ctx_scatter_reference(data: torch.Tensor, position_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    batch, heads, ctx_len, _ = data.shape
    valid = (position_ids >= 0) & (position_ids < ctx_len)
    # One spare slot at index ctx_len takes every invalid write, then is cut off: invalid writes vanish.
    spare = torch.cat([data, data.new_zeros(batch, heads, 1, data.shape[-1])], dim=2)
    slot = torch.where(valid, position_ids, torch.full_like(position_ids, ctx_len))
    b = torch.arange(batch, device=data.device).view(-1, 1, 1)
    h = torch.arange(heads, device=data.device).view(1, -1, 1)
    spare[b, h, slot[:, None, :]] = updates.to(data.dtype)
    return spare[:, :, :ctx_len]


def ctx_gather_reference(data: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
    valid = ctx_indices >= 0
    safe = torch.where(valid, ctx_indices, torch.zeros_like(ctx_indices))
    index = safe[:, None, :, None].expand(data.shape[0], data.shape[1], safe.shape[1], data.shape[3])
    out = torch.gather(data, 2, index)
    return torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=data.dtype))


# ----------------------------------------------------------------------------- ONNX functions
@onnxscript.script(CTX_DOMAIN)
def CtxScatter(data: FLOAT, position_ids: INT64, updates: FLOAT) -> FLOAT:
    ctx_len = op.Gather(op.Shape(data), [2])
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    valid = op.And(op.GreaterOrEqual(position_ids, zero), op.Less(position_ids, ctx_len))
    valid_int = op.Cast(valid, to=7)
    # An invalid position repeats the row's first valid write (same slot, same value: order cannot matter);
    # in a row with no valid position it rewrites slot 0 with its own value.
    first = op.ArgMax(valid_int, axis=1, keepdims=1)
    any_valid = op.Greater(op.ReduceMax(valid_int, axes=[1], keepdims=1), zero)
    fill_slot = op.Where(any_valid, op.GatherElements(position_ids, first, axis=1), zero)
    slot = op.Where(valid, position_ids, fill_slot)
    update_shape = op.Shape(updates)
    first_shape = op.Concat(op.Slice(update_shape, zero, [2]), one, op.Slice(update_shape, [3], [4]), axis=0)
    first_update = op.GatherElements(updates, op.Expand(op.Unsqueeze(first, [1, 3]), first_shape), axis=2)
    fill_value = op.Where(op.Unsqueeze(any_valid, [1, 3]), op.CastLike(first_update, data),
                          op.Slice(data, zero, one, [2]))
    written = op.Where(op.Unsqueeze(valid, [1, 3]), op.CastLike(updates, data), fill_value)
    return op.ScatterElements(data, op.Expand(op.Unsqueeze(slot, [1, 3]), op.Shape(written)), written, axis=2)


@onnxscript.script(CTX_DOMAIN)
def CtxGather(data: FLOAT, ctx_indices: INT64) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    valid = op.GreaterOrEqual(ctx_indices, zero)
    safe = op.Where(valid, ctx_indices, zero)
    # GatherND over (batch, head) with a [B, H, K, 1] index: no index tensor as large as the cache itself
    index_shape = op.Concat(op.Slice(op.Shape(data), [0], [2]), op.Shape(ctx_indices, start=1), axis=0)
    index = op.Unsqueeze(op.Expand(op.Unsqueeze(safe, [1]), index_shape), [3])
    out = op.GatherND(data, index, batch_dims=2)
    return op.Where(op.Unsqueeze(valid, [1, 3]), out, op.CastLike(op.Constant(value_float=0.0), data))


# ----------------------------------------------------------------------------- the exported node
class _CtxScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, position_ids, updates):
        return ctx_scatter_reference(data, position_ids, updates)

    @staticmethod
    def symbolic(g, data, position_ids, updates):
        return g.onnxscript_op(CtxScatter, data, position_ids, updates).setTypeAs(data)


class _CtxGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, ctx_indices):
        return ctx_gather_reference(data, ctx_indices)

    @staticmethod
    def symbolic(g, data, ctx_indices):
        return g.onnxscript_op(CtxGather, data, ctx_indices).setTypeAs(data)


def ctx_scatter(data: torch.Tensor, position_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """Write `updates` into the cache `data` at `position_ids` (invalid positions write nothing)."""
    return _CtxScatter.apply(data, position_ids, updates)


def ctx_gather(data: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
    """Read slots `ctx_indices` [B, K] of the cache `data` (negative index: zeros)."""
    return _CtxGather.apply(data, ctx_indices)
