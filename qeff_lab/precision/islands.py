"""fp32 islands by search: the fewest modules to keep in fp32 so emulated fp16 (+ MXFP6 weights) reaches an
accuracy target against fp32, written as the compiler's node-precision-info YAML with a reason per node.

Like Polygraphy's `debug precision` and ModelOpt's AutoCast, but on the device's numerics (precision.emulate).

Granularity: modules. A unit is the ops one module runs itself (not its children's), which is what the
exporter puts in that module's scope, so a unit maps to the ONNX nodes `npi.map_finding` gives a module.
Graph nodes one by one would need one emulated run per node and thousands of nodes; module units are few
enough (SmolLM2: ~400) to search within a notebook's budget, and every node of a unit shares one scope.

The search, each step one emulated run over the prompts (all cached, recorded in `IslandSearch.steps`):
  1. baseline: nothing in fp32 (done if it already meets the target); every unit in fp32 (the target must
     be reachable: otherwise fp16 / MXFP6 weights, not the arithmetic, limit it);
  2. bisection over the units ranked by fp32 range (headroom in the fp32 profile, graph order breaking
     ties): the smallest k such that the k riskiest units in fp32 meet the target;
  3. bisection over graph order within those: the latest start such that the units from there on suffice;
  4. pruning: drop the remaining units one at a time, least risky first, keeping each drop that still
     meets the target, within `max_evals` runs in all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from qeff_lab.pipeline import HtmlRepr, timed
from qeff_lab.precision.emulate import Fp16Emulation, fp16_weights
from qeff_lab.precision.numerics import FP16_MAX, kl_divergence
from qeff_lab.precision.profile import OUTPUT, ROOT, RangeProfiler

METRICS = {  # name -> (default target, higher is better, what it measures)
    "token_match": (0.9, True, "share of positions whose fp16 argmax is fp32's (teacher-forced over the prompts)"),
    "kl": (0.05, False, "mean KL(fp32 || fp16) per position, in nats"),
    "cosine": (0.99, True, "min cosine similarity of fp16 and fp32 outputs, per token row"),
}
WEIGHTS = (None, "mxfp6")
STEP_COLUMNS = ["step", "phase", "units_fp32", "value", "meets_target", "note"]


class Fp16IslandEmulation(Fp16Emulation):
    """Fp16Emulation in which the ops that the modules in `fp32_modules` run themselves stay in fp32 (their
    children's ops are rounded unless named too). Use as a context manager around `model`'s forward."""

    def __init__(self, model: nn.Module, fp32_modules=(), flush_subnormals: bool = False):
        super().__init__(flush_subnormals)
        self.model, self.fp32_modules = model, set(fp32_modules)
        self._stack: list[str] = []
        self._handles: list = []

    def __enter__(self):
        def enter(path):
            def hook(module, args) -> None:
                self._stack.append(path)
            return hook

        def leave(module, args, output) -> None:  # returns None: the output stays the module's
            if self._stack:
                self._stack.pop()

        for path, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(enter(path or ROOT)))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._stack and self._stack[-1] in self.fp32_modules:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


@dataclass
class IslandSearch(HtmlRepr):
    """The result: the modules kept in fp32 (with why), the accuracy of every step of the search, and the NPI
    YAML written for them (node output names of the exported graph)."""

    islands: list[str]
    reasons: dict[str, str]
    steps: pd.DataFrame
    metric: str
    target: float
    weights: str | None
    reached: bool
    value: float  # the metric with the islands
    baseline: float  # the metric with nothing in fp32
    units: int  # candidate units searched
    nodes: list[str] = field(default_factory=list)  # ONNX node outputs in the NPI YAML
    npi_path: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "fp16" + (" + MXFP6 weights" if self.weights == "mxfp6" else "")
        got = (f"{len(self.islands)} of {self.units} modules in fp32" if self.reached else
               "target not reached even with every module in fp32")
        nodes = f", {len(self.nodes)} ONNX nodes" if self.npi_path else ""
        return (f"{what}, {self.metric} target {_fmt(self.target)}: {got}{nodes}; {self.metric} "
                f"{_fmt(self.baseline)} -> {_fmt(self.value)} in {len(self.steps)} runs")

    def table(self) -> str:
        """The steps as text (no timings: the same on every CPU)."""
        return self.steps.to_string(index=False, formatters={"value": _fmt})

    def plot(self, ax=None):
        """The metric at each step of the search, the target as a line (matplotlib)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 3))[1]
        ok = self.steps["meets_target"].astype(bool)
        ax.plot(self.steps["step"], self.steps["value"], color="0.6", zorder=1)
        ax.scatter(self.steps["step"][ok], self.steps["value"][ok], color="tab:green", label="meets target", zorder=2)
        ax.scatter(self.steps["step"][~ok], self.steps["value"][~ok], color="tab:red", label="misses", zorder=2)
        ax.axhline(self.target, ls="--", color="k", lw=1, label=f"target {_fmt(self.target)}")
        ax.set_xlabel("search step (one emulated run each)")
        ax.set_ylabel(self.metric)
        ax.legend(loc="best", fontsize=8)
        return ax.figure

    def to_frame(self) -> pd.DataFrame:
        """One row per island: module and why it is kept in fp32."""
        return pd.DataFrame([{"module": m, "reason": self.reasons.get(m, "")} for m in self.islands],
                            columns=["module", "reason"])

    def __repr__(self) -> str:
        return f"<IslandSearch {self.summary()}>"


