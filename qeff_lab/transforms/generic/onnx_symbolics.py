"""Override (named, small): ONNX symbolics for aten ops the TorchScript exporter (opset 17) lacks or lowers wrongly.
Why: it raises UnsupportedOperatorError on `aten::expm1` (xIELU activation: apertus) and `aten::rms_norm`
(`torch.nn.RMSNorm`: diffllama), and its `repeat_interleave` with a constant count bakes the traced sizes into
Reshape (interleaved RoPE of glm, glm4, helium, ernie4_5: "All tensors must have the same rank" at export, a Reshape
error in ONNX Runtime at another length). All three decompose exactly into standard ONNX ops.

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


def _repeat_interleave(g, x, repeats, dim=None, output_size=None):
    """A constant count along a constant dim: Unsqueeze after dim, Expand, Reshape with shapes read at run time."""
    from torch.onnx import symbolic_opset13

    count = symbolic_helper._maybe_get_const(repeats, "i")
    axis = None if symbolic_helper._is_none(dim) else symbolic_helper._maybe_get_const(dim, "i")
    rank = symbolic_helper._get_tensor_rank(x)
    if not isinstance(count, int) or not isinstance(axis, int) or rank is None:
        return symbolic_opset13.repeat_interleave(g, x, repeats, dim, output_size)
    axis %= rank

    def const(values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.long))

    shape = g.op("Shape", x)
    before = g.op("Slice", shape, const([0]), const([axis + 1]))
    after = g.op("Slice", shape, const([axis + 1]), const([rank]))
    expanded = g.op("Expand", g.op("Unsqueeze", x, const([axis + 1])),
                    g.op("Concat", before, const([count]), after, axis_i=0))
    lead = g.op("Slice", shape, const([0]), const([axis]))
    size = g.op("Mul", g.op("Slice", shape, const([axis]), const([axis + 1])), const([count]))
    return g.op("Reshape", expanded, g.op("Concat", lead, size, after, axis_i=0))


def register() -> None:
    if not _DONE:
        register_custom_op_symbolic("aten::expm1", _expm1, 9)
        register_custom_op_symbolic("aten::rms_norm", _rms_norm, 9)
        register_custom_op_symbolic("aten::repeat_interleave", _repeat_interleave, 13)
        _DONE.append(True)
