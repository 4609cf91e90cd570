"""CtxScatterCB / CtxGatherCB: CtxScatter / CtxGather for continuous batching, where the cache has
`full_batch_size` slots and each batch row names its slot with `batch_index`.

Semantics (both definitions), the cache `data` being [F, H, C, D] and a call's batch [B] (B <= F rows):
- `ctx_scatter_cb(data, batch_index [B,1], position_ids [B,S], updates [B,H,S,D])` returns `data` with row b's
  `updates[b, :, s]` written into slot `batch_index[b]` at position `position_ids[b, s]`; a position outside
  [0, C) (padding, or a free slot in decode: -1) writes nothing. Slots no row names are untouched.
- `ctx_gather_cb(data, batch_index [B,1], ctx_indices [B,K])` returns [B,H,K,D]: position `ctx_indices[b, k]`
  of slot `batch_index[b]`, or exact zeros where the index is negative (a `where`, never a multiply).

Names and domain are QEfficient's (`com.qualcomm.cloud`), inputs as ours: CtxGatherCB takes the -1 convention of
our CtxGather and no `comp_ctx_len` input (QEfficient's 4th input, unused by its body). The ONNX ScatterND
cannot skip an index, so an invalid position repeats its row's first valid write, or, in a row with no valid
position, rewrites position 0 of its slot with its current value: exact, as the eager reference.
"""
from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset17 as op

from qeff_lab.ops.ctx import CTX_DOMAIN


# ----------------------------------------------------------------------------- eager references
def ctx_scatter_cb_reference(data: torch.Tensor, batch_index: torch.Tensor, position_ids: torch.Tensor,
                             updates: torch.Tensor) -> torch.Tensor:
    slots, heads, ctx_len, dim = data.shape
    valid = (position_ids >= 0) & (position_ids < ctx_len)
    spare = torch.cat([data, data.new_zeros(slots, heads, 1, dim)], dim=2)  # takes the invalid writes, cut off
    pos = torch.where(valid, position_ids, torch.full_like(position_ids, ctx_len))
    b = batch_index.reshape(-1, 1, 1)
    h = torch.arange(heads, device=data.device).view(1, -1, 1)
    spare[b, h, pos[:, None, :]] = updates.to(data.dtype)
    return spare[:, :, :ctx_len]


def ctx_gather_cb_reference(data: torch.Tensor, batch_index: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
    valid = ctx_indices >= 0
    safe = torch.where(valid, ctx_indices, torch.zeros_like(ctx_indices))
    b = batch_index.reshape(-1, 1, 1)
    h = torch.arange(data.shape[1], device=data.device).view(1, -1, 1)
    out = data[b, h, safe[:, None, :]]
    return torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=data.dtype))


# ----------------------------------------------------------------------------- ONNX functions
@onnxscript.script(CTX_DOMAIN)
def CtxScatterCB(data: FLOAT, batch_index: INT64, position_ids: INT64, updates: FLOAT) -> FLOAT:
    ctx_len = op.Gather(op.Shape(data), [2])
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    valid = op.And(op.GreaterOrEqual(position_ids, zero), op.Less(position_ids, ctx_len))
    valid_int = op.Cast(valid, to=7)
    first = op.ArgMax(valid_int, axis=1, keepdims=1)
    any_valid = op.Greater(op.ReduceMax(valid_int, axes=[1], keepdims=1), zero)
    fill_pos = op.Where(any_valid, op.GatherElements(position_ids, first, axis=1), zero)
    pos = op.Where(valid, position_ids, fill_pos)
    update_shape = op.Shape(updates)
    first_shape = op.Concat(op.Slice(update_shape, zero, [2]), one, op.Slice(update_shape, [3], [4]), axis=0)
    first_update = op.GatherElements(updates, op.Expand(op.Unsqueeze(first, [1, 3]), first_shape), axis=2)
    slot_rows = op.Reshape(batch_index, [-1])
    current = op.Gather(op.Slice(data, zero, one, [2]), slot_rows, axis=0)  # position 0 of each row's slot
    fill_value = op.Where(op.Unsqueeze(any_valid, [1, 3]), op.CastLike(first_update, data), current)
    written = op.Where(op.Unsqueeze(valid, [1, 3]), op.CastLike(updates, data), fill_value)
    index_shape = op.Concat(op.Slice(update_shape, zero, [3]), one, axis=0)  # [B, H, S, 1]
    heads = op.Gather(op.Shape(data), op.Constant(value_int=1))
    head_range = op.Range(op.Constant(value_int=0), heads, op.Constant(value_int=1))
    b_idx = op.Expand(op.Unsqueeze(slot_rows, [1, 2, 3]), index_shape)
    h_idx = op.Expand(op.Unsqueeze(head_range, [0, 2, 3]), index_shape)
    s_idx = op.Expand(op.Unsqueeze(pos, [1, 3]), index_shape)
    return op.ScatterND(data, op.Concat(b_idx, h_idx, s_idx, axis=3), written)


@onnxscript.script(CTX_DOMAIN)
def CtxGatherCB(data: FLOAT, batch_index: INT64, ctx_indices: INT64) -> FLOAT:
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    valid = op.GreaterOrEqual(ctx_indices, zero)
    safe = op.Where(valid, ctx_indices, zero)
    index_shape = op.Concat(op.Shape(ctx_indices, end=1), op.Shape(data, start=1, end=2),
                            op.Shape(ctx_indices, start=1), one, axis=0)  # [B, H, K, 1]
    heads = op.Gather(op.Shape(data), op.Constant(value_int=1))
    head_range = op.Range(op.Constant(value_int=0), heads, op.Constant(value_int=1))
    b_idx = op.Expand(op.Unsqueeze(op.Reshape(batch_index, [-1]), [1, 2, 3]), index_shape)
    h_idx = op.Expand(op.Unsqueeze(head_range, [0, 2, 3]), index_shape)
    k_idx = op.Expand(op.Unsqueeze(safe, [1, 3]), index_shape)
    out = op.GatherND(data, op.Concat(b_idx, h_idx, k_idx, axis=3))
    return op.Where(op.Unsqueeze(valid, [1, 3]), out, op.CastLike(op.Constant(value_float=0.0), data))


# ----------------------------------------------------------------------------- the exported node
class _CtxScatterCB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, batch_index, position_ids, updates):
        return ctx_scatter_cb_reference(data, batch_index, position_ids, updates)

    @staticmethod
    def symbolic(g, data, batch_index, position_ids, updates):
        return g.onnxscript_op(CtxScatterCB, data, batch_index, position_ids, updates).setTypeAs(data)


class _CtxGatherCB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, batch_index, ctx_indices):
        return ctx_gather_cb_reference(data, batch_index, ctx_indices)

    @staticmethod
    def symbolic(g, data, batch_index, ctx_indices):
        return g.onnxscript_op(CtxGatherCB, data, batch_index, ctx_indices).setTypeAs(data)


def ctx_scatter_cb(data: torch.Tensor, batch_index: torch.Tensor, position_ids: torch.Tensor,
                   updates: torch.Tensor) -> torch.Tensor:
    """Write `updates` into slots `batch_index` of the cache `data` at `position_ids` (invalid: nothing)."""
    return _CtxScatterCB.apply(data, batch_index, position_ids, updates)


def ctx_gather_cb(data: torch.Tensor, batch_index: torch.Tensor, ctx_indices: torch.Tensor) -> torch.Tensor:
    """Read positions `ctx_indices` [B, K] of slots `batch_index` [B, 1] (negative index: zeros)."""
    return _CtxGatherCB.apply(data, batch_index, ctx_indices)
