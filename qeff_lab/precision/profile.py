"""Streaming range profiling: per module path and per tensor op inside it, fp16-relevant statistics, nothing stored.

A TorchFunctionMode sees every torch function call (`pow`, `matmul`, `softmax`, `linear`, `x * x`, ...);
forward hooks keep a stack of module paths, so each call is attributed to the innermost module running it
(`model.layers.7.input_layernorm: pow`). Each result is reduced on the spot to a handful of numbers and
folded into running totals; memory is bounded by the number of (module, op) sites, not by depth or length.

A fused op (`layer_norm`, `scaled_dot_product_attention`, tanh-`gelu`, `softmax`, `baddbmm`, ...) hides the
intermediates a device forms in fp16 (centered squares, attention scores, x³, ...); for each call the
profiler recomputes them from the call's inputs (qeff_lab.precision.fused, block by block) and records them
as the same (module, op) site with an `intermediate` name (`layer_norm [centered_square]`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.overrides import TorchFunctionMode

from qeff_lab.pipeline import HtmlRepr

from qeff_lab.precision import fused
from qeff_lab.precision.numerics import FP16_MAX, headroom_bits, tensor_stats

ROOT = "<root>"
OUTPUT = "output"  # the op name under which a module's own output is recorded

# Calls that move, view or re-type values without computing new ones: not worth a record.
SKIP_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "contiguous", "expand", "expand_as",
    "unsqueeze", "squeeze", "getitem", "setitem", "flatten", "unflatten", "chunk", "split", "narrow", "select",
    "size", "dim", "t", "to", "type", "type_as", "float", "half", "double", "bfloat16", "detach", "clone", "numel",
    "stride", "item", "tolist", "is_floating_point", "get_device", "requires_grad_", "dropout", "get",
    "cat", "stack", "index_select", "gather", "repeat", "repeat_interleave", "len", "contains", "eq", "ne", "lt",
    "le", "gt", "ge", "and", "or", "invert", "logical_not", "logical_and", "logical_or", "bool", "long", "int",
    "any", "all", "argmax", "argmin", "nonzero", "arange", "ones", "zeros", "ones_like", "zeros_like",
    "empty", "empty_like", "new_ones", "new_zeros", "new_empty", "tensor", "as_tensor", "cpu", "data_ptr",
    "element_size", "is_contiguous", "storage_offset", "copy", "fill", "diff",
    "format", "repr", "hash", "bool_", "index", "unbind", "slice", "tril", "triu", "is_complex", "dtype",
    "device", "shape", "isfinite", "isnan", "isinf", "sort", "topk",
})
_RENAME = {"rmul": "mul", "imul": "mul", "radd": "add", "iadd": "add", "rsub": "sub", "isub": "sub",
           "truediv": "div", "rtruediv": "div", "itruediv": "div", "rpow": "pow", "ipow": "pow",
           "matmul": "matmul", "rmatmul": "matmul", "bmm": "matmul", "neg": "neg"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def op_name(func) -> str | None:
    """'pow' for torch.pow / Tensor.pow / Tensor.__pow__ / Tensor.pow_; None for calls not worth recording."""
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):
        return None
    name = name.strip("_")
    if name.endswith("_") and name not in SKIP_OPS:  # in-place variant: pow_ -> pow
        name = name.rstrip("_")
    name = _RENAME.get(name, name)
    return None if name in SKIP_OPS else name


def layer_of(path: str) -> int | None:
    """The first numeric path segment (the block index in `model.layers.7.mlp`), or None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


_SHORT_OPS = {"scaled_dot_product_attention": "sdpa"}


def site_of(path: str, op: str, intermediate: str = "") -> str:
    """What a heatmap column means: the path inside the block plus the op (`input_layernorm: pow`,
    `output.LayerNorm: layer_norm [centered_square]`)."""
    m = _LAYER_RE.search(path)
    inner = path[m.end():] if m else path
    op = _SHORT_OPS.get(op, op)
    return f"{inner or 'block'}: {op}" + (f" [{intermediate}]" if intermediate else "")


def place_of(module: str, op: str, intermediate: str = "", node: str = "", op_type: str = "",
             function: str = "") -> str:
    """`model.layers.7.input_layernorm: pow` (PyTorch side), `...: layer_norm [centered_square]` (inside a fused
    op), `...: pow (Pow in CustomRMSNorm, node n2__7)` (ONNX side)."""
    text = f"{module}: {op}" + (f" [{intermediate}]" if intermediate else "")
    if node:
        text += f" ({op_type}" + (f" in {function}" if function else "") + f", node {node})"
    return text


