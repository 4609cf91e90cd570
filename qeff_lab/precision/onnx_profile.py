"""ONNX-side range profile: the exported graph in ONNX Runtime, functions inlined, each node's values streamed.

What the lab sees here is what the compiler gets. The graph's ONNX functions (CustomRMSNorm, CtxScatter, ...)
are inlined with `onnx.inliner`, so their bodies' nodes (the Pow inside CustomRMSNorm) are ordinary nodes;
every float value a node computes becomes a graph output. ONNX Runtime (graph optimizations off, so no node is
fused away) runs the inputs once per chunk of at most `max_outputs` requested values: only that chunk is held
at once, each value is folded into running statistics (numerics.tensor_stats) and dropped. Nodes that are
fused ops in ONNX too (LayerNormalization, Softmax, Gelu, ...) get their intermediates recomputed from their
real inputs by the same handlers as the PyTorch side (precision.fused).

Each node is attributed to a PyTorch module path through the scope the TorchScript exporter writes into node
names (`/model/model/layers.7/input_layernorm/CustomRMSNorm` -> `model.layers.7.input_layernorm` when the
model's module names are given); a node inlined from a function keeps the call's scope and names the function.
Its op is named as on the PyTorch side (Pow -> pow, ReduceMean -> mean, LayerNormalization -> layer_norm), so
`find_issues` classifies and groups ONNX-side sites with the same rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx.inliner
import torch

from qeff_lab.precision import fused
from qeff_lab.precision.numerics import tensor_stats
from qeff_lab.precision.profile import ROOT, OpRange, RangeProfile

# ONNX op type -> the PyTorch-side op name (so the findings' rules apply unchanged); others: lower case.
OP_NAMES = {
    "Pow": "pow", "Mul": "mul", "Add": "add", "Sub": "sub", "Div": "div", "ReduceMean": "mean", "ReduceSum": "sum",
    "Sqrt": "sqrt", "Reciprocal": "reciprocal", "MatMul": "matmul", "Gemm": "linear", "Softmax": "softmax",
    "LogSoftmax": "log_softmax", "Exp": "exp", "Log": "log", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf",
    "Relu": "relu", "Where": "where", "Neg": "neg", "Abs": "abs", "ReduceMax": "amax", "Max": "maximum",
    "Min": "minimum", "Clip": "clamp", "Sin": "sin", "Cos": "cos", "CumSum": "cumsum", "Softplus": "softplus",
    "Gelu": "gelu", "LayerNormalization": "layer_norm", "GroupNormalization": "group_norm",
    "InstanceNormalization": "group_norm", "SimplifiedLayerNormalization": "rms_norm",
    "RMSNormalization": "rms_norm", "LpNormalization": "normalize", "ReduceLogSumExp": "logsumexp",
}
# Nodes that only move, view, index or re-type values (as profile.SKIP_OPS on the PyTorch side).
MOVE_TYPES = frozenset({
    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Slice", "Expand", "Shape", "Constant",
    "ConstantOfShape", "Cast", "CastLike", "Identity", "Flatten", "Split", "Range", "ScatterND", "ScatterElements",
    "GatherND", "GatherElements", "Gather", "Tile", "Pad", "Size", "Dropout",
})
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_SUFFIX = re.compile(r"__(\d+)$")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fused_call(node: onnx.NodeProto, x: torch.Tensor) -> tuple[str, tuple] | None:
    """(fused handler name, its args) for an ONNX node that is a fused op in ONNX too; None otherwise."""
    t = node.op_type
    if t in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
        axis = _attr(node, "axis", -1) % x.dim()
        return ("layer_norm" if t == "LayerNormalization" else "rms_norm"), (x, tuple(x.shape[axis:]))
    if t == "GroupNormalization":
        return "group_norm", (x, _attr(node, "num_groups"))
    if t == "InstanceNormalization":
        return "group_norm", (x, x.shape[1])
    if t in ("Softmax", "LogSoftmax"):
        return "softmax", (x, _attr(node, "axis", -1))
    if t == "ReduceLogSumExp":
        axes = _attr(node, "axes")
        return ("logsumexp", (x, axes[0])) if axes and len(axes) == 1 else None
    if t == "Softplus":
        return "softplus", (x,)
    if t == "Gelu":
        approximate = _attr(node, "approximate", b"none")
        return "gelu", (x, approximate.decode() if isinstance(approximate, bytes) else approximate)
    if t == "LpNormalization":
        return "normalize", (x, float(_attr(node, "p", 2)), _attr(node, "axis", -1))
    return None


def _scope(name: str) -> list[str]:
    """'/model/model/layers.0/input_layernorm/Pow' -> ['model', 'model', 'layers', '0', 'input_layernorm']."""
    if "/" not in name:
        return []
    return [p for p in name.rsplit("/", 1)[0].strip("/").replace("/", ".").split(".") if p]


def module_of(name: str, modules: Iterable[str] | None) -> str:
    """The PyTorch module path of an exported node: the longest tail of its scope that is one of `modules`
    (export wrappers add leading segments); without `modules`, the scope itself."""
    parts = _scope(name)
    if not parts:
        return ROOT
    if modules is None:
        return ".".join(parts)
    known = set(modules)
    for end in range(len(parts), 0, -1):  # the scope may also end inside a module (a function's name)
        for start in range(end):
            path = ".".join(parts[start:end])
            if path in known:
                return path
    return ROOT


@dataclass
class _Site:
    node: onnx.NodeProto
    module: str
    function: str  # "" outside an inlined function body
    name: str  # the node's name; inlined from a function: "<call node name>/<body node name>"
    fetch: list[str]  # the values this node needs fetched: its float outputs (+ its input, for fused ops)


def inline_with_origin(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto]]:
    """(model with local functions inlined by onnx.inliner, {inlined node name: the call node it came from}).
    The inliner suffixes each call's body names with `__k`; k is read off the node that produces the call's
    output, so the mapping rests on the data, not on the inliner's numbering order."""
    functions = {(f.domain, f.name) for f in model.functions}
    calls = [n for n in model.graph.node if (n.domain, n.op_type) in functions]
    inlined = onnx.inliner.inline_local_functions(model)
    producer = {o: n for n in inlined.graph.node for o in n.output}
    by_suffix: dict[str, onnx.NodeProto] = {}
    for call in calls:
        made = producer.get(call.output[0]) if call.output else None
        m = _SUFFIX.search(made.name) if made is not None else None
        if m:
            by_suffix[m.group(1)] = call
    origin = {}
    for n in inlined.graph.node:
        m = _SUFFIX.search(n.name)
        if m and m.group(1) in by_suffix:
            origin[n.name] = by_suffix[m.group(1)]
    return inlined, origin


