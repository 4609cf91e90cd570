"""Views of continuous batching: the slot timeline (which request occupied which slot when) as HTML, a live widget
that redraws it while a run goes on, and the per-request / run metrics tables (pure functions of ServingMetrics)."""
from __future__ import annotations

import html
import time

import ipywidgets as widgets

from qeff_lab.views.tables import COLORS, html_table

# request colours cycle through these (prefill part drawn darker by the opacity)
PALETTE = ("#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#c62828", "#558b2f", "#4e342e")
ROW_PX, WIDTH_PX = 22, 640


def timeline_html(spans: list[dict], full_batch_size: int, now_s: float | None = None, title: str = "slots") -> str:
    """A Gantt-like timeline: one row per slot, one bar per request from its prefill start to its finish (still
    running: to `now_s`), the prefill part (start to first token) darker. `spans`: dicts with request, slot,
    start, first (or None), end (or None), reused (prefix tokens reused)."""
    end_all = max([now_s or 0.0] + [s["end"] or s["first"] or s["start"] for s in spans]) or 1e-9
    scale = WIDTH_PX / end_all
    rows = []
    for slot in range(full_batch_size):
        bars = []
        for s in (s for s in spans if s["slot"] == slot):
            color = PALETTE[s["request"] % len(PALETTE)]
            stop = s["end"] if s["end"] is not None else (now_s if now_s is not None else end_all)
            left, width = s["start"] * scale, max((stop - s["start"]) * scale, 2)
            first = s["first"] if s["first"] is not None else stop
            pre = max((first - s["start"]) * scale, 1)
            tip = (f"request {s['request']}: prefill {s['start']:.3f}s, first token "
                   + (f"{s['first']:.3f}s" if s["first"] is not None else "-")
                   + (f", done {s['end']:.3f}s" if s["end"] is not None else ", running")
                   + (f", {s['reused']} prefix tokens reused" if s.get("reused") else ""))
            bars.append(
                f"<div title='{html.escape(tip)}' style='position:absolute;left:{left:.1f}px;width:{width:.1f}px;"
                f"top:2px;height:{ROW_PX - 4}px;background:{color};opacity:0.55;border-radius:2px;overflow:hidden;"
                f"color:white;font-size:10px;line-height:{ROW_PX - 4}px'>"
                f"<div style='position:absolute;left:0;width:{pre:.1f}px;height:100%;background:{color}'></div>"
                f"<span style='position:relative;padding-left:2px'>#{s['request']}</span></div>")
        rows.append(f"<div style='display:flex;align-items:center'><div style='width:48px;font-size:11px'>slot {slot}"
                    f"</div><div style='position:relative;width:{WIDTH_PX}px;height:{ROW_PX}px;background:#fafafa;"
                    f"border-bottom:1px solid #eee'>{''.join(bars)}</div></div>")
    axis = (f"<div style='margin-left:48px;width:{WIDTH_PX}px;display:flex;justify-content:space-between;"
            f"font-size:10px;color:{COLORS['muted']}'><span>0 s</span><span>{end_all:.2f} s</span></div>")
    return (f"<div class='qeff-slots' style='font-family:ui-monospace,monospace;margin:4px 0'><b>{html.escape(title)}"
            f"</b> <span style='font-size:11px;color:{COLORS['muted']}'>(bar: request, darker: prefill)</span>"
            f"{''.join(rows)}{axis}</div>")


def spans_from_metrics(metrics) -> list[dict]:
    return [{"request": r.index, "slot": r.slot, "start": r.prefill_start_s, "first": r.first_token_s,
             "end": r.finish_s, "reused": r.prefix_reused} for r in metrics.requests if r.slot >= 0]


def render_serving(metrics) -> str:
    """ServingMetrics: the slot timeline, the run's figures and one row per request."""
    return (timeline_html(spans_from_metrics(metrics), metrics.full_batch_size,
                          title=f"{metrics.prompts} requests on {metrics.full_batch_size} slots")
            + html_table(metrics.to_frame(), caption="run")
            + html_table(metrics.requests_frame(), caption="requests"))


class SlotView:
    """The live slot timeline: pass `view.on_event` to `generate(..., on_event=...)` (continuous batching) and the
    widget redraws at most every `refresh_s` while the run goes on; `view.finish(result)` draws the final
    timeline with the metrics tables. Displayed, it is the widget with a static HTML copy as fallback (a stored
    notebook without widget state still shows the timeline as it was when displayed)."""

    def __init__(self, full_batch_size: int, refresh_s: float = 0.2):
        self.full_batch_size, self.refresh_s = full_batch_size, refresh_s
        self.spans: dict[int, dict] = {}
        self.now_s = 0.0
        self._drawn = 0.0
        self._handle = None
        self.widget = widgets.HTML(value=self.html())

    def on_event(self, kind: str, request: int, slot: int, seconds: float) -> None:
        """generate_continuous's callback: "prefill" opens a bar, the first "token" ends its prefill part,
        "finish" closes it."""
        self.now_s = seconds
        if kind == "prefill":
            self.spans[request] = {"request": request, "slot": slot, "start": seconds, "first": None, "end": None}
        elif kind == "token" and self.spans[request]["first"] is None:
            self.spans[request]["first"] = seconds
        elif kind == "finish":
            self.spans[request]["end"] = seconds
        if kind != "token" or time.perf_counter() - self._drawn >= self.refresh_s:
            self.widget.value = self.html()
            self._drawn = time.perf_counter()

    def html(self) -> str:
        running = sum(s["end"] is None for s in self.spans.values())
        return timeline_html(list(self.spans.values()), self.full_batch_size, self.now_s,
                             title=f"{len(self.spans)} requests started, {running} running")

    def show(self) -> None:
        """Display the view and keep its display handle: `finish` then replaces the stored output too (the static
        HTML fallback a saved notebook shows is the final timeline, not the empty one)."""
        from IPython.display import display

        self._handle = display(self, display_id=True)

    def finish(self, result) -> None:
        """The final picture from the run's ServingMetrics (or a GenerationResult holding them)."""
        metrics = getattr(result, "metrics", result)
        self.widget.value = render_serving(metrics)
        if self._handle is not None:
            self._handle.update(self)

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        return {**bundle, "text/html": self.widget.value, "text/plain": repr(self)}

    def __repr__(self) -> str:
        return f"<SlotView {self.full_batch_size} slots>"


def _register() -> None:
    from qeff_lab.pipeline import register_view
    from qeff_lab.runtime.continuous_batching import ServingMetrics

    register_view(ServingMetrics, "html", render_serving)


_register()
