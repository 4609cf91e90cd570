"""The static HTML report: self-contained (no script, no remote URL), every step, graph tables, plots, findings."""
import base64
import re
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest

from qeff_lab.pipeline import StepReport
from qeff_lab.views.report import FIGURES, report_html
from qeff_lab.views.tables import COLORS

from tests.views.conftest import tiny_model


class Page(HTMLParser):
    """Collects tags with their attributes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def test_report_is_self_contained_and_shows_every_step(compiled_tiny, tmp_path):
    path = compiled_tiny.report(tmp_path / "sub" / "report.html")
    assert path == tmp_path / "sub" / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.all("script") and not page.all("link") and "@import" not in text
    for tag, attrs in page.tags:  # nothing to fetch: every src is inline data, every href an anchor
        assert not attrs.get("src", "data:").startswith(("http", "//", "/")), (tag, attrs)
        assert attrs.get("href", "#").startswith("#"), (tag, attrs)
    steps = page.all("table", "qeff-steps")
    assert len(steps) == 1
    sections = [a["id"] for a in page.all("section")]
    assert sections == [f"step-{name}" for name in compiled_tiny.steps]
    body = "".join(page.text)
    for report in compiled_tiny.steps.values():
        assert report.summary in body
    assert "inputs and outputs" in body and "op counts before / after the ONNX passes" in body
    assert "not run: analyze, generate, compare" in body


def test_plots_are_embedded_pngs(compiled_tiny):
    page = Page(report_html(compiled_tiny))
    imgs = page.all("img", "plot")
    assert len(imgs) >= 1 and imgs[0]["alt"] == "time per step"
    for img in imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix):])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


@dataclass
class Finding:
    place: str
    op: str
    value: float
    limit: float
    severity: str
    fix: str


@dataclass
class Analysis:
    findings: list

    def figures(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3, 2))
        fig.add_subplot().imshow([[0, 1], [1, 0]])
        return [fig]


def test_findings_and_step_figures_appear_when_present():
    model = tiny_model("tiny-findings")
    model._record(StepReport("analyze", "done", 2.0, "2 findings", Analysis([
        Finding("model.layers.7.input_layernorm", "pow", 4.8e8, 65504.0, "overflow", "overflow-safe RMSNorm"),
        Finding("model.layers.2.mlp", "mul", 3e-9, 6.1e-5, "underflow", "fp32 island")])))
    default = FIGURES["analyze"]
    FIGURES["analyze"] = lambda report: [Analysis([]).figures()[0]]
    try:
        text = report_html(model)
    finally:
        FIGURES["analyze"] = default
    page = Page(text)
    (table,) = page.all("table", "qeff-findings")
    assert "findings (2)" in "".join(page.text)
    assert "model.layers.7.input_layernorm" in text and "overflow-safe RMSNorm" in text
    assert "<td style='border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top'>4.8e+08</td>" in text
    overflow_cell = re.search(r"<td style='[^']*background:(#[0-9a-f]{6})'>overflow</td>", text)
    underflow_cell = re.search(r"<td style='[^']*background:(#[0-9a-f]{6})'>underflow</td>", text)
    assert overflow_cell.group(1) == COLORS["overflow"] and underflow_cell.group(1) == COLORS["underflow"]
    assert len(page.all("img", "plot")) == 3  # durations + the registered figure + the details' own figures()


def test_a_model_with_no_steps_is_a_clear_error(fresh_tiny):
    fresh_tiny.steps.clear()
    with pytest.raises(ValueError, match="has no steps recorded yet"):
        report_html(fresh_tiny)


def test_precision_report_of_a_real_analyze_shows_findings_and_the_heatmap(tmp_path):
    """A tiny random Llama, analyzed by the precision lab: its findings table and heatmap reach the report."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qeff_lab import QEFFAutoModelForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                      max_position_embeddings=128)).eval()
    with torch.no_grad():  # a residual stream as large as SmolLM2's massive activations: x*x overflows fp16
        hf.model.embed_tokens.weight[5].fill_(2.0e4)
    model = QEFFAutoModelForCausalLM.from_model(hf, name="tiny-llama")
    report = model.analyze(torch.tensor([[1, 5, 7, 9]]), progress=False)
    assert any(f.kind == "norm-square" for f in report.findings)
    text = model.report(tmp_path / "r.html").read_text()
    page = Page(text)
    assert len(page.all("table", "qeff-findings")) == 1  # one row per root cause...
    causes = report.findings.causes()
    headline = report.findings.headline()
    assert headline.startswith(f"{len(causes)} cause") and f"over {len(report.findings)} place" in headline
    # one count wording everywhere: the steps table, the Findings section, the analyze section's head
    assert "".join(page.text).count(headline) == 3, headline
    assert text.count("fix: ") - text.count("; fix: ") == len(causes)  # each cause's fix said once, not per place
    assert len(page.all("table", "qeff-findings-places")) == len(causes)  # ...each expandable to its places
    assert f"background:{COLORS['failed']}'>error</td>" in text  # severity "error" in the palette's red
    alts = [a["alt"] for a in page.all("img", "plot")]
    assert alts == ["time per step", "analyze plot 1"]  # durations, then the precision heatmap
