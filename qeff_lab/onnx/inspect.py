"""Read an exported ONNX graph into plain data for views: op counts, inputs/outputs with shapes, a weightless copy."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx
import pandas as pd

RAW_OP_COUNTS = "raw_op_counts.json"  # written beside model.onnx by an export that records its graph before passes


@dataclass
class TensorInfo:
    """A graph input or output: name, element type, shape (ints for fixed dims, names for dynamic ones)."""

    kind: str  # "input" | "output"
    name: str
    dtype: str
    shape: list[int | str]

    @property
    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass
class GraphReport:
    """What a graph holds, as plain data. `op_counts_before` is the graph before the ONNX passes, when known."""

    path: Path
    op_counts: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    initializers: int
    weight_bytes: int
    functions: list[str] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    op_counts_before: dict[str, int] | None = None
    passes: list = field(default_factory=list)  # TransformResults of the ONNX passes, when known

    @property
    def nodes(self) -> int:
        return sum(self.op_counts.values())

    def op_frame(self) -> pd.DataFrame:
        """One row per op type: count before and after the passes (before is blank when unknown), sorted by count."""
        return op_count_table(self.op_counts_before, self.op_counts)

    def io_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"kind": t.kind, "name": t.name, "dtype": t.dtype, "shape": t.shape_text}
                             for t in self.inputs + self.outputs], columns=["kind", "name", "dtype", "shape"])

    def __repr__(self) -> str:
        return (f"<GraphReport {self.path.name}: {self.nodes} nodes, {len(self.op_counts)} op types, "
                f"{len(self.inputs)} inputs, {len(self.outputs)} outputs>")


def op_key(node: onnx.NodeProto) -> str:
    """`Op` for the default domain, `domain::Op` for the others (custom ops stay visible as such)."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the main graph by op type (a custom-op call counts once; function bodies are listed apart)."""
    return dict(Counter(op_key(n) for n in model.graph.node))


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return ["?"]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name \
        if value.type.tensor_type.elem_type else "?"


def op_count_table(before: dict[str, int] | None, after: dict[str, int]) -> pd.DataFrame:
    """Op types with their counts before and after; `change` is after - before (blank when before is unknown)."""
    names = sorted(set(after) | set(before or {}), key=lambda k: (-after.get(k, 0), k))
    rows = []
    for name in names:
        a = after.get(name, 0)
        if before is None:
            rows.append({"op": name, "before passes": "", "after passes": a, "change": ""})
        else:
            b = before.get(name, 0)
            rows.append({"op": name, "before passes": b, "after passes": a,
                         "change": f"{a - b:+d}" if a != b else ""})
    return pd.DataFrame(rows, columns=["op", "before passes", "after passes", "change"])


def graph_report(source, passes: list | None = None) -> GraphReport:
    """Build a GraphReport from an ExportResult, a model with `export_result`, or a path to an .onnx file.

    Weights are not read (external data stays on disk), so this is quick even for large graphs."""
    export_result = source
    if hasattr(source, "export_result"):  # a QEFF model
        export_result = source.export_result
        if export_result is None:
            raise ValueError(f"{type(source).__name__} has not been exported yet: call model.export() "
                             "(or model.compile(...), which exports first), then look at the graph.")
    if passes is None:
        passes = list(getattr(export_result, "passes", []) or [])
    path = Path(getattr(export_result, "path", export_result))
    if not path.is_file():
        raise FileNotFoundError(f"No ONNX file at {path}: export the model first (model.export()).")
    stat = path.stat()
    report = _graph_report_cached(str(path), stat.st_mtime_ns, stat.st_size)
    return GraphReport(**{**vars(report), "passes": passes})


@lru_cache(maxsize=8)
def _graph_report_cached(path: str, mtime_ns: int, size: int) -> GraphReport:
    p = Path(path)
    model = load_skeleton(p)
    g = model.graph
    init_names = {i.name for i in g.initializer}
    weight_bytes = 0
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    before = None
    raw = p.parent / RAW_OP_COUNTS
    if raw.is_file():
        before = json.loads(raw.read_text())
    return GraphReport(
        path=p,
        op_counts=op_counts(model),
        inputs=[TensorInfo("input", v.name, _dtype(v), _shape(v)) for v in g.input if v.name not in init_names],
        outputs=[TensorInfo("output", v.name, _dtype(v), _shape(v)) for v in g.output],
        initializers=len(g.initializer),
        weight_bytes=weight_bytes,
        functions=[f"{f.domain}::{f.name}" for f in model.functions],
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        op_counts_before=before,
    )