@dataclass
class OpRange:
    """Running range statistics of one (module, op[, step]) site."""

    module: str
    op: str
    module_class: str
    step: int | None = None
    calls: int = 0
    numel: int = 0
    abs_max: float = 0.0
    min_nonzero: float = math.inf
    n_over: int = 0
    n_subnormal: int = 0
    n_flush: int = 0
    n_nonfinite: int = 0
    intermediate: str = ""  # a value formed inside a fused op (fused.INTERMEDIATES); "" for the op's result
    # Set by the ONNX-side profile (precision.onnx_profile): the node (name in the inlined graph), its op type,
    # and the ONNX function whose body it came from ("" outside functions). "" on the PyTorch side.
    node: str = ""
    op_type: str = ""
    function: str = ""

    def add(self, stats: tuple) -> None:
        n, hi, lo, over, sub, flush, nonfinite = stats
        self.calls += 1
        self.numel += n
        self.abs_max = max(self.abs_max, hi)
        self.min_nonzero = min(self.min_nonzero, lo)
        self.n_over += over
        self.n_subnormal += sub
        self.n_flush += flush
        self.n_nonfinite += nonfinite

    def merge(self, other: "OpRange") -> None:
        self.add((other.numel, other.abs_max, other.min_nonzero, other.n_over, other.n_subnormal, other.n_flush,
                  other.n_nonfinite))
        self.calls += other.calls - 1

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies a site: (module, op, intermediate, ONNX node)."""
        return self.module, self.op, self.intermediate, self.node

    @property
    def place(self) -> str:
        return place_of(self.module, self.op, self.intermediate, self.node, self.op_type, self.function)

    @property
    def headroom_bits(self) -> float:
        return headroom_bits(self.abs_max)

    @property
    def frac_subnormal(self) -> float:
        return self.n_subnormal / self.numel if self.numel else 0.0

    @property
    def frac_flush(self) -> float:
        return self.n_flush / self.numel if self.numel else 0.0

    @property
    def overflows(self) -> bool:
        return self.abs_max > FP16_MAX


COLUMNS = ["module", "op", "intermediate", "module_class", "layer", "site", "step", "calls", "numel", "abs_max",
           "min_nonzero", "n_over", "frac_subnormal", "frac_flush", "n_nonfinite", "headroom_bits", "node", "op_type",
           "function"]


@dataclass
class RangeProfile(HtmlRepr):
    """What a profiling run saw: one OpRange per site, in first-seen order. Plain data for views and tests."""

    records: list[OpRange]
    model_class: str = ""
    inputs: int = 0
    notes: list[str] = field(default_factory=list)
    source: str = "pytorch"  # "pytorch" (RangeProfiler) or "onnx" (onnx_profile: the exported graph in ORT)

    def to_frame(self) -> pd.DataFrame:
        rows = [{"module": r.module, "op": r.op, "intermediate": r.intermediate, "module_class": r.module_class,
                 "layer": layer_of(r.module), "site": site_of(r.module, r.op, r.intermediate), "step": r.step,
                 "calls": r.calls, "numel": r.numel,
                 "abs_max": r.abs_max, "min_nonzero": r.min_nonzero, "n_over": r.n_over,
                 "frac_subnormal": r.frac_subnormal, "frac_flush": r.frac_flush, "n_nonfinite": r.n_nonfinite,
                 "headroom_bits": r.headroom_bits, "node": r.node, "op_type": r.op_type, "function": r.function}
                for r in self.records]
        return pd.DataFrame(rows, columns=COLUMNS)

    @property
    def sites(self) -> int:
        """Distinct places profiled (module path + op + intermediate [+ ONNX node]), steps together."""
        return len({r.place for r in self.records})

    def merged(self) -> dict[tuple[str, str, str, str], OpRange]:
        """(module, op, intermediate, node) -> one record over all steps (the records themselves when not
        profiled per step)."""
        out: dict[tuple[str, str, str, str], OpRange] = {}
        for r in self.records:
            key = r.key
            if key not in out:
                out[key] = r if r.step is None else OpRange(r.module, r.op, r.module_class,
                                                            intermediate=r.intermediate, node=r.node,
                                                            op_type=r.op_type, function=r.function)
            if r.step is not None:
                out[key].merge(r)
        return out

    def get(self, module: str, op: str = OUTPUT, intermediate: str | None = None) -> OpRange | None:
        """The record of one site, merged over steps when profiled per step. `get(m, "attn_scores")` also
        finds an intermediate by its own name when no op is called that."""
        merged = self.merged()
        hit = merged.get((module, op, intermediate or "", ""))
        if hit is None:  # an ONNX-side profile: the worst node of that op in that module
            hits = [r for r in merged.values() if r.module == module and r.op == op
                    and r.intermediate == (intermediate or "")]
            hit = max(hits, key=lambda r: r.abs_max) if hits else None
        if hit is None and intermediate is None:
            hit = next((r for r in merged.values() if r.module == module and r.intermediate == op), None)
        return hit

    def overflowing(self) -> list[OpRange]:
        return [r for r in self.records if r.overflows]

    def heatmap_frame(self, value: str = "headroom_bits", sites: list[str] | None = None) -> pd.DataFrame:
        """Layers (rows) x site (`input_layernorm: pow`, ...) of the worst value over calls and steps:
        `headroom_bits` (min over merged records) or `frac_flush` / `frac_subnormal` (max)."""
        df = self.to_frame()
        df = df[df["layer"].notna()]
        if df.empty:
            return pd.DataFrame()
        agg = "min" if value == "headroom_bits" else "max"
        table = df.pivot_table(index="layer", columns="site", values=value, aggfunc=agg, sort=False)
        order = list(dict.fromkeys(df["site"]))
        table = table[[c for c in order if c in table.columns]]
        if sites is not None:
            table = table[[c for c in sites if c in table.columns]]
        table.index = table.index.astype(int)
        return table.sort_index()

    def __repr__(self) -> str:
        over = len({r.place for r in self.overflowing()})
        modules = len({r.module for r in self.records})
        where = "" if self.source == "pytorch" else f" ({self.source})"
        return (f"<RangeProfile {self.model_class}{where}: {self.sites} sites in {modules} "
                f"modules, {over} above fp16 max>")


class _OpMode(TorchFunctionMode):
    def __init__(self, profiler: "RangeProfiler"):
        super().__init__()
        self.p = profiler
        self._names: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name = self._names[func]
        except (KeyError, TypeError):
            name = op_name(func)
            try:
                self._names[func] = name
            except TypeError:
                pass
        if name is None:
            return func(*args, **kwargs)
        p = self.p
        handler = fused.HANDLERS.get(name)
        if handler is not None:
            p._record_fused(name, handler, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            p._record(name, out, intermediate=fused.RESULT_NAMES.get(name, ""))
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            p._record(name, out[0])
        return out


class RangeProfiler:
    """Context manager that profiles every forward of `model` run inside it.

    >>> with RangeProfiler(model) as prof:
    ...     model(**inputs)
    >>> prof.profile().overflowing()

    `per_step=True` keeps separate records per `prof.step` (set it before each forward: 0 for the prefill,
    1.. for decode steps). `module_outputs=False` skips the per-module output records (a little faster).
    """

    def __init__(self, model: torch.nn.Module, per_step: bool = False, module_outputs: bool = True):
        self.model = model
        self.per_step = per_step
        self.module_outputs = module_outputs
        self.step: int | None = 0 if per_step else None
        self._records: dict[tuple, OpRange] = {}
        self._stack: list[str] = []
        self._classes: dict[str, str] = {}
        self._handles: list = []
        self._mode: _OpMode | None = None
        self._last: tuple | None = None
        self.inputs = 0

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "RangeProfiler":
        for path, module in self.model.named_modules():
            path = path or ROOT
            self._classes[path] = type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._pre(path)))
            self._handles.append(module.register_forward_hook(self._post(path), always_call=True))
        self._mode = _OpMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._last = None

    def _pre(self, path: str):
        def hook(module, args):
            if path == ROOT:
                self._stack.clear()
                self.inputs += 1
            self._stack.append(path)
        return hook

    def _post(self, path: str):
        def hook(module, args, output):
            if self._stack and self._stack[-1] == path:
                self._stack.pop()
            if self.module_outputs and self._mode is not None:
                t = _first_float_tensor(output)
                if t is not None:
                    self._record(OUTPUT, t, path)
        return hook

    # ------------------------------------------------------------------ recording
    def _site(self, module: str, op: str, intermediate: str) -> OpRange:
        key = (module, op, intermediate, self.step)
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = OpRange(module, op, self._classes.get(module, "?"), self.step,
                                               intermediate=intermediate)
        return rec

    def _record(self, op: str, t: torch.Tensor, module: str | None = None, intermediate: str = "") -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            return
        if module is None:
            module = self._stack[-1] if self._stack else ROOT
        rec = self._site(module, op, intermediate)
        last = self._last
        if op == OUTPUT and last is not None and last[0] is t and last[2] == t._version:
            rec.add(last[1])  # a module's output is often its last op's result, unchanged since: reuse
            return
        with torch.no_grad(), torch._C.DisableTorchFunction():  # the statistics' own ops are not the model's
            stats = tensor_stats(t)
        rec.add(stats)
        self._last = (t, stats, t._version)  # one tensor kept alive at most: the latest

    def _record_fused(self, op: str, handler, args, kwargs) -> None:
        """The intermediates a fused op forms inside (fused.HANDLERS), from this call's inputs."""
        module = self._stack[-1] if self._stack else ROOT
        with torch.no_grad(), torch._C.DisableTorchFunction():
            found = handler(args, kwargs)
        for intermediate, stats in found.items():
            self._site(module, op, intermediate).add(stats)

    def profile(self) -> RangeProfile:
        notes = []
        if any(r.intermediate and r.op in fused.HANDLERS for r in self._records.values()):
            notes.append("intermediates of fused ops ([centered_square], [attn_scores], [cube], ...) are "
                         "recomputed by the profiler from each call's inputs; attention scores cover every key "
                         "position, the softmax input only the unmasked ones")
        return RangeProfile(list(self._records.values()), type(self.model).__name__, self.inputs, notes)


def _first_float_tensor(output):
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                return o
        return None
    if isinstance(output, dict):  # HF ModelOutput
        for o in output.values():
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                return o
    return None
