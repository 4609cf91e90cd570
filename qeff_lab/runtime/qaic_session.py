"""Run a QPC on Cloud AI 100 through the SDK's `qaicrt` runtime, behind the same interface as OrtSession.

Importing this module never needs the SDK: `qaicrt` (and its `QAicApi_pb2` protobuf) are imported when a session
is opened, and their absence is a QaicRuntimeUnavailable error saying what to install. The binding logic (which
buffers are retained state, which compiled shape the inputs match, which devices to use) is plain Python over
the bindings' name / direction / dims, so it is tested without the SDK; the session itself runs in the tests
against tests/qaicrt_double, a test double of the qaicrt API subset QEfficient's cloud_infer.py uses.
"""
from __future__ import annotations

import importlib
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qeff_lab.contracts import BATCH_INDEX, INPUT_IDS, RETAINED_SUFFIX
from qeff_lab.runtime.session import ShapeNotCompiledError


class QaicRuntimeUnavailable(ImportError):
    """The SDK's Python runtime (qaicrt, QAicApi_pb2) cannot be imported on this machine."""


class DeviceSelectionError(ValueError):
    """device_ids that do not fit the compiled program or the cards present."""


def load_qaicrt(sdk_root: Path | str | None = None):
    """(qaicrt, QAicApi_pb2), from the environment or from the SDK's own folders."""
    from qeff_lab.compile.sdk import sdk_root as default_root

    root = Path(sdk_root) if sdk_root is not None else default_root()
    extra = [root / "dev" / "lib" / platform.machine(), root / "dev" / "python"]
    modules = []
    for name in ("qaicrt", "QAicApi_pb2"):
        try:
            modules.append(importlib.import_module(name))
            continue
        except ImportError:
            pass
        for p in extra:
            if p.is_dir() and str(p) not in sys.path:
                sys.path.append(str(p))
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise QaicRuntimeUnavailable(
                f"Cannot import {name!r}, the Cloud AI 100 runtime's Python API ({e}). It ships with the AI 100 "
                f"Platform and Apps SDKs (looked in the environment and under {extra[0]} and {extra[1]}). On a "
                "machine without the card, compile with backend='onnxruntime' (or None) to run on the embedded "
                "backend; set QEFF_LAB_QAIC_ROOT if the SDK is installed elsewhere.") from e
    return modules[0], modules[1]


# ----------------------------------------------------------------------------- binding logic (no SDK needed)
@dataclass
class Binding:
    """One QPC input or output, as the IO descriptor lists it."""

    name: str
    index: int
    is_input: bool
    dims: tuple[int, ...]
    dtype: np.dtype

    @property
    def retained(self) -> bool:
        return self.name.endswith(RETAINED_SUFFIX)


def retained_state_names(bindings: list[Binding]) -> set[str]:
    """Buffers the device keeps between runs: every X_RetainedState output and its paired input X.

    The host sends and receives nothing for them (zero-size buffers), which is what makes decode cheap."""
    outputs = {b.name for b in bindings if not b.is_input and b.retained}
    paired = {o[: -len(RETAINED_SUFFIX)] for o in outputs}
    return outputs | {b.name for b in bindings if b.is_input and b.name in paired}


