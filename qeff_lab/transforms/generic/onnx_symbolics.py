"""Override (named, small): ONNX symbolics for two aten ops that models call and opset 17 lacks. Why: the project's
TorchScript exporter (opset 17) raises UnsupportedOperatorError on `aten::expm1` (xIELU activation: apertus) and
`aten::rms_norm` (`torch.nn.RMSNorm`: diffllama); both decompose exactly into standard ONNX ops.

Registered once, globally (`torch.onnx.register_custom_op_symbolic`), when a model goes on the generic path.
"""
from __future__ import annotations

import torch
from torch.onnx import register_custom_op_symbolic, symbolic_helper

_DONE: list[bool] = []


def _expm1(g, x):
    return g.op("Sub", g.op("Exp", x), g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32)))


def _rms_norm(g, x, normalized_shape, weight, eps):
    """x / sqrt(mean(x^2 over the normalized dims) + eps) * weight, computed as torch does (eps default: finfo.eps)."""
    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = symbolic_helper._maybe_get_const(eps, "f")
    if eps_value is None or symbolic_helper._is_value(eps_value):
        eps_value = torch.finfo(torch.float32).eps
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(dims), 0)), keepdims_i=1)  # opset 17: attribute
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", x, denom)
    if not symbolic_helper._is_none(weight):
        out = g.op("Mul", out, weight)
    return out


def register() -> None:
    if not _DONE:
        register_custom_op_symbolic("aten::expm1", _expm1, 9)
        register_custom_op_symbolic("aten::rms_norm", _rms_norm, 9)
        _DONE.append(True)
