"""Overflow-safe RMSNorm / LayerNorm: eager PyTorch reference + ONNX function (domain com.qeff_lab).

A naive fp16 RMSNorm squares its input: any |x| > 256 makes x*x pass 65504 (fp16's largest finite
value), the mean becomes inf and the row comes out as zeros. These forms first divide each row by
s = max(max|x|, SCALE_FLOOR), so every squared term is <= 1, and use the identity

    x / sqrt(mean(x^2) + eps)  ==  (x/s) / sqrt(mean((x/s)^2) + eps/s^2)

which is exact in real arithmetic. eps/s^2 <= eps / SCALE_FLOOR^2 stays finite in fp16, and the scale
also lifts tiny rows away from fp16's subnormal range. It is computed as eps/s/s: s*s itself would pass
65504 for s > 256 (harmless, eps/inf = 0, but the range profile would flag it). Same weights, same outputs in fp32 (to rounding).
"""
from __future__ import annotations

import torch
from onnxscript import FLOAT
from onnxscript import opset17 as op
from onnxscript import script
from onnxscript.values import Opset

DOMAIN = "com.qeff_lab"
qeff_lab_ops = Opset(DOMAIN, 1)

# Rows whose max |x| is below this are scaled by it instead: keeps eps / s^2 finite in fp16
# (1e-5 / 2^-12 = 0.04) while still scaling small rows up.
SCALE_FLOOR = 2.0**-6


# ----------------------------------------------------------------------------- eager reference
def safe_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last axis that cannot overflow in x's dtype. `weight_offset` is 1.0 for Gemma-style
    norms that multiply by (1 + weight)."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(SCALE_FLOOR)
    y = x / s
    var = (y * y).mean(-1, keepdim=True)
    out = y * torch.rsqrt(var + eps / s / s)
    if weight is None:
        return out
    return out * (weight + weight_offset) if weight_offset else out * weight


def safe_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis that cannot overflow: the mean and variance are taken of x/s."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(SCALE_FLOOR)
    y = x / s
    d = y - y.mean(-1, keepdim=True)
    var = (d * d).mean(-1, keepdim=True)
    out = d * torch.rsqrt(var + eps / s / s)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ----------------------------------------------------------------------------- ONNX functions
@script(qeff_lab_ops, default_opset=op)
def SafeRMSNorm(x: FLOAT, weight: FLOAT, epsilon: float) -> FLOAT:
    s = op.Max(op.ReduceMax(op.Abs(x), axes=[-1], keepdims=1), op.CastLike(op.Constant(value_float=SCALE_FLOOR), x))
    y = op.Div(x, s)
    var = op.ReduceMean(op.Mul(y, y), axes=[-1], keepdims=1)
    eps = op.CastLike(op.Constant(value_float=epsilon), x)
    denom = op.Sqrt(op.Add(var, op.Div(op.Div(eps, s), s)))
    return op.Mul(op.Div(y, denom), weight)


@script(qeff_lab_ops, default_opset=op)
def SafeLayerNorm(x: FLOAT, weight: FLOAT, bias: FLOAT, epsilon: float) -> FLOAT:
    s = op.Max(op.ReduceMax(op.Abs(x), axes=[-1], keepdims=1), op.CastLike(op.Constant(value_float=SCALE_FLOOR), x))
    y = op.Div(x, s)
    d = op.Sub(y, op.ReduceMean(y, axes=[-1], keepdims=1))
    var = op.ReduceMean(op.Mul(d, d), axes=[-1], keepdims=1)
    eps = op.CastLike(op.Constant(value_float=epsilon), x)
    denom = op.Sqrt(op.Add(var, op.Div(op.Div(eps, s), s)))
    return op.Add(op.Mul(op.Div(d, denom), weight), bias)


# ----------------------------------------------------------------------------- PyTorch <-> ONNX bridge
class SafeRMSNormFunc(torch.autograd.Function):
    """Eager: safe_rms_norm. Exported (TorchScript exporter): one com.qeff_lab::SafeRMSNorm node whose
    function body travels in the ONNX file, so ONNX Runtime runs it and a device compiler can replace it."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return safe_rms_norm(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps: float):
        return g.onnxscript_op(SafeRMSNorm, x, weight, epsilon_f=eps).setType(x.type())


class SafeLayerNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        return safe_layer_norm(x, weight, bias, eps)

    @staticmethod
    def symbolic(g, x, weight, bias, eps: float):
        return g.onnxscript_op(SafeLayerNorm, x, weight, bias, epsilon_f=eps).setType(x.type())


def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """What a swapped module calls: the autograd Function when exporting, the eager form otherwise."""
    w = weight + weight_offset if weight_offset else weight
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return SafeRMSNormFunc.apply(x, w.to(x.dtype), float(eps))
    return safe_rms_norm(x, w, eps)


def layer_norm_op(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        n = x.shape[-1]
        w = weight if weight is not None else torch.ones(n, dtype=x.dtype)
        b = bias if bias is not None else torch.zeros(n, dtype=x.dtype)
        return SafeLayerNormFunc.apply(x, w, b, float(eps))
    return safe_layer_norm(x, weight, bias, eps)
