"""OrtGqaKVSession against OrtKVSession (the exported graph) on the same calls: same logits and the same retained
cache after padded batched prefill, decode with a row sitting out (position -1 touches nothing) and a second
prefill over a used cache; and clear errors for what the GQA graph cannot express."""
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
