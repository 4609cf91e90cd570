"""TEST DOUBLE of `qaicrt`, the Cloud AI 100 runtime's Python API. NOT the SDK (which cannot be installed here).

It implements the subset QEfficient's QEfficient/generation/cloud_infer.py (QAICInferenceSession) uses, with the
same names and calling conventions: QStatus, QLogLevel, QIDList, Context([QIDList]), Context.setLogLevel,
Queue(context, device_id), Qpc(path).getIoDescriptor() -> (status, bytes of a QAicApi_pb2.IoDesc),
QAicProgramProperties (devMapping, dataPathTimeoutMs), Program(context, device_id | None, qpc, properties) with
load / activate / deactivate, ExecObj(context, program) with setData(qbuffers, BufferDimensionsVecRef) /
waitForCompletion / getData -> (status, qbuffers), Queue.enqueue(exec_obj), QBuffer(bytes) with .size.

Behind it, ONNX Runtime runs the ONNX named in the stand-in QPC that tests/fake_sdk's compiler writes, at the
specialization the passed buffer shapes match (as the device selects one), and:
- bindings are the graph's inputs then outputs (QAicApi.proto: "inputs first, followed by outputs"), typed by
  custom_io.yaml where it names them; with -retained-state each X_RetainedState output and its input X allow a
  zero-size ("skipped", partial) buffer, and the program keeps them between runs: X_RetainedState of one run is X
  of the next (zeros after activate). Any other zero-size buffer fails, as "Partial buffer not allowed".
- a single-specialization QPC lists no allowed_shapes (QEfficient modeling_auto.py: "we can't fetch allowed shapes
  for single seq_len"); bindings' dims are then that shape; with several, the largest of each dim (an assumption:
  the real selected set's dims are not documented).
- buffers whose shapes match no specialization fail waitForCompletion with "No matching dimension found".
- cards come from the same variables as tests/fake_sdk's qaic-util (FAKE_QAIC_DEVICES, FAKE_QAIC_STATUS,
  FAKE_QAIC_NSP_FREE); Program.load fails on a card that is not Ready or lacks the QPC's cores, and holds them
  until unload. With device_id None and no devMapping the runtime picks the first card that fits.
What it does not model: device numerics (it runs the ONNX's own dtypes; retained state stays in them), timing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import QAicApi_pb2 as aicapi


class QStatus:
    QS_SUCCESS = 0
    QS_ERROR = 1
    QS_INVAL = 2
    QS_NODEV = 3
    QS_NOMEM = 4


class QLogLevel:
    QL_DEBUG = 0
    QL_INFO = 1
    QL_WARN = 2
    QL_ERROR = 3


class QIDList(list):
    pass


def _per_card(name: str, default: str, n: int) -> list[str]:
    values = [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()] or [default]
    return [values[min(i, len(values) - 1)] for i in range(n)]


def _cards() -> dict[int, dict]:
    n = int(os.environ.get("FAKE_QAIC_DEVICES", "2"))
    status, free = _per_card("FAKE_QAIC_STATUS", "Ready", n), _per_card("FAKE_QAIC_NSP_FREE", "16", n)
    return {i: {"status": status[i], "nsp_free": int(free[i]) - _HELD.get(i, 0)} for i in range(n)}


_HELD: dict[int, int] = {}  # cores held by loaded programs in this process, per card
errors: list[str] = []  # what failed, in order (the real runtime logs it)


def _error(message: str) -> int:
    errors.append(message)
    print(f"[qaicrt test double] {message}", file=sys.stderr)
    return QStatus.QS_ERROR


class Context:
    def __init__(self, devices: QIDList | None = None):
        cards = _cards()
        if devices is not None:
            missing = [d for d in devices if d not in cards]
            if missing:
                raise RuntimeError(f"qaicrt.Context: no device {missing} (devices {sorted(cards)})")
        self.devices = list(devices) if devices is not None else None
        self.log_level = QLogLevel.QL_ERROR

    def setLogLevel(self, level) -> int:
        self.log_level = level
        return QStatus.QS_SUCCESS


class Queue:
    def __init__(self, context: Context, device_id: int):
        self.context, self.device_id = context, device_id

    def enqueue(self, exec_obj: "ExecObj") -> int:
        if exec_obj.data is None:
            return _error("enqueue before setData")
        exec_obj._execute()
        return QStatus.QS_SUCCESS


class QBuffer:
    def __init__(self, data=b""):
        self._data = bytes(data) if not isinstance(data, np.ndarray) else data.tobytes()

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def buf(self) -> memoryview:
        return memoryview(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class BufferDimensionsVecRef(list):
    """(element size, dims) per binding; dims as given, e.g. [1, 8] or (0,)."""

    def __init__(self, items=()):
        super().__init__((int(e), list(d)) for e, d in items)

    def __setitem__(self, index, value):
        super().__setitem__(index, (int(value[0]), list(value[1])))


class QAicProgramProperties:
    __slots__ = ("devMapping", "dataPathTimeoutMs")  # a misspelt property fails, as on the pybind11 class

    def __init__(self):
        self.devMapping = ""
        self.dataPathTimeoutMs = 0


_ONNX_TO_AIC = {1: aicapi.FLOAT_TYPE, 10: aicapi.FLOAT_16_TYPE, 7: aicapi.INT64_I_TYPE, 6: aicapi.INT32_I_TYPE,
                3: aicapi.INT8_Q_TYPE, 2: aicapi.UINT8_Q_TYPE, 5: aicapi.INT16_Q_TYPE, 9: aicapi.INT8_TYPE}
_CUSTOM_IO_TO_AIC = {"float16": aicapi.FLOAT_16_TYPE, "bfloat16": aicapi.BFLOAT16_TYPE, "float32": aicapi.FLOAT_TYPE,
                     "mxint8": aicapi.UINT8_Q_TYPE}
# Host dtypes per type: QEfficient cloud_infer.py aic_to_np_dtype_mapping
AIC_TO_NP = {aicapi.BFLOAT16_TYPE: np.float16, aicapi.FLOAT_TYPE: np.float32, aicapi.FLOAT_16_TYPE: np.float16,
             aicapi.INT8_Q_TYPE: np.int8, aicapi.UINT8_Q_TYPE: np.uint8, aicapi.INT16_Q_TYPE: np.int16,
             aicapi.INT32_Q_TYPE: np.int32, aicapi.INT32_I_TYPE: np.int32, aicapi.INT64_I_TYPE: np.int64,
             aicapi.INT8_TYPE: np.int8}
RETAINED = "_RetainedState"


class Qpc:
    def __init__(self, path: str):
        qpc_file = Path(path) / "programqpc.bin"
        try:
            self.manifest = json.loads(qpc_file.read_text())
            assert "test_double_qpc" in self.manifest
        except (OSError, ValueError, AssertionError) as e:
            raise RuntimeError(f"qaicrt.Qpc: {qpc_file} is not a QPC this test double can run ({e})") from e
        import onnx

        self.path = Path(path)
        graph = onnx.load(self.manifest["onnx"], load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        ios = [(v, True) for v in graph.input if v.name not in initializers] + [(v, False) for v in graph.output]
        specs, custom_io = self.manifest["specializations"], self.manifest["custom_io"]
        retained = set()
        if self.manifest["retained_state"]:
            outs = {v.name for v, is_in in ios if not is_in and v.name.endswith(RETAINED)}
            retained = outs | {v.name for v, is_in in ios if is_in and v.name + RETAINED in outs}
        self.onnx_dtypes, shapes, self.bindings = {}, [], []
        for index, (v, is_input) in enumerate(ios):
            t = v.type.tensor_type
            self.onnx_dtypes[v.name] = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            per_spec = []
            for spec in specs:
                dims = []
                for d in t.shape.dim:
                    if d.dim_param:
                        if d.dim_param not in spec:
                            raise RuntimeError(f"qaicrt.Qpc: symbol {d.dim_param!r} of {v.name} has no size in "
                                               f"specialization {spec}")
                        dims.append(spec[d.dim_param])
                    else:
                        dims.append(d.dim_value)
                per_spec.append(dims)
            shapes.append(per_spec)
            typ = _CUSTOM_IO_TO_AIC.get(custom_io.get(v.name), _ONNX_TO_AIC.get(t.elem_type, aicapi.TYPE_INVALID))
            dims = [max(s[i] for s in per_spec) for i in range(len(per_spec[0]))]
            self.bindings.append(aicapi.IoBinding(
                name=v.name, index=index, type=typ,
                dir=aicapi.BUFFER_IO_TYPE_INPUT if is_input else aicapi.BUFFER_IO_TYPE_OUTPUT, dims=dims,
                size=int(np.prod(dims)) * np.dtype(AIC_TO_NP[typ]).itemsize, is_partial_buf_allowed=v.name in retained))
        self.allowed = [[shapes[i][k] for i in range(len(ios))] for k in range(len(specs))]
        desc = aicapi.IoDesc(program_name=self.path.name)
        desc.selected_set = aicapi.IoSet(name="default", bindings=self.bindings)
        if len(specs) > 1:
            desc.allowed_shapes = [aicapi.IoShapes(shapes=[aicapi.TensorShape(type=b.type, dims=shape_set[i])
                                                           for i, b in enumerate(self.bindings)])
                                   for shape_set in self.allowed]
        self.io_desc = desc

    def getIoDescriptor(self):
        return QStatus.QS_SUCCESS, self.io_desc.SerializeToString()


class Program:
    def __init__(self, context: Context, device_id: int | None, qpc: Qpc, properties: QAicProgramProperties | None = None):
        if not isinstance(qpc, Qpc):
            raise TypeError(f"qaicrt.Program: expected a Qpc, got {type(qpc).__name__}")
        self.context, self.device_id, self.qpc = context, device_id, qpc
        self.properties = properties or QAicProgramProperties()
        self.loaded_on: list[int] | None = None
        self.active = False
        self.state: dict[str, np.ndarray] = {}
        self.session = None

    def _wanted(self) -> list[int] | None:
        if self.properties.devMapping:
            return [int(d) for d in self.properties.devMapping.split(":")]
        if self.device_id is not None:
            return [self.device_id]
        return None

    def load(self) -> int:
        if self.loaded_on is not None:
            return QStatus.QS_SUCCESS
        cards, need, cores = _cards(), self.qpc.manifest["num_devices"], self.qpc.manifest["num_cores"]
        wanted = self._wanted()
        allowed = self.context.devices if self.context.devices is not None else sorted(cards)
        if wanted is None:  # the runtime picks
            fit = [q for q in allowed if cards[q]["status"].lower() == "ready" and cards[q]["nsp_free"] >= cores]
            if len(fit) < need:
                return _error(f"Program.load: no {need} card(s) ready with {cores} free NSP cores: {cards}")
            wanted = fit[:need]
        if len(wanted) != need:
            return _error(f"Program.load: the QPC was compiled for {need} device(s), given {wanted}")
        for q in wanted:
            if q not in cards or q not in allowed:
                return _error(f"Program.load: device {q} is not in the context ({allowed})")
            if cards[q]["status"].lower() != "ready":
                return _error(f"Program.load: device {q} is {cards[q]['status']}, not Ready")
            if cards[q]["nsp_free"] < cores:
                return _error(f"Program.load: device {q} has {cards[q]['nsp_free']} free NSP cores, the QPC needs "
                              f"{cores}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(self.qpc.manifest["onnx"], opts, providers=["CPUExecutionProvider"])
        for q in wanted:
            _HELD[q] = _HELD.get(q, 0) + cores
        self.loaded_on = wanted
        return QStatus.QS_SUCCESS

    def unload(self) -> int:
        if self.loaded_on is not None:
            for q in self.loaded_on:
                _HELD[q] -= self.qpc.manifest["num_cores"]
            self.loaded_on, self.session, self.active = None, None, False
        return QStatus.QS_SUCCESS

    def activate(self) -> int:
        if self.loaded_on is None:
            return _error("Program.activate before load")
        self.active, self.state = True, {}
        return QStatus.QS_SUCCESS

    def deactivate(self) -> int:
        self.active = False
        return QStatus.QS_SUCCESS

    def __del__(self):
        try:
            self.unload()
        except Exception:
            pass


class ExecObj:
    def __init__(self, context: Context, program: Program):
        if not program.active:
            raise RuntimeError("qaicrt.ExecObj: the program is not activated")
        self.context, self.program = context, program
        self.data = None
        self.status = QStatus.QS_SUCCESS
        self.outputs: list[QBuffer] = []

    def setData(self, qbuffers, buf_dims) -> int:
        n = len(self.program.qpc.bindings)
        if len(qbuffers) != n or len(buf_dims) != n:
            return _error(f"setData: {len(qbuffers)} buffers / {len(buf_dims)} dims for {n} bindings")
        if not all(isinstance(b, QBuffer) for b in qbuffers):
            return _error("setData: buffers must be QBuffer")
        self.data = (list(qbuffers), [(int(e), list(d)) for e, d in buf_dims])
        return QStatus.QS_SUCCESS

    def _execute(self) -> None:
        program, qpc = self.program, self.program.qpc
        qbuffers, dims = self.data
        self.outputs, self.status = [], QStatus.QS_SUCCESS
        if not program.active:
            self.status = _error("run on a deactivated program")
            return
        given = {}
        for i, b in enumerate(qpc.bindings):
            elem, shape = dims[i]
            if qbuffers[i].size == 0 or shape == [0]:
                if not b.is_partial_buf_allowed:
                    self.status = _error(f"Partial buffer not allowed for: {b.name}")
                    return
                continue
            itemsize = np.dtype(AIC_TO_NP[b.type]).itemsize
            if elem != itemsize or qbuffers[i].size != itemsize * int(np.prod(shape)):
                self.status = _error(f"{b.name}: buffer of {qbuffers[i].size} bytes, element size {elem}, dims "
                                     f"{shape}; the binding's element size is {itemsize}")
                return
            given[i] = shape
        match = [k for k, shape_set in enumerate(qpc.allowed) if all(shape_set[i] == s for i, s in given.items())]
        if not match:
            self.status = _error("No matching dimension found: passed " + ", ".join(
                f"{qpc.bindings[i].name}{s}" for i, s in given.items()) + f"; allowed {qpc.allowed}")
            return
        shape_set = qpc.allowed[match[0]]
        feeds = {}
        for i, b in enumerate(qpc.bindings):
            if b.dir != aicapi.BUFFER_IO_TYPE_INPUT:
                continue
            want = qpc.onnx_dtypes[b.name]
            if i in given:
                host = np.frombuffer(bytes(qbuffers[i]), AIC_TO_NP[b.type]).reshape(given[i])
                feeds[b.name] = host.astype(want)
            else:  # retained: what the device holds
                held = program.state.get(b.name)
                if held is None or list(held.shape) != shape_set[i]:
                    held = np.zeros(shape_set[i], want)
                feeds[b.name] = held
        names = [b.name for b in qpc.bindings if b.dir == aicapi.BUFFER_IO_TYPE_OUTPUT]
        values = dict(zip(names, program.session.run(names, feeds)))
        for name, value in values.items():
            if name.endswith(RETAINED) and qpc.manifest["retained_state"]:
                program.state[name[: -len(RETAINED)]] = value
        for i, b in enumerate(qpc.bindings):
            if b.dir == aicapi.BUFFER_IO_TYPE_INPUT or i not in given:
                self.outputs.append(qbuffers[i] if b.dir == aicapi.BUFFER_IO_TYPE_INPUT else QBuffer(b""))
                continue
            value = np.ascontiguousarray(values[b.name], AIC_TO_NP[b.type])
            if list(value.shape) != given[i]:
                self.status = _error(f"{b.name}: produced {list(value.shape)}, buffer dims {given[i]}")
                return
            self.outputs.append(QBuffer(value.tobytes()))

    def waitForCompletion(self) -> int:
        return self.status

    def getData(self):
        return self.status, list(self.outputs)
