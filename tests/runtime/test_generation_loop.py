"""The generation loop and the ONNX Runtime KV session: retained state between steps (in ORT's own buffers),
padding that touches nothing, EOS per row, per-row length limits, and the PyTorch runner on the same schedule."""
import numpy as np
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.runtime.generation import TorchKVRunner, generate_ids
from qeff_lab.runtime.kv_session import OrtKVSession
from tests.transforms.tiny_decoders import hf_greedy, prompts, tiny_model

PREFILL, CTX = 8, 32


@pytest.fixture(scope="module")
def compiled():
    hf = tiny_model("qwen2", seed=11)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("qwen2", seed=11), "tiny-qwen2-loop")
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)
    return model, hf


def _fresh_session(model) -> OrtKVSession:
    return OrtKVSession(model.export_result.path, model.compile_result.specializations)


def test_retained_state_lives_between_steps_and_padding_touches_nothing(compiled):
    model, _ = compiled
    session = _fresh_session(model)
    ids = np.array([[11, 12, 13, 14, 15, 0, 0, 0], [0] * 8], np.int64)
    pos = np.array([[0, 1, 2, 3, 4, -1, -1, -1], [-1] * 8], np.int64)  # row 1: a filler row
    session.step(ids, pos)
    after_prefill = session.kv_state()
    assert len(after_prefill) == 4  # 2 layers x (key, value)
    for name, kv in after_prefill.items():
        assert (np.abs(kv[0, :, :5]).sum(-1) > 0).all(), name  # written slots 0..4
        assert not kv[0, :, 5:].any() and not kv[1].any(), name  # the rest untouched (still zeros)
    session.step(np.array([[16], [0]], np.int64), np.array([[5], [-1]], np.int64))
    after_decode = session.kv_state()
    for name, kv in after_decode.items():
        np.testing.assert_array_equal(kv[0, :, :5], after_prefill[name][0, :, :5])  # kept, bit for bit
        assert (np.abs(kv[0, :, 5]).sum(-1) > 0).all() and not kv[0, :, 6:].any() and not kv[1].any()
    assert session.steps == 2


def test_onnxruntime_cache_equals_pytorch_cache_after_the_same_steps(compiled):
    model, _ = compiled
    session = _fresh_session(model)
    runner = TorchKVRunner(model.model, 2, PREFILL, CTX)
    ids = np.array([[21, 22, 23, 0, 0, 0, 0, 0], [31, 32, 33, 34, 35, 36, 37, 38]], np.int64)
    pos = np.array([[0, 1, 2, -1, -1, -1, -1, -1], list(range(8))], np.int64)
    np.testing.assert_allclose(session.step(ids, pos), runner.step(ids, pos), rtol=1e-4, atol=1e-4)
    state = session.kv_state()
    for i, (key, value) in enumerate(runner.cache):
        np.testing.assert_allclose(state[f"past_key.{i}"], key.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state[f"past_value.{i}"], value.numpy(), rtol=1e-5, atol=1e-5)


def test_eos_stops_one_row_while_the_other_continues(compiled):
    model, hf = compiled
    prompt_ids = prompts(seed=4, lengths=(6, 10))
    reference = hf_greedy(hf, prompt_ids, 12)
    eos = reference[0][3]
    assert eos not in reference[1] and eos not in reference[0][:3]  # the chosen stop token hits row 0 only
    ids, stopped, metrics = generate_ids(model.runner(), prompt_ids, 12, eos_token_ids=[eos])
    assert ids[0] == reference[0][:4] and stopped[0] == "eos"
    assert ids[1] == reference[1] and stopped[1] == "length"
    assert metrics.generated_tokens == 16 and metrics.decode_tokens == 14


def test_pytorch_runner_and_compiled_session_agree_on_a_long_schedule(compiled):
    model, hf = compiled
    prompt_ids = prompts(seed=9, lengths=(17, 2))  # three prefill chunks for row 0; row 1 done in the first
    reference = hf_greedy(hf, prompt_ids, 13)
    assert generate_ids(model.runner(), prompt_ids, 13)[0] == reference
    assert generate_ids(TorchKVRunner(model.model, 2, PREFILL, CTX), prompt_ids, 13)[0] == reference


def test_streaming_callback_sees_every_token_in_order(compiled):
    model, _ = compiled
    seen: dict[int, list[list[int]]] = {}
    ids, _, _ = generate_ids(model.runner(), prompts(seed=2, lengths=(4, 7, 5)), 5,
                             on_tokens=lambda i, new: seen.setdefault(i, []).append(list(new)))
    for i, out in enumerate(ids):
        assert [len(s) for s in seen[i]] == list(range(1, 6)) and seen[i][-1] == out


def test_metrics_and_views_are_short_and_complete(compiled):
    model, _ = compiled
    out = model.generate_from_ids(prompts(lengths=(4,)), 3)
    m = out.metrics
    assert repr(m).startswith("<GenerationMetrics 1 prompt(s), 3 tokens, TTFT ")
    assert m.to_frame()["metric"].tolist() == ["backend", "prompts", "batches", "prompt tokens", "generated tokens",
                                               "time to first token", "decode", "total", "end to end"]
    report = m.report().splitlines()
    assert report[0].startswith("=") and "Performance Stats" in report[0] and len(report) == 6
    frame = out.to_frame()
    assert frame.loc[0, "new tokens"] == 3 and frame.loc[0, "stopped"] == "length"
