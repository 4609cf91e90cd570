"""The pipeline dashboard as a widget, without a browser: rows from model.steps, clicks open views, live progress."""
import html
import re
import time
from dataclasses import dataclass

import ipywidgets as widgets
import pandas as pd
import pytest
from ipywidgets.embed import embed_data

from qeff_lab.pipeline import StepReport
from qeff_lab.views.dashboard import PASSES_ROW, Dashboard, dashboard, register_step_view, STEP_VIEWS
from qeff_lab.views.graph import GraphView
from qeff_lab.views.tables import COLORS

from tests.views.conftest import tiny_model


def eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def rows(dash: Dashboard) -> list[tuple[str, str, str]]:
    """(button text, badge text, summary text) for each row, read off the widgets as the user sees them."""
    cells = dash.table.children
    out = []
    for i in range(0, len(cells), 4):
        badge = re.sub(r"<[^>]+>", "", cells[i + 1].value)
        summary = html.unescape(re.sub(r"<[^>]+>", "", cells[i + 3].value))
        out.append((cells[i].description, badge, summary))
    return out


def test_fresh_model_shows_recorded_steps_then_the_stages_to_come(fresh_tiny):
    dash = dashboard(fresh_tiny)
    got = rows(dash)
    assert [r[0] for r in got] == ["load", "analyze", "transform", "export", "compile", "generate", "compare"]
    assert [r[1] for r in got] == ["done", "pending", "done", "pending", "pending", "pending", "pending"]
    assert got[2][2] == fresh_tiny.steps["transform"].summary
    assert dash.buttons["export"].disabled and not dash.buttons["load"].disabled
    assert "2 step(s) done" in dash.header.value


def test_compiled_model_rows_include_onnx_passes_under_export(compiled_tiny):
    dash = dashboard(compiled_tiny)
    names = [r[0] for r in rows(dash)]
    assert names[:6] == ["load", "analyze", "transform", "export", "└ " + PASSES_ROW, "compile"]
    passes_summary = dict((r[0], r[2]) for r in rows(dash))["└ " + PASSES_ROW]
    assert "FP16ClipConstants" in passes_summary and "ExternalData" in passes_summary
    badge_html = dash.table.children[names.index("compile") * 4 + 1].value
    assert COLORS[compiled_tiny.steps["compile"].status] in badge_html


def test_clicking_a_step_opens_its_view(compiled_tiny):
    dash = dashboard(compiled_tiny)
    assert dash.detail.children == ()
    dash.buttons["load"].click()
    assert dash.selected == "load"
    (view,) = dash.detail.children
    assert "tiny-bert" in view.value and "load" in view.value
    assert dash.buttons["load"].style.button_color == "#e3f2fd"

    dash.buttons["export"].click()
    (view,) = dash.detail.children
    graph = [c for c in view.children if isinstance(c, GraphView)]
    assert len(graph) == 1 and graph[0].server is None  # netron starts only when asked
    assert "input_ids" in graph[0].children[2].children[1].value
    assert dash.buttons["load"].style.button_color is None

    dash.buttons[PASSES_ROW].click()
    assert "FP16ClipConstants" in dash.detail.children[0].value

    dash.buttons["compile"].click()
    assert "specializations" in dash.detail.children[0].value


def test_whole_state_serializes_for_the_frontend(compiled_tiny):
    dash = dashboard(compiled_tiny)
    dash.buttons["compile"].click()
    state = embed_data(views=[dash])
    models = state["manager_state"]["state"]
    assert len(models) > 20
    kinds = {m["model_name"] for m in models.values()}
    assert {"VBoxModel", "GridBoxModel", "ButtonModel", "HTMLModel", "FloatProgressModel"} <= kinds
    assert dash.get_state()["_dom_classes"] == ("qeff-dashboard",)


def test_repr_is_short_and_deterministic(compiled_tiny):
    text = repr(dashboard(compiled_tiny))
    assert text == repr(dashboard(compiled_tiny))
    assert text == "<Dashboard tiny-bert: load, transform, export, compile>"
    many = tiny_model("an-org/a-model-with-a-rather-long-name-indeed")
    for i in range(8):
        many._record(StepReport(f"extra-step-{i}", "done", 0.1, "x"))
    assert repr(dashboard(many)) == "<Dashboard a-model-with-a-rather-long-name-indeed: 10 steps>"


