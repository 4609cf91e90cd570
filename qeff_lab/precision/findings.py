"""Findings from a range profile: each place (module path + op [+ intermediate]) fp16 cannot hold, grouped by cause.

Kinds (and the fix each suggests; "exact" fixes compute the same function in fp32):
  norm-square      x², (x - mean)² or their sums inside a norm          -> SafeNorm (exact; LayerNorm / RMSNorm
                   (RMSNorm/LayerNorm ops, F.layer_norm, group_norm,       modules), else fp32 island (NPI)
                   rms_norm, normalize)
  attention-scores q·kᵀ before or after the scale (sdpa, matmul, baddbmm) -> PrescaledAttention (exact: 1/sqrt(d)
                                                                           folded into q) when the scaled
                                                                           scores fit; else NPI
  softmax-input    scores + mask entering softmax                        -> where-mask with -1e4 / NPI
  softmax-sum      Σ exp(x - max) of a softmax / logsumexp / cross-entropy -> NPI (fp32 reduction)
  gelu-cube        x³ inside tanh-GELU                                   -> SafeGELU (exact); a warning: IEEE
                                                                           tanh(±inf) = ±1 keeps the result
  exp-overflow     exp(βx) inside softplus                               -> NPI
  mask-constant    fp32-minimum (~-3.4e38) mask values                   -> fp16-safe where-mask + FP16ClipConstants
  activation       any other op or module output above 65504             -> fp32 island (NPI)
  near-overflow    within 2x of 65504 (< 1 bit of headroom)              -> watch; fp32 island if it grows
  underflow        a share of non-zero values flushing to 0 in fp16       -> fp32 island or rescale

One cause (`Findings.causes()`) gathers the findings of one kind in one kind of module (e.g. every
LlamaRMSNorm whose square overflows): `Findings.to_frame()` has one row per cause, worst first (severity,
then how many times past the limit); `places_frame()` lists every place with the cause it belongs to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from qeff_lab.pipeline import HtmlRepr

from qeff_lab.precision.fused import INTERMEDIATES
from qeff_lab.precision.numerics import FP16_MAX
from qeff_lab.precision.profile import _SHORT_OPS, OUTPUT, OpRange, RangeProfile, layer_of

FP32_MIN_MAGNITUDE = 1e38  # torch.finfo(float32).min is -3.4e38: a mask constant, not a computed value
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
FIXES = {
    "norm-square": ("SafeNorm", "replace the norm by its overflow-safe form (scale the row by its max |x| before "
                                "squaring): precision.safe_norm_transform"),
    "attention-scores": ("NPI", "keep this MatMul in fp32 (node-precision-info YAML), or fold 1/sqrt(head_dim) "
                                "into q before q.k^T"),
    "softmax-input": ("NPI", "mask with where(mask, scores, -1e4) rather than adding fp32-min; keep the softmax "
                             "input in fp32 (node-precision-info YAML)"),
    "softmax-sum": ("NPI", "the softmax denominator passes 65504: keep this softmax / reduction in fp32 "
                           "(node-precision-info YAML)"),
    "gelu-cube": ("SafeGELU", "tanh-GELU with x clamped to ±10 inside the tanh (tanh is already ±1 there): "
                              "precision.safe_gelu_transform"),
    "exp-overflow": ("NPI", "exp passes 65504 below softplus' linear threshold: keep this node in fp32 "
                            "(node-precision-info YAML)"),
    "mask-constant": ("FP16SafeMask", "build the mask with where(mask, 0, -1e4) (or -inf via where); "
                                      "FP16ClipConstants clips remaining constants to ±65504"),
    "activation": ("NPI", "run this node in fp32 (node-precision-info YAML: FP32NodeInstanceNames)"),
    "near-overflow": ("watch", "less than 1 bit of fp16 headroom: longer inputs may overflow; consider an fp32 "
                               "island (node-precision-info YAML)"),
    "underflow": ("NPI", "values flush to zero in fp16: keep this node in fp32 or rescale its inputs"),
}
# Fixes other than a kind's default, chosen per place (see find_issues).
ALT_FIXES = {
    "PrescaledAttention": "fold the 1/sqrt(head_dim) scale into q (q·scale)·kᵀ: the scaled scores fit fp16 "
                          "(exact; precision.prescaled_attention_transform)",
    "NPI-norm": "no safe form for this norm here: keep its nodes in fp32 (node-precision-info YAML)",
}
# How each fix is applied, for the grouped view ("one call" where a transform exists).
REMEDIES = {
    "SafeNorm": "safe_norm_transform(model, only=findings.modules('norm-square')) (one call; or "
                "precision.apply_fixes / model.fix_precision())",
    "PrescaledAttention": "prescaled_attention_transform(model, only=...) (one call; or precision.apply_fixes)",
    "SafeGELU": "safe_gelu_transform(model, only=...) (one call; or precision.apply_fixes)",
    "NPI": "write_npi_yaml(findings, path, onnx_model): these nodes run in fp32",
    "FP16SafeMask": "an fp16-safe where-mask (encoders: fp16_safe_mask_transform), FP16ClipConstants at export",
    "watch": "nothing yet; profile longer inputs",
}
_NORM_OPS = {"pow", "mul", "square", "mean", "sum", "var", "var_mean", "rsqrt", "sqrt", "add", "norm"}
_SCORE_OPS = {"matmul", "baddbmm", "einsum", "attn_scores"}
_BENIGN_UNDERFLOW_OPS = {"softmax", "exp", "sigmoid", "attn_mask", "where", "full", "masked_fill", "silu", "gelu",
                         "scaled_dot_product_attention", "softplus", "log_softmax", "logsumexp"}
_NORM_INTERMEDIATES = {"centered_square", "sum_centered_square", "square", "sum_square"}
_SUM_INTERMEDIATES = {"sum_centered_square", "sum_square"}
_CLASS_KINDS = {"norm-square", "attention-scores", "gelu-cube", "mask-constant", "softmax-input"}


@dataclass
class Finding:
    """One place fp16 cannot hold: what was seen there, the limit, how bad, and what to do."""

    place: str  # "module.path: op" or "module.path: op [intermediate]"
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
    intermediate: str = ""  # the value formed inside a fused op (fused.INTERMEDIATES); "" for the op's result

    @property
    def reason(self) -> str:
        if self.kind == "underflow":
            return f"{self.value:.1%} of values flush to 0 in fp16"
        what = f"{self.intermediate} " if self.intermediate else ""
        return f"{what}|x| reached {self.value:.3g} > fp16 max {self.limit:.0f}" if self.value > self.limit \
            else f"{what}|x| reached {self.value:.3g} (fp16 max {self.limit:.0f})"

    @property
    def times_limit(self) -> float:
        return self.value / self.limit if self.limit else float("inf")


def _sig2(v: float) -> str:
    """Two significant digits, the same on every CPU (6.2e+08 -> '6.2e8', 0.031 -> '0.031')."""
    if v != v:
        return "nan"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    text = f"{v:.2g}"
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)


def _pattern(module: str) -> str:
    """model.layers.7.mlp.down_proj -> model.layers.*.mlp.down_proj (the module's role, whatever the layer)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module)


@dataclass
class Cause:
    """One root cause: the findings of one kind in one kind of module (and one op, for plain activations)."""

    kind: str
    module_class: str
    fix: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def severity(self) -> str:
        return min((f.severity for f in self.findings), key=SEVERITY_ORDER.__getitem__)

    @property
    def worst(self) -> Finding:
        pool = [f for f in self.findings if f.severity == self.severity]
        return max(pool, key=lambda f: f.times_limit)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(f.module for f in self.findings))

    @property
    def ops(self) -> list[str]:
        return list(dict.fromkeys(f.op for f in self.findings))

    @property
    def intermediates(self) -> list[str]:
        return list(dict.fromkeys(f.intermediate for f in self.findings if f.intermediate))

    @property
    def remedy(self) -> str:
        return REMEDIES.get(self.fix, self.worst.suggestion)

    @property
    def title(self) -> str:
        """e.g. '61 LlamaRMSNorm: pow reaches 6.2e8 (9500x the fp16 max 65504); fix: SafeNorm (one call)'."""
        w = self.worst
        n = len(self.modules)
        op = _SHORT_OPS.get(w.op, w.op)
        what = f"{op} [{w.intermediate}]" if w.intermediate else op
        if w.intermediate in INTERMEDIATES:
            what += f" = {INTERMEDIATES[w.intermediate].split(',')[0]}"
        who = f"{n} {w.module_class or 'module'}" + ("" if n == 1 else "s")
        if self.kind == "underflow":
            body = f"{what}: up to {w.value:.0%} of values flush to 0 in fp16"
        elif w.value > w.limit:
            body = f"{what} reaches {_sig2(w.value)} ({_sig2(w.times_limit)}x the fp16 max 65504)"
        else:
            body = f"{what} reaches {_sig2(w.value)} (fp16 max 65504)"
        one = " (one call)" if self.fix in ("SafeNorm", "PrescaledAttention", "SafeGELU") else ""
        return f"{who}: {body}; fix: {self.fix}{one}"

    def to_frame(self) -> pd.DataFrame:
        """The places under this cause, worst first."""
        return Findings(sorted(self.findings, key=lambda f: -f.times_limit)).places_frame()


