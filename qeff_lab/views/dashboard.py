"""Pipeline dashboard: one row per step (status, duration, summary), click a step to open its view, live progress."""
from __future__ import annotations

import html
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ipywidgets as widgets
import pandas as pd

from qeff_lab.contracts import Step
from qeff_lab.views.fallback import StaticFallback
from qeff_lab.views.tables import COLORS, _badge, _details_html, figure_png, steps_table_html

# The stages a model goes through, in order. A stage counts as run when any of its step names is in model.steps;
# the ones not run yet are listed after the recorded steps, greyed out.
# Step names are the ones the models record (qeff_lab.contracts.Step).
STAGES: list[tuple[str, tuple[str, ...]]] = [
    (Step.LOAD, (Step.LOAD,)),
    (Step.ANALYZE, (Step.ANALYZE,)),
    (Step.TRANSFORM, (Step.TRANSFORM, Step.PRECISION_FIXES)),
    (Step.EXPORT, (Step.EXPORT,)),
    (Step.COMPILE, (Step.COMPILE,)),
    (Step.GENERATE, (Step.GENERATE,)),
    (Step.COMPARE, (Step.COMPARE,)),
]
PASSES_ROW = "onnx passes"  # shown under "export", from the export step's own report
# What a pending stage's row says: how to run it (shown as its summary and its button's tooltip).
HOW_TO_RUN = {
    Step.ANALYZE: "model.analyze(prompts)",
    Step.EXPORT: "model.export()",
    Step.COMPILE: "model.compile(...)",
    Step.GENERATE: "model.generate(tokenizer, prompts)",
    Step.COMPARE: "dash.run(\"compare\", causal_lm_ladder, hf_model, tokenizer, prompts, qeff_model=model): "
                  "accuracy before / after, rung by rung",
}

# step name (or kind of details) -> a function building that step's view widget; other owners may register theirs.
STEP_VIEWS: dict[str, Callable[[Any], widgets.Widget]] = {}


def register_step_view(step: str):
    """Decorator: `@register_step_view("analyze") def view(report) -> widget` makes the dashboard open it."""
    def deco(fn):
        STEP_VIEWS[step] = fn
        return fn
    return deco


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def pending_stages(steps: dict) -> list[str]:
    """The canonical stages none of whose step names has been recorded yet."""
    return [stage for stage, names in STAGES if not any(n in steps for n in names)]


def step_detail_html(report, body: str | None = None) -> str:
    """The HTML for one step's details: the object's own _repr_html_ when it has one, else the shared renderers
    (`body`: this HTML instead)."""
    details = report.details
    head = (f"<div class='qeff-step-head'><b>{html.escape(report.step)}</b> {_badge(report.status)} "
            f"{_fmt_seconds(report.seconds)} — {html.escape(report.summary)}</div>")
    if body is not None:
        return head + body
    if hasattr(details, "_repr_html_") and not isinstance(details, (pd.DataFrame, dict, list)):
        try:
            return head + details._repr_html_()
        except Exception as exc:  # a view must not break the dashboard; say what failed instead
            return head + f"<pre>could not draw {type(details).__name__}: {html.escape(str(exc))}</pre>"
    return head + _details_html(details)


def default_step_view(report) -> widgets.Widget:
    view = widgets.HTML(step_detail_html(report))
    view.add_class("qeff-step-view")
    return view


def export_step_view(report) -> widgets.Widget:
    """The export step opens the graph view (tables at once; netron on request, it starts a server)."""
    from qeff_lab.views.graph import graph_view

    path = getattr(report.details, "path", None)
    if path is None or not path.is_file():
        return default_step_view(report)
    return widgets.VBox([default_step_view(report), graph_view(report.details, netron=False)])


STEP_VIEWS["export"] = export_step_view


def passes_step_view(report) -> widgets.Widget:
    from qeff_lab.views.tables import render_transform

    passes = getattr(report.details, "passes", []) or []
    return widgets.HTML("<div><b>ONNX passes</b> (part of export)</div>" + "".join(render_transform(p) for p in passes))


def compare_step_view(report) -> widgets.Widget:
    """The compare step: the accuracy ladder's table and generated texts, and its figure (log-scale perplexity,
    top-1 agreement, KL per rung)."""
    details = report.details
    if not hasattr(details, "summary") or not hasattr(details, "per_prompt"):
        return default_step_view(report)
    from qeff_lab.views.precision import ladder_figure

    image = widgets.Image(value=figure_png(ladder_figure(details)), format="png",
                          layout=widgets.Layout(max_width="100%"))
    view = widgets.VBox([default_step_view(report), image])
    view.add_class("qeff-compare-view")
    return view


