"""The custom-op registry: every op qeff_lab writes into a graph, its domain and the module that defines it twice
(eager reference + ONNX function). Export checks each exported graph against it and hashes these modules into
the export key, so an edited op body never reuses a stale file."""
from __future__ import annotations

import hashlib
import importlib
import inspect
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class CustomOp:
    name: str
    domain: str
    module: str  # defines the eager reference and the ONNX function body


CUSTOM_OPS: dict[str, CustomOp] = {op.name: op for op in [
    CustomOp("CtxScatter", "com.qualcomm.cloud", "qeff_lab.ops.ctx"),
    CustomOp("CtxGather", "com.qualcomm.cloud", "qeff_lab.ops.ctx"),
    CustomOp("CtxScatterCB", "com.qualcomm.cloud", "qeff_lab.ops.ctx_cb"),
    CustomOp("CtxGatherCB", "com.qualcomm.cloud", "qeff_lab.ops.ctx_cb"),
    CustomOp("CustomRMSNorm", "com.qti.aisw.onnx", "qeff_lab.ops.rms_norm"),
    CustomOp("SafeRMSNorm", "com.qeff_lab", "qeff_lab.ops.safe_norm"),
    CustomOp("SafeLayerNorm", "com.qeff_lab", "qeff_lab.ops.safe_norm"),
]}
CUSTOM_DOMAINS = {op.domain for op in CUSTOM_OPS.values()}


class UnknownCustomOpError(ValueError):
    """An exported graph uses a custom-domain node that the registry does not know or whose body is missing."""


def source_fingerprint() -> str:
    """Hash of the source of every module that defines a registered op."""
    h = hashlib.sha256()
    for name in sorted({op.module for op in CUSTOM_OPS.values()}):
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


def custom_op_counts(model) -> dict[str, int]:
    """{op name: node count} of the registered custom ops in an onnx.ModelProto's main graph. Raises
    UnknownCustomOpError for a custom-domain node that is not registered or has no function body in the file
    (ONNX Runtime could not run it, and a device compiler would not know it)."""
    bodies = {(f.domain, f.name) for f in model.functions}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.domain not in CUSTOM_DOMAINS:
            continue
        op = CUSTOM_OPS.get(node.op_type)
        if op is None or op.domain != node.domain:
            raise UnknownCustomOpError(f"node {node.name!r} is {node.domain}::{node.op_type}, which the custom-op "
                                       f"registry (qeff_lab/ops/registry.py) does not know.")
        if (node.domain, node.op_type) not in bodies:
            raise UnknownCustomOpError(f"node {node.name!r} ({node.domain}::{node.op_type}) has no function body "
                                       "in the exported file.")
        counts[node.op_type] += 1
    return dict(sorted(counts.items()))
