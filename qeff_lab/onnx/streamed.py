"""Export without holding the weights: trace on meta tensors, trace a stack of identical layers twice and clone
the second one, then write each initializer tensor by tensor (from the checkpoint's safetensors, or from memory)
into the external-data file. Peak memory stays near the size of one chunk of one tensor, whatever the model.

Why each piece (measured on a 362M Llama, see shared/EXPORT-AT-SCALE.md): tracing real weights holds them and
the TorchScript exporter copies them again (6-7x the weights at peak); tracing costs ~2 s per layer, so a deep
stack is traced at two layers and the second layer's nodes are cloned (renaming `layers.1` to `layers.i`); a
checkpoint tensor read with safetensors' mmap counts every touched page as resident, so tensors are copied in
chunks with plain reads instead.
"""
from __future__ import annotations

import json
import re
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import onnx
import torch
from torch import nn

from qeff_lab.contracts import FP16_MAX
from qeff_lab.pipeline import Change, TransformResult

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per read
ALIGN = 4096  # tensors start on page boundaries in the data file: ONNX Runtime maps them in place
INLINE_BELOW = 1024  # bytes: smaller tensors stay in the protobuf (as today's save_model does)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_ONNX_DTYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
                torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
                torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32,
                torch.int16: onnx.TensorProto.INT16, torch.int8: onnx.TensorProto.INT8,
                torch.uint8: onnx.TensorProto.UINT8, torch.bool: onnx.TensorProto.BOOL}


class StreamedExportError(RuntimeError):
    """The streamed route cannot build this graph (the caller falls back to the traced route and says why)."""


# ----------------------------------------------------------------------------- checkpoint index
@dataclass(frozen=True)
class CheckpointTensor:
    """Where a tensor's bytes sit in a safetensors file."""

    file: Path
    offset: int  # absolute, in bytes
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (the index's shards when there is one), or [] when it has none."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def safetensors_index(files: list[Path]) -> dict[str, CheckpointTensor]:
    """{tensor name: CheckpointTensor} from the files' headers (no tensor data is read)."""
    out = {}
    for f in files:
        size, text = _header(f)
        for name, info in json.loads(text).items():
            if name == "__metadata__" or info["dtype"] not in _SAFETENSORS_DTYPES:
                continue
            out[name] = CheckpointTensor(Path(f), 8 + size + info["data_offsets"][0],
                                         _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
    return out


def checkpoint_identity(files: list[Path]) -> list:
    """What identifies a checkpoint's weights in an export key without reading them: each file's resolved path,
    size, modification time and header (names, dtypes, shapes, offsets)."""
    out = []
    for f in files:
        st = Path(f).resolve().stat()
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, _header(f)[1].decode()])
    return out


def _header(file: Path) -> tuple[int, bytes]:
    """(header length, header bytes) of a safetensors file: its JSON header, no tensor data."""
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return size, handle.read(size)


# ----------------------------------------------------------------------------- tracing on meta
def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every parameter and buffer (non-persistent ones and tied aliases included)."""
    return {f"{path}.{key}" if path else key: value
            for path, sub in module.named_modules(remove_duplicate=False)
            for store in (sub._parameters, sub._buffers) for key, value in store.items() if value is not None}


@contextmanager
def weights_on_meta(module: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer of `module` for a meta tensor of its shape (tied ones stay tied) and make
    non-persistent buffers persistent meanwhile, so the TorchScript exporter (export_params=False) takes each as
    a graph input instead of baking its values in. Everything is put back on exit."""
    memo: dict[int, torch.Tensor] = {}
    undo: list[Callable[[], None]] = []
    try:
        for path, sub in module.named_modules(remove_duplicate=False):
            hidden = set(sub._non_persistent_buffers_set)
            if hidden:
                sub._non_persistent_buffers_set.clear()
                undo.append(lambda sub=sub, hidden=hidden: sub._non_persistent_buffers_set.update(hidden))
            for store in (sub._parameters, sub._buffers):
                for key, value in list(store.items()):
                    if value is None:
                        continue
                    if id(value) not in memo:
                        fake = torch.empty_like(value, device="meta")
                        memo[id(value)] = nn.Parameter(fake, requires_grad=False) if isinstance(value, nn.Parameter) else fake
                    store[key] = memo[id(value)]
                    undo.append(lambda store=store, key=key, value=value: store.__setitem__(key, value))
        yield
    finally:
        for fn in reversed(undo):
            fn()


@contextmanager
def first_layers(owner: nn.Module, attr: str, count: int) -> Iterator[None]:
    """Let `owner.<attr>` (a ModuleList) hold only its first `count` layers meanwhile."""
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(layers)[:count]))
    try:
        yield
    finally:
        setattr(owner, attr, layers)


