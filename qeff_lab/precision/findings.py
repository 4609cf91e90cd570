"""Findings from a range profile: each place (module path + op) that fp16 cannot hold, how badly, and the fix.

Kinds (and the fix each suggests):
  norm-square      x*x / pow / mean inside an RMSNorm or LayerNorm      -> SafeNorm transform
  attention-scores q.k^T (attn_scores, or a matmul in an attention block) -> fp32 island (NPI) / scale q first
  softmax-input    scores + mask entering softmax                        -> where-mask with -1e4 / fp32 island
  mask-constant    fp32-minimum (~-3.4e38) mask values                   -> fp16-safe where-mask + FP16ClipConstants
  activation       any other op or module output above 65504             -> fp32 island (NPI)
  near-overflow    within 2x of 65504 (< 1 bit of headroom)              -> watch; fp32 island if it grows
  underflow        a share of non-zero values flushing to 0 in fp16       -> fp32 island or rescale
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from qeff_lab.pipeline import HtmlRepr

from qeff_lab.precision.numerics import FP16_MAX
from qeff_lab.precision.profile import OUTPUT, OpRange, RangeProfile, layer_of

FP32_MIN_MAGNITUDE = 1e38  # torch.finfo(float32).min is -3.4e38: a mask constant, not a computed value
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
FIXES = {
    "norm-square": ("SafeNorm", "replace the norm by its overflow-safe form (scale the row by its max |x| before "
                                "squaring): precision.safe_norm_transform"),
    "attention-scores": ("NPI", "keep this MatMul in fp32 (node-precision-info YAML), or fold 1/sqrt(head_dim) "
                                "into q before q.k^T"),
    "softmax-input": ("NPI", "mask with where(mask, scores, -1e4) rather than adding fp32-min; keep the softmax "
                             "input in fp32 (node-precision-info YAML)"),
    "mask-constant": ("FP16SafeMask", "build the mask with where(mask, 0, -1e4) (or -inf via where); "
                                      "FP16ClipConstants clips remaining constants to ±65504"),
    "activation": ("NPI", "run this node in fp32 (node-precision-info YAML: FP32NodeInstanceNames)"),
    "near-overflow": ("watch", "less than 1 bit of fp16 headroom: longer inputs may overflow; consider an fp32 "
                               "island (node-precision-info YAML)"),
    "underflow": ("NPI", "values flush to zero in fp16: keep this node in fp32 or rescale its inputs"),
}
_NORM_OPS = {"pow", "mul", "square", "mean", "sum", "var", "var_mean", "rsqrt", "sqrt", "add", "norm"}
_SCORE_OPS = {"matmul", "baddbmm", "einsum", "attn_scores"}
_BENIGN_UNDERFLOW_OPS = {"softmax", "exp", "sigmoid", "attn_mask", "where", "full", "masked_fill", "silu", "gelu"}


@dataclass
class Finding:
    """One place fp16 cannot hold: what was seen there, the limit, how bad, and what to do."""

    place: str  # "module.path: op"
    module: str
    op: str
    kind: str
    severity: str  # "error" | "warning" | "info"
    value: float  # abs max seen (underflow: the fraction flushing to zero)
    limit: float  # fp16 max (underflow: the threshold fraction)
    fix: str  # the transform / mechanism that addresses it
    suggestion: str
    module_class: str = ""
    visible_at_output: bool = True  # False: the module's own output looks fine, the overflow is inside
    n_over: int = 0

    @property
    def reason(self) -> str:
        if self.kind == "underflow":
            return f"{self.value:.1%} of values flush to 0 in fp16"
        return f"|x| reached {self.value:.3g} > fp16 max {self.limit:.0f}" if self.value > self.limit \
            else f"|x| reached {self.value:.3g} (fp16 max {self.limit:.0f})"


class Findings(list, HtmlRepr):
    """A list of Finding, worst first, with a DataFrame view and short summaries."""

    COLUMNS = ["severity", "kind", "place", "value", "limit", "visible_at_output", "fix", "suggestion"]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{c: getattr(f, c) for c in self.COLUMNS} for f in self], columns=self.COLUMNS)

    def of_kind(self, *kinds: str) -> "Findings":
        return Findings(f for f in self if f.kind in kinds)

    def modules(self, *kinds: str) -> list[str]:
        """Module paths with findings (of these kinds), in order, without repeats."""
        return list(dict.fromkeys(f.module for f in self if not kinds or f.kind in kinds))

    def summary(self) -> pd.DataFrame:
        df = self.to_frame()
        if df.empty:
            return pd.DataFrame(columns=["kind", "severity", "places", "hidden", "worst", "fix"])
        df["hidden"] = ~df["visible_at_output"].astype(bool)
        out = df.groupby(["kind", "severity"], sort=False).agg(
            places=("place", "size"), hidden=("hidden", "sum"), worst=("value", "max"), fix=("fix", "first"))
        return out.reset_index()

    def __repr__(self) -> str:
        counts = {s: sum(f.severity == s for f in self) for s in SEVERITY_ORDER}
        kinds = ", ".join(f"{k} {n}" for k, n in pd.Series([f.kind for f in self]).value_counts().items()) \
            if self else "none"
        return f"<Findings: {counts['error']} error, {counts['warning']} warning, {counts['info']} info ({kinds})>"


def _is_norm(cls_name: str) -> bool:
    return "norm" in cls_name.lower()


def _is_attention(module: str, cls_name: str) -> bool:
    return "attn" in cls_name.lower() or "attention" in cls_name.lower() or module.rsplit(".", 1)[-1] in (
        "self_attn", "attn", "attention", "self")


def classify(r: OpRange) -> str:
    """The finding kind of an over-range record (see the module docstring)."""
    if r.op == "attn_mask" or r.abs_max >= FP32_MIN_MAGNITUDE:
        return "mask-constant"
    if _is_norm(r.module_class) and r.op in _NORM_OPS:
        return "norm-square"
    if r.op == "softmax_input":
        return "softmax-input"
    if r.op in _SCORE_OPS and _is_attention(r.module, r.module_class):
        return "attention-scores"
    return "activation"


def find_issues(profile: RangeProfile, near_bits: float = 1.0, underflow_frac: float = 0.01,
                include_outputs: bool = True) -> Findings:
    """Findings from a profile (merged over decode steps), worst first.

    - above 65504 -> error (mask constants: warning, since where-masks and clipping make them harmless);
    - within `near_bits` of it -> warning (near-overflow);
    - more than `underflow_frac` of values flushing to zero -> info (underflow), skipping ops where that
      is expected (softmax probabilities, exp, masks).
    Module outputs (`op == "output"`) are reported only when no op inside the module already explains
    them, so one overflow is not listed twice.
    """
    merged = profile.merged()
    out_max = {m: r.abs_max for (m, op), r in merged.items() if op == OUTPUT}
    inner_over = {m for (m, op), r in merged.items() if op != OUTPUT and r.abs_max > FP16_MAX}
    findings = Findings()
    for (module, op), r in merged.items():
        if op == OUTPUT and not include_outputs:
            continue
        visible = out_max.get(module, r.abs_max) > FP16_MAX if op != OUTPUT else True
        if r.abs_max > FP16_MAX:
            if op == OUTPUT and module in inner_over:
                continue
            kind = classify(r)
            if kind == "mask-constant" and op == "softmax_input" and r.abs_max < FP32_MIN_MAGNITUDE:
                kind = "softmax-input"
            severity = "error"
            if kind == "mask-constant":  # -inf built with where is fine in fp16; fp32-min becomes -inf there
                severity = "info" if r.abs_max == float("inf") else "warning"
            fix, text = FIXES[kind]
            findings.append(Finding(r.place, module, op, kind, severity, r.abs_max, FP16_MAX, fix, text,
                                    r.module_class, visible, r.n_over))
        elif r.abs_max > FP16_MAX / 2 ** near_bits:
            fix, text = FIXES["near-overflow"]
            findings.append(Finding(r.place, module, op, "near-overflow", "warning", r.abs_max, FP16_MAX, fix, text,
                                    r.module_class, visible, 0))
        if r.frac_flush > underflow_frac and op not in _BENIGN_UNDERFLOW_OPS:  # a site can do both
            fix, text = FIXES["underflow"]
            findings.append(Finding(r.place, module, op, "underflow", "info", r.frac_flush, underflow_frac, fix,
                                    text, r.module_class, True, 0))
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], layer_of(f.module) if layer_of(f.module) is not None
                                 else -1, -f.value))
    return findings