def _expose(model: onnx.ModelProto, names: list[str], types: dict[str, int]) -> None:
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            existing.add(name)


class OnnxRangeProfiler:
    """Profiles an exported ONNX graph in ONNX Runtime. `modules`: {PyTorch module path: class name} of the
    model it was exported from (names the nodes' modules and classes); `max_outputs`: values fetched per run."""

    def __init__(self, onnx_model: onnx.ModelProto | str | Path, modules: dict[str, str] | None = None,
                 max_outputs: int = 512):
        import onnxruntime as ort

        if max_outputs < 1:
            raise ValueError(f"max_outputs must be at least 1, got {max_outputs}")
        folder = Path(onnx_model).parent if isinstance(onnx_model, (str, Path)) else None
        # Weights stay in their external-data files: inlining and the session never copy them through protobuf.
        proto = onnx.load(str(onnx_model), load_external_data=False) if folder else onnx_model
        self.modules = modules or {}
        inlined, origin = inline_with_origin(proto)
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(
            _without_weights(inlined)).graph.value_info}
        types.update({v.name: v.type.tensor_type.elem_type for v in list(inlined.graph.input)
                      + list(inlined.graph.output)})
        self.initializers = {t.name: t for t in inlined.graph.initializer}
        self.sites: list[_Site] = []
        for node in inlined.graph.node:
            if node.op_type in MOVE_TYPES or node.domain not in ("", "ai.onnx"):
                continue
            outs = [o for o in node.output if o and types.get(o) in _FLOAT_TYPES]
            if not outs:
                continue
            call = origin.get(node.name)
            named = call.name if call is not None else node.name
            module = module_of(named, self.modules or None)
            fetch = list(outs)
            if node.op_type in _FUSED_TYPES and node.input[0] not in self.initializers:
                fetch.append(node.input[0])
            self.sites.append(_Site(node, module, call.op_type if call is not None else "",
                                    f"{call.name}/{node.name}" if call is not None else node.name, fetch))
        graph_inputs = {i.name for i in inlined.graph.input}
        _expose(inlined, [n for s in self.sites for n in s.fetch if n not in graph_inputs], types)
        self.graph_inputs = [i for i in inlined.graph.input if i.name not in self.initializers]
        self.input_names = [i.name for i in self.graph_inputs]
        self.chunks = _chunks(self.sites, max_outputs)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as exported
        opts.log_severity_level = 3
        if _external_files(inlined):  # as runtime.OrtSession: the graph from memory, its weights read in place
            if folder is None:
                raise ValueError("The graph refers to external-data files: pass the .onnx path rather than a "
                                 "ModelProto.")
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        self.session = ort.InferenceSession(inlined.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self._records: dict[tuple, OpRange] = {}
        self.inputs = 0

    def _site(self, s: _Site, op: str, intermediate: str = "") -> OpRange:
        key = (s.module, op, intermediate, s.name)
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = OpRange(s.module, op, self.modules.get(s.module, ""), intermediate=intermediate,
                                               node=s.name, op_type=s.node.op_type, function=s.function)
        return rec

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> None:
        """Fold one run of the graph on `feeds` into the statistics (one ORT run per chunk of values)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"The graph needs inputs {missing}; got {sorted(feeds)}.")
        feeds = {n: feeds[n] for n in self.input_names}
        self.inputs += 1
        for sites, names in self.chunks:
            values = dict(zip(names, self.session.run(names, feeds)))
            values.update({k: v for k, v in feeds.items() if k not in values})
            for s in sites:
                op = OP_NAMES.get(s.node.op_type, s.node.op_type.lower())
                for o in s.node.output:
                    if o in values:
                        self._site(s, op, fused.RESULT_NAMES.get(op, "")).add(tensor_stats(torch.from_numpy(
                            np.asarray(values[o]))))
                call = _fused_call(s.node, torch.from_numpy(np.asarray(values[s.node.input[0]]))) \
                    if s.node.op_type in _FUSED_TYPES and s.node.input[0] in values else None
                if call is not None:
                    for inter, stats in fused.HANDLERS[call[0]](call[1], {}).items():
                        self._site(s, op, inter).add(stats)
            del values

    def profile(self, model_class: str = "") -> RangeProfile:
        notes = [("ONNX side: the exported graph in ONNX Runtime (optimizations off), ONNX functions inlined; "
                  "nodes named by the PyTorch module of their scope; intermediates of fused ONNX ops recomputed "
                  "from their inputs")]
        return RangeProfile(list(self._records.values()), model_class, self.inputs, notes, source="onnx")


_FUSED_TYPES = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
                "InstanceNormalization", "Softmax", "LogSoftmax", "ReduceLogSumExp", "Softplus", "Gelu",
                "LpNormalization"}


def _external_files(model: onnx.ModelProto) -> set[str]:
    """The external-data files the graph's initializers refer to."""
    return {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for kv in t.external_data if kv.key == "location"}


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for type inference only: initializers become typed graph inputs (no weight bytes copied)."""
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    known = {i.name for i in model.graph.input}
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in model.graph.initializer if t.name not in known)
    return light


def _chunks(sites: list[_Site], max_outputs: int) -> list[tuple[list[_Site], list[str]]]:
    """Sites in graph order cut into runs of at most `max_outputs` fetched values (a site is never split)."""
    out: list[tuple[list[_Site], list[str]]] = []
    cur_sites: list[_Site] = []
    cur: list[str] = []
    for s in sites:
        if cur and len(cur) + len(s.fetch) > max_outputs:
            out.append((cur_sites, cur))
            cur_sites, cur = [], []
        cur_sites.append(s)
        cur.extend(n for n in s.fetch if n not in cur)
    if cur:
        out.append((cur_sites, cur))
    return out


def onnx_feeds(graph_inputs, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               ctx_len: int | None = None) -> dict[str, np.ndarray]:
    """Inputs for one run, by the names in qeff_lab.contracts: input_ids, attention_mask, position_ids
    (0..n-1), token_type_ids (0), batch_index (0..b-1); every other input (the retained KV buffers) zeros,
    its symbolic axes batch_size / full_batch_size -> the batch, seq_len -> n, ctx_len -> `ctx_len` (default n)."""
    from qeff_lab.contracts import BATCH_INDEX, INPUT_IDS, POSITION_IDS

    ids = np.asarray(input_ids, np.int64)
    b, n = ids.shape
    sizes = {"batch_size": b, "full_batch_size": b, "seq_len": n, "ctx_len": ctx_len or n}
    feeds: dict[str, np.ndarray] = {}
    for v in graph_inputs:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if v.name == INPUT_IDS:
            feeds[v.name] = ids.astype(dtype)
        elif v.name == "attention_mask":
            feeds[v.name] = (np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)).astype(dtype)
        elif v.name == POSITION_IDS:
            feeds[v.name] = np.broadcast_to(np.arange(n), (b, n)).astype(dtype)
        elif v.name == BATCH_INDEX:
            feeds[v.name] = np.arange(b).reshape(b, 1).astype(dtype)
        else:
            shape = [d.dim_value if d.dim_value else sizes.get(d.dim_param, 1) for d in t.shape.dim]
            feeds[v.name] = np.zeros(shape, dtype)
    return feeds
