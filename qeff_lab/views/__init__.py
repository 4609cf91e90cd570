"""HTML and widget views: pure functions of reports (they never compute on a model).

Importing this package registers each view with `qeff_lab.pipeline.register_view`; the reports' `_repr_html_`,
`model.dashboard()` and `model.report()` look them up there, so nothing below views/ imports views/."""
from qeff_lab.views.tables import html_table, render_steps, render_step, render_transform, steps_widget

from qeff_lab.views.compile import render_compile_result
from qeff_lab.views.dashboard import STEP_SUMMARIES, Dashboard, dashboard
from qeff_lab.views.generation import render_generation
from qeff_lab.views.graph import NetronServer, graph_view
from qeff_lab.views.precision import (ladder_summary, render_findings, render_islands, render_ladder, render_profile,
                                      render_report)
from qeff_lab.views.report import report_html, write_report
from qeff_lab.views.serving import SlotView, render_serving  # noqa: F401  registers the ServingMetrics view


def _register() -> None:
    from qeff_lab.accuracy.ladder import LadderReport
    from qeff_lab.compile.backend import CompileResult
    from qeff_lab.models.base import QEFFBaseModel
    from qeff_lab.pipeline import StepReport, TransformResult, register_view
    from qeff_lab.precision.analyze import PrecisionReport
    from qeff_lab.precision.findings import Findings
    from qeff_lab.precision.islands import IslandSearch
    from qeff_lab.precision.profile import RangeProfile
    from qeff_lab.runtime.generation import GenerationResult
    from qeff_lab.transforms.kv_cache import SwapResult

    for cls, render in [
        (TransformResult, render_transform), (StepReport, render_step), (QEFFBaseModel, render_steps),
        (SwapResult, render_transform),
        (CompileResult, render_compile_result), (GenerationResult, render_generation),
        (PrecisionReport, render_report), (Findings, render_findings), (RangeProfile, render_profile),
        (LadderReport, render_ladder), (IslandSearch, render_islands),
    ]:
        register_view(cls, "html", render)
    STEP_SUMMARIES["LadderReport"] = ladder_summary
    register_view(QEFFBaseModel, "dashboard", dashboard)
    register_view(QEFFBaseModel, "report", write_report)


_register()

__all__ = ["html_table", "render_steps", "render_step", "render_transform", "steps_widget",
           "Dashboard", "dashboard", "NetronServer", "graph_view", "report_html", "write_report"]