CAUSE_COLUMNS = ["cause", "severity", "kind", "modules", "places", "module_class", "ops", "intermediates", "value",
                 "limit", "times_limit", "fix", "remedy", "worst_place"]
PLACE_COLUMNS = ["cause_id", "severity", "kind", "place", "module", "op", "intermediate", "value", "limit",
                 "visible_at_output", "fix", "suggestion"]


class Findings(list, HtmlRepr):
    """A list of Finding, worst first. `causes()` groups them by root cause; `to_frame()` is one row per cause
    (the same grouping the widget and the static report show); `places_frame()` one row per place."""

    COLUMNS = CAUSE_COLUMNS

    def causes(self) -> list[Cause]:
        """Root causes, worst first: severity, then how far past the limit the worst place goes."""
        groups: dict[tuple, Cause] = {}
        for f in self:
            if f.kind in _CLASS_KINDS:  # the module kind is the cause, whichever op shows it
                key = (f.kind, f.module_class, f.fix)
            elif f.kind in ("near-overflow", "underflow"):  # the same role (layer index ignored), any op
                key = (f.kind, f.module_class, f.fix, _pattern(f.module))
            else:  # a plain value: the same op in the same role
                key = (f.kind, f.module_class, f.fix, f.op, f.intermediate, _pattern(f.module))
            groups.setdefault(key, Cause(f.kind, f.module_class, f.fix)).findings.append(f)
        return sorted(groups.values(), key=lambda c: (SEVERITY_ORDER[c.severity], -c.worst.times_limit))

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for c in self.causes():
            w = c.worst
            rows.append({"cause": c.title, "severity": c.severity, "kind": c.kind, "modules": len(c.modules),
                         "places": len(c.findings), "module_class": c.module_class, "ops": ", ".join(c.ops),
                         "intermediates": ", ".join(c.intermediates), "value": w.value, "limit": w.limit,
                         "times_limit": w.times_limit, "fix": c.fix, "remedy": c.remedy, "worst_place": w.place})
        return pd.DataFrame(rows, columns=CAUSE_COLUMNS)

    def places_frame(self) -> pd.DataFrame:
        """One row per place; `cause_id` is the row of `to_frame()` (the cause) it belongs to."""
        ids = {id(f): i for i, c in enumerate(self.causes()) for f in c.findings}
        return pd.DataFrame([{"cause_id": ids[id(f)], **{c: getattr(f, c) for c in PLACE_COLUMNS[1:]}}
                             for f in self], columns=PLACE_COLUMNS)

    def of_kind(self, *kinds: str) -> "Findings":
        return Findings(f for f in self if f.kind in kinds)

    def with_fix(self, *fixes: str) -> "Findings":
        return Findings(f for f in self if f.fix in fixes)

    def modules(self, *kinds: str) -> list[str]:
        """Module paths with findings (of these kinds), in order, without repeats."""
        return list(dict.fromkeys(f.module for f in self if not kinds or f.kind in kinds))

    def summary(self) -> pd.DataFrame:
        """Per kind and severity: how many places (hidden inside modules), the worst value, the fix."""
        df = self.places_frame()
        if df.empty:
            return pd.DataFrame(columns=["kind", "severity", "places", "hidden", "worst", "fix"])
        df["hidden"] = ~df["visible_at_output"].astype(bool)
        out = df.groupby(["kind", "severity"], sort=False).agg(
            places=("place", "size"), hidden=("hidden", "sum"), worst=("value", "max"), fix=("fix", "first"))
        return out.reset_index()

    def headline(self) -> str:
        """The counts every view shows, in one wording: causes (by severity), the places under them, and the
        modules those places are in. e.g. '2 cause(s) (1 error, 1 warning) over 129 place(s) in 56 module(s)'."""
        causes = self.causes()
        counts = ", ".join(f"{n} {s}" for s in SEVERITY_ORDER if (n := sum(c.severity == s for c in causes)))
        return (f"{len(causes)} cause(s){f' ({counts})' if counts else ''} over {len(self)} place(s) in "
                f"{len(self.modules())} module(s)")

    def __repr__(self) -> str:
        causes = self.causes()
        kinds = ", ".join(f"{k} {n}" for k, n in pd.Series([c.kind for c in causes]).value_counts().items()) \
            if causes else "none"
        return f"<Findings: {self.headline()}; kinds: {kinds}>"