def match_allowed_shape(allowed_shapes: list[list[tuple[int, ...]]], bindings: list[Binding],
                        shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first compiled shape set in which every given buffer's shape matches its binding.

    `allowed_shapes[k][i]` is binding i's dims in specialization k (the IO descriptor's allowed_shapes).
    Buffers left out (retained state) are not compared. Raises ShapeNotCompiledError listing what is compiled."""
    by_name = {b.name: b for b in bindings}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise KeyError(f"No binding named {unknown} in this QPC; its bindings are {sorted(by_name)}.")
    if not allowed_shapes:  # a single-shape program: its bindings' own dims
        allowed_shapes = [[b.dims for b in sorted(bindings, key=lambda b: b.index)]]
    for k, shape_set in enumerate(allowed_shapes):
        if all(tuple(shape_set[by_name[n].index]) == tuple(s) for n, s in shapes.items()):
            return k
    compiled = "\n".join(
        f"  {k}: " + ", ".join(f"{n}{list(shape_set[by_name[n].index])}" for n in shapes)
        for k, shape_set in enumerate(allowed_shapes))
    given = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
    raise ShapeNotCompiledError(f"Input shapes {given} match no compiled specialization of this QPC:\n{compiled}\n"
                                "Compile with a specialization for this shape, or pad the inputs to one of these.")


def select_devices(device_ids: list[int] | None, num_devices: int, available: list[int] | None = None) -> list[int]:
    """The device ids to load on: default the first `num_devices` ids (0..n-1); given ids must number
    `num_devices` (what the QPC was compiled for) and, when the cards are known, exist."""
    if device_ids is None:
        ids = (sorted(available)[:num_devices] if available else list(range(num_devices)))
        if len(ids) < num_devices:
            raise DeviceSelectionError(f"The program was compiled for {num_devices} device(s) but only "
                                       f"{len(ids)} are present ({sorted(available or [])}).")
        return ids
    ids = [int(d) for d in device_ids]
    if len(set(ids)) != len(ids):
        raise DeviceSelectionError(f"device_ids {ids} repeats a device.")
    if len(ids) != num_devices:
        raise DeviceSelectionError(
            f"device_ids {ids} names {len(ids)} device(s) but the program was compiled for num_devices="
            f"{num_devices}. Give {num_devices} id(s), or compile again with num_devices={len(ids)}.")
    if available is not None and available:
        missing = sorted(set(ids) - set(available))
        if missing:
            raise DeviceSelectionError(f"device_ids {missing} are not among the cards present {sorted(available)} "
                                       "(see `qaic-util -q`).")
    return ids


def choose_devices(device_ids: list[int] | None, num_devices: int, cards: list | None,
                   num_cores: int | None = None) -> list[int] | None:
    """Where to load a QPC compiled for `num_devices` devices of `num_cores` NSP cores each.

    `cards`: the DeviceInfo list from `qaic-util -q` (empty or None when it gave nothing). Given ids are checked
    against the cards (present, Ready, enough free cores). Without ids, the first cards that are Ready and have the
    cores free; when nothing is known about the cards, None for one device: the runtime picks, as QEfficient does
    (`Program(ctx, None, qpc, props)`, QEfficient/generation/cloud_infer.py), and 0..n-1 for several (a devMapping
    needs ids)."""
    if not cards:
        if device_ids is None and num_devices == 1:
            return None
        return select_devices(device_ids, num_devices)
    by_id = {c.qid: c for c in cards}
    if device_ids is not None:
        ids = select_devices(device_ids, num_devices, sorted(by_id))
        bad = [by_id[i] for i in ids if not by_id[i].usable(num_cores)]
        if bad:
            raise DeviceSelectionError(
                f"device_ids {ids}: " + "; ".join(c.describe() for c in bad) + f" (the program needs {num_cores} "
                "free NSP cores on each, on a Ready card). Pick other cards (`qaic-util -q`), or wait for the "
                "program holding them to end.")
        return ids
    usable = [c.qid for c in cards if c.usable(num_cores)]
    if len(usable) < num_devices:
        raise DeviceSelectionError(
            f"The program needs {num_devices} Ready card(s) with {num_cores} free NSP cores each, and "
            f"{len(usable)} qualify: " + "; ".join(c.describe() for c in cards) + ". Free a card, compile with "
            "fewer num_cores, or give device_ids.")
    return usable[:num_devices]


def _dtype_map(aicapi) -> dict[int, np.dtype]:
    """aicapi type -> numpy dtype, as QEfficient's cloud_infer.py maps them (BFLOAT16 defaults to 11 there)."""
    names = {"FLOAT_TYPE": np.float32, "FLOAT_16_TYPE": np.float16, "INT8_Q_TYPE": np.int8, "UINT8_Q_TYPE": np.uint8,
             "INT16_Q_TYPE": np.int16, "INT32_Q_TYPE": np.int32, "INT32_I_TYPE": np.int32,
             "INT64_I_TYPE": np.int64, "INT8_TYPE": np.int8}
    mapping = {getattr(aicapi, "BFLOAT16_TYPE", 11): np.dtype(np.float16)}
    mapping.update({getattr(aicapi, n): np.dtype(t) for n, t in names.items() if hasattr(aicapi, n)})
    return mapping