def layer_signature(layer: nn.Module) -> list:
    """What must be equal for two layers to be one graph up to their weights: every submodule's class (swaps
    included) and every parameter's and buffer's name, shape and dtype."""
    return [(path, type(m).__qualname__, type(m).__module__,
             [(n, tuple(t.shape), str(t.dtype)) for n, t in [*m.named_parameters(recurse=False),
                                                              *m.named_buffers(recurse=False)]])
            for path, m in layer.named_modules()]


def trace_on_meta(module: nn.Module, example_inputs: dict[str, torch.Tensor], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int) -> onnx.ModelProto:
    """TorchScript export of `module` with its weights on meta: every weight a graph input named by its
    state-dict name."""
    import io
    import warnings

    buffer = io.BytesIO()
    with weights_on_meta(module), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            module, tuple(v.to("meta") for v in example_inputs.values()), buffer, dynamo=False, opset_version=opset,
            input_names=list(example_inputs), output_names=output_names, dynamic_axes=dynamic_axes,
            export_params=False, keep_initializers_as_inputs=True,  # no value is compared or folded
            do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


# ----------------------------------------------------------------------------- cloning the repeated layer
def clone_layers(proto: onnx.ModelProto, layers_path: str, traced: int, total: int,
                 layer_io: Callable[[int], list[str]]) -> None:
    """Grow a graph traced with `traced` (>= 2) identical layers to `total`, in place: the nodes of the last traced
    layer (scope `/<layers_path>/<traced-1>/`) are copied for each new layer with every layer-specific name
    (scope, weights `<layers_path>.<i>.`, the layer's graph I/O from `layer_io(i)`) renamed; a value the last
    layer reads from the one before comes from the previous copy; what read the last traced layer's values
    reads the final layer's. Values shared with an earlier layer stay shared. Raises StreamedExportError when the result does not check out."""
    graph = proto.graph
    scope, prefix = "/" + layers_path.replace(".", "/"), layers_path
    last = traced - 1
    pattern = re.compile(rf"^({re.escape(scope)}\.)(\d+)(?=/)|^({re.escape(prefix)}\.)(\d+)(?=\.)")
    io_index = {name: (i, k) for i in range(max(0, last - 1), total) for k, name in enumerate(layer_io(i))}

    def renamed(name: str, shift: dict[int, int]) -> str:
        if name in io_index:
            i, k = io_index[name]
            return layer_io(shift[i])[k] if i in shift else name
        m = pattern.match(name)
        if not m or int(m.group(2) or m.group(4)) not in shift:
            return name
        head = m.group(1) or m.group(3)
        return head + str(shift[int(m.group(2) or m.group(4))]) + name[m.end():]

    in_last = [n for n in graph.node if n.name.startswith(f"{scope}.{last}/")]
    if not in_last:
        raise StreamedExportError(f"no node of the layer scope {scope}.{last}/ in the traced graph")
    produced = {o for n in in_last for o in n.output}
    # The exporter hoists what layers compute alike (rope slices, constants) into the first layer that needs it:
    # a value from an earlier layer is the previous layer's own only when it depends on that layer's weights or
    # cache inputs; anything else stays shared.
    made = {o for n in graph.node for o in n.output}
    previous = {x for n in graph.node for x in n.input if x not in made and renamed(x, {last - 1: last}) != x}
    for node in graph.node:
        if any(x in previous for x in node.input):
            previous.update(node.output)
    shared = made - produced - previous
    if any(renamed(o, {last: last + 1}) == o for o in produced):
        raise StreamedExportError(f"a value of layer {last} does not carry the layer's name")
    position = max(i for i, n in enumerate(graph.node) if n.name.startswith(f"{scope}.{last}/")) + 1
    clones = []
    for i in range(traced, total):
        shift = {last: i, last - 1: i - 1}
        for node in in_last:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = renamed(node.name, shift)
            copy.input[:] = [x if x in shared else renamed(x, shift) for x in node.input]
            copy.output[:] = [renamed(x, shift) for x in node.output]
            clones.append(copy)
    after = list(graph.node[position:])
    for node in after:  # what read the last traced layer now reads the final one
        node.input[:] = [renamed(x, {last: total - 1}) if x in produced else x for x in node.input]
    del graph.node[position:]
    graph.node.extend(clones + after)
    known = {v.name: v for v in [*graph.input, *graph.output]}
    for i in range(traced, total):
        for name, template in zip(layer_io(i), layer_io(last)):
            if template in known:
                v = onnx.ValueInfoProto()
                v.CopyFrom(known[template])
                v.name = name
                (graph.input if template in {x.name for x in graph.input} else graph.output).append(v)
    defined = {x.name for x in [*graph.input, *graph.initializer]} | {o for n in graph.node for o in n.output}
    dangling = [x for n in graph.node for x in n.input if x and x not in defined and not x.startswith(prefix + ".")]
    if dangling:
        raise StreamedExportError(f"cloned layers read values nothing defines, e.g. {dangling[0]!r}")


