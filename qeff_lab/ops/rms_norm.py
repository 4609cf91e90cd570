"""CustomRMSNorm: RMS normalisation computed in fp32 whatever the input dtype, as one replaceable node.

x * rsqrt(mean(x^2) + eps) * weight. In fp16, x*x overflows once |x| > 256 (SmolLM2's residual stream
reaches ~2.2e4), so the square and the mean happen in fp32 inside the op, and a device compiler can swap
the node for its own fused kernel.
"""
from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT
from onnxscript import opset17 as op

RMS_DOMAIN = onnxscript.values.Opset("com.qti.aisw.onnx", 1)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    # Same rounding order as HF's LlamaRMSNorm: normalise in fp32, cast back, then scale.
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * normed.to(x.dtype)


@onnxscript.script(RMS_DOMAIN)
def CustomRMSNorm(hidden_states: FLOAT, weight: FLOAT, epsilon: float) -> FLOAT:
    # Written in the form ONNX Runtime fuses into one SimplifiedLayerNormalization kernel.
    x = op.Cast(hidden_states, to=1)
    variance = op.ReduceMean(op.Pow(x, op.Constant(value_float=2.0)), axes=[-1], keepdims=1)
    normed = op.Div(x, op.Sqrt(op.Add(variance, op.CastLike(epsilon, variance))))
    return op.Mul(op.CastLike(normed, hidden_states), weight)


class _CustomRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, epsilon: float):
        return rms_norm_reference(x, weight, epsilon)

    @staticmethod
    def symbolic(g, x, weight, epsilon: float):
        return g.onnxscript_op(CustomRMSNorm, x, weight, epsilon_f=epsilon).setTypeAs(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return _CustomRMSNorm.apply(x, weight, float(epsilon))