def test_watch_shows_running_elapsed_and_progress_then_the_new_step():
    model = tiny_model("tiny-watch")
    dash = Dashboard(model, tick=0.05)
    with dash.watch("export") as progress:
        assert dict((r[0], r[1]) for r in rows(dash))["export"] == "running"
        assert dash.buttons["export"].disabled
        assert dash.progress.layout.visibility == "visible"
        idx = list(dash.buttons).index("export") * 4
        # the ticker thread redraws the elapsed time, then the reported progress (poll: the machine may be busy)
        assert eventually(lambda: re.search(r"0\.[1-9]\d?s|\d\.\d\ds", dash.table.children[idx + 2].value))
        progress.update(0.25, "tracing")
        assert eventually(lambda: dash.progress.value == 0.25 and dash.progress.description == "25%")
        assert eventually(lambda: "tracing" in dash.table.children[idx + 3].value)
        model.export()
    assert dash.running is None and dash.progress.layout.visibility == "hidden"
    got = dict((r[0], r[1]) for r in rows(dash))
    assert got["export"] in ("done", "reused") and not dash.buttons["export"].disabled
    assert "└ " + PASSES_ROW in got


def test_run_returns_the_result_and_a_failure_is_shown_and_raised(fresh_tiny):
    dash = Dashboard(fresh_tiny, tick=0.05)
    assert dash.run("compare", lambda x: x * 2, 21) == 42
    with pytest.raises(ValueError, match="bad seq_len"):
        with dash.watch("compile"):
            raise ValueError("bad seq_len")
    last = rows(dash)[-1]
    assert last == ("compile", "failed", "ValueError: bad seq_len")
    with pytest.raises(RuntimeError, match="already watching"):
        with dash.watch("export"):
            with dash.watch("compile"):
                pass


@dataclass
class _Profile:
    """Stands in for another owner's report type: any details with a _repr_html_ draw themselves."""

    rows: int

    def _repr_html_(self):
        return f"<div class='profile'>{self.rows} rows profiled</div>"


def test_steps_added_by_other_paths_show_up_with_their_own_views(fresh_tiny):
    fresh_tiny._record(StepReport("analyze", "done", 1.5, "3 findings", _Profile(12)))
    fresh_tiny._record(StepReport("compare", "done", 0.5, "fp32 -> fp16", pd.DataFrame({"rung": ["fp32"], "match": [1.0]})))
    dash = dashboard(fresh_tiny)
    got = rows(dash)
    assert ("analyze", "done", "3 findings") in got
    assert [r[0] for r in got].index("compare") > [r[0] for r in got].index("analyze")
    assert [r[0] for r in got].count("compare") == 1  # the recorded step fills its stage's row
    dash.buttons["analyze"].click()
    assert "12 rows profiled" in dash.detail.children[0].value
    dash.buttons["compare"].click()
    assert "<table" in dash.detail.children[0].value and "fp32" in dash.detail.children[0].value

    calls = []
    own = STEP_VIEWS["compare"]
    register_step_view("compare")(lambda report: calls.append(report.step) or widgets.Label("custom"))
    try:
        dash.buttons["compare"].click()
        assert calls == ["compare"] and dash.detail.children[0].value == "custom"
    finally:
        STEP_VIEWS["compare"] = own


def test_view_of_an_unknown_step_is_a_clear_error(fresh_tiny):
    with pytest.raises(KeyError, match="No step 'compile' recorded yet; recorded: load, transform"):
        dashboard(fresh_tiny).view_for("compile")
    with pytest.raises(TypeError, match="needs a QEFF model"):
        dashboard(object())


