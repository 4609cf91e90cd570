"""Views of causal-LM work: generation results and module-swap reports (pure functions of the reports)."""
from __future__ import annotations

from qeff_lab.views.tables import html_table


def render_generation(result) -> str:
    """A GenerationResult: the metrics, then one row per prompt with its new text."""
    return (html_table(result.metrics.to_frame(), caption="generation metrics")
            + html_table(result.to_frame(), caption=f"{len(result.ids)} prompt(s)"))
