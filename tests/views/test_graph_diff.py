"""The graph diff of fix_precision: which scopes' nodes became the safe forms, read from the two real exports."""
import pytest

from qeff_lab.views.graph_diff import graph_diff_frame, render_graph_diff

from tests.views.conftest import tiny_model


def test_fix_precision_diff_names_the_scopes_that_changed(tmp_path):
    model = tiny_model("tiny-bert-diff")
    before = model.export()
    model.fix_precision()
    after = model.export()
    assert before != after
    frame = graph_diff_frame(before, after)
    # the fixes' scopes only: safe LayerNorms, attention with 1/sqrt(d) folded into q (nothing renumbered)
    assert len(frame) and all(s.endswith("LayerNorm") or "/attention/" in s for s in frame["scope"]), frame
    norms = frame[frame["scope"].str.endswith("LayerNorm")]
    assert len(norms) == 5 and (norms["after"] == "com.qeff_lab::SafeLayerNorm").all()  # embeddings + 2 per layer
    assert all(b != a for b, a in zip(frame["before"], frame["after"]))
    page = render_graph_diff(before, after)
    assert f"{len(frame)} scope(s) changed" in page and "<details" in page
    assert "same ops in every scope" in render_graph_diff(before, before)
    with pytest.raises(FileNotFoundError, match="export the model first"):
        graph_diff_frame(tmp_path / "none.onnx", after)
