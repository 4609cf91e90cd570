"""Export a PyTorch module to ONNX into a content-addressed folder, with the ONNX passes applied, by one of two
routes: "traced" (TorchScript export of the module with its weights, reloaded and rewritten: about 6-7x the
weights at peak) or "streamed" (qeff_lab.onnx.streamed: weights on meta, repeated layers traced once, each
weight written from the checkpoint into the external data: peak memory independent of the model size)."""
from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

import qeff_lab
from qeff_lab.onnx.passes import EXTERNAL_DATA_THRESHOLD, clip_fp16, save_model
from qeff_lab.onnx.inspect import RAW_OP_COUNTS, op_counts
from qeff_lab.onnx.streamed import LayerStack
from qeff_lab.ops.registry import custom_op_counts, source_fingerprint
from qeff_lab.pipeline import TransformResult, build_artifact, cache_root, fingerprint

OPSET = 17
ONNX_NAME = "model.onnx"
PASSES_FILE = "passes.json"
ROUTE_FILE = "route.json"
TRACED, STREAMED = "traced", "streamed"
# Checkpoints smaller than this take the traced route by default: its peak (~7x the weights) still fits, and its
# weights feed the MatMuls directly where the streamed graph has MatMul(x, Transpose(W)). Larger checkpoints stream,
# so export memory stays flat. The embedded backend's GroupQueryAttention rewrite takes both graphs.
STREAM_ABOVE = 1 << 30
TRACED_LAYERS = 2  # layers the streamed route traces before cloning the last one
CUSTOM_OPS_FILE = "custom_ops.json"


@dataclass
class StreamPlan:
    """What the streamed route needs beyond the module: why it was chosen, the layer stack to trace once (None:
    trace every layer), the checkpoint's safetensors files (None: every weight from memory) and the HF model's
    path prefix inside the exported module (its state-dict names less this are the checkpoint's names)."""

    reason: str
    layers: LayerStack | None = None
    checkpoint: list[Path] | None = None
    prefix: str = ""


@dataclass
class ExportResult:
    """An exported graph: the .onnx path, whether the cache was reused, and the passes' reports."""

    path: Path
    reused: bool
    passes: list[TransformResult] = field(default_factory=list)
    key: dict = field(default_factory=dict)
    custom_ops: dict[str, int] = field(default_factory=dict)  # registered custom op -> nodes in the graph
    route: str = TRACED
    route_reason: str = ""

    @property
    def folder(self) -> Path:
        return self.path.parent

    def __repr__(self) -> str:
        return f"<ExportResult {self.folder.name}/{self.path.name}>"  # no cache state: stable in notebooks


