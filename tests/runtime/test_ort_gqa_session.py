"""OrtGqaKVSession against OrtKVSession (the exported graph) on the same calls: same logits and the same retained
cache after padded batched prefill, decode with a row sitting out (position -1 touches nothing) and a second
prefill over a used cache; with continuous batching (cache row = slot) prefill into any slot, decode with a free
slot and with rows out of slot order, prefix copies; and clear errors for what the GQA graph cannot express."""
import numpy as np
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.runtime.kv_session import OrtKVSession
from qeff_lab.runtime.ort_gqa_session import OrtGqaKVSession
from tests.transforms.tiny_decoders import tiny_model

P, CTX = 8, 32


@pytest.fixture(scope="module")
def runners():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-llama-gqa-session")
    result = model.compile(prefill_seq_len=P, ctx_len=CTX, batch_size=2)
    result = model.compile_result
    assert result.ort_graph["graph"] == "gqa"
    gqa = OrtGqaKVSession(result.folder / result.ort_graph["path"], result.specializations,
                          weights_dir=result.onnx_path.parent)
    return OrtKVSession(result.onnx_path, result.specializations), gqa


def _chunk(rows):
    ids, pos = np.zeros((len(rows), P), np.int64), np.full((len(rows), P), -1, np.int64)
    for r, (start, tokens) in enumerate(rows):
        ids[r, :len(tokens)], pos[r, :len(tokens)] = tokens, np.arange(start, start + len(tokens))
    return ids, pos


def _same(exported, gqa, ids, pos, active):
    a, b = exported.step(ids, pos), gqa.step(ids, pos)
    np.testing.assert_allclose(a[active], b[active], atol=1e-4)
    ka, kb = exported.kv_state(), gqa.kv_state()
    assert ka.keys() == kb.keys()
    for name in ka:
        np.testing.assert_allclose(ka[name], kb[name], atol=1e-5, err_msg=name)


def test_same_logits_and_same_retained_cache_step_by_step(runners):
    exported, gqa = runners
    rng = np.random.default_rng(0)
    long, short = rng.integers(5, 1000, 11).tolist(), rng.integers(5, 1000, 3).tolist()
    _same(exported, gqa, *_chunk([(0, long[:8]), (0, short)]), [0, 1])  # row 1 padded
    _same(exported, gqa, *_chunk([(8, long[8:]), (3, [])]), [0])  # row 1 sits the whole chunk out
    for step in range(3):  # decode; row 1 stops after one step (-1 must leave its cache as it is)
        ids = np.array([[7 + step], [9]])
        pos = np.array([[11 + step], [3 if step == 0 else -1]])
        _same(exported, gqa, ids, pos, [0, 1] if step == 0 else [0])
    # a new prompt over the used cache: stale slots past its length must not be read
    _same(exported, gqa, *_chunk([(0, short), (0, long[:8])]), [0, 1])
    _same(exported, gqa, np.array([[4], [5]]), np.array([[3], [8]]), [0, 1])


def test_what_the_gqa_graph_cannot_express_is_a_clear_error(runners):
    _, gqa = runners
    ids = np.ones((2, P), np.int64)
    holes = np.tile(np.arange(P), (2, 1))
    holes[0, 2] = -1  # padding inside a row
    with pytest.raises(ValueError, match="positions consecutive"):
        gqa.step(ids, holes)
    with pytest.raises(ValueError, match="no continuous batching"):
        gqa.step(ids[:, :1], np.zeros((2, 1), np.int64), batch_index=np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="match no compiled specialization"):
        gqa.step(np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)))


# ----------------------------------------------------------------------------- continuous batching
FBS = 3


@pytest.fixture(scope="module")
def cb_runners():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-llama-gqa-session-cb",
                                                continuous_batching=True)
    model.compile(prefill_seq_len=P, ctx_len=CTX, full_batch_size=FBS)
    result = model.compile_result
    assert result.ort_graph["graph"] == "gqa"
    gqa = OrtGqaKVSession(result.folder / result.ort_graph["path"], result.specializations,
                          weights_dir=result.onnx_path.parent)
    return OrtKVSession(result.onnx_path, result.specializations), gqa


def _same_cb(exported, gqa, ids, pos, batch_index, active):
    a, b = exported.step(ids, pos, batch_index), gqa.step(ids, pos, batch_index)
    np.testing.assert_allclose(a[active], b[active], atol=1e-4)
    ka, kb = exported.kv_state(), gqa.kv_state()
    assert ka.keys() == kb.keys()
    for name in ka:
        np.testing.assert_allclose(ka[name], kb[name], atol=1e-5, err_msg=name)


def test_continuous_batching_same_logits_and_same_slots_step_by_step(cb_runners):
    exported, gqa = cb_runners
    assert gqa.continuous_batching and gqa.full_batch_size == FBS and gqa.batch_size == FBS
    assert next(iter(gqa.kv_state().values())).shape[0] == FBS
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(5, 1000, n).tolist() for n in (11, 3, 6))
    _same_cb(exported, gqa, *_chunk([(0, a[:8])]), [[2]], [0])  # prefill into slot 2, then slot 0: rows are slots
    _same_cb(exported, gqa, *_chunk([(8, a[8:])]), [[2]], [0])
    _same_cb(exported, gqa, *_chunk([(0, b)]), [[0]], [0])
    every = np.arange(FBS)[:, None]
    for step in range(2):  # decode in slot order; slot 1 is free (position -1 writes nothing)
        ids, pos = np.array([[4 + step], [1], [6 + step]]), np.array([[3 + step], [-1], [11 + step]])
        _same_cb(exported, gqa, ids, pos, every, [0, 2])
    # a decode whose rows are not in slot order: the same logits per row as the exported graph
    _same_cb(exported, gqa, np.array([[5], [8], [1]]), np.array([[13], [5], [-1]]), np.array([[2], [0], [1]]), [0, 1])
    # a new request over slot 2's used cache; prefix reuse: slot 0's first 4 positions copied into slot 1
    _same_cb(exported, gqa, *_chunk([(0, c)]), [[2]], [0])
    exported.copy_prefix(0, 1, 4)
    gqa.copy_prefix(0, 1, 4)
    _same_cb(exported, gqa, *_chunk([(4, c[:2])]), [[1]], [0])
    _same_cb(exported, gqa, np.array([[3], [9], [2]]), np.array([[6], [6], [6]]), every, [0, 1, 2])


def test_continuous_batching_needs_a_valid_batch_index(cb_runners):
    _, gqa = cb_runners
    ids, pos = _chunk([(0, [5, 6])])
    with pytest.raises(ValueError, match="needs batch_index"):
        gqa.step(ids, pos)
    with pytest.raises(ValueError, match="distinct slot"):
        gqa.step(ids, pos, np.array([[FBS]]))
    with pytest.raises(ValueError, match="distinct slot"):
        gqa.step(np.ones((FBS, 1), np.int64), np.ones((FBS, 1), np.int64), np.zeros((FBS, 1), np.int64))