def order_io(proto: onnx.ModelProto, input_names: list[str], output_names: list[str]) -> None:
    """Set the graph's inputs and outputs to exactly these names, in this order (the weights, inputs of the
    traced graph, are dropped here: they become initializers)."""
    graph = proto.graph
    known = {v.name: v for v in [*graph.input, *graph.output]}
    for names, field in ((input_names, graph.input), (output_names, graph.output)):
        missing = [n for n in names if n not in known]
        if missing:
            raise StreamedExportError(f"the cloned graph lacks {missing[:3]}")
        values = []
        for n in names:
            v = onnx.ValueInfoProto()
            v.CopyFrom(known[n])
            values.append(v)
        del field[:]
        field.extend(values)


# ----------------------------------------------------------------------------- the stack a kind declares
@dataclass
class LayerStack:
    """A kind's repeated layers: `path` of the ModuleList inside the exported module (e.g. "model.model.layers")
    and `io(i)`, the graph inputs and outputs that belong to layer i (e.g. past_key.i, ..._RetainedState)."""

    path: str
    io: Callable[[int], list[str]]


# ----------------------------------------------------------------------------- writing the weights
@dataclass
class WeightSource:
    """One initializer: the in-memory tensor (its dtype and shape are what the graph takes) and, when its bytes
    can come from the checkpoint instead, where they are."""

    name: str
    tensor: torch.Tensor
    checkpoint: CheckpointTensor | None = None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def chunks(self) -> Iterator[torch.Tensor]:
        """The tensor's values, flattened, in the graph's dtype, CHUNK_ELEMENTS at a time (read from the file
        with plain reads: nothing stays mapped)."""
        n, dtype = self.tensor.numel(), self.tensor.dtype
        if self.checkpoint is None:
            flat = self.tensor.detach().reshape(-1)
            for start in range(0, n, CHUNK_ELEMENTS):
                yield flat[start:start + CHUNK_ELEMENTS].contiguous()
            return
        src = self.checkpoint
        size = torch.empty((), dtype=src.dtype).element_size()
        with open(src.file, "rb", buffering=0) as f:
            for start in range(0, n, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, n - start)
                buf = bytearray(count * size)
                f.seek(src.offset + start * size)
                if f.readinto(buf) != len(buf):
                    raise StreamedExportError(f"{src.file} ended inside tensor {self.name!r}")
                yield torch.frombuffer(buf, dtype=src.dtype).to(dtype)


def weight_sources(names: list[str], real: dict[str, torch.Tensor], prefix: str,
                   index: dict[str, CheckpointTensor]) -> tuple[list[WeightSource], list[str]]:
    """A WeightSource per initializer name: from the checkpoint when one of the tensor's names (tied aliases
    included, less `prefix`, the HF model's path in the exported module) is a checkpoint tensor of the same
    shape that memory holds as a mapping of those very bytes, or whose values agree with memory at three spots
    (probing a mapped tensor would make its pages resident); else from memory. Returns (sources, notes)."""
    aliases: dict[int, list[str]] = {}
    for n, t in real.items():
        aliases.setdefault(id(t), []).append(n)
    sources, notes = [], []
    maps = FileMappings()
    for name in names:
        tensor = real[name]
        found = None
        for alias in aliases[id(tensor)]:
            key = alias[len(prefix):] if alias.startswith(prefix) else None
            if key in index and index[key].shape == tuple(tensor.shape):
                found = index[key]
                break
        source = WeightSource(name, tensor, found)
        if found is not None and not (maps.holds(tensor, found) or _agrees(source)):
            notes.append(f"{name}: differs from the checkpoint's {key} at a spot check: written from memory")
            source.checkpoint = None
        sources.append(source)
    return sources, notes


class FileMappings:
    """This process's file mappings (/proc/self/maps): which file and offset a tensor's memory maps, if any."""

    def __init__(self):
        self.maps = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip().startswith("/"):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        self.maps.append((start, end, int(parts[2], 16), parts[5].strip()))
        except OSError:  # not Linux: every tensor gets the spot check instead
            pass

    def holds(self, tensor: torch.Tensor, src: CheckpointTensor) -> bool:
        """Is `tensor` a mapping of `src`'s bytes in its file (same dtype, so the bytes are the values)?"""
        if tensor.dtype != src.dtype or not tensor.is_contiguous():
            return False
        ptr, path = tensor.data_ptr(), str(src.file.resolve())
        return any(start <= ptr < end and file == path and offset + ptr - start == src.offset
                   for start, end, offset, file in self.maps)


