"""TEST DOUBLE of `QAicApi_pb2`, the protobuf module the Cloud AI 100 SDK ships (/opt/qti-aic/dev/python).

Same message and field names and enum values as the public QAicApi.proto (github.com/quic/
software-kit-for-qualcomm-cloud-ai-100, lib/core/proto/QAicApi.proto): IoDesc.selected_set.bindings (IoBinding:
name, index, type, dir, dims, size, is_partial_buf_allowed) and IoDesc.allowed_shapes (IoShapes.shapes:
TensorShape type, dims; "inputs first, followed by outputs", in IoBinding order). Serialised as JSON, not protobuf
wire format: only this double's qaicrt writes it and only this module reads it.
"""
from __future__ import annotations

import json

# enum bufferIoDirectionEnum
BUFFER_IO_TYPE_INPUT = 0
BUFFER_IO_TYPE_OUTPUT = 1
# enum bufferIoDataTypeEnum (BFLOAT16_TYPE is not in the public proto; QEfficient's cloud_infer.py defaults it to 11)
FLOAT_TYPE = 0
FLOAT_16_TYPE = 1
INT8_Q_TYPE = 2
UINT8_Q_TYPE = 3
INT16_Q_TYPE = 4
INT32_Q_TYPE = 5
INT32_I_TYPE = 6
INT64_I_TYPE = 7
INT8_TYPE = 8
BFLOAT16_TYPE = 11
TYPE_INVALID = 0xFF


class _Message:
    _fields: dict = {}  # field name -> default (a list for repeated fields, a class for sub-messages)

    def __init__(self, **values):
        for name, default in self._fields.items():
            if isinstance(default, type):
                value = default()
            elif isinstance(default, list):
                value = []
            else:
                value = default
            setattr(self, name, values.get(name, value))

    def _to(self):
        def conv(v):
            if isinstance(v, _Message):
                return v._to()
            if isinstance(v, list):
                return [conv(x) for x in v]
            return v
        return {name: conv(getattr(self, name)) for name in self._fields}

    @classmethod
    def _from(cls, data):
        msg = cls()
        for name, default in cls._fields.items():
            if name not in data:
                continue
            value = data[name]
            item = _ITEMS.get((cls.__name__, name))
            if item is not None:
                value = [item._from(x) for x in value]
            elif isinstance(default, type):
                value = default._from(value)
            setattr(msg, name, value)
        return msg

    def SerializeToString(self) -> bytes:
        return json.dumps(self._to()).encode()

    def ParseFromString(self, data: bytes) -> None:
        parsed = type(self)._from(json.loads(bytes(data).decode()))
        for name in self._fields:
            setattr(self, name, getattr(parsed, name))


class TensorShape(_Message):
    _fields = {"type": FLOAT_TYPE, "dims": []}


class IoShapes(_Message):
    _fields = {"shapes": []}


class IoBinding(_Message):
    _fields = {"name": "", "index": 0, "type": FLOAT_TYPE, "dir": BUFFER_IO_TYPE_INPUT, "quant_scale": 0.0,
               "quant_offset": 0, "dims": [], "size": 0, "is_partial_buf_allowed": False, "is_valid": True}


class IoSet(_Message):
    _fields = {"name": "default", "bindings": []}


class IoDesc(_Message):
    _fields = {"io_sets": [], "selected_set": IoSet, "program_name": "", "allowed_shapes": []}


_ITEMS = {("IoShapes", "shapes"): TensorShape, ("IoSet", "bindings"): IoBinding, ("IoDesc", "io_sets"): IoSet,
          ("IoDesc", "allowed_shapes"): IoShapes}
