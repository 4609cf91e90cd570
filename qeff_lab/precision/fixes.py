"""Precision fixes as transforms with reports: overflow-safe RMSNorm / LayerNorm (switchable on and off).

The swap changes only `__class__` (a generated subclass whose forward calls qeff_lab.ops.safe_norm), so
every parameter object and state-dict key stays the same, and `revert_safe_norm` restores the original
classes to compare with and without the fix.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from qeff_lab.ops.safe_norm import layer_norm_op, rms_norm_op
from qeff_lab.pipeline import Change, TransformResult

_RMS_RE = re.compile(r"RMS_?Norm$", re.IGNORECASE)
_SAFE_CLASSES: dict[type, type] = {}
WHY = ("squares the input: |x| > 256 overflows fp16 (x*x > 65504) and the row becomes zeros; the safe form "
       "divides each row by its max |x| before squaring (exact identity, same weights)")


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def norm_kind(module: nn.Module) -> str | None:
    """'rms' / 'rms+1' (Gemma: scales by 1 + weight) / 'layer' for norms this fix understands, else None."""
    cls = type(module)
    if getattr(cls, "_qeff_safe_norm", False):
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer" if len(module.normalized_shape) == 1 else None
    if isinstance(module, nn.RMSNorm) or _RMS_RE.search(cls.__name__):
        w = getattr(module, "weight", None)
        if _eps(module) is None or (w is not None and not isinstance(w, torch.Tensor)):
            return None
        return "rms+1" if "gemma" in cls.__name__.lower() else "rms"
    return None


def _rms_forward(self, hidden_states, *args, **kwargs):
    offset = 1.0 if self._qeff_norm_kind == "rms+1" else 0.0
    weight = self.weight if getattr(self, "weight", None) is not None else torch.ones(
        hidden_states.shape[-1], dtype=hidden_states.dtype)
    return rms_norm_op(hidden_states, weight, _eps(self), offset).to(hidden_states.dtype)


def _layer_forward(self, x):
    return layer_norm_op(x, self.weight, self.bias, self.eps)


def _safe_class(cls: type, kind: str) -> type:
    if cls not in _SAFE_CLASSES:
        fwd = _layer_forward if kind == "layer" else _rms_forward
        _SAFE_CLASSES[cls] = type(f"Safe{cls.__name__}", (cls,), {
            "forward": fwd, "_qeff_safe_norm": True, "_qeff_norm_kind": kind, "_qeff_original": cls,
            "__doc__": f"{cls.__name__} computed by qeff_lab.ops.safe_norm (cannot overflow in fp16)."})
    return _SAFE_CLASSES[cls]


def safe_norm_transform(model: nn.Module, only: Iterable[str] | None = None,
                        reasons: dict[str, str] | None = None) -> TransformResult:
    """Swap RMSNorm / LayerNorm modules for their overflow-safe form. `only`: module paths to swap (e.g.
    `findings.modules("norm")`); default every norm. `reasons`: path -> why (the value the profile saw)."""
    only = set(only) if only is not None else None
    reasons = reasons or {}
    result = TransformResult("SafeNorm")
    skipped = []
    for path, module in model.named_modules():
        if only is not None and path not in only:
            continue
        kind = norm_kind(module)
        if kind is None:
            if only is not None and path in only and not getattr(type(module), "_qeff_safe_norm", False):
                skipped.append(f"{path} ({type(module).__name__}: not a norm this fix understands)")
            continue
        old = type(module)
        module.__class__ = _safe_class(old, kind)
        why = reasons.get(path) or WHY
        result.changes.append(Change(path or "<root>", old.__name__, module.__class__.__name__, why))
    if skipped:
        result.notes.append("left alone: " + "; ".join(skipped))
    if not result.changes:
        result.notes.append("no RMSNorm / LayerNorm left to make safe" if only is None else
                            "none of the given modules is an RMSNorm / LayerNorm")
    return result


def revert_safe_norm(model: nn.Module) -> TransformResult:
    """Switch the fix off: restore each swapped norm's original class (weights untouched)."""
    result = TransformResult("RevertSafeNorm")
    for path, module in model.named_modules():
        cls = type(module)
        if getattr(cls, "_qeff_safe_norm", False):
            module.__class__ = cls._qeff_original
            result.changes.append(Change(path or "<root>", cls.__name__, module.__class__.__name__,
                                         "safe-norm fix switched off"))
    if not result.changes:
        result.notes.append("no safe norm to revert")
    return result