def _is_norm(cls_name: str) -> bool:
    return "norm" in cls_name.lower()


def _is_attention(module: str, cls_name: str) -> bool:
    return "attn" in cls_name.lower() or "attention" in cls_name.lower() or module.rsplit(".", 1)[-1] in (
        "self_attn", "attn", "attention", "self")


def _is_gelu(cls_name: str) -> bool:
    return "gelu" in cls_name.lower()


def classify(r: OpRange) -> str:
    """The finding kind of an over-range record (see the module docstring)."""
    if r.op == "attn_mask" or r.intermediate == "attn_mask" or r.abs_max >= FP32_MIN_MAGNITUDE:
        return "mask-constant"
    if r.intermediate in _NORM_INTERMEDIATES or (not r.intermediate and _is_norm(r.module_class)
                                                 and r.op in _NORM_OPS):
        return "norm-square"
    if r.op == "softmax_input" or r.intermediate == "softmax_input":
        return "softmax-input"
    if r.intermediate == "sum_exp":
        return "softmax-sum"
    if r.intermediate in ("qk_product", "attn_scores"):
        return "attention-scores"
    if r.intermediate == "cube" or (_is_gelu(r.module_class) and r.op == "pow"):
        return "gelu-cube"
    if r.op == "softplus" and r.intermediate == "exp":
        return "exp-overflow"
    if (r.op in _SCORE_OPS or r.intermediate == "product") and _is_attention(r.module, r.module_class):
        return "attention-scores"
    return "activation"