STEP_VIEWS[Step.COMPARE] = compare_step_view


class _Running:
    """The state of a step being run under the dashboard: elapsed time ticks, progress when the step reports it."""

    def __init__(self, step: str):
        self.step = step
        self.start = time.perf_counter()
        self.fraction: float | None = None
        self.note = ""
        self.result: Any = None

    def update(self, fraction: float | None = None, note: str = "") -> None:
        """Report progress from inside the step: `fraction` in [0, 1] (None: unknown), and a short note."""
        self.fraction = None if fraction is None else min(max(float(fraction), 0.0), 1.0)
        self.note = note


class Dashboard(StaticFallback, widgets.VBox):
    """The pipeline of one model at a glance.

    One row per recorded step (status badge, duration, one-line summary) plus the stages still to come; click a
    step's button to open its view below. `with dash.watch("compile"): model.compile(...)` (or
    `dash.run("compile", model.compile, ...)`) shows the step as running, with elapsed time and progress, while it
    works, and refreshes from `model.steps` when it ends. `refresh()` redraws after steps run elsewhere.
    A row's time is the step's own report's; when the call under the dashboard took longer (a session opened,
    inputs tokenized), the row says so. Stored in a notebook, it carries a static HTML copy (`static_html()`).
    """

    static_note = "a static copy of the dashboard: run the notebook to click through the steps"

    def __init__(self, model, tick: float = 0.5):
        self.model = model
        self.tick = tick
        self.selected: str | None = None
        self.running: _Running | None = None
        self.observed: dict[str, Any] = {}  # steps run under watch() that the model did not record itself
        self.wall: dict[str, float] = {}  # seconds each call under watch() took, start to end
        self.buttons: dict[str, widgets.Button] = {}
        self.header = widgets.HTML()
        self.table = widgets.GridBox(layout=widgets.Layout(
            grid_template_columns="150px 80px 70px 1fr", grid_gap="2px 8px", align_items="center"))
        self.table.add_class("qeff-dashboard-steps")
        self.progress = widgets.FloatProgress(min=0.0, max=1.0, value=0.0, bar_style="info",
                                              # no margin: 100% plus the widgets' 2 px each side overflowed the
                                              # output area by 4 px (a sideways scrollbar under the dashboard)
                                              layout=widgets.Layout(width="100%", margin="0", visibility="hidden"))
        self.detail = widgets.VBox()
        self.detail.add_class("qeff-dashboard-detail")
        self._ticker: threading.Thread | None = None
        self._stop_tick = threading.Event()
        self.add_class("qeff-dashboard")
        super().__init__(children=[self.header, self.table, self.progress, self.detail])
        self.refresh()

    # ------------------------------------------------------------------ rows
    @property
    def steps(self) -> dict:
        """The model's step reports, then the ones this dashboard observed (a step that records no report)."""
        steps = dict(self.model.steps)
        for name, report in self.observed.items():
            steps.setdefault(name, report)
        return steps

    def _rows(self) -> list[tuple[str, str, float | None, str]]:
        """(name, status, seconds, summary) for every row, in display order."""
        steps = self.steps
        stage_of = {n: i for i, (_, names) in enumerate(STAGES) for n in names}
        running = self.running.step if self.running is not None else None
        waiting = [(stage_of[names[0]], stage) for stage, names in STAGES
                   if stage in pending_stages(steps) and running not in names]
        rows = []
        for name, r in steps.items():
            while waiting and name in stage_of and waiting[0][0] < stage_of[name]:
                rows.append(self._pending_row(waiting.pop(0)[1]))
            rows.append((name, r.status, r.seconds, r.summary + self._wall_note(name, r)))
            if name == "export" and getattr(r.details, "passes", None) is not None:
                passes = r.details.passes
                n = sum(len(p.changes) for p in passes)
                rows.append((PASSES_ROW, r.status, None,
                             f"{len(passes)} pass(es), {n} change(s): " + "; ".join(p.summary() for p in passes)))
        if running is not None and running not in steps:
            while waiting and running in stage_of and waiting[0][0] < stage_of[running]:
                rows.append(self._pending_row(waiting.pop(0)[1]))
            rows.append((running, "running", None, "…"))
        rows += [self._pending_row(stage) for _, stage in waiting]
        return rows

    @staticmethod
    def _pending_row(stage: str) -> tuple[str, str, None, str]:
        how = HOW_TO_RUN.get(stage)
        return (stage, "pending", None, f"not run yet: {how}" if how else "not run yet")

    def _wall_note(self, name: str, report) -> str:
        """When the call under watch() took clearly longer than the step's own time, say what the row shows."""
        wall = self.wall.get(name)
        if wall is None or name in self.observed or wall < report.seconds * 1.2 + 0.2:
            return ""
        return (f" · the call took {_fmt_seconds(wall)} in all; the row shows the step's own time "
                "(e.g. prefill + decode), the rest opened the session and prepared inputs")

    def refresh(self) -> None:
        old = self.table.children
        cells: list[widgets.Widget] = []
        self.buttons = {}
        for name, status, seconds, summary in self._rows():
            if self.running is not None and name == self.running.step:
                status, seconds = "running", time.perf_counter() - self.running.start
                summary = self.running.note or "running…"
            tip = f"open the {name} view" if status != "pending" else f"not run yet: {HOW_TO_RUN.get(name, name)}"
            button = widgets.Button(description=name, tooltip=tip,
                                    disabled=status in ("pending", "running"),
                                    layout=widgets.Layout(width="145px"))
            if name == PASSES_ROW:
                button.description = "└ " + name
            button.style.button_color = "#e3f2fd" if name == self.selected else None
            button.on_click(lambda _b, n=name: self.select(n))
            button.add_class("qeff-step-button")
            self.buttons[name] = button
            colour = COLORS["muted"] if status == "pending" else "inherit"
            cells += [button, widgets.HTML(_badge(status)),
                      widgets.HTML(f"<span style='font-family:ui-monospace,monospace'>{_fmt_seconds(seconds)}</span>"),
                      widgets.HTML(f"<span style='color:{colour}'>{html.escape(summary)}</span>")]
        self.table.children = cells
        for w in old:  # the rows are rebuilt: free the old widgets (front-end models included)
            close_widget(w)
        self.header.value = self._header_html("Click a step to see it.")

    def _header_html(self, tail: str) -> str:
        done = sum(1 for r in self.steps.values() if r.status in ("done", "reused"))
        total = sum(r.seconds for r in self.steps.values())
        return (f"<div style='font-size:14px'><b>{html.escape(type(self.model).__name__)}</b> "
                f"{html.escape(self.model.model_name)} — {done} step(s) done, {_fmt_seconds(total)} "
                f"in all. {tail}</div>")

    def static_html(self) -> str:
        """The dashboard as static HTML: the header, one row per step (pending stages included), and the view of
        the selected step (HTML parts only)."""
        table = steps_table_html([(name, status, _fmt_seconds(seconds), summary)
                                  for name, status, seconds, summary in self._rows()])
        detail = ""
        if self.selected is not None:
            report = self.steps["export"] if self.selected == PASSES_ROW else self.steps[self.selected]
            detail = (f"<div style='margin-top:6px'>view of <b>{html.escape(self.selected)}</b>:</div>"
                      + step_detail_html(report))
        return f"<div class='qeff-dashboard-static'>{self._header_html('')}{table}{detail}</div>"

    # ------------------------------------------------------------------ views
    def view_for(self, name: str) -> widgets.Widget:
        """The widget a click on `name` opens (built from its report only)."""
        steps = self.steps
        if name == PASSES_ROW:
            return passes_step_view(steps["export"])
        if name not in steps:
            raise KeyError(f"No step {name!r} recorded yet; recorded: {', '.join(steps) or 'none'}.")
        report = steps[name]
        return STEP_VIEWS.get(name, default_step_view)(report)

    def select(self, name: str) -> None:
        self.selected = name
        old = self.detail.children
        self.detail.children = [self.view_for(name)]
        for w in old:
            close_widget(w)
        for n, b in self.buttons.items():
            b.style.button_color = "#e3f2fd" if n == name else None

    # ------------------------------------------------------------------ running steps
    def _tick_loop(self) -> None:
        while not self._stop_tick.wait(self.tick):
            self._show_running()

    def _show_running(self) -> None:
        r = self.running
        if r is None:
            return
        self.progress.layout.visibility = "visible"
        if r.fraction is None:  # unknown length: a bar that sweeps, so the user sees it is alive
            self.progress.value = ((time.perf_counter() - r.start) / 4.0) % 1.0
            self.progress.description = ""
        else:
            self.progress.value = r.fraction
            self.progress.description = f"{r.fraction:.0%}"
        cells = self.table.children
        names = list(self.buttons)
        if r.step in names:
            i = names.index(r.step) * 4
            cells[i + 2].value = (f"<span style='font-family:ui-monospace,monospace'>"
                                  f"{_fmt_seconds(time.perf_counter() - r.start)}</span>")
            cells[i + 3].value = html.escape(r.note or "running…")

    @contextmanager
    def watch(self, step: str) -> Iterator[_Running]:
        """Show `step` as running (elapsed time, progress) while the body runs; refresh from the reports after.

        The body may call `progress.update(fraction, note)` on the value it gets. On an error the row shows the
        error and the exception propagates. A step that records no report of its own (model.steps unchanged)
        keeps a row of what the dashboard saw: its time and, from `run`, what it returned."""
        if self.running is not None:
            raise RuntimeError(f"The dashboard is already watching {self.running.step!r}.")
        before = self.model.steps.get(step)
        self.running = _Running(step)
        self.refresh()
        self._show_running()
        self._stop_tick.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="qeff-dashboard-tick", daemon=True)
        self._ticker.start()
        failed: BaseException | None = None
        try:
            yield self.running
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._stop_tick.set()
            self._ticker.join()
            self._ticker = None
            running, self.running = self.running, None
            self.wall[step] = time.perf_counter() - running.start
            if failed is None and self.model.steps.get(step) is before:
                self.observed[step] = _observed_report(step, running)
            self.progress.layout.visibility = "hidden"
            self.progress.value = 0.0
            self.refresh()
            if failed is not None:  # the newest thing known about this step, even when an older report exists
                self._show_failure(step, failed)

    def _show_failure(self, step: str, exc: BaseException) -> None:
        self.table.children = list(self.table.children) + [
            widgets.Button(description=step, disabled=True, layout=widgets.Layout(width="145px")),
            widgets.HTML(_badge("failed")), widgets.HTML(""),
            widgets.HTML(f"<span style='color:{COLORS['failed']}'>{html.escape(type(exc).__name__)}: "
                         f"{html.escape(str(exc))}</span>")]

    def run(self, step: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` shown as `step` while it runs; returns what fn returns."""
        with self.watch(step) as running:
            running.result = fn(*args, **kwargs)
            return running.result

    def report(self, path, title: str | None = None):
        """The static HTML report (views.report) of every row here: the model's steps and those run under this
        dashboard that the model does not record (e.g. compare). Returns the path written."""
        from qeff_lab.pipeline import show  # the registered report view (views.report imports this module)

        return show(self.model, "report", path, title=title, steps=self.steps)

    def __repr__(self) -> str:
        # Short (front ends cut widget reprs at 110 characters) and the same on every run: step names, no
        # statuses or times ("reused" or "done" depends on the artifact cache).
        name = self.model.model_name.rsplit("/", 1)[-1]
        steps = ", ".join(self.steps) or "no steps"
        text = f"<Dashboard {name}: {steps}>"
        return text if len(text) <= 100 else f"<Dashboard {name}: {len(self.steps)} steps>"


def close_widget(w: widgets.Widget) -> None:
    """Close a widget, its children, layout and style (and stop a graph view's netron)."""
    for child in getattr(w, "children", ()):
        close_widget(child)
    stop = getattr(w, "stop", None)
    if callable(stop) and hasattr(w, "server"):
        stop()
    for part in (getattr(w, "layout", None), getattr(w, "style", None)):
        if isinstance(part, widgets.Widget):
            part.close()
    w.close()


# class name -> a one-line summary of what a step run under the dashboard returned (other owners may add theirs)
STEP_SUMMARIES: dict[str, Callable[[Any], str]] = {}


def result_summary(result) -> str:
    """A one-line summary of what a step returned, in words (never a bare class name)."""
    for cls in type(result).__mro__:
        if cls.__name__ in STEP_SUMMARIES:
            return STEP_SUMMARIES[cls.__name__](result)
    summary = getattr(result, "summary", None)
    summary = summary() if callable(summary) else summary
    if isinstance(summary, str):
        return summary
    if result is None:
        return "done"
    if isinstance(result, (str, int, float, Path)):
        return str(result) if not isinstance(result, Path) else f"wrote {result.name}"
    return "done: click to see what it returned"


def _observed_report(step: str, running: _Running):
    from qeff_lab.pipeline import StepReport

    return StepReport(step, "done", time.perf_counter() - running.start, result_summary(running.result),
                      running.result)


def dashboard(model) -> Dashboard:
    """The pipeline dashboard of a QEFF model (see Dashboard)."""
    if not hasattr(model, "steps"):
        raise TypeError(f"dashboard() needs a QEFF model with a `steps` record, got {type(model).__name__}.")
    return Dashboard(model)
