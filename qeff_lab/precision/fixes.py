"""Precision fixes as transforms with reports, each exact and switchable: overflow-safe RMSNorm / LayerNorm,
pre-scaled attention scores (1/sqrt(d) folded into q), and a clamped tanh-GELU; `apply_fixes` applies the
ones a set of findings calls for.

Each swap changes only `__class__` (a generated subclass: the norm's forward calls qeff_lab.ops.safe_norm,
the q projection multiplies by the scale, the GELU clamps inside its tanh), so every parameter object and
state-dict key stays the same, and the revert_* functions restore the original classes to compare with
and without the fix.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
from torch import nn

from qeff_lab.ops.safe_norm import layer_norm_op, rms_norm_op
from qeff_lab.pipeline import TransformResult
from qeff_lab.transforms.base import swap_modules, unswap_modules

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


def _derived(cache: dict[type, type], cls: type, prefix: str, doc: str, **attrs) -> type:
    """The fix's subclass of `cls` (made once, then reused): `prefix + cls name`, remembering the original."""
    if cls not in cache:
        cache[cls] = type(f"{prefix}{cls.__name__}", (cls,), {**attrs, "_qeff_original": cls,
                                                              "__doc__": f"{cls.__name__} {doc}"})
    return cache[cls]


def _safe_class(cls: type, kind: str) -> type:
    return _derived(_SAFE_CLASSES, cls, "Safe", "computed by qeff_lab.ops.safe_norm (cannot overflow in fp16).",
                    forward=_layer_forward if kind == "layer" else _rms_forward, _qeff_safe_norm=True,
                    _qeff_norm_kind=kind)


def safe_norm_transform(model: nn.Module, only: Iterable[str] | None = None,
                        reasons: dict[str, str] | None = None) -> TransformResult:
    """Swap RMSNorm / LayerNorm modules for their overflow-safe form. `only`: module paths to swap (e.g.
    `findings.modules("norm")`); default every norm. `reasons`: path -> why (the value the profile saw)."""
    reasons = reasons or {}

    def choose(path, module):
        kind = norm_kind(module)
        return (_safe_class(type(module), kind), reasons.get(path) or WHY) if kind else None

    def skip_note(path, module):
        return None if getattr(type(module), "_qeff_safe_norm", False) else "not a norm this fix understands"

    return _swap_with_notes(model, "SafeNorm", choose, only, skip_note,
                            "no RMSNorm / LayerNorm left to make safe" if only is None else
                            "none of the given modules is an RMSNorm / LayerNorm")


def revert_safe_norm(model: nn.Module) -> TransformResult:
    """Switch the fix off: restore each swapped norm's original class (weights untouched)."""
    return _revert(model, "SafeNorm", "RevertSafeNorm", "no safe norm to revert")


def _swap_with_notes(model: nn.Module, name: str, choose, only: Iterable[str] | None, skip_note, nothing: str
                     ) -> TransformResult:
    """swap_modules with `choose`, limited to the paths in `only`; a path in `only` that `choose` refuses is
    noted with `skip_note(path, module)` (None: say nothing)."""
    only = set(only) if only is not None else None
    skipped = []

    def limited(path, module):
        if only is not None and path not in only:
            return None
        choice = choose(path, module)
        if choice is None and only is not None:
            note = skip_note(path, module)
            if note:
                skipped.append(f"{path} ({type(module).__name__}: {note})")
        return choice

    result = swap_modules(model, limited, name)
    if skipped:
        result.notes.append("left alone: " + "; ".join(skipped))
    if not result.changes:
        result.notes.append(nothing)
    return result


def _revert(model: nn.Module, name: str, report_name: str, nothing: str) -> TransformResult:
    result = unswap_modules(model, name)
    result.name = report_name
    if not result.changes:
        result.notes[:] = [nothing]
    return result


# ----------------------------------------------------------------------------- tanh-GELU
GELU_CLAMP = 10.0  # tanh(0.798 * (10 + 0.044715 * 1000)) = tanh(43.7) is 1.0 in fp32 and fp16 alike
_GELU_TANH_CLASSES = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "AccurateGELUActivation")
_SAFE_GELU: dict[type, type] = {}
GELU_WHY = ("tanh-GELU forms x³, which passes 65504 for |x| > 40.3; the safe form clamps x to ±10 inside the tanh, "
            "where tanh is already ±1 (exact identity, no weights)")


