"""OCP Microscaling (MX) quantize-dequantize: MXFP6 weights and MXINT8 KV cache, emulated on the CPU.

Per the OCP MX v1.0 spec: values are cut into blocks of 32 along one axis; each block shares one 8-bit
power-of-two scale X = 2^(floor(log2(max|v|)) - emax_elem), where emax_elem is the exponent of the element
format's largest normal; each element is v / X rounded (to nearest, ties to even) into the element format,
saturating at its largest magnitude. Dequantized values are element * X.

Element formats: FP6 E2M3 (max 7.5, the default for `mxfp6`), FP6 E3M2 (max 28), INT8 (two's complement
with an implicit 2^-6 scale: max 127/64, the MXINT8 element).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from qeff_lab.pipeline import Change, TransformResult

BLOCK = 32


@dataclass(frozen=True)
class ElementFormat:
    name: str
    emax: int  # exponent of the largest normal
    max_value: float
    mbits: int = 0  # mantissa bits (floating formats)
    emin: int = 0  # exponent of the smallest normal (floating formats)
    int_step: float = 0.0  # grid step (integer formats)


FP6_E2M3 = ElementFormat("fp6_e2m3", emax=2, max_value=7.5, mbits=3, emin=0)
FP6_E3M2 = ElementFormat("fp6_e3m2", emax=4, max_value=28.0, mbits=2, emin=-2)
INT8 = ElementFormat("int8", emax=0, max_value=127 / 64, int_step=1 / 64)
FORMATS = {f.name: f for f in (FP6_E2M3, FP6_E3M2, INT8)}


def _quantize_elements(v: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Round scaled values into the element format (RNE, saturating)."""
    if fmt.int_step:
        q = torch.round(v / fmt.int_step) * fmt.int_step
        return q.clamp(-fmt.max_value, fmt.max_value)
    a = v.abs()
    exp = torch.floor(torch.log2(a.clamp_min(2.0 ** fmt.emin))).clamp(min=fmt.emin)  # subnormals share emin's step
    step = torch.exp2(exp - fmt.mbits)
    q = torch.round(a / step) * step
    return (torch.sign(v) * q.clamp(max=fmt.max_value))


def mx_qdq(x: torch.Tensor, fmt: str | ElementFormat = "fp6_e2m3", block: int = BLOCK, axis: int = -1) -> torch.Tensor:
    """Quantize-dequantize `x` to MX (blocks of `block` along `axis`, shared power-of-two scale)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    dtype = x.dtype
    t = x.detach().float().movedim(axis, -1)
    n = t.shape[-1]
    pad = (-n) % block
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    blocks = t.reshape(*t.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    shared = torch.floor(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny))) - fmt.emax
    scale = torch.exp2(shared.clamp(-127, 127))  # E8M0
    q = _quantize_elements(blocks / scale, fmt) * scale
    q = torch.where(amax == 0, torch.zeros_like(q), q)
    q = q.reshape(*t.shape)[..., :n].movedim(-1, axis)
    return q.to(dtype)


def relative_rms_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).pow(2).mean().sqrt() / x.float().pow(2).mean().sqrt().clamp_min(1e-30))


def mxfp6_weights(model: nn.Module, fmt: str = "fp6_e2m3", inplace: bool = False,
                  skip: str | None = None) -> tuple[nn.Module, TransformResult]:
    """Emulate `mxfp6_matmul`: every nn.Linear weight (the constant MatMul weights the compiler compresses)
    quantize-dequantized to MX `fmt`, blocks of 32 along the input (reduction) axis. Tied weights are
    untied first: an embedding table is a Gather, not a MatMul, and stays as it was. `skip`: a regex of
    module paths to leave alone. Returns (model, report)."""
    m = model if inplace else copy.deepcopy(model)
    result = TransformResult("MXFP6Weights")
    for path, module in m.named_modules():
        if not isinstance(module, nn.Linear) or (skip and re.search(skip, path)):
            continue
        w = module.weight
        q = mx_qdq(w.data, fmt, axis=-1)
        err = relative_rms_error(w.data, q)
        users = [id(p) for n_, p in m.named_parameters(remove_duplicate=False) if p is w]
        if len(users) > 1:
            module.weight = nn.Parameter(q, requires_grad=False)  # untie: only the MatMul use is compressed
        else:
            with torch.no_grad():
                w.copy_(q)
        result.changes.append(Change(path, f"fp32 weight {tuple(w.shape)}", f"MX {fmt} (blocks of {BLOCK})",
                                     f"relative RMS error {err:.2%}"))
    if not result.changes:
        result.notes.append("no nn.Linear weights found")
    return m, result


def mxint8_qdq_cache(cache) -> None:
    """Emulate `mxint8_kv_cache` on a KV cache in place: HF Cache objects (layers[i].keys / values) or a list
    of (key, value) tensors, blocks of 32 along head_dim. Idempotent: values already on the grid stay."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    setattr(layer, name, mx_qdq(t, "int8"))
        return
    if isinstance(cache, list):
        for i, kv in enumerate(cache):
            cache[i] = type(kv)(mx_qdq(t, "int8") for t in kv) if isinstance(kv, tuple) else mx_qdq(kv, "int8")
        return
    raise TypeError(f"Don't know how to quantize a KV cache of type {type(cache).__name__}.")