def _fix_for(kind: str, r: OpRange, merged: dict) -> tuple[str, str]:
    """The kind's fix, or the exact fix / fallback this particular place calls for."""
    fix, text = FIXES[kind]
    if kind == "norm-square":
        swappable = _is_norm(r.module_class) and "group" not in r.module_class.lower() and (
            not r.intermediate or r.op in ("layer_norm", "rms_norm"))
        if not swappable:
            return "NPI", ALT_FIXES["NPI-norm"]
    if kind == "attention-scores":
        # The unscaled product overflows but the scaled scores fit: fold the scale into q.
        scaled = None
        if r.intermediate == "qk_product":
            scaled = merged.get((r.module, r.op, "attn_scores"))
        elif r.op == "matmul" and not r.intermediate:  # eager attention: matmul, then * scaling
            scaled = merged.get((r.module, "mul", ""))
        if scaled is not None and scaled.abs_max <= FP16_MAX:
            return "PrescaledAttention", ALT_FIXES["PrescaledAttention"]
    return fix, text


def _severity(kind: str, r: OpRange) -> str:
    if kind == "mask-constant":  # -inf built with where is fine in fp16; fp32-min becomes -inf there
        return "info" if r.abs_max == float("inf") else "warning"
    if kind == "gelu-cube" or r.intermediate in _SUM_INTERMEDIATES:
        # x³ -> inf gives tanh(inf) = 1, the right value, under IEEE; a sum overflows only when the device
        # accumulates the reduction in fp16 (wide accumulators do not)
        return "warning"
    return "error"


def find_issues(profile: RangeProfile, near_bits: float = 1.0, underflow_frac: float = 0.01,
                include_outputs: bool = True) -> Findings:
    """Findings from a profile (merged over decode steps), worst first.

    - above 65504 -> error (mask constants, row sums inside norms and tanh-GELU's x³: warning, see _severity);
    - within `near_bits` of it -> warning (near-overflow);
    - more than `underflow_frac` of values flushing to zero -> info (underflow), skipping ops where that
      is expected (softmax probabilities, exp, masks) and fused-op intermediates.
    Module outputs (`op == "output"`) are reported only when no op inside the module already explains
    them, so one overflow is not listed twice. Group them with `.causes()` / `.to_frame()`.
    """
    merged = profile.merged()
    out_max = {m: r.abs_max for (m, op, _), r in merged.items() if op == OUTPUT}
    inner_over = {m for (m, op, _), r in merged.items() if op != OUTPUT and r.abs_max > FP16_MAX}
    findings = Findings()
    for (module, op, inter), r in merged.items():
        if op == OUTPUT and not include_outputs:
            continue
        visible = out_max.get(module, r.abs_max) > FP16_MAX if op != OUTPUT else True
        if r.abs_max > FP16_MAX:
            if op == OUTPUT and module in inner_over:
                continue
            kind = classify(r)
            fix, text = _fix_for(kind, r, merged)
            findings.append(Finding(r.place, module, op, kind, _severity(kind, r), r.abs_max, FP16_MAX, fix, text,
                                    r.module_class, visible, r.n_over, inter))
        elif r.abs_max > FP16_MAX / 2 ** near_bits and inter not in _SUM_INTERMEDIATES:
            fix, text = FIXES["near-overflow"]
            findings.append(Finding(r.place, module, op, "near-overflow", "warning", r.abs_max, FP16_MAX, fix, text,
                                    r.module_class, visible, 0, inter))
        if r.frac_flush > underflow_frac and op not in _BENIGN_UNDERFLOW_OPS and not inter:  # a site can do both
            fix, text = FIXES["underflow"]
            findings.append(Finding(r.place, module, op, "underflow", "info", r.frac_flush, underflow_frac, fix,
                                    text, r.module_class, True, 0))
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], layer_of(f.module) if layer_of(f.module) is not None
                                 else -1, -f.value))
    return findings
