"""The embedded backend's own compile result for encoders (qeff_lab.compile.ort_encoder): per-token ops on real
tokens only. MiniLM and tiny random encoders run the packed graph with the exported graph's outputs; a graph whose
real tokens see its padding ones, or whose per-token output differs at padding positions, keeps the exported graph
and says why; the compile reason and qconfig.json say which graph runs."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_lab import QEFFAutoModel
from qeff_lab.compile import ort_encoder
from qeff_lab.compile.backend import compile_graph
from qeff_lab.runtime import open_session
from tests.models.sentences import SENTENCES
from tests.transforms.test_encoders import tiny

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_minilm_runs_the_packed_graph_with_the_exported_graphs_embeddings(minilm_path, monkeypatch):
    model = QEFFAutoModel.from_pretrained(MINILM, pooling="mean")
    model.compile(seq_len=[16, 32, 64, 128], batch_size=4)
    result = model.compile_result
    report = result.ort_graph
    assert report["graph"] == "packed", report["why"]
    assert json.loads((result.folder / "qconfig.json").read_text())["ort_graph"] == report
    assert report["matmuls"] == 36 and report["max_abs_diff"] < 1e-5  # 6 layers x (q, k, v, out, up, down)
    assert "runs its packed-token graph" in result.reason and "36 matmuls" in result.reason
    ops = {n.op_type for n in onnx.load(str(result.folder / report["path"]), load_external_data=False).graph.node}
    assert {"NonZero", "Gather"} <= ops
    assert model.session().onnx_path == result.folder / report["path"]
    ours = model.embed(SENTENCES)

    monkeypatch.setenv("QEFF_LAB_ORT_GRAPH", "exported")
    exported = QEFFAutoModel.from_pretrained(MINILM, pooling="mean")
    exported.compile(seq_len=[16, 32, 64, 128], batch_size=4)
    assert exported.compile_result.ort_graph["graph"] == "exported"
    assert "QEFF_LAB_ORT_GRAPH=exported" in exported.compile_result.reason
    assert exported.compile_result.folder != result.folder  # the graph choice is part of the compile key
    assert exported.session().onnx_path == exported.compile_result.onnx_path
    ref = exported.embed(SENTENCES)
    assert np.abs(ours - ref).max() < 1e-4 and cosine(ours, ref).min() > 0.99999


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_tiny_bert_pooled_runs_packed_and_equals_the_exported_graph(pooling):
    model = QEFFAutoModel.from_model(tiny("bert"), pooling=pooling, name="tiny-bert-pack")
    model.compile(seq_len=[8, 16], batch_size=2)
    assert model.compile_result.ort_graph["graph"] == "packed", model.compile_result.ort_graph["why"]
    ids = np.random.default_rng(1).integers(5, 100, (3, 11))
    mask = np.array([[1] * 11, [1] * 6 + [0] * 5, [1] * 2 + [0] * 9])
    got = model.generate({"input_ids": ids, "attention_mask": mask})["output"]
    padded = {"input_ids": np.pad(ids, ((0, 0), (0, 5))), "attention_mask": np.pad(mask, ((0, 0), (0, 5)))}
    want = ort.InferenceSession(str(model.compile_result.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, padded)[0]  # the exported graph, at the seq_len generate picks (16)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_per_token_output_keeps_the_exported_graph_and_says_why():
    model = QEFFAutoModel.from_model(tiny("bert"), pooling=None, name="tiny-bert-pack-none")
    model.compile(seq_len=[8, 16], batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "exported" and report["path"] is None
    assert "only at padding positions of its per-token output" in report["why"]
    assert "runs the exported graph (the packed graph differed by" in model.compile_result.reason
    assert not (model.compile_result.folder / ort_encoder.ORT_GRAPH).exists()
    assert model.session().onnx_path == model.compile_result.onnx_path


def _mean_without_mask(path):
    """An 'encoder' whose output averages every position, padding included: its real outputs see the padding."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq_len"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "seq_len"])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 4])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"]),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["output"], axes=[1], keepdims=0),
             helper.make_node("Identity", ["attention_mask"], ["unused"])]
    graph = helper.make_graph(nodes, "mean-all", [ids, mask], [out], inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_graph_whose_real_tokens_see_padding_falls_back_and_still_runs_right(tmp_path, no_sdk):
    path = _mean_without_mask(tmp_path / "export" / "model.onnx")
    specs = [{"batch_size": 2, "seq_len": 8}]
    result = compile_graph(path, specs, backend="onnxruntime")
    report = result.ort_graph
    assert report["graph"] == "exported"
    assert "at real tokens (this model's real tokens see its padding ones)" in report["why"]
    assert report["max_abs_diff"] > 1e-3  # what the check measured is kept
    feed = {"input_ids": np.arange(16).reshape(2, 8), "attention_mask": np.array([[1] * 8, [1] * 3 + [0] * 5])}
    session = open_session(result)
    assert session.onnx_path == path
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(session.run(feed)["output"], want, rtol=1e-6)
    # and the rewrite itself was applicable: it is the check that refused it
    _, ops, matmuls = ort_encoder.pack_tokens(onnx.load(str(path)))
    assert matmuls == 1 and ops == 2  # MatMul and Relu run packed; ReduceMean mixes tokens


def test_graphs_it_does_not_handle_keep_the_exported_graph_with_the_reason(tmp_path, tiny_onnx, no_sdk):
    result = compile_graph(tiny_onnx, [{"batch_size": 1, "seq_len": 4}], backend="onnxruntime")
    assert result.ort_graph["graph"] == "exported"
    assert "inputs ['input_ids'], expected exactly input_ids and attention_mask" in result.ort_graph["why"]
    assert "runs the exported graph (inputs ['input_ids']" in result.reason
    model = onnx.load(str(_mean_without_mask(tmp_path / "m" / "model.onnx")))
    model.graph.node.remove(model.graph.node[1])  # no matmul left: nothing worth packing
    model.graph.node[0].output[0] = "y"
    with pytest.raises(ort_encoder.EncoderRewriteNotApplicable, match="no matmul with a weight"):
        ort_encoder.pack_tokens(model)


def test_decoder_specializations_are_not_encoder_compiles():
    assert ort_encoder.is_encoder_compile([{"batch_size": 1, "seq_len": 8}])
    assert not ort_encoder.is_encoder_compile([{"batch_size": 1, "seq_len": 8, "ctx_len": 32}])
    assert not ort_encoder.is_encoder_compile([])


def test_check_inputs_pad_every_shape_with_random_ids_and_keep_a_real_token_per_row(tmp_path):
    path = _mean_without_mask(tmp_path / "model.onnx")
    feeds = ort_encoder.check_inputs(path, [{"batch_size": 3, "seq_len": s} for s in (4, 8, 16)])
    assert [f["input_ids"].shape for f in feeds] == [(3, 4), (3, 16)]  # smallest and largest
    for f in feeds:
        assert f["attention_mask"].sum(1).min() >= 1 and f["attention_mask"][0].all() and (f["input_ids"] < 100).all()
    pads = feeds[-1]["input_ids"][feeds[-1]["attention_mask"] == 0]
    assert pads.size and (pads != 0).any()  # padding positions hold random ids, not one pad id

