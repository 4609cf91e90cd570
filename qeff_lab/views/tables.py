"""Compact HTML tables for step reports and transform results, one look across all views."""
from __future__ import annotations

import html
import io
import re
from typing import Any

import ipywidgets as widgets
import pandas as pd

from qeff_lab.views.fallback import StaticFallback

# One palette for every view: the same colour always means the same thing.
COLORS = {"done": "#2e7d32", "reused": "#1565c0", "failed": "#c62828", "skipped": "#757575",
          "overflow": "#c62828", "underflow": "#ef6c00", "headroom": "#2e7d32",
          "running": "#f9a825", "pending": "#bdbdbd", "info": "#1565c0", "muted": "#757575"}
TABLE_STYLE = ("border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px;"
               "margin:4px 0")
CELL_STYLE = "border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top"


def html_table(df: pd.DataFrame, caption: str | None = None, max_rows: int = 60, css_class: str | None = None,
               nowrap: tuple[str, ...] = ()) -> str:
    """A DataFrame as a small, consistently styled HTML table (long tables are cut with a note). Cells of the
    `nowrap` columns stay on one line (numbers such as "<1e-06" would otherwise break at their hyphen)."""
    shown = df.head(max_rows)
    head = "".join(f"<th style='{CELL_STYLE};background:#f5f5f5'>{html.escape(str(c))}</th>" for c in shown.columns)
    styles = [CELL_STYLE + (";white-space:nowrap" if c in nowrap else "") for c in shown.columns]
    rows = "".join(
        "<tr>" + "".join(f"<td style='{st}'>{html.escape(str(v))}</td>" for st, v in zip(styles, row)) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    cap = f"<caption style='text-align:left;font-weight:bold'>{html.escape(caption)}</caption>" if caption else ""
    more = f"<div style='font-size:11px;color:#757575'>… {len(df) - max_rows} more rows</div>" if len(df) > max_rows else ""
    cls = f" class='{html.escape(css_class)}'" if css_class else ""
    return f"<table{cls} style='{TABLE_STYLE}'>{cap}<tr>{head}</tr>{rows}</table>{more}"


def _badge(status: str) -> str:
    return (f"<span style='color:white;background:{COLORS.get(status, '#757575')};border-radius:3px;"
            f"padding:0 4px'>{html.escape(status)}</span>")


def steps_table_html(rows, time_head: str = "time", link: bool = False) -> str:
    """The static steps table (class qeff-steps) of the report and the dashboard's stored copy: `rows` of (step,
    status, time text, summary), the status as a badge, a pending row's summary muted; `link`: each step name an
    anchor to its `#step-<name>` section."""
    head = "".join(f"<th style='{CELL_STYLE};background:#f5f5f5'>{h}</th>" for h in ("step", "status", time_head, "summary"))
    body = ""
    for name, status, time_text, summary in rows:
        label = f"<a href='#step-{html.escape(name)}'>{html.escape(name)}</a>" if link else html.escape(name)
        muted = ";color:" + COLORS["muted"] if status == "pending" else ""
        body += (f"<tr><td style='{CELL_STYLE}'>{label}</td><td style='{CELL_STYLE}'>{_badge(status)}</td>"
                 f"<td style='{CELL_STYLE}'>{time_text}</td><td style='{CELL_STYLE}{muted}'>{html.escape(summary)}</td></tr>")
    return f"<table class='qeff-steps' style='{TABLE_STYLE}'><tr>{head}</tr>{body}</table>"


def figure_png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes at 100 dpi (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


SUMMARY_ABOVE = 12  # a result with more changes than this shows a summary, the full list one click away


def details_html(summary: str, body: str, css_class: str = "qeff-more") -> str:
    """`body` folded under a one-line `summary` (an HTML <details>: one click opens it, no JavaScript)."""
    return (f"<details class='{css_class}'><summary style='cursor:pointer;font-size:12px'>{html.escape(summary)}"
            f"</summary>{body}</details>")


def changes_summary_frame(result) -> pd.DataFrame:
    """The changes grouped by what changed: (what, before, after) -> count, and the MiB they hold when the
    changes state sizes (e.g. ExternalData: initializers moved out of the protobuf). A result with its own
    grouping (`summary_frame()`, e.g. a SwapResult's counts per class) keeps it."""
    if hasattr(result, "summary_frame"):
        return result.summary_frame()
    df = result.to_frame()
    df["what"] = [p.split(" ", 1)[0] if " " in p else "module" for p in df["place"]]
    df["MiB"] = [float(m.group(1)) if (m := re.match(r"\s*([\d.]+) MiB", w)) else None for w in df["why"]]
    out = df.groupby(["what", "before", "after"], sort=False).agg(count=("place", "size"), MiB=("MiB", "sum"),
                                                                  sized=("MiB", "count")).reset_index()
    out["MiB"] = [f"{m:.1f}" if n else "" for m, n in zip(out["MiB"], out["sized"])]
    out = out.drop(columns="sized")[["count", "what", "before", "after", "MiB"]]
    return out if out["MiB"].ne("").any() else out.drop(columns="MiB")


def transform_headline(result, groups: pd.DataFrame | None = None) -> str:
    """e.g. 'ExternalData: 273 initializers: inline -> external (model.onnx.data), 621.3 MiB' (`groups`:
    changes_summary_frame(result) when the caller has it)."""
    if hasattr(result, "summary_frame"):  # grouped its own way (a SwapResult): its own summary line
        return result.summary()
    groups = changes_summary_frame(result) if groups is None else groups
    if len(groups) != 1:
        return result.summary()
    g = groups.iloc[0]
    size = f", {g['MiB']} MiB" if g.get("MiB", "") else ""
    return f"{result.name}: {g['count']} {g['what']}(s): {g['before']} -> {g['after']}{size}"


def render_transform(result, full_list: bool = True) -> str:
    """What a transform did: the full table when it is short; else a summary first (counts per kind of change,
    sizes when stated) and the full list one click away (`full_list=False`: the one-line headline, for narrow panels)."""
    if not result.changes:
        note = f" — {html.escape(result.notes[0])}" if result.notes else ""
        return f"<div><b>{html.escape(result.name)}</b>: nothing to change{note}</div>"
    if not full_list:  # one line: the narrow panels
        return f"<div style='font-size:11px'>{html.escape(transform_headline(result))}</div>"
    if len(result.changes) <= SUMMARY_ABOVE:
        return html_table(result.to_frame(), caption=f"{result.name}: {len(result.changes)} change(s)")
    full = html_table(result.to_frame(), max_rows=len(result.changes))
    groups = changes_summary_frame(result)
    return (html_table(groups, caption=transform_headline(result, groups), css_class="qeff-summary")
            + details_html(f"all {len(result.changes)} changes", full))


def _details_html(details: Any) -> str:
    from qeff_lab.onnx.export import ExportResult
    from qeff_lab.pipeline import TransformResult

    if isinstance(details, pd.DataFrame):
        return html_table(details)
    if isinstance(details, dict):
        return html_table(pd.DataFrame({"field": list(details), "value": [str(v) for v in details.values()]}))
    if isinstance(details, list) and details and all(isinstance(d, TransformResult) for d in details):
        return "".join(render_transform(d) for d in details)
    if isinstance(details, ExportResult):
        return (f"<div>{html.escape(str(details.path))}</div>"
                + "".join(render_transform(p) for p in details.passes))
    if hasattr(details, "_repr_html_"):  # reports that draw themselves (a CompileResult, a PrecisionReport, ...)
        return details._repr_html_()
    return f"<pre>{html.escape(repr(details))}</pre>" if details is not None else ""


def render_step(report) -> str:
    return (f"<div><b>{html.escape(report.step)}</b> {_badge(report.status)} "
            f"{report.seconds:.2f}s — {html.escape(report.summary)}</div>{_details_html(report.details)}")


def steps_frame(model) -> pd.DataFrame:
    # a no-break space: "0.53 s" stays on one line in the narrow time column (it wrapped to "0.53" / "s")
    return pd.DataFrame([{"step": r.step, "status": r.status, "time": f"{r.seconds:.2f}\u00a0s", "summary": r.summary}
                         for r in model.steps.values()], columns=["step", "status", "time", "summary"])


def render_steps(model) -> str:
    return html_table(steps_frame(model), caption=f"{type(model).__name__}: {model.model_name}")


class StepsAccordion(StaticFallback, widgets.Accordion):
    """One pane per step (the summary in the title, the details inside); stored, it reads as <details> blocks."""

    def __init__(self, model):
        self.reports = list(model.steps.values())
        super().__init__(children=[widgets.HTML(_details_html(r.details)) for r in self.reports])
        for i, r in enumerate(self.reports):
            self.set_title(i, _step_title(r))

    def static_html(self) -> str:
        return "".join(details_html(_step_title(r), _details_html(r.details), "qeff-step") for r in self.reports)


def _step_title(r) -> str:
    return f"{r.step} [{r.status}] {r.seconds:.2f}s — {r.summary}"


def steps_widget(model) -> StepsAccordion:
    """An accordion with one pane per step: the summary in the title, the details inside."""
    return StepsAccordion(model)


FINDING_COLORS = {"overflow": COLORS["overflow"], "underflow": COLORS["underflow"], "error": COLORS["failed"],
                   "high": COLORS["failed"], "critical": COLORS["failed"], "warning": COLORS["underflow"],
                   "medium": COLORS["underflow"], "low": COLORS["info"], "info": COLORS["info"]}


def findings_html(frame: pd.DataFrame, max_rows: int = 200, caption: str | None = None,
                  css_class: str = "qeff-findings") -> str:
    """Findings as a table whose severity cells carry the palette's colours (worst first, as given)."""
    total = len(frame)
    frame = frame.head(max_rows)
    key = next((c for c in ("severity", "kind", "level") if c in frame.columns), None)
    head = "".join(f"<th style='{CELL_STYLE};background:#f5f5f5'>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        colour = FINDING_COLORS.get(str(row[key]).lower()) if key else None
        cells = []
        for c in frame.columns:
            style = CELL_STYLE + (f";color:white;background:{colour}" if c == key and colour else "")
            value = row[c]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            cells.append(f"<td style='{style}'>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<div class='meta'>… {total - max_rows} more</div>" if total > max_rows else ""
    return (f"<table class='{html.escape(css_class)}' style='{TABLE_STYLE}'>"
            "<caption style='text-align:left;font-weight:bold'>"
            f"{html.escape(caption or f'findings ({total})')}</caption><tr>{head}</tr>{''.join(rows)}</table>{more}")
