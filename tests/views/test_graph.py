"""Graph view: op counts and I/O read from a real export, a real netron server started and stopped, the widget."""
import logging
import re
import socket
import urllib.error
import urllib.request

import onnx
import pytest

from qeff_lab.onnx.inspect import RAW_OP_COUNTS, graph_report, op_count_table, weightless_copy
from qeff_lab.views.graph import GraphView, NetronServer, graph_view, stop_all


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_graph_report_counts_every_node_and_reads_shapes(compiled_tiny):
    report = graph_report(compiled_tiny)
    proto = onnx.load(str(report.path))
    assert report.nodes == len(proto.graph.node)
    assert report.op_counts["MatMul"] == sum(n.op_type == "MatMul" for n in proto.graph.node)
    io = {(r.kind, r.name): (r.dtype, r.shape) for r in report.io_frame().itertuples()}
    assert io == {("input", "input_ids"): ("int64", "[batch_size, seq_len]"),
                  ("input", "attention_mask"): ("int64", "[batch_size, seq_len]"),
                  ("output", "output"): ("float32", "[batch_size, 32]")}
    # the export recorded its graph before the passes; today's passes rewrite constants and storage, not nodes
    assert (report.path.parent / RAW_OP_COUNTS).is_file()
    assert report.op_counts_before == report.op_counts
    assert [p.name for p in report.passes] == ["FP16ClipConstants", "ExternalData"]
    assert repr(report).startswith(f"<GraphReport model.onnx: {report.nodes} nodes")


def test_op_count_table_shows_what_changed():
    frame = op_count_table({"MatMul": 4, "Pow": 2, "Add": 3}, {"MatMul": 4, "Add": 5, "com.qeff::CustomRMSNorm": 2})
    got = {r.op: (r._2, r._3, r.change) for r in frame.itertuples()}
    assert got == {"MatMul": (4, 4, ""), "Add": (3, 5, "+2"), "Pow": (2, 0, "-2"), "com.qeff::CustomRMSNorm": (0, 2, "+2")}
    assert list(frame.op)[:2] == ["Add", "MatMul"]  # most frequent after the passes first
    unknown = op_count_table(None, {"MatMul": 1})
    assert unknown.iloc[0].tolist() == ["MatMul", "", 1, ""]


def test_not_exported_is_a_clear_error(fresh_tiny, tmp_path):
    with pytest.raises(ValueError, match="has not been exported yet: call model.export"):
        graph_report(fresh_tiny)
    with pytest.raises(FileNotFoundError, match="export the model first"):
        graph_report(tmp_path / "missing.onnx")


def test_weightless_copy_keeps_structure_and_drops_data(compiled_tiny, tmp_path):
    src = compiled_tiny.export_result.path
    dest = weightless_copy(src, tmp_path / "w.onnx")
    a, b = onnx.load(str(src)), onnx.load(str(dest))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [(t.name, list(t.dims)) for t in a.graph.initializer] == [(t.name, list(t.dims)) for t in b.graph.initializer]
    assert all(not t.raw_data for t in b.graph.initializer)
    weights = graph_report(src).weight_bytes
    assert src.stat().st_size - dest.stat().st_size >= 0.95 * weights  # what is left is the graph, not the data


def test_netron_serves_the_graph_and_stops(compiled_tiny):
    root_handlers = list(logging.getLogger().handlers)
    with NetronServer(compiled_tiny.export_result.path) as server:
        assert server.running and not server.weightless  # a small file is served as is
        assert server.url == f"http://127.0.0.1:{server.port}/"
        status, page = get(server.url)
        assert status == 200 and b"netron" in page.lower() and b'content="/data/model.onnx"' in page
        status, data = get(server.url + "data/model.onnx")
        assert status == 200 and data == compiled_tiny.export_result.path.read_bytes()
        assert repr(server) == "<NetronServer model.onnx: running>"
        port = server.port
    assert not server.running and repr(server) == "<NetronServer model.onnx: stopped>"
    with pytest.raises((urllib.error.URLError, ConnectionError, socket.timeout)):
        get(f"http://127.0.0.1:{port}/", timeout=3)
    assert logging.getLogger().handlers == root_handlers  # netron did not install a root handler
    assert logging.getLogger("netron").getEffectiveLevel() >= logging.WARNING


def test_large_graphs_are_served_without_weights(compiled_tiny, tmp_path):
    with NetronServer(compiled_tiny.export_result.path, weightless=True, scratch=tmp_path) as server:
        status, data = get(server.url + "data/" + server.served_path.name)
        full = compiled_tiny.export_result.path
        assert status == 200 and len(data) <= full.stat().st_size - 0.95 * graph_report(full).weight_bytes
        assert [n.op_type for n in onnx.load_from_string(data).graph.node] == \
            [n.op_type for n in onnx.load(str(full)).graph.node]
        assert server.served_path.parent == tmp_path


