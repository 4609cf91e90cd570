"""Device numerics on this CPU: fp16 execution (every op's result rounded to fp16) and fp16 weights.

A graph compiled with `-convert-to-fp16` computes every float op in fp16, including the casts to fp32
that HF code inserts (e.g. inside LlamaRMSNorm), which is why `model.half()` in PyTorch hides overflows
that the device shows. `Fp16Emulation` reproduces the device instead: inside it, the result of every
torch op is rounded to fp16 (beyond ±65504 -> ±inf; |x| <= 2^-25 -> 0; optionally subnormals -> 0),
while storage stays fp32, so CPU kernels stay fast. Matmuls and reductions accumulate in fp32 and round
once, as a device's wide accumulators do. Fused attention is decomposed so its scores, softmax input and
probabilities are rounded too.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.overrides import TorchFunctionMode

from qeff_lab.precision.numerics import FP16_MIN_NORMAL
from qeff_lab.precision.profile import op_name

# Calls whose result shares storage with an input (or is metadata): rounding would break aliasing, and
# their values are already rounded wherever they were computed.
_ALIASING = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as",
                       "unsqueeze", "squeeze", "getitem", "flatten", "unflatten", "chunk", "split", "narrow",
                       "select", "t", "detach", "unbind", "contiguous", "as_strided"})


def round_fp16(t: torch.Tensor, flush_subnormals: bool = False) -> torch.Tensor:
    if t.dtype not in (torch.float32, torch.float64):
        return t
    r = t.to(torch.float16).to(t.dtype)
    if flush_subnormals:
        r = torch.where(r.abs() < FP16_MIN_NORMAL, torch.zeros((), dtype=r.dtype), r)
    return r


def _sdpa_fp16(mode: "Fp16Emulation", query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
               scale=None, enable_gqa=False, **_):
    """scaled_dot_product_attention spelled out, each intermediate rounded to fp16."""
    r = mode.round
    h, hk = query.shape[-3], key.shape[-3]
    if hk != h:
        key = key.repeat_interleave(h // hk, dim=-3)
        value = value.repeat_interleave(h // hk, dim=-3)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = r(r(torch.matmul(query, key.transpose(-2, -1))) * scale)
    s, length = scores.shape[-2], scores.shape[-1]
    if is_causal:
        keep = torch.ones(s, length, dtype=torch.bool).tril(diagonal=length - s)
        scores = scores.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = r(scores + r(attn_mask))
    probs = r(torch.softmax(scores, dim=-1))
    return r(torch.matmul(probs, value))


class Fp16Emulation(TorchFunctionMode):
    """`with Fp16Emulation(): model(...)`: every float op result rounded to fp16, as on the device."""

    def __init__(self, flush_subnormals: bool = False):
        super().__init__()
        self.flush_subnormals = flush_subnormals
        self._names: dict = {}

    def round(self, t):
        return round_fp16(t, self.flush_subnormals) if isinstance(t, torch.Tensor) else t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name = self._names[func]
        except (KeyError, TypeError):
            raw = getattr(func, "__name__", "") or ""
            name = "__skip__" if raw in ("__get__", "__set__") else (op_name(func) or raw.strip("_"))
            try:
                self._names[func] = name
            except TypeError:
                pass
        if name == "scaled_dot_product_attention":
            return _sdpa_fp16(self, *args, **kwargs)
        out = func(*args, **kwargs)
        if name == "__skip__" or name in _ALIASING:
            return out
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            raw = getattr(func, "__name__", "")
            if raw.endswith("_") and not raw.endswith("__") or raw.startswith("__i"):
                with torch.no_grad():
                    out.copy_(self.round(out))  # in-place op: keep the same tensor
                return out
            return self.round(out)
        if isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
            return type(out)(self.round(o) if o.is_floating_point() else o for o in out) \
                if type(out) is tuple else out
        return out


def fp16_weights(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model with every float parameter and buffer rounded to fp16 (stored as fp32). A copy unless
    `inplace`. Tied weights stay tied (deepcopy keeps sharing)."""
    m = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.to(torch.float16).to(torch.float32))
    return m
