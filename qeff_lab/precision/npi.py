"""fp32 islands: findings -> the compiler's node-precision-info YAML (FP32NodeInstanceNames), with reasons.

Module paths map to ONNX node output names through the scopes the TorchScript exporter writes into node
names: module `model.layers.7.input_layernorm` becomes the scope `/.../model/layers.7/input_layernorm/`
(any wrapper prefix allowed). Within that scope the finding's op picks the nodes (`pow` -> Pow, `linear`
-> MatMul/Gemm, ...); an op fused into a custom-op node (e.g. CustomRMSNorm) maps to that node; a norm
finding keeps the whole norm in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import onnx

from qeff_lab.pipeline import Change, TransformResult
from qeff_lab.precision.findings import Finding

ONNX_TYPES = {
    "pow": {"Pow"}, "mul": {"Mul"}, "square": {"Mul", "Pow"}, "mean": {"ReduceMean"}, "sum": {"ReduceSum"},
    "add": {"Add"}, "sub": {"Sub"}, "div": {"Div"}, "rsqrt": {"Sqrt", "Reciprocal", "Div"}, "sqrt": {"Sqrt"},
    "matmul": {"MatMul"}, "linear": {"MatMul", "Gemm"}, "attn_scores": {"MatMul"}, "softmax": {"Softmax"},
    "softmax_input": {"Add", "Where"}, "exp": {"Exp"}, "silu": {"Sigmoid", "Mul"}, "embedding": {"Gather"},
    # fused ops (their intermediates below pick the nodes more precisely when the finding names one)
    "layer_norm": {"LayerNormalization", "ReduceMean", "Sub", "Pow", "Mul", "Sqrt", "Div", "Add"},
    "group_norm": {"GroupNormalization", "InstanceNormalization", "ReduceMean", "Sub", "Pow", "Mul", "Sqrt", "Div"},
    "rms_norm": {"RMSNormalization", "Pow", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div"},
    "normalize": {"LpNormalization", "ReduceL2", "Div", "Clip", "Max"},
    "scaled_dot_product_attention": {"MatMul", "Mul", "Div", "Add", "Softmax"},
    "log_softmax": {"LogSoftmax"}, "logsumexp": {"ReduceLogSumExp", "Exp", "ReduceSum", "Log"},
    "cross_entropy": {"SoftmaxCrossEntropyLoss", "LogSoftmax", "NegativeLogLikelihoodLoss"},
    "gelu": {"Gelu", "Pow", "Mul", "Add", "Tanh"}, "softplus": {"Softplus", "Exp", "Log"}, "cumsum": {"CumSum"},
    "baddbmm": {"MatMul", "Mul", "Add"},
}
# What each fused-op intermediate is, in ONNX node types (within the op's nodes).
INTERMEDIATE_TYPES = {
    "centered_square": {"Pow", "Mul", "LayerNormalization", "GroupNormalization", "InstanceNormalization"},
    "sum_centered_square": {"ReduceMean", "ReduceSum", "LayerNormalization", "GroupNormalization"},
    "square": {"Pow", "Mul", "RMSNormalization", "ReduceL2"}, "sum_square": {"ReduceMean", "ReduceSum", "ReduceL2"},
    "qk_product": {"MatMul"}, "attn_scores": {"MatMul", "Mul", "Div"}, "softmax_input": {"Add", "Where", "Softmax"},
    "sum_exp": {"Softmax", "LogSoftmax", "ReduceLogSumExp", "SoftmaxCrossEntropyLoss", "Exp", "ReduceSum"},
    "cube": {"Pow", "Mul", "Gelu"}, "exp": {"Softplus", "Exp"}, "product": {"MatMul"}, "running_sum": {"CumSum"},
}
_SKIP_TYPES = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Concat", "Slice",
               "Cast", "Expand", "Range", "ConstantOfShape", "Equal", "Less", "Greater", "Not", "And", "Or"}


@dataclass
class NpiEntry:
    node_output: str
    place: str
    reason: str


def _scope_of(node: onnx.NodeProto) -> str:
    """'/model/model/layers.0/input_layernorm/Pow' -> 'model.model.layers.0.input_layernorm'."""
    return node.name.rsplit("/", 1)[0].strip("/").replace("/", ".") if "/" in node.name else ""


def _in_scope(scope: str, module: str) -> bool:
    return scope == module or scope.endswith("." + module) or (module in ("<root>", "") and True)


def map_finding(finding: Finding, model: onnx.ModelProto, whole_module: bool = False) -> list[str]:
    """ONNX node output names that carry `finding`'s op inside its module (empty when none match).
    An ONNX-side finding names its node: that node, or for a node inlined from a function (`<call>/<body
    node>`) the call node, which is what the compiler sees. `whole_module`: every computing node the module's
    scope holds directly (an fp32 island)."""
    if getattr(finding, "node", ""):
        by_name = {n.name: n for n in model.graph.node}
        hit = by_name.get(finding.node) or by_name.get(finding.node.rsplit("/", 1)[0])
        if hit is not None and hit.output:
            return [hit.output[0]]
    nodes = [n for n in model.graph.node if n.output and _scope_of(n) and _in_scope(_scope_of(n), finding.module)]
    direct = [n for n in nodes if _scope_of(n).endswith(finding.module)]  # the module itself, not its children
    direct = direct or nodes
    if finding.kind == "norm-square" or whole_module:
        picked = [n for n in direct if n.op_type not in _SKIP_TYPES or n.domain not in ("", "ai.onnx")]
    else:
        wanted = ONNX_TYPES.get(finding.op, set())
        inter = getattr(finding, "intermediate", "")
        if inter in INTERMEDIATE_TYPES:
            wanted = (wanted & INTERMEDIATE_TYPES[inter]) or INTERMEDIATE_TYPES[inter]
        picked = [n for n in direct if n.op_type in wanted]
        if not picked:  # fused into a custom-op node, or the module's own output
            picked = [n for n in direct if n.domain not in ("", "ai.onnx")] or (
                [m for m in direct if m.op_type not in _SKIP_TYPES][-1:] if finding.op == "output" else [])
    return [o for n in picked for o in n.output[:1]]


def npi_entries(findings_or_names, onnx_model: onnx.ModelProto | str | Path | None = None,
                severities: Iterable[str] = ("error",)) -> tuple[list[NpiEntry], list[str]]:
    """(entries, unmatched places). Findings need the ONNX model to be mapped; plain names (a list of ONNX
    node output names, or a {name: reason} mapping) are taken as they are."""
    if isinstance(findings_or_names, Mapping):
        return [NpiEntry(k, k, str(v)) for k, v in findings_or_names.items()], []
    items = list(findings_or_names)
    if all(isinstance(i, str) for i in items):
        return [NpiEntry(i, i, "named by the user") for i in items], []
    if onnx_model is None:
        raise ValueError("Mapping findings to ONNX node names needs the exported model: pass onnx_model=<path or "
                         "ModelProto> (e.g. qeff_model.export()), or give node output names directly.")
    model = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, Path)) else onnx_model
    severities = set(severities)
    entries: dict[str, NpiEntry] = {}
    unmatched = []
    for f in items:
        if f.severity not in severities:
            continue
        outs = map_finding(f, model)
        if not outs:
            unmatched.append(f.place)
        for o in outs:
            entries.setdefault(o, NpiEntry(o, f.place, f.reason))
    return list(entries.values()), unmatched


def render_npi_yaml(entries: list[NpiEntry]) -> str:
    lines = ["# node-precision-info written by qeff_lab.precision.npi: nodes to keep in fp32, each with the",
             "# place and value the range profile saw there.", "FP32NodeInstanceNames:"]
    for e in entries:
        lines.append(f"  - {e.node_output}  # {e.place}: {e.reason}".replace("\n", " "))
    if not entries:
        lines[-1] = "FP32NodeInstanceNames: []"
    return "\n".join(lines) + "\n"


def write_npi_yaml(findings_or_names, path: str | Path, onnx_model: onnx.ModelProto | str | Path | None = None,
                   *, severities: Iterable[str] = ("error",)) -> TransformResult:
    """Write the compiler's node-precision-info YAML to `path` and report each node kept in fp32 and why.

    `findings_or_names`: Findings (mapped to node output names through `onnx_model`), a list of ONNX node
    output names, or a {node output name: reason} mapping. Only findings of `severities` are written."""
    entries, unmatched = npi_entries(findings_or_names, onnx_model, severities)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_npi_yaml(entries))
    result = TransformResult("NodePrecisionInfo")
    for e in entries:
        result.changes.append(Change(e.node_output, "fp16", "fp32", f"{e.place}: {e.reason}"))
    result.notes.append(f"wrote {len(entries)} node(s) to {path}")
    if unmatched:
        result.notes.append("no ONNX node found for: " + "; ".join(unmatched))
    return result