def test_behind_jupyter_server_proxy_the_url_is_under_the_hub_prefix(compiled_tiny, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/someone/")
    with NetronServer(compiled_tiny.export_result.path) as server:
        assert server.url == f"/user/someone/proxy/{server.port}/"
        assert f"src='/user/someone/proxy/{server.port}/'" in server.iframe_html()


def test_graph_view_widget_opens_and_stops_netron(compiled_tiny):
    view = graph_view(compiled_tiny, netron=False)
    assert isinstance(view, GraphView) and view.server is None
    assert "<iframe" not in view.frame.value and view.stop_button.disabled
    tables = view.children[2].children[1].value
    assert "inputs and outputs" in tables and "op counts before / after the ONNX passes" in tables
    assert "FP16ClipConstants" in tables
    view.open_button.click()
    try:
        assert view.server.running and f":{view.server.port}/" in view.frame.value and "<iframe" in view.frame.value
        assert view.open_button.disabled and not view.stop_button.disabled
        assert "is off until you stop it" in view.netron_note.value  # why the button is greyed out
        assert "cookie notice" in view.frame.value
        assert repr(view).endswith("netron running>")
    finally:
        view.stop_button.click()
    assert not view.server.running and "<iframe" not in view.frame.value
    assert repr(view) == "<GraphView model.onnx: netron stopped>"


def test_stored_graph_view_carries_its_tables_as_static_html(compiled_tiny):
    view = graph_view(compiled_tiny, netron=False)
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    static = bundle["text/html"]
    assert "class='qeff-static'" in static and "op counts before / after the ONNX passes" in static
    assert "inputs and outputs" in static and "run the notebook to browse the graph in netron" in static


def test_side_panel_folds_numbered_names_and_long_lists(compiled_tiny):
    from qeff_lab.onnx.inspect import graph_report
    from qeff_lab.pipeline import Change, TransformResult
    from qeff_lab.views.graph import io_summary_frame
    from qeff_lab.views.tables import render_transform

    report = graph_report(compiled_tiny)
    folded = io_summary_frame(report)
    assert folded["count"].sum() == len(report.io_frame())
    moved = TransformResult("ExternalData", [Change(f"initializer w.{i}", "inline", "external (model.onnx.data)",
                                                    "2.25 MiB; mapped") for i in range(20)])
    page = render_transform(moved)
    head = page[:page.index("<details")]
    assert "ExternalData: 20 initializer(s): inline -&gt; external (model.onnx.data), 45.0 MiB" in head
    assert "w.7" not in head and "w.7" in page  # the full list one click away
    # in the narrow panel long names and shapes may break anywhere, the short columns not at all ("inpu" / "t")
    from qeff_lab.views.graph import io_table_html, op_table_html

    io, ops = io_table_html(report), op_table_html(report)
    assert re.search(r"white-space:nowrap'>input</td>", io) and re.search(r"white-space:nowrap'>int64</td>", io)
    assert not re.search(r"white-space:nowrap'>input_ids</td>", io)
    assert re.search(r"white-space:nowrap'>-?\d+</td>", ops)


def test_stop_all_ends_every_server(compiled_tiny):
    servers = [NetronServer(compiled_tiny.export_result.path).start() for _ in range(2)]
    assert stop_all() >= 2
    assert not any(s.running for s in servers)


def test_netron_can_show_just_the_part_that_computes_some_outputs(compiled_tiny, tmp_path):
    src = compiled_tiny.export_result.path
    full = onnx.load(str(src))
    target = next(n for n in full.graph.node if n.op_type == "MatMul").output[0]  # the first layer's first matmul
    with NetronServer(src, scratch=tmp_path, outputs=[target]) as server:
        assert server.weightless
        status, data = get(server.url + "data/" + server.served_path.name)
        part = onnx.load_from_string(data)
    assert [o.name for o in part.graph.output] == [target]
    assert 0 < len(part.graph.node) < len(full.graph.node) / 4
    assert [i.name for i in part.graph.input] == ["input_ids"]  # the mask does not feed the first projection
    with pytest.raises(ValueError, match="No tensor named 'nope' in this graph; its outputs include output"):
        weightless_copy(src, tmp_path / "x.onnx", outputs=["nope"])
    view = graph_view(compiled_tiny, netron_outputs=[target])
    try:
        assert f"computes {target}" in view.frame.value and "<iframe" in view.frame.value
    finally:
        view.stop()


def test_skeleton_is_the_model_without_initializer_data(compiled_tiny, tmp_path):
    from qeff_lab.onnx.inspect import load_skeleton

    src = compiled_tiny.export_result.path
    full, skel = onnx.load(str(src)), load_skeleton(src)
    assert skel.graph.node == full.graph.node and skel.graph.input == full.graph.input
    assert skel.graph.output == full.graph.output and skel.opset_import == full.opset_import
    assert [(t.name, t.data_type, list(t.dims)) for t in skel.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in full.graph.initializer]
    assert all(not t.raw_data and not t.float_data for t in skel.graph.initializer)
    for t in full.graph.initializer:  # what was dropped is exactly the data
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int64_data")
    assert skel == full
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(Exception):
        load_skeleton(tmp_path / "junk.onnx")