def _compiled_cores(qpc_path: Path) -> int | None:
    """num_cores from the compile folder's qconfig.json (beside qpc/), None when it is not there."""
    try:
        return int(json.loads((qpc_path.parent / "qconfig.json").read_text())["options"]["num_cores"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- the session
class QaicSession:
    """A loaded QPC on one or more cards. Same interface as OrtSession: input_names, output_names, allowed,
    check_shapes(feeds), run(feeds) -> {output name: array}.

    Drives qaicrt as QEfficient's QAICInferenceSession does (QEfficient/generation/cloud_infer.py): Context and
    Queue (on the given devices, or the runtime's choice), the IO descriptor's bindings and allowed shapes, a
    Program with dataPathTimeoutMs (and devMapping for several devices), ExecObj.setData with one QBuffer and one
    (element size, dims) per binding in binding order, Queue.enqueue, waitForCompletion, getData.

    Retained state stays on the device (`keeps_retained_state`): past_* inputs and X_RetainedState outputs get
    zero-size buffers (QEfficient's skip_buffers); their feeds are ignored and they are not returned."""

    backend = "qaic"
    keeps_retained_state = True

    def __init__(self, qpc_path: Path | str, device_ids: list[int] | None = None, num_devices: int = 1,
                 allowed: list[dict[str, int]] | None = None, sdk_root: Path | str | None = None,
                 activate: bool = True, num_cores: int | None = None, data_path_timeout_ms: int = 60_000):
        qaicrt, aicapi = load_qaicrt(sdk_root)
        qpc_path = Path(qpc_path)
        if not (qpc_path / "programqpc.bin").is_file():
            raise FileNotFoundError(f"No programqpc.bin in {qpc_path}: compile with backend='qaic' first.")
        from qeff_lab.compile.sdk import detect_sdk

        cards = detect_sdk(sdk_root).devices
        num_cores = num_cores if num_cores is not None else _compiled_cores(qpc_path)
        chosen = choose_devices(device_ids, num_devices, cards, num_cores)
        self.allowed = allowed or []
        self._rt, self._api = qaicrt, aicapi
        ok = qaicrt.QStatus.QS_SUCCESS
        if chosen is not None:
            self.context = qaicrt.Context(qaicrt.QIDList(chosen))
            self.queue = qaicrt.Queue(self.context, chosen[0])
        else:  # the runtime picks (QEfficient: Context() and Queue(context, 0))
            self.context = qaicrt.Context()
            self.queue = qaicrt.Queue(self.context, 0)
        self.device_ids = chosen
        qpc = qaicrt.Qpc(str(qpc_path))
        status, iodesc_bytes = qpc.getIoDescriptor()
        if status != ok:
            raise RuntimeError(f"qaicrt could not read the IO descriptor of {qpc_path} (status {status}).")
        iodesc = aicapi.IoDesc()
        iodesc.ParseFromString(bytes(iodesc_bytes))
        dtypes = _dtype_map(aicapi)
        self.bindings = [Binding(b.name, b.index, b.dir == aicapi.BUFFER_IO_TYPE_INPUT, tuple(b.dims), dtypes[b.type])
                         for b in iodesc.selected_set.bindings]
        # Indexed by binding.index (QEfficient's binding_index_map); the proto lists inputs first, then outputs.
        if sorted(b.index for b in self.bindings) != list(range(len(self.bindings))):
            raise RuntimeError(f"Unexpected binding indices in {qpc_path}: {[b.index for b in self.bindings]}")
        self.bindings.sort(key=lambda b: b.index)
        self.allowed_shapes = [[tuple(s.dims) for s in a.shapes] for a in iodesc.allowed_shapes]
        self._by_name = {b.name: b for b in self.bindings}
        self.input_names = [b.name for b in self.bindings if b.is_input]
        self.output_names = [b.name for b in self.bindings if not b.is_input]
        self.retained = retained_state_names(self.bindings)
        props = qaicrt.QAicProgramProperties()
        props.dataPathTimeoutMs = data_path_timeout_ms
        device = None
        if chosen and len(chosen) == 1:
            device = chosen[0]
        elif chosen and len(chosen) > 1:
            props.devMapping = ":".join(map(str, chosen))
        self.program = qaicrt.Program(self.context, device, qpc, props)
        if self.program.load() != ok:
            where = f"devices {chosen}" if chosen else "the card the runtime picked"
            raise RuntimeError(f"qaicrt could not load {qpc_path} on {where}: check `qaic-util -q` for a Ready card "
                               f"with {num_cores or 'enough'} free NSP cores (another program may hold them).")
        self.exec_obj = None
        if activate:
            self.activate()

    def activate(self) -> None:
        if self.exec_obj is None:
            if self.program.activate() != self._rt.QStatus.QS_SUCCESS:
                raise RuntimeError("qaicrt could not activate the program.")
            self.exec_obj = self._rt.ExecObj(self.context, self.program)

    def close(self) -> None:
        if self.exec_obj is not None:
            self.exec_obj = None
            self.program.deactivate()

    def check_shapes(self, feeds: dict[str, np.ndarray]) -> int:
        sent = {n: tuple(np.shape(v)) for n, v in feeds.items() if n not in self.retained}
        missing = [n for n in self.input_names if n not in self.retained and n not in sent]
        if missing:
            raise KeyError(f"Missing input(s) {missing}: this QPC takes {self.input_names} "
                           f"({sorted(self.retained & set(self.input_names))} stay on the device).")
        return match_allowed_shape(self.allowed_shapes, self.bindings, sent)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.exec_obj is None:
            raise RuntimeError("The session is not active: call activate() first.")
        rt, ok = self._rt, self._rt.QStatus.QS_SUCCESS
        k = self.check_shapes(feeds)
        buffers, dims = [], []
        for b in self.bindings:  # in binding-index order
            if b.name in self.retained:
                buffers.append(rt.QBuffer(b""))  # skipped: the device keeps (or produces) it
                dims.append((b.dtype.itemsize, [0]))
            elif b.is_input:
                arr = np.ascontiguousarray(feeds[b.name], dtype=b.dtype)
                buffers.append(rt.QBuffer(arr.tobytes()))
                dims.append((arr.itemsize, list(arr.shape) or [1]))
            else:  # an output, sized for the specialization the inputs matched
                shape = list(self.allowed_shapes[k][b.index]) if self.allowed_shapes else list(b.dims)
                buffers.append(rt.QBuffer(bytes(int(np.prod(shape)) * b.dtype.itemsize)))
                dims.append((b.dtype.itemsize, shape))
        if self.exec_obj.setData(buffers, rt.BufferDimensionsVecRef(dims)) != ok:
            raise RuntimeError("qaicrt setData failed: the buffers do not fit the program's bindings.")
        if self.queue.enqueue(self.exec_obj) != ok:
            raise RuntimeError("qaicrt could not enqueue the run.")
        if self.exec_obj.waitForCompletion() != ok:
            raise RuntimeError(f"The run failed on the device (see the runtime's log above); compiled shapes: "
                               f"{self.allowed_shapes or [list(b.dims) for b in self.bindings]}")
        status, out = self.exec_obj.getData()
        if status != ok:
            raise RuntimeError("qaicrt getData failed.")
        result = {}
        for b in self.bindings:
            if b.is_input or buffers[b.index].size == 0:
                continue
            result[b.name] = np.frombuffer(bytes(out[b.index]), b.dtype).reshape(dims[b.index][1]).copy()
        return result

    def __repr__(self) -> str:
        where = f"devices {self.device_ids}" if self.device_ids else "device chosen by the runtime"
        return f"<QaicSession {where}: {len(self.input_names)} inputs, {len(self.output_names)} outputs>"


class QaicKVRunner:
    """A KVRunner (see runtime.generation) over a QaicSession: the decoder's KV cache stays on the card
    (-retained-state), so a step sends only input_ids and position_ids and gets the logits back."""

    backend = "qaic"

    def __init__(self, session: QaicSession, specializations: list[dict[str, int]]):
        from qeff_lab.runtime.kv_session import kv_shapes

        self.session = session
        self.batch_size, self.ctx_len, self.full_batch_size = kv_shapes(specializations)
        self.continuous_batching = self.full_batch_size is not None
        self.prefill_seq_len = max(s["seq_len"] for s in specializations)
        self.steps = 0

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, batch_index: np.ndarray | None = None) -> np.ndarray:
        from qeff_lab.runtime.kv_session import check_batch_index

        feeds = {"input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64)}
        if self.continuous_batching:
            feeds[BATCH_INDEX] = check_batch_index(batch_index, feeds[INPUT_IDS].shape[0], self.full_batch_size)
        out = self.session.run(feeds)
        self.steps += 1
        return np.asarray(out["logits"], np.float32)

    def __repr__(self) -> str:
        return (f"<QaicKVRunner devices {self.session.device_ids or 'chosen by the runtime'}, batch {self.batch_size}, prefill "
                f"{self.prefill_seq_len}, ctx {self.ctx_len}>")

