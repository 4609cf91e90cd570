"""QaicSession without the SDK: the module imports anyway, opening a session says what is missing, and the
binding logic (retained state, shape matching, device choice) is checked on hand-built bindings.

qaicrt cannot be installed here, so no test here runs a QPC; the bindings below are plain data shaped like the
IO descriptor of a one-layer retained-state decoder compiled for Prefill (seq 8) and Decode (seq 1)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from qeff_lab.runtime import open_kv_runner, open_session
from qeff_lab.runtime.qaic_session import (
    Binding,
    DeviceSelectionError,
    QaicRuntimeUnavailable,
    load_qaicrt,
    match_allowed_shape,
    retained_state_names,
    select_devices,
)
from qeff_lab.runtime.session import ShapeNotCompiledError

I64, F16, F32 = np.dtype(np.int64), np.dtype(np.float16), np.dtype(np.float32)
BINDINGS = [
    Binding("input_ids", 0, True, (1, 8), I64),
    Binding("position_ids", 1, True, (1, 8), I64),
    Binding("past_key.0", 2, True, (1, 1, 32, 16), F16),
    Binding("past_value.0", 3, True, (1, 1, 32, 16), F16),
    Binding("logits", 4, False, (1, 1, 128), F32),
    Binding("past_key.0_RetainedState", 5, False, (1, 1, 32, 16), F16),
    Binding("past_value.0_RetainedState", 6, False, (1, 1, 32, 16), F16),
]
KV = (1, 1, 32, 16)
ALLOWED = [  # per specialization, every binding's dims in binding order (the IO descriptor's allowed_shapes)
    [(1, 8), (1, 8), KV, KV, (1, 1, 128), KV, KV],  # Prefill
    [(1, 1), (1, 1), KV, KV, (1, 1, 128), KV, KV],  # Decode
]


def test_module_imports_without_the_sdk():
    code = ("import sys, qeff_lab.runtime.qaic_session, qeff_lab.runtime; "
            "assert 'qaicrt' not in sys.modules and 'QAicApi_pb2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_opening_without_qaicrt_says_what_to_do(tmp_path):
    with pytest.raises(QaicRuntimeUnavailable) as e:
        load_qaicrt(tmp_path / "no-sdk")
    msg = str(e.value)
    assert "'qaicrt'" in msg and "backend='onnxruntime'" in msg and "QEFF_LAB_QAIC_ROOT" in msg
    assert isinstance(e.value, ImportError)


def test_retained_state_pairs_outputs_with_their_inputs():
    assert retained_state_names(BINDINGS) == {"past_key.0", "past_value.0", "past_key.0_RetainedState",
                                              "past_value.0_RetainedState"}
    assert retained_state_names([b for b in BINDINGS if not b.name.startswith("past_")]) == set()


def test_shapes_select_the_matching_specialization():
    assert match_allowed_shape(ALLOWED, BINDINGS, {"input_ids": (1, 8), "position_ids": (1, 8)}) == 0
    assert match_allowed_shape(ALLOWED, BINDINGS, {"input_ids": (1, 1), "position_ids": (1, 1)}) == 1
    with pytest.raises(ShapeNotCompiledError) as e:
        match_allowed_shape(ALLOWED, BINDINGS, {"input_ids": (1, 4), "position_ids": (1, 4)})
    assert "input_ids[1, 4]" in str(e.value) and "0: input_ids[1, 8]" in str(e.value)
    with pytest.raises(KeyError, match="attention_mask"):
        match_allowed_shape(ALLOWED, BINDINGS, {"attention_mask": (1, 8)})


def test_single_shape_program_uses_the_bindings_dims():
    assert match_allowed_shape([], BINDINGS, {"input_ids": (1, 8)}) == 0
    with pytest.raises(ShapeNotCompiledError):
        match_allowed_shape([], BINDINGS, {"input_ids": (1, 1)})


def test_device_selection():
    assert select_devices(None, 1) == [0]
    assert select_devices(None, 2, available=[3, 1, 2]) == [1, 2]
    assert select_devices([2, 3], 2, available=[0, 1, 2, 3]) == [2, 3]
    with pytest.raises(DeviceSelectionError, match="compiled for num_devices=2"):
        select_devices([0], 2)
    with pytest.raises(DeviceSelectionError, match="not among the cards present"):
        select_devices([5], 1, available=[0, 1])
    with pytest.raises(DeviceSelectionError, match="repeats"):
        select_devices([1, 1], 2)
    with pytest.raises(DeviceSelectionError, match="only 1 are present"):
        select_devices(None, 2, available=[0])


class _Result:
    """Stands in for a CompileResult (only the fields open_session reads)."""

    def __init__(self, backend, folder, dry_run=False, onnx_path=None):
        self.backend, self.folder, self.dry_run, self.onnx_path = backend, folder, dry_run, onnx_path
        self.specializations = [{"batch_size": 1, "seq_len": 8, "ctx_len": 32}]
        self.num_devices = 1

    @property
    def qpc_path(self):
        return self.folder / "qpc"


def test_open_session_picks_by_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("QEFF_LAB_QAIC_ROOT", str(tmp_path / "no-sdk"))
    with pytest.raises(QaicRuntimeUnavailable):
        open_session(_Result("qaic", tmp_path))
    with pytest.raises(QaicRuntimeUnavailable):
        open_kv_runner(_Result("qaic", tmp_path))
    with pytest.raises(RuntimeError, match="is a dry run"):
        open_session(_Result("qaic", tmp_path, dry_run=True))
    with pytest.raises(ValueError, match="No session for backend"):
        open_session(_Result("tpu", tmp_path))
    with pytest.raises(ValueError, match="device_ids=\\[0\\] selects AI 100 cards"):
        open_session(_Result("onnxruntime", tmp_path), device_ids=[0])
