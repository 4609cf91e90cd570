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


# ----------------------------------------------------------------------------- choosing cards (qaic-util fields)
def test_default_choice_skips_cards_not_ready_or_busy():
    from qeff_lab.compile.sdk import DeviceInfo
    from qeff_lab.runtime.qaic_session import choose_devices

    cards = [DeviceInfo(0, "Error", nsp_total=16, nsp_free=16), DeviceInfo(1, "Ready", nsp_total=16, nsp_free=4),
             DeviceInfo(2, "Ready", nsp_total=16, nsp_free=16), DeviceInfo(3, "Ready", nsp_total=16, nsp_free=16)]
    assert choose_devices(None, 1, cards, num_cores=16) == [2]
    assert choose_devices(None, 2, cards, num_cores=16) == [2, 3]
    assert choose_devices(None, 1, cards, num_cores=4) == [1]
    assert choose_devices([3], 1, cards, num_cores=16) == [3]
    with pytest.raises(DeviceSelectionError, match="QID 1: Ready, 4/16 NSP free"):
        choose_devices([1], 1, cards, num_cores=8)
    with pytest.raises(DeviceSelectionError, match="QID 0: Error"):
        choose_devices([0], 1, cards, num_cores=8)
    with pytest.raises(DeviceSelectionError, match="3 Ready card\\(s\\) with 16 free NSP cores each, and 2 qualify"):
        choose_devices(None, 3, cards, num_cores=16)
    # nothing known about the cards: the runtime picks one (QEfficient: Program(ctx, None, qpc, props))
    assert choose_devices(None, 1, [], num_cores=16) is None
    assert choose_devices(None, 2, None) == [0, 1]


# ----------------------------------------------------------------------------- end to end on the qaicrt double
# fixtures qaic_device and qaicrt_double: tests/runtime/conftest.py


@pytest.fixture
def tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    from qeff_lab import QEFFAutoModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64))
    return QEFFAutoModel.from_model(hf, pooling="mean", name="tiny-bert")


def test_encoder_runs_through_qaicrt_and_matches_onnxruntime(qaic_device, qaicrt_double, tiny_bert):
    from qeff_lab.runtime.qaic_session import QaicSession
    from qeff_lab.runtime.session import OrtSession

    tiny_bert.compile(seq_len=[8, 16], num_cores=8, backend="qaic", stream=False)
    r = tiny_bert.compile_result
    session = open_session(r)
    assert isinstance(session, QaicSession) and session.device_ids == [0]
    assert session.allowed_shapes and len(session.allowed_shapes) == 2  # two specializations -> allowed shapes
    ort = OrtSession(r.onnx_path, r.specializations)
    rng = np.random.default_rng(0)
    for seq in (8, 16):
        feeds = {"input_ids": rng.integers(0, 50, (1, seq)), "attention_mask": np.ones((1, seq), np.int64)}
        got, want = session.run(feeds), ort.run(feeds)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeNotCompiledError):
        session.run({"input_ids": np.zeros((1, 12), np.int64), "attention_mask": np.ones((1, 12), np.int64)})
    with pytest.raises(KeyError, match="Missing input"):
        session.run({"input_ids": np.zeros((1, 8), np.int64)})
    # the model's own generate() goes through the same session
    out = tiny_bert.generate({"input_ids": np.array([[2, 5, 6, 7, 3]]), "attention_mask": np.ones((1, 5), np.int64)})
    assert out["output"].shape == (1, 32)
    assert qaicrt_double.errors == []
    # the runtime, not only our own check, refuses a shape no specialization has
    session.check_shapes = lambda feeds: 0
    with pytest.raises(RuntimeError, match="run failed on the device"):
        session.run({"input_ids": np.zeros((1, 12), np.int64), "attention_mask": np.ones((1, 12), np.int64)})
    assert qaicrt_double.errors[-1].startswith("No matching dimension found")


def _tiny_decoder(family="llama"):
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM
    from tests.transforms.tiny_decoders import tiny_model

    return QEFFAutoModelForCausalLM.from_model(tiny_model(family), name=f"tiny-{family}")


@pytest.mark.parametrize("prefill", [8, 1])
def test_kv_runner_on_qaicrt_gives_the_onnxruntime_tokens(qaic_device, qaicrt_double, prefill):
    from qeff_lab.runtime.qaic_session import QaicKVRunner
    from tests.transforms.tiny_decoders import CTX, prompts

    model = _tiny_decoder()
    ids = prompts()
    model.compile(prefill_seq_len=prefill, ctx_len=CTX, backend="onnxruntime")
    want = model.generate_from_ids(ids, generation_len=12).ids
    model.compile(prefill_seq_len=prefill, ctx_len=CTX, backend="qaic", stream=False)
    r = model.compile_result
    assert len(r.specializations) == (2 if prefill > 1 else 1)  # prefill_seq_len=1: one "Decode" graph
    runner = model.runner()
    assert isinstance(runner, QaicKVRunner) and runner.prefill_seq_len == prefill
    got = model.generate_from_ids(ids, generation_len=12).ids
    assert got == want
    assert runner.steps > 0 and qaicrt_double.errors == []
    # the cache stayed on the "device": the host never sent or received a past_* buffer
    assert runner.session.retained == {n for n in runner.session.input_names + runner.session.output_names
                                       if n.startswith("past_")}


def test_loading_skips_busy_cards_and_reports_a_full_machine(qaic_device, qaicrt_double):
    model = _tiny_decoder()
    qaic_device(status="Error,Ready")
    model.compile(prefill_seq_len=8, ctx_len=32, num_cores=16, backend="qaic", stream=False)
    assert model.runner().session.device_ids == [1]
    qaic_device(status="Ready", nsp_free="4,8")
    model._session = None
    with pytest.raises(DeviceSelectionError, match="QID 0: Ready, 4/16 NSP free; QID 1: Ready, 8/16 NSP free"):
        model.runner()
    model.compile(prefill_seq_len=8, ctx_len=32, num_cores=8, backend="qaic", stream=False)
    assert model.runner().session.device_ids == [1]


def test_without_qaic_util_the_runtime_picks(qaic_device, qaicrt_double):
    (qaic_device.root / "tools" / "qaic-util").unlink()
    model = _tiny_decoder()
    model.compile(prefill_seq_len=8, ctx_len=32, backend="qaic", stream=False)
    runner = model.runner()
    assert runner.session.device_ids is None and runner.session.program.loaded_on == [0]
    assert "chosen by the runtime" in repr(runner)
