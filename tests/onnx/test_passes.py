"""ONNX passes: fp16 clipping reports each tensor; external data keeps weights out of the protobuf."""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qeff_lab.onnx.passes import FP16_MAX, clip_fp16, save_model


def _graph():
    w = numpy_helper.from_array(np.array([1.0, 1e6, -7e4, -np.inf, 3.0], np.float32), "w")
    small = numpy_helper.from_array(np.array([0.5, -2.0], np.float32), "small")
    const = helper.make_node("Constant", [], ["big"], value=numpy_helper.from_array(np.array([-3.4e38], np.float32)))
    add = helper.make_node("Add", ["x", "w"], ["y0"])
    add2 = helper.make_node("Add", ["y0", "big"], ["y"])
    graph = helper.make_graph([const, add, add2], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])], [w, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_clip_fp16_reports_each_tensor_and_keeps_inf():
    model = _graph()
    result = clip_fp16(model)
    places = {c.place: c for c in result.changes}
    assert set(places) == {"initializer w", "Constant big"}
    assert "2 of 5 value(s)" in places["initializer w"].before
    assert "largest change 9.345e+05" in places["initializer w"].why
    w = numpy_helper.to_array(model.graph.initializer[0])
    assert w.tolist() == [1.0, FP16_MAX, -FP16_MAX, -np.inf, 3.0]
    assert np.isfinite(w[:3].astype(np.float16)).all()


def test_clip_fp16_says_when_nothing_to_do():
    model = _graph()
    clip_fp16(model)
    again = clip_fp16(model)
    assert not again.modified and again.notes == ["every float constant already fits fp16"]


def test_external_data_split_runs_in_onnxruntime(tmp_path):
    model = _graph()
    result = save_model(model, tmp_path / "m.onnx", external=True, size_threshold=0)
    assert {c.place for c in result.changes} == {"initializer w", "initializer small"}
    assert (tmp_path / "m.onnx.data").is_file()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros(5, np.float32)})[0]
    assert y[0] < -1e38  # the unclipped constant is still there: this graph was not clipped


def test_small_model_stays_in_one_file(tmp_path):
    result = save_model(_graph(), tmp_path / "m.onnx")
    assert not result.modified and "fit in one protobuf file" in result.notes[0]
    assert not (tmp_path / "m.onnx.data").exists()
