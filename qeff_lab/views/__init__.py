"""HTML and widget views: pure functions of reports (they never compute on a model)."""
from qeff_lab.views.tables import html_table, render_steps, render_step, render_transform, steps_widget

__all__ = ["html_table", "render_steps", "render_step", "render_transform", "steps_widget"]
