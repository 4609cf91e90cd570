"""ONNX graph passes, each returning a TransformResult: fp16 range clipping, external-data splitting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qeff_lab.contracts import FP16_MAX
from qeff_lab.pipeline import Change, TransformResult

# Above this, weights go to an external file by default: ONNX Runtime then maps them instead of copying them
# out of the protobuf (about 200 MiB less peak memory for SmolLM2-135M), and large models stay under 2 GB.
EXTERNAL_DATA_THRESHOLD = 256 << 20


def _float_tensors(model: onnx.ModelProto):
    """Yield (place, TensorProto) for every float initializer and Constant value, in graphs and functions."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            yield f"initializer {init.name}", init
    graphs = [("", model.graph.node)] + [(f"function {f.name}: ", f.node) for f in model.functions]
    for prefix, nodes in graphs:
        for node in nodes:
            if node.op_type != "Constant":
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    yield f"{prefix}Constant {node.output[0]}", attr.t


def clip_fp16(model: onnx.ModelProto) -> TransformResult:
    """Clip finite float constants and initializers to [-65504, 65504] so that fp16 conversion does not
    turn them into inf. -inf and +inf are kept (they are meant, e.g. in masks); NaN is left alone."""
    result = TransformResult("FP16ClipConstants")
    for place, tensor in _float_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor)
        over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
        n = int(over.sum())
        if not n:
            continue
        clipped = np.where(over, np.clip(values, -FP16_MAX, FP16_MAX), values).astype(np.float32)
        largest = float(np.max(np.abs(values[over]) - FP16_MAX))
        tensor.CopyFrom(numpy_helper.from_array(clipped, tensor.name))
        result.changes.append(Change(
            place, f"{n} of {values.size} value(s) beyond fp16 (largest |x| {float(np.abs(values[over]).max()):.4g})",
            "clipped to ±65504", f"fp16 would make them inf; largest change {largest:.4g}"))
    if not result.changes:
        result.notes.append("every float constant already fits fp16")
    return result


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None,
               size_threshold: int = 1024) -> TransformResult:
    """Save `model`, splitting weights into `<name>.data` when asked, or by default when they pass
    EXTERNAL_DATA_THRESHOLD. Reports which tensors moved out."""
    result = TransformResult("ExternalData")
    total = tensor_bytes(model)
    if external is None:
        external = total > EXTERNAL_DATA_THRESHOLD
    if not external:
        result.notes.append(f"weights ({total / 2**20:.1f} MiB) fit in one protobuf file")
        onnx.save_model(model, str(path))
        return result
    location = path.name + ".data"
    moved = [(t.name, len(t.raw_data)) for t in model.graph.initializer if len(t.raw_data) >= size_threshold]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=size_threshold)
    for name, size in moved:
        result.changes.append(Change(f"initializer {name}", "inline", f"external ({location})",
                                     f"{size / 2**20:.2f} MiB; mapped, not copied, by ONNX Runtime; no 2 GB protobuf limit"))
    return result