def weightless_copy(path: Path, dest: Path, outputs: list[str] | None = None) -> Path:
    """Write the graph of `path` with every initializer's data dropped (names, types and shapes kept) to `dest`.

    With `outputs`, only the part of the graph that computes those outputs (from the graph's inputs) is kept, e.g.
    `["past_key.1_RetainedState"]`: the embedding, layer 0 and layer 1's key path of a decoder. For looking at
    structure in a browser: netron then loads kilobytes instead of the whole model, and lays out what it shows
    in seconds (a layout of thousands of nodes takes minutes)."""
    model = load_skeleton(Path(path))
    if outputs:
        model = _subgraph(model, outputs)
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(f)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    onnx.save_model(model, str(tmp))
    tmp.replace(dest)
    return dest


def _subgraph(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    from onnx.utils import Extractor

    known = {o.name for o in model.graph.output} | {o for n in model.graph.node for o in n.output}
    missing = [o for o in outputs if o not in known]
    if missing:
        listed = ", ".join(o.name for o in model.graph.output[:6])
        raise ValueError(f"No tensor named {', '.join(map(repr, missing))} in this graph; its outputs include {listed}, ...")
    described = {v.name for v in list(model.graph.value_info) + list(model.graph.output)}
    for name in outputs:  # an inner tensor as output: its type is not needed to cut the graph there
        if name not in described:
            model.graph.value_info.append(onnx.helper.make_empty_tensor_value_info(name))
    inits = {i.name for i in model.graph.initializer}
    sub = Extractor(model).extract_model([i.name for i in model.graph.input if i.name not in inits], list(outputs))
    used = {i for n in sub.graph.node for i in n.input}
    keep = [i for i in sub.graph.input if i.name in used]
    del sub.graph.input[:]
    sub.graph.input.extend(keep)
    return sub


# ----------------------------------------------------------------------------- reading a graph without its weights
# onnx.load reads a whole file into memory and parses it: for a model with inline weights that costs about twice
# the file's size (SmolLM2-135M: +1.2 GB), too much for a 2 GB Binder session. load_skeleton walks the protobuf
# wire format with small positioned reads instead and copies everything except the initializers' data fields,
# so the weights are never read. (A memory map would do too, but the kernel maps whole page-cache folios around
# each touched byte: +290 MB of resident pages for SmolLM2.)
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_DATA_FIELDS = {4, 5, 6, 7, 9, 10, 11}  # TensorProto float/int32/string/int64/raw/double/uint64 data


class _FileBytes:
    """Read-only byte access to a file by position (buf[i], bytes(buf[a:b]), len) through os.pread, with a
    small window for the many one-byte reads of varints."""

    WINDOW = 1 << 14

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.start, self.window = 0, b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            return os.pread(self.fd, key.stop - key.start, key.start)
        if not self.start <= key < self.start + len(self.window):
            self.start, self.window = key, os.pread(self.fd, self.WINDOW, key)
            if not self.window:
                raise ValueError(f"truncated protobuf: nothing at byte {key}")
        return self.window[key - self.start]


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, field start, payload start, payload end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, p = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, q = _varint(buf, p)
            yield field, wire, pos, p, q
        elif wire == 1:
            yield field, wire, pos, p, p + 8
            q = p + 8
        elif wire == 2:
            n, p = _varint(buf, p)
            q = p + n
            yield field, wire, pos, p, q
        elif wire == 5:
            q = p + 4
            yield field, wire, pos, p, q
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}: not an ONNX file?")
        pos = q


def _strip(buf, start: int, end: int, keep) -> bytes:
    """The fields of buf[start:end] that keep(field) accepts, re-encoded as they were."""
    return b"".join(bytes(buf[f0:q]) for field, _, f0, _, q in _fields(buf, start, end) if keep(field))


def load_skeleton(path: Path) -> onnx.ModelProto:
    """The model at `path` with every initializer's data left out (names, types, dims, external-data refs kept)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty: not an ONNX file.")
    with open(path, "rb") as f:
        buf = _FileBytes(f.fileno(), size)
        parts = []
        for field, _, f0, p, q in _fields(buf, 0, size):
            if q > size:
                raise ValueError(f"{path} is truncated or not an ONNX file (field {field} runs past the end).")
            if field != _MODEL_GRAPH:
                parts.append(bytes(buf[f0:q]))
                continue
            graph = []
            for gfield, _, g0, gp, gq in _fields(buf, p, q):
                if gfield == _GRAPH_INITIALIZER:
                    tensor = _strip(buf, gp, gq, lambda t: t not in _TENSOR_DATA_FIELDS)
                    graph.append(_encode_varint(_GRAPH_INITIALIZER << 3 | 2) + _encode_varint(len(tensor)) + tensor)
                else:
                    graph.append(bytes(buf[g0:gq]))
            body = b"".join(graph)
            parts.append(_encode_varint(_MODEL_GRAPH << 3 | 2) + _encode_varint(len(body)) + body)
    return onnx.load_from_string(b"".join(parts))