def safe_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(u + 0.044715·u³))) with u = clamp(x, ±10): the same values as tanh-GELU (beyond
    ±10 the tanh is exactly ±1 in fp32 either way), and u³ <= 1000 fits fp16. Plain ops: exports as Clip,
    Mul, Tanh."""
    u = x.clamp(-GELU_CLAMP, GELU_CLAMP)
    inner = math.sqrt(2.0 / math.pi) * (u + 0.044715 * (u * u * u))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def is_gelu_tanh(module: nn.Module) -> bool:
    cls = type(module)
    if getattr(cls, "_qeff_safe_gelu", False):
        return False
    if isinstance(module, nn.GELU):
        return module.approximate == "tanh"
    return cls.__name__ in _GELU_TANH_CLASSES


def _safe_gelu_forward(self, x, *args, **kwargs):
    return safe_gelu_tanh(x)


def safe_gelu_transform(model: nn.Module, only: Iterable[str] | None = None) -> TransformResult:
    """Swap tanh-GELU activation modules (nn.GELU('tanh'), transformers' GELUTanh / NewGELUActivation) for the
    clamped safe form. `only`: module paths (e.g. `findings.with_fix("SafeGELU").modules()`); default all."""
    def choose(path, module):
        if not is_gelu_tanh(module):
            return None
        return _derived(_SAFE_GELU, type(module), "Safe", f"with x clamped to ±{GELU_CLAMP} inside the tanh "
                        "(fp16-safe x³).", forward=_safe_gelu_forward, _qeff_safe_gelu=True), GELU_WHY

    def skip_note(path, module):
        return None if getattr(type(module), "_qeff_safe_gelu", False) else "not a tanh-GELU module"

    return _swap_with_notes(model, "SafeGELU", choose, only, skip_note, "no tanh-GELU module to make safe")


# ----------------------------------------------------------------------------- pre-scaled attention scores
_Q_CHILDREN = ("q_norm", "q_proj", "query", "q")  # the last module that produces q, in order of preference
_PRESCALED: dict[type, type] = {}
PRESCALE_WHY = ("q·kᵀ is formed before the 1/sqrt(head_dim) scale and passes 65504 while the scaled scores fit; "
                "the scale is folded into q instead ((q·s)·kᵀ, attention scale set to 1; exact, same weights)")


def _prescaled_forward(self, *args, **kwargs):
    return self._qeff_original.forward(self, *args, **kwargs) * self._qeff_prescale


def _q_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    for name in _Q_CHILDREN:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def prescaled_attention_transform(model: nn.Module, only: Iterable[str] | None = None) -> TransformResult:
    """Fold each attention module's score scale into q: the module's q producer (q_norm, else q_proj / query)
    gets a subclass multiplying its output by the scale, and the module's `scaling` becomes 1.0. Works for
    every attention that reads `self.scaling` (transformers' eager / sdpa / retained-state attention).
    `only`: attention module paths (e.g. `findings.with_fix("PrescaledAttention").modules()`); default all."""
    only = set(only) if only is not None else None
    targets: dict[str, tuple[nn.Module, str, float]] = {}  # q producer's path -> (attention, child name, scale)
    skipped = []
    for path, module in model.named_modules():  # find the attention modules; the swap is on their q producers
        if (only is not None and path not in only) or getattr(module, "_qeff_prescaled", None) is not None:
            continue
        scaling, found = getattr(module, "scaling", None), _q_child(module)
        if not isinstance(scaling, float) or found is None:
            if only is not None:
                skipped.append(f"{path} ({type(module).__name__}: no float `scaling` and q projection)")
            continue
        targets[f"{path}.{found[0]}" if path else found[0]] = (module, found[0], scaling)

    def swap_child(path, child):
        if path not in targets:
            return None
        scaling = targets[path][2]
        return (_derived(_PRESCALED, type(child), "Prescaled", "whose output is multiplied by the attention scale.",
                         forward=_prescaled_forward, _qeff_prescaled_q=True),
                f"q · {scaling:.4g} before q·kᵀ; scaling 1.0. {PRESCALE_WHY}")

    result = swap_modules(model, swap_child, "PrescaledAttention")
    for attention, name, scaling in targets.values():
        getattr(attention, name)._qeff_prescale = scaling
        attention._qeff_prescaled = (name, scaling)
        attention.scaling = 1.0
    if skipped:
        result.notes.append("left alone: " + "; ".join(skipped))
    if not result.changes:
        result.notes.append("no attention module with a float `scaling` and a q projection")
    return result


def revert_prescaled_attention(model: nn.Module) -> TransformResult:
    result = _revert(model, "PrescaledAttention", "RevertPrescaledAttention", "no pre-scaled attention to revert")
    for module in model.modules():
        state = module.__dict__.pop("_qeff_prescaled", None)
        if state is not None:
            name, scaling = state
            getattr(module, name).__dict__.pop("_qeff_prescale", None)
            module.scaling = scaling
    return result


def revert_safe_gelu(model: nn.Module) -> TransformResult:
    return _revert(model, "SafeGELU", "RevertSafeGELU", "no safe GELU to revert")


# ----------------------------------------------------------------------------- every exact fix at once
def apply_fixes(model: nn.Module, findings=None) -> list[TransformResult]:
    """The exact fixes the findings call for, each limited to the modules named: SafeNorm, PrescaledAttention,
    SafeGELU. Without findings: every norm, tanh-GELU and attention module. Findings whose fix is an fp32
    island ("NPI") are left to write_npi_yaml."""
    if findings is None:
        return [safe_norm_transform(model), prescaled_attention_transform(model), safe_gelu_transform(model)]
    reasons = {f.module: f"{f.place}: {f.reason}" for f in findings if f.fix == "SafeNorm"}
    out = []
    norms = findings.with_fix("SafeNorm").modules()
    if norms:
        out.append(safe_norm_transform(model, only=norms, reasons=reasons))
    attn = findings.with_fix("PrescaledAttention").modules()
    if attn:
        out.append(prescaled_attention_transform(model, only=attn))
    gelu = findings.with_fix("SafeGELU").modules()
    if gelu:
        out.append(safe_gelu_transform(model, only=gelu))
    if not out:
        empty = TransformResult("PrecisionFixes")
        empty.notes.append("no finding calls for an exact fix (fp32 islands: write_npi_yaml)")
        out.append(empty)
    return out


def revert_fixes(model: nn.Module) -> list[TransformResult]:
    """Switch every precision fix off (safe norms, pre-scaled attention, safe GELU)."""
    return [revert_safe_norm(model), revert_prescaled_attention(model), revert_safe_gelu(model)]
