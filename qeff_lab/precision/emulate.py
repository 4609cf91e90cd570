"""Device numerics on this CPU: fp16 execution (every op's result rounded to fp16) and fp16 weights.

A graph compiled with `-convert-to-fp16` computes every float op in fp16, including the casts to fp32
that HF code inserts (e.g. inside LlamaRMSNorm), which is why `model.half()` in PyTorch hides overflows
that the device shows. `Fp16Emulation` reproduces the device instead: inside it, the result of every
torch op is rounded to fp16 (beyond ±65504 -> ±inf; |x| <= 2^-25 -> 0; optionally subnormals -> 0),
while storage stays fp32, so CPU kernels stay fast. Matmuls and reductions accumulate in fp32 and round
once, as a device's wide accumulators do. Fused ops are decomposed the way a compiler lowers them, so
their intermediates are rounded too: attention (scores, softmax input, probabilities), layer_norm /
group_norm (centered squares), rms_norm / normalize (squares), tanh-GELU (x³), softplus (exp), baddbmm
(the product before alpha), and softmax / log_softmax / logsumexp over rows longer than 65504 (the sum of
exponentials).
"""
from __future__ import annotations

import copy
import math

import torch
from torch.overrides import TorchFunctionMode

from qeff_lab.precision.fused import _arg
from qeff_lab.precision.numerics import FP16_MAX, FP16_MIN_NORMAL
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


def _centered_norm(r, x, dims, eps):
    """(x - mean) / sqrt(mean((x - mean)²) + eps) with every step rounded: (x - mean)² overflows for |x - mean|
    > 256, the variance becomes inf and the row comes out as zeros (bias only)."""
    mean = r(x.mean(dims, keepdim=True))
    d = r(x - mean)
    var = r(r(d * d).mean(dims, keepdim=True))
    return r(d * r(torch.rsqrt(r(var + eps))))


def _affine(r, y, weight, bias):
    if weight is not None:
        y = r(y * weight)
    if bias is not None:
        y = r(y + bias)
    return y


def _layer_norm_fp16(mode, args, kwargs):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    shape = [shape] if isinstance(shape, int) else list(shape)
    y = _centered_norm(mode.round, x, tuple(range(-len(shape), 0)), _arg(args, kwargs, 4, "eps", 1e-5))
    return _affine(mode.round, y, _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"))


def _group_norm_fp16(mode, args, kwargs):
    x, groups = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "num_groups")
    y = _centered_norm(mode.round, x.reshape(x.shape[0], groups, -1), (-1,),
                       _arg(args, kwargs, 4, "eps", 1e-5)).reshape(x.shape)
    extra = (1,) * (x.dim() - 2)
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    return _affine(mode.round, y, None if w is None else w.reshape(-1, *extra),
                   None if b is None else b.reshape(-1, *extra))


def _rms_norm_fp16(mode, args, kwargs):
    r = mode.round
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    eps = _arg(args, kwargs, 3, "eps")
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-(1 if isinstance(shape, int) else len(shape)), 0))
    ms = r(r(x * x).mean(dims, keepdim=True))
    return _affine(r, r(x * r(torch.rsqrt(r(ms + eps)))), _arg(args, kwargs, 2, "weight"), None)


def _normalize_fp16(mode, args, kwargs):
    r = mode.round
    x, p, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "p", 2.0), _arg(args, kwargs, 2, "dim", 1)
    eps = _arg(args, kwargs, 3, "eps", 1e-12)
    if p != 2:
        return r(torch.nn.functional.normalize(x, p, dim, eps))
    norm = r(torch.sqrt(r(r(x * x).sum(dim, keepdim=True))))
    return r(x / norm.clamp_min(eps))


def _gelu_fp16(mode, args, kwargs):
    r = mode.round
    x, approximate = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "approximate", "none")
    if approximate != "tanh":
        return r(torch.nn.functional.gelu(x))
    cube = r(r(x * x) * x)
    inner = r(math.sqrt(2.0 / math.pi) * r(x + r(0.044715 * cube)))
    return r(r(0.5 * x) * r(1.0 + r(torch.tanh(inner))))


def _softplus_fp16(mode, args, kwargs):
    r = mode.round
    x = _arg(args, kwargs, 0, "input")
    beta, threshold = _arg(args, kwargs, 1, "beta", 1.0), _arg(args, kwargs, 2, "threshold", 20.0)
    z = r(x * beta)
    soft = r(r(torch.log1p(r(torch.exp(z)))) / beta)
    return torch.where(z > threshold, x, soft)


def _baddbmm_fp16(mode, args, kwargs):
    r = mode.round
    inp, b1, b2 = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "batch1", "batch2")))
    beta, alpha = kwargs.get("beta", 1.0), kwargs.get("alpha", 1.0)
    out = r(r(torch.bmm(b1, b2)) * alpha) if alpha != 1 else r(torch.bmm(b1, b2))
    return out if beta == 0 else r(out + r(inp * beta))


def _sum_exp_overflows(x, dim) -> torch.Tensor | None:
    """Rows (along dim, kept) whose Σ exp(x - max) passes 65504 in fp16; None when rows are too short to."""
    dim = -1 if dim is None else dim
    if not isinstance(dim, int) or x.dim() == 0 or x.shape[dim] <= FP16_MAX:
        return None
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
    return torch.exp(x - m).sum(dim, keepdim=True) > FP16_MAX


def _softmax_like_fp16(mode, name, func, args, kwargs):
    """softmax / log_softmax / logsumexp: torch's own result, except rows whose sum of exponentials would
    overflow in fp16 (probabilities 0, log-probabilities -inf, logsumexp inf)."""
    out = mode.round(func(*args, **kwargs))
    x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim")
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    bad = _sum_exp_overflows(x, dim) if isinstance(x, torch.Tensor) and x.is_floating_point() else None
    if bad is None or not bool(bad.any()):
        return out
    if name == "logsumexp":
        keep = bool(_arg(args, kwargs, 2, "keepdim", False))
        return torch.where(bad if keep else bad.squeeze(dim), torch.full((), math.inf), out)
    return torch.where(bad, torch.full((), 0.0 if name == "softmax" else -math.inf), out)


def _in_place(func) -> bool:
    raw = getattr(func, "__name__", "") or ""
    return raw.endswith("_") and not raw.endswith("__")


_DECOMPOSED = {"layer_norm": _layer_norm_fp16, "group_norm": _group_norm_fp16, "rms_norm": _rms_norm_fp16,
               "normalize": _normalize_fp16, "gelu": _gelu_fp16, "softplus": _softplus_fp16,
               "baddbmm": _baddbmm_fp16}


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
        if name in _DECOMPOSED and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() \
                and not _in_place(func):
            return _DECOMPOSED[name](self, args, kwargs)
        if name in ("softmax", "log_softmax", "logsumexp"):
            return _softmax_like_fp16(self, name, func, args, kwargs)
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
