"""Export a PyTorch module to ONNX into a content-addressed folder, with the ONNX passes applied."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

import qeff_lab
from qeff_lab.onnx.passes import EXTERNAL_DATA_THRESHOLD, clip_fp16, save_model
from qeff_lab.onnx.inspect import RAW_OP_COUNTS, op_counts
from qeff_lab.ops.registry import custom_op_counts, source_fingerprint
from qeff_lab.pipeline import TransformResult, build_artifact, cache_root, fingerprint

OPSET = 17
ONNX_NAME = "model.onnx"
PASSES_FILE = "passes.json"
CUSTOM_OPS_FILE = "custom_ops.json"


@dataclass
class ExportResult:
    """An exported graph: the .onnx path, whether the cache was reused, and the passes' reports."""

    path: Path
    reused: bool
    passes: list[TransformResult] = field(default_factory=list)
    key: dict = field(default_factory=dict)
    custom_ops: dict[str, int] = field(default_factory=dict)  # registered custom op -> nodes in the graph

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
) -> ExportResult:
    """Export `module(**example_inputs)` once per `key` (which must hold everything that shapes the file:
    model fingerprint, transforms, options). Reuses the cached folder only when its manifest checks out."""
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
    }
    folder = cache_root() / "export" / f"{name}-{fingerprint(full_key)}"
    reports: list[TransformResult] = []

    def build(tmp: Path) -> None:
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
    return ExportResult(folder / ONNX_NAME, reused, reports, full_key, custom)


def _report_to_json(r: TransformResult) -> dict:
    return {"name": r.name, "changes": [vars(c) for c in r.changes], "notes": r.notes}


def _report_from_json(d: dict) -> TransformResult:
    from qeff_lab.pipeline import Change

    return TransformResult(d["name"], [Change(**c) for c in d["changes"]], d["notes"])