def _fmt(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.4g}"


# ----------------------------------------------------------------------------- forward passes
def _runs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Callable[[nn.Module], torch.Tensor]:
    """The rows the metric compares: logits at every prompt position (decoders, teacher-forced), or the last
    hidden state of every unmasked token (encoders)."""
    if hasattr(model, "new_kv_cache"):  # retained-state (KV-transformed) decoder: every position's logits
        def run(m):  # as accuracy.runners.RetainedStateRunner.step_all (precision may not import accuracy)
            out = []
            for enc in batches:
                for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
                    ids = row[mask.bool()][None]
                    hidden, _ = getattr(m, m.base_name)(ids, torch.arange(ids.shape[1])[None],
                                                        m.new_kv_cache(1, ids.shape[1]))
                    out.append(m.final_logits(getattr(m, m.head_name)(hidden)).float()[0])
            return torch.cat(out)
        return run

    def run(m):
        out = []
        for enc in batches:
            res = m(**enc)
            t = getattr(res, "logits", None)
            t = t if t is not None else getattr(res, "last_hidden_state", None)
            t = t if t is not None else (res[0] if isinstance(res, (tuple, list)) else res)
            out.append(t[enc["attention_mask"].bool()].float())
        return torch.cat(out)
    return run


def _score(metric: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    if metric == "token_match":
        return float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    if metric == "kl":  # mean KL(P_ref || P_out) per row; non-finite rows: inf
        rows = ref.shape[-1]
        return float(kl_divergence(ref.detach().reshape(-1, rows).numpy(), out.detach().reshape(-1, rows).numpy()).mean())
    cos = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1)
    return float(torch.where(torch.isfinite(cos), cos, torch.full_like(cos, -1.0)).min())


# ----------------------------------------------------------------------------- the search
def _units_by_risk(model: nn.Module, run) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """Units (modules running ops themselves) in graph order, each one's worst fp32 |x| (fused intermediates
    included) and where it was seen, from one profiled fp32 run."""
    with torch.no_grad(), RangeProfiler(model, module_outputs=False) as prof:
        run(model)
    order: list[str] = []
    worst: dict[str, float] = {}
    where: dict[str, str] = {}
    for r in prof.profile().records:
        if r.op == OUTPUT:
            continue
        if r.module not in worst:
            order.append(r.module)
            worst[r.module] = -1.0
        if r.abs_max > worst[r.module]:
            worst[r.module], where[r.module] = r.abs_max, f"{r.place} reaches |x| {r.abs_max:.3g}"
    return order, worst, where


