"""A static, self-contained HTML report of a whole pipeline run: no JavaScript, no CDN, plots as embedded PNGs."""
from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from qeff_lab.views.tables import COLORS, figure_png, findings_html, html_table, steps_table_html

# step name -> function(report) returning matplotlib Figures to embed in that step's section. Other owners may add
# theirs (e.g. a precision heatmap); a details object with a `figures()` method is drawn without registering.
FIGURES: dict[str, Callable[[Any], list]] = {}

PAGE_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#212121}
h1{font-size:20px;margin-bottom:2px} h2{font-size:16px;margin:22px 0 4px;border-bottom:1px solid #ddd}
.meta{color:%(muted)s;font-size:12px} section{margin-bottom:10px} img.plot{max-width:100%%;border:1px solid #eee}
code,pre{font-family:ui-monospace,monospace;font-size:12px} pre{white-space:pre-wrap}
""" % {"muted": COLORS["muted"]}


def figure_png_base64(fig) -> str:
    """A matplotlib Figure as base64 PNG (the figure is closed afterwards)."""
    return base64.b64encode(figure_png(fig)).decode("ascii")


def img_html(fig, alt: str) -> str:
    return f"<img class='plot' alt='{html.escape(alt)}' src='data:image/png;base64,{figure_png_base64(fig)}'>"


def durations_figure(steps: dict):
    """Horizontal bars: seconds per step, coloured by status (the palette of every view)."""
    from matplotlib.figure import Figure

    names = list(steps)[::-1]
    seconds = [steps[n].seconds for n in names]
    fig = Figure(figsize=(7, 0.35 * len(names) + 0.9))
    ax = fig.add_subplot()
    ax.barh(names, seconds, color=[COLORS.get(steps[n].status, COLORS["muted"]) for n in names])
    for y, s in enumerate(seconds):
        ax.text(s, y, f" {s:.2f}s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("time per step (colour: status)", fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def findings_frame(details: Any) -> pd.DataFrame | None:
    """Findings carried by a step's details (an attribute `findings`: dataclasses or dicts), as a DataFrame."""
    findings = getattr(details, "findings", None)
    if findings is None and isinstance(details, dict):
        findings = details.get("findings")
    if callable(findings):
        findings = findings()
    if hasattr(findings, "to_frame"):  # e.g. precision.Findings: its owner chose the columns
        findings = findings.to_frame()
    if isinstance(findings, pd.DataFrame):
        return findings if len(findings) else None
    if not findings:
        return None
    rows = [f if isinstance(f, dict) else (vars(f) if hasattr(f, "__dict__") else {"finding": str(f)})
            for f in findings]
    return pd.DataFrame(rows)


def _precision_figures(report) -> list:
    """The precision lab's heatmap (layers x op, fp16 headroom; underflow beside it) for an analyze step."""
    profile = getattr(report.details, "profile", None)
    if profile is None:
        return []
    from qeff_lab.views.precision import profile_heatmap

    return [profile_heatmap(profile)]


FIGURES["analyze"] = _precision_figures


def _ladder_figures(report) -> list:
    """The compare step's accuracy ladder: top-1 agreement, KL and perplexity per rung."""
    if not hasattr(report.details, "per_prompt"):
        return []
    from qeff_lab.views.precision import ladder_figure

    return [ladder_figure(report.details)]


FIGURES["compare"] = _ladder_figures


def _step_figures(report) -> list:
    figs = []
    if report.step in FIGURES:
        figs += list(FIGURES[report.step](report) or [])
    maker = getattr(report.details, "figures", None)
    if callable(maker):
        figs += list(maker() or [])
    return figs


def _steps_table_html(steps: dict) -> str:
    return steps_table_html([(n, r.status, f"{r.seconds:.2f}s", r.summary) for n, r in steps.items()],
                            time_head="seconds", link=True)


def report_html(model, title: str | None = None, steps: dict | None = None) -> str:
    """The whole run of `model` (its `steps`, or `steps` given: e.g. a dashboard's, which adds the steps run under it
    that the model does not record) with graph, findings and plots as one self-contained HTML page."""
    from qeff_lab import __version__
    from qeff_lab.views.dashboard import pending_stages, step_detail_html

    steps = model.steps if steps is None else steps
    if not steps:
        raise ValueError(f"{type(model).__name__} has no steps recorded yet: load it (from_pretrained) first.")
    title = title or f"qeff_lab report: {model.model_name}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<div class='meta'>{html.escape(type(model).__name__)} · qeff_lab {__version__} · written {now}</div>",
             "<h2 id='summary'>Pipeline</h2>", _steps_table_html(steps)]
    pending = pending_stages(steps)
    if pending:
        parts.append(f"<div class='meta'>not run: {html.escape(', '.join(pending))}</div>")
    parts.append(img_html(durations_figure(steps), "time per step"))

    all_findings = []
    for name, rep in steps.items():
        grouped = getattr(rep.details, "findings", None)
        if hasattr(grouped, "causes"):  # precision findings: one row per root cause, places expandable
            if len(grouped):
                from qeff_lab.views.precision import render_findings

                all_findings.append((name, render_findings(grouped, max_rows=200, css_class="qeff-findings")))
            continue
        frame = findings_frame(rep.details)
        if frame is not None and len(frame):
            all_findings.append((name, findings_html(frame)))
    if all_findings:
        parts.append("<h2 id='findings'>Findings</h2>")
        parts += [f"<div class='meta'>from {html.escape(n)}</div>" + body for n, body in all_findings]

    shown_above = {n for n, _ in all_findings}
    for name, rep in steps.items():
        if name in shown_above and hasattr(rep.details, "findings") and hasattr(rep.details, "profile"):
            from qeff_lab.views.precision import render_report

            detail = (step_detail_html(rep, body=render_report(rep.details, findings=False))
                      + "<div class='meta'><a href='#findings'>its findings: above</a></div>")
        else:
            detail = step_detail_html(rep)
        parts.append(f"<section id='step-{html.escape(name)}'><h2>{html.escape(name)}</h2>{detail}")
        for i, fig in enumerate(_step_figures(rep)):
            parts.append(img_html(fig, f"{name} plot {i + 1}"))
        if name == "export":
            parts.append(_graph_section(rep))
        parts.append("</section>")

    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _graph_section(export_report) -> str:
    from qeff_lab.onnx.inspect import graph_report
    from qeff_lab.views.graph import graph_header_html, io_table_html, op_table_html

    path = getattr(export_report.details, "path", None)
    if path is None or not Path(path).is_file():
        return "<div class='meta'>the exported file is no longer on disk: graph tables left out</div>"
    g = graph_report(export_report.details)
    return "<h3>Graph</h3>" + graph_header_html(g) + io_table_html(g) + op_table_html(g)


def write_report(model, path: str | Path, title: str | None = None, steps: dict | None = None) -> Path:
    """Write report_html(model) to `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(model, title=title, steps=steps), encoding="utf-8")
    return path


__all__ = ["report_html", "write_report", "durations_figure", "findings_frame", "FIGURES", "html_table"]
