"""The encoder ladder on all-MiniLM-L6-v2: cosine against HF fp32 for each step towards the device."""
import pytest

pytestmark = pytest.mark.slow


def test_minilm_ladder_cosines(tmp_path, monkeypatch):
    from qeff_lab import QEFFAutoModel
    from qeff_lab.accuracy import encoder_ladder

    monkeypatch.setenv("QEFF_LAB_CACHE", str(tmp_path))
    model = QEFFAutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", pooling="mean")
    texts = ["My name is", "The quick brown fox jumps over the lazy dog.", "fp16 keeps eleven significant bits"]
    report = encoder_ladder(model, progress=False)  # default: 128 sentences of the shipped text
    s = report.summary.set_index("rung")
    assert (s["sentences"] >= 100).all()
    assert (s["min_cosine"] <= s["p1_cosine"]).all() and (s["p1_cosine"] <= s["median_cosine"]).all()
    assert list(s.index) == ["HF fp32", "transformed fp32", "ORT fp32", "fp16 (no fixes)", "fp16 (fixes)",
                             "fp16 + MXFP6"]
    assert s.loc["HF fp32", "min_cosine"] == pytest.approx(1.0)
    assert s.loc["transformed fp32", "min_cosine"] > 0.99999 and s.loc["ORT fp32", "min_cosine"] > 0.99999
    assert s.loc["fp16 (fixes)", "min_cosine"] > 0.999
    assert 0.9 < s.loc["fp16 + MXFP6", "min_cosine"] < s.loc["fp16 (fixes)", "min_cosine"] + 1e-9
    assert report.kind == "encoder" and "6 rungs" in repr(report)
    # the lab also profiles an encoder through the model's own analyze
    prec = model.analyze(texts[:2])
    assert prec.inputs == 2 and "analyze" in model.steps