def export_module(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    key: dict,
    name: str,
    external_data: bool | None = None,
    stream: StreamPlan | None = None,
    traced_reason: str = "",
) -> ExportResult:
    """Export `module(**example_inputs)` once per `key` (which must hold everything that shapes the file:
    model fingerprint, transforms, options). Reuses the cached folder only when its manifest checks out.
    With `stream`, by the streamed route (`traced_reason`: why not, otherwise)."""
    full_key = {
        **key,
        "inputs": {k: [str(v.dtype), v.dim()] for k, v in example_inputs.items()},
        "outputs": output_names,
        "dynamic_axes": dynamic_axes,
        "opset": OPSET,
        "torch": torch.__version__,
        "qeff_lab": qeff_lab.__version__,
        "external_data": external_data,
        "external_data_threshold": EXTERNAL_DATA_THRESHOLD,
        "custom_ops_source": source_fingerprint(),
        "route": [STREAMED, stream.reason] if stream is not None else TRACED,
    }
    folder = cache_root() / "export" / f"{name}-{fingerprint(full_key)}"
    reports: list[TransformResult] = []

    route = {"route": STREAMED, "why": stream.reason} if stream is not None else {"route": TRACED, "why": traced_reason}

    def build(tmp: Path) -> None:
        (tmp / ROUTE_FILE).write_text(json.dumps(route))
        if stream is not None:
            reports.extend(_build_streamed(tmp, module, example_inputs, output_names, dynamic_axes, external_data,
                                           stream))
            (tmp / PASSES_FILE).write_text(json.dumps([_report_to_json(r) for r in reports], indent=1))
            return
        raw = tmp / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
            torch.onnx.export(
                module, tuple(example_inputs.values()), str(raw), dynamo=False, opset_version=OPSET,
                input_names=list(example_inputs), output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
        for f in tmp.iterdir():  # the raw export (and any external data it wrote) is replaced below
            if f.name != ROUTE_FILE:
                f.unlink()
        (tmp / RAW_OP_COUNTS).write_text(json.dumps(op_counts(proto)))  # the graph view's "before the passes"
        (tmp / CUSTOM_OPS_FILE).write_text(json.dumps(custom_op_counts(proto)))  # raises on an unknown custom op
        reports.append(clip_fp16(proto))
        reports.append(save_model(proto, tmp / ONNX_NAME, external=external_data))
        (tmp / PASSES_FILE).write_text(json.dumps([_report_to_json(r) for r in reports], indent=1))

    folder, reused = build_artifact(folder, full_key, build)
    if reused:
        reports = [_report_from_json(r) for r in json.loads((folder / PASSES_FILE).read_text())]
    custom = json.loads((folder / CUSTOM_OPS_FILE).read_text())
    return ExportResult(folder / ONNX_NAME, reused, reports, full_key, custom, route["route"], route["why"])


def _build_streamed(tmp: Path, module: torch.nn.Module, example_inputs: dict[str, torch.Tensor],
                    output_names: list[str], dynamic_axes: dict, external_data: bool | None,
                    stream: StreamPlan) -> list[TransformResult]:
    """The streamed route into `tmp`: trace on meta (the first TRACED_LAYERS layers of the stack), clone the
    last traced layer up to the full depth, write each weight from the checkpoint (or memory)."""
    from qeff_lab.onnx import streamed

    layers = stream.layers
    total = traced = None
    inputs, outputs, axes = example_inputs, output_names, dynamic_axes
    if layers is not None:
        owner_path, attr = layers.path.rsplit(".", 1)
        owner = module.get_submodule(owner_path)
        total = len(getattr(owner, attr))
        traced = min(total, TRACED_LAYERS)
        later = {n for i in range(traced, total) for n in layers.io(i)}
        inputs = {k: v for k, v in example_inputs.items() if k not in later}
        outputs = [n for n in output_names if n not in later]
        axes = {k: v for k, v in dynamic_axes.items() if k not in later}
    with streamed.first_layers(owner, attr, traced) if layers is not None else nullcontext():
        proto = streamed.trace_on_meta(module, inputs, outputs, axes, OPSET)
    if layers is not None and total > traced:
        streamed.clone_layers(proto, layers.path, traced, total, layers.io)
    streamed.order_io(proto, list(example_inputs), output_names)
    (tmp / RAW_OP_COUNTS).write_text(json.dumps(op_counts(proto)))  # the graph view's "before the passes"
    (tmp / CUSTOM_OPS_FILE).write_text(json.dumps(custom_op_counts(proto)))  # raises on an unknown custom op
    produced = {o for n in proto.graph.node for o in n.output} | set(example_inputs)
    names = list(dict.fromkeys(x for n in proto.graph.node for x in n.input if x and x not in produced))
    real = streamed.named_tensors(module)
    unknown = [n for n in names if n not in real]
    if unknown:
        raise streamed.StreamedExportError(f"the graph reads {unknown[:3]}, which are no weights of the module")
    index = streamed.safetensors_index(stream.checkpoint) if stream.checkpoint else {}
    sources, notes = streamed.weight_sources(names, real, stream.prefix, index)
    total_bytes = sum(s.nbytes for s in sources)
    external = external_data if external_data is not None else total_bytes > EXTERNAL_DATA_THRESHOLD
    clip, moved = streamed.write_weights(proto, sources, tmp / (ONNX_NAME + ".data"), external)
    moved.notes.extend(notes)
    constants = clip_fp16(proto)  # Constant nodes (the weights were clipped while written)
    clip.changes = constants.changes + clip.changes
    if not clip.changes:
        clip.notes.append("every float constant already fits fp16")
    onnx.save_model(proto, str(tmp / ONNX_NAME))
    return [clip, moved]


def _report_to_json(r: TransformResult) -> dict:
    return {"name": r.name, "changes": [vars(c) for c in r.changes], "notes": r.notes}


def _report_from_json(d: dict) -> TransformResult:
    from qeff_lab.pipeline import Change

    return TransformResult(d["name"], [Change(**c) for c in d["changes"]], d["notes"])