def _agrees(source: WeightSource, probe: int = 16) -> bool:
    """Do memory and checkpoint hold the same values at the start, middle and end of the tensor? Touches three
    small ranges only."""
    n = source.tensor.numel()
    if n == 0:
        return True
    flat = source.tensor.detach().reshape(-1)
    src = source.checkpoint
    size = torch.empty((), dtype=src.dtype).element_size()
    with open(src.file, "rb", buffering=0) as f:
        for start in {0, max(0, n // 2 - probe // 2), max(0, n - probe)}:
            count = min(probe, n - start)
            f.seek(src.offset + start * size)
            from_file = torch.frombuffer(bytearray(f.read(count * size)), dtype=src.dtype).to(flat.dtype)
            if not torch.equal(from_file, flat[start:start + count]):
                return False
    return True


def write_weights(proto: onnx.ModelProto, sources: list[WeightSource], data_path: Path, external: bool,
                  progress: bool = True) -> tuple[TransformResult, TransformResult]:
    """Add each source as an initializer of `proto`: in `data_path` (page-aligned, tensor by tensor) when
    `external` and the tensor has INLINE_BELOW bytes or more, else inline. fp32 values beyond fp16's range are
    clipped on the way, as clip_fp16 does. Returns (the clipping report, the external-data report)."""
    from tqdm.auto import tqdm

    clip = TransformResult("FP16ClipConstants")
    moved = TransformResult("ExternalData")
    location = data_path.name
    total = sum(s.nbytes for s in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress, leave=False)
    with open(data_path, "wb") if external else nullcontext() as out:
        for source in sources:
            t = source.tensor
            proto_t = onnx.TensorProto(name=source.name, dims=list(t.shape), data_type=_ONNX_DTYPES[t.dtype])
            to_file = external and source.nbytes >= INLINE_BELOW
            if to_file:
                offset = -out.tell() % ALIGN
                out.write(b"\0" * offset)
                offset = out.tell()
            parts, over, largest = [], 0, 0.0
            for chunk in source.chunks():
                if chunk.dtype == torch.float32 and chunk.numel():
                    values = chunk.numpy()  # numpy: one thread, no pool to wake per tensor on a busy machine
                    fits = -FP16_MAX <= values.min() and values.max() <= FP16_MAX  # NaN looks closer too
                    beyond = None if fits else chunk.isfinite() & (chunk.abs() > FP16_MAX)
                    if beyond is not None and bool(beyond.any()):
                        over += int(beyond.sum())
                        largest = max(largest, float(chunk[beyond].abs().max()))
                        chunk = torch.where(beyond, chunk.clamp(-FP16_MAX, FP16_MAX), chunk)
                data = chunk.view(torch.uint8).numpy() if chunk.numel() else b""
                if to_file:
                    out.write(data)
                else:
                    parts.append(bytes(data))
                bar.update(chunk.numel() * chunk.element_size())
            if to_file:
                for k, v in (("location", location), ("offset", str(offset)), ("length", str(source.nbytes))):
                    proto_t.external_data.add(key=k, value=v)
                proto_t.data_location = onnx.TensorProto.EXTERNAL
                moved.changes.append(Change(
                    f"initializer {source.name}", "inline", f"external ({location})",
                    f"{source.nbytes / 2**20:.2f} MiB; mapped, not copied, by ONNX Runtime; no 2 GB protobuf limit"))
            else:
                proto_t.raw_data = b"".join(parts)
            if over:
                clip.changes.append(Change(
                    f"initializer {source.name}", f"{over} of {t.numel()} value(s) beyond fp16 (largest |x| "
                    f"{largest:.4g})", "clipped to ±65504", f"fp16 would make them inf; largest change "
                    f"{largest - FP16_MAX:.4g}"))
            proto.graph.initializer.append(proto_t)
    bar.close()
    if not external:
        moved.notes.append(f"weights ({total / 2**20:.1f} MiB) fit in one protobuf file")
    from_checkpoint = [s for s in sources if s.checkpoint is not None]
    converted = sum(1 for s in from_checkpoint if s.checkpoint.dtype != s.tensor.dtype)
    moved.notes.append(f"{len(from_checkpoint)} tensor(s) read from the checkpoint's safetensors"
                       + (f" ({converted} converted to {str(sources[0].tensor.dtype).removeprefix('torch.')} tensor by tensor)"
                          if converted else "")
                       + f", {len(sources) - len(from_checkpoint)} from memory")
    return clip, moved