@torch.no_grad()
def find_fp32_islands(model: nn.Module, inputs: Any, tokenizer=None, *, metric: str = "token_match",
                      target: float | None = None, weights: str | None = None, onnx_model=None,
                      npi_path: str | Path | None = None, max_evals: int = 24, progress: bool = True
                      ) -> IslandSearch:
    """Search the fewest modules to keep in fp32 so that `model` in emulated fp16 (`weights="mxfp6"`: with
    MXFP6 MatMul weights too) reaches `target` in `metric` against fp32 on `inputs` (prompts with
    `tokenizer`, or token ids; a few short ones keep it quick). Metrics: "token_match" (>= target), "kl"
    (mean, <= target), "cosine" (min, >= target); defaults in METRICS. With `onnx_model` (the graph exported
    from `model`) and `npi_path`, writes the NPI YAML (precision.npi) with a reason per node.
    See the module docstring for the search; `max_evals` caps the emulated runs."""
    from tqdm.auto import tqdm

    from qeff_lab.precision.analyze import _inputs_list

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be None (fp16 weights) or 'mxfp6', got {weights!r}")
    if npi_path is not None and onnx_model is None:
        raise ValueError("Writing the NPI YAML needs the exported graph: pass onnx_model=<path or ModelProto> "
                         "(or use model.find_fp32_islands(...), which exports first).")
    default, higher, _ = METRICS[metric]
    target = default if target is None else float(target)
    meets = (lambda v: v >= target) if higher else (lambda v: v <= target)
    batches = _inputs_list(inputs, tokenizer)
    run = _runs(model, batches)
    was_training = model.training
    model.eval()
    with timed() as elapsed:
        ref = run(model)
        units, worst, where = _units_by_risk(model, run)
        low = _low_precision(model, weights)
        rows: list[dict] = []
        cache: dict[frozenset, float] = {}
        bar = tqdm(total=max_evals, desc="fp32 island search", disable=not progress, leave=False)

        def evaluate(kept, phase: str, note: str = "") -> bool:
            key = frozenset(kept)
            if key not in cache:
                with Fp16IslandEmulation(low, key):
                    cache[key] = _score(metric, ref, run(low))
                bar.update(1)
            rows.append({"step": len(rows), "phase": phase, "units_fp32": len(key), "value": cache[key],
                         "meets_target": meets(cache[key]), "note": note})
            return meets(cache[key])

        def budget() -> bool:
            return len(cache) < max_evals

        notes = []
        kept: list[str] = []
        baseline_ok = evaluate([], "baseline", "nothing in fp32")
        reached = baseline_ok or evaluate(units, "baseline", "every module in fp32")
        if not reached:
            notes.append("the target is not reached even with every module in fp32: the weights (fp16"
                         + (" + MXFP6" if weights else "") + ") limit it, not the arithmetic; relax the target")
        elif not baseline_ok:
            ranked = sorted(units, key=lambda u: (-worst[u], units.index(u)))
            lo, hi = 0, len(ranked)  # invariant: the hi riskiest meet the target, the lo riskiest do not
            while hi - lo > 1 and budget():
                mid = (lo + hi) // 2
                if evaluate(ranked[:mid], "bisect by range", f"the {mid} riskiest"):
                    hi = mid
                else:
                    lo = mid
            kept = sorted(ranked[:hi], key=units.index)
            lo, hi = 0, len(kept) - 1  # the units kept[start:] must meet; find the latest start
            while hi - lo > 0 and budget():
                mid = (lo + hi + 1) // 2
                if evaluate(kept[mid:], "bisect by graph order", f"from {kept[mid]} on"):
                    lo = mid
                else:
                    hi = mid - 1
            kept = kept[lo:]
            for u in sorted(kept, key=lambda u: worst[u]):  # pruning, least risky first
                if not budget():
                    notes.append(f"pruning stopped at the budget of {max_evals} runs")
                    break
                trial = [k for k in kept if k != u]
                if trial and evaluate(trial, "prune", f"without {u}"):
                    kept = trial
        bar.close()
        final = cache[frozenset(kept)] if frozenset(kept) in cache else cache[frozenset()]
    model.train(was_training)
    reasons = {u: f"fp32 island: {where.get(u, 'no op recorded')}"
               + (" (beyond fp16 max)" if worst.get(u, 0) > FP16_MAX else "") for u in kept}
    result = IslandSearch(kept, reasons, pd.DataFrame(rows, columns=STEP_COLUMNS), metric, target, weights,
                          reached, final, cache[frozenset()], len(units), seconds=elapsed(), notes=notes)
    if npi_path is not None:  # sets result.nodes too (the graph read and mapped once)
        write_island_yaml(result, onnx_model, npi_path)
    elif onnx_model is not None:
        result.nodes = island_nodes(kept, reasons, onnx_model)
    return result


@torch.no_grad()
def island_accuracy(model: nn.Module, inputs: Any, islands, tokenizer=None, *, metric: str = "token_match",
                    weights: str | None = None) -> float:
    """`metric` against fp32 of emulated fp16 (+ MXFP6 weights) with the modules `islands` in fp32: e.g. the
    findings-based islands (`findings.modules(...)`), to compare with a search's result."""
    from qeff_lab.precision.analyze import _inputs_list

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    run = _runs(model, _inputs_list(inputs, tokenizer))
    ref = run(model)
    low = _low_precision(model, weights)
    with Fp16IslandEmulation(low, islands):
        return _score(metric, ref, run(low))


def _low_precision(model: nn.Module, weights: str | None) -> nn.Module:
    """A copy with fp16 weights (and MXFP6 MatMul weights when `weights == "mxfp6"`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be None (fp16 weights) or 'mxfp6', got {weights!r}")
    low = fp16_weights(model)
    if weights == "mxfp6":
        from qeff_lab.precision.mx import mxfp6_weights

        mxfp6_weights(low, inplace=True)
    return low


def island_nodes(islands: list[str], reasons: dict[str, str], onnx_model) -> list[str]:
    """The ONNX node outputs of the islands: the nodes each module's scope holds directly (npi.map_finding)."""
    return [e.node_output for e in _entries(islands, reasons, onnx_model)]


def _entries(islands, reasons, onnx_model):
    import onnx

    from qeff_lab.precision.findings import Finding
    from qeff_lab.precision.npi import NpiEntry, map_finding

    model = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, Path)) \
        else onnx_model
    entries: dict[str, NpiEntry] = {}
    for module in islands:
        f = Finding(module, module, "", "island", "error", 0.0, FP16_MAX, "NPI", "", node="")
        for out in map_finding(f, model, whole_module=True):
            entries.setdefault(out, NpiEntry(out, module, reasons.get(module, "fp32 island")))
    return list(entries.values())


def write_island_yaml(result: IslandSearch, onnx_model, path: str | Path) -> Path:
    """Write the islands as node-precision-info YAML (npi.render_npi_yaml's format) to `path`."""
    from qeff_lab.precision.npi import render_npi_yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _entries(result.islands, result.reasons, onnx_model)
    path.write_text(render_npi_yaml(entries))
    result.npi_path, result.nodes = path, [e.node_output for e in entries]
    return path