def test_a_step_that_records_no_report_keeps_the_row_the_dashboard_saw(fresh_tiny):
    class Result:
        def summary(self):
            return "1 prompt(s), 16 new tokens"

        def _repr_html_(self):
            return "<b>16 new tokens</b>"

    class Opaque:
        def __repr__(self):
            return "<Opaque 1 prompt(s)>"

    dash = Dashboard(fresh_tiny, tick=0.05)
    out = dash.run("generate", lambda: Result())
    assert isinstance(out, Result) and "generate" not in fresh_tiny.steps
    got = dict((r[0], r[1:]) for r in rows(dash))
    assert got["generate"] == ("done", "1 prompt(s), 16 new tokens")
    assert list(got).count("generate") == 1  # the observed step fills the "generate" stage
    dash.buttons["generate"].click()
    assert "<b>16 new tokens</b>" in dash.detail.children[0].value
    dash.run("export", lambda: Opaque())  # no summary of its own: words, never the class name
    summary = dict((r[0], r[2]) for r in rows(dash))["export"]
    assert "Opaque" not in summary and summary.startswith("done")


def test_pending_stages_say_how_to_run_them(fresh_tiny):
    dash = dashboard(fresh_tiny)
    got = dict((r[0], r[2]) for r in rows(dash))
    assert got["compare"].startswith("not run yet: dash.run(\"compare\", causal_lm_ladder")
    assert "causal_lm_ladder" in dash.buttons["compare"].tooltip and dash.buttons["compare"].disabled


def test_a_call_longer_than_the_step_says_what_the_row_shows(fresh_tiny):
    dash = Dashboard(fresh_tiny, tick=0.05)

    def generate():  # the step reports 0.1 s of its own; the call takes longer (opening a session, say)
        time.sleep(0.6)
        fresh_tiny.steps["generate"] = StepReport("generate", "done", 0.1, "1 prompt(s), 4 new tokens")

    dash.run("generate", generate)
    summary = dict((r[0], r[2]) for r in rows(dash))["generate"]
    took = re.match(r"1 prompt\(s\), 4 new tokens · the call took (\d+\.\d\d)s in all; the row shows the step's own", summary)
    assert took and float(took.group(1)) >= 0.6, summary


def test_stored_output_carries_a_static_html_copy(compiled_tiny):
    dash = dashboard(compiled_tiny)
    dash.select("compile")
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # a live front end still shows the widget
    static = bundle["text/html"]
    for name, *_ in rows(dash):
        assert f">{name.lstrip('└ ')}<" in static, name
    assert "class='qeff-steps'" in static and "specializations" in static  # the rows and the selected view
    assert "not run yet" in static and "run the notebook" in static


def test_compare_step_opens_the_ladder_view(fresh_tiny, tmp_path):
    from qeff_lab.accuracy.ladder import LadderReport, SUMMARY_COLUMNS

    summary = pd.DataFrame([
        {"rung": "HF fp32", "token_match": 1.0, "top1_agreement": 1.0, "kl_mean": 0.0, "perplexity": 31.0},
        {"rung": "fp16 (no fixes)", "token_match": 0.0, "top1_agreement": 0.02, "kl_mean": 9.1, "perplexity": 3.5e4},
    ], columns=SUMMARY_COLUMNS)
    per_prompt = pd.DataFrame([
        {"rung": "HF fp32", "prompt": 0, "text": "Paris."},
        {"rung": "fp16 (no fixes)", "prompt": 0, "text": "<|endoftext|>"}])
    ladder = LadderReport(summary, per_prompt, "HF fp32", text_tokens=32, generation_len=8)
    dash = Dashboard(fresh_tiny, tick=0.05)
    dash.run("compare", lambda: ladder)
    got = dict((r[0], r[1:]) for r in rows(dash))
    assert got["compare"][0] == "done" and "fp16 (no fixes)" in got["compare"][1]
    assert not dash.buttons["compare"].disabled
    dash.buttons["compare"].click()
    (view,) = dash.detail.children
    html_part, image = view.children
    assert "accuracy ladder" in html_part.value and "Paris." in html_part.value
    assert isinstance(image, widgets.Image) and image.value[:4] == b"\x89PNG"
    page = dash.report(tmp_path / "report.html").read_text()  # the report covers the dashboard's steps too
    assert "id='step-compare'" in page and "Paris." in page and "compare plot 1" in page


def test_redrawing_frees_the_old_widgets(compiled_tiny):
    from ipywidgets.widgets.widget import _instances

    dash = dashboard(compiled_tiny)
    dash.select("load")
    live = len(_instances)
    for _ in range(5):
        dash.refresh()
        dash.buttons["compile"].click()
        dash.buttons["load"].click()
    assert len(_instances) == live  # rows and views are rebuilt, not piled up
