"""HTML and widget views: pure functions of reports (they never compute on a model)."""
from qeff_lab.views.tables import html_table, render_steps, render_step, render_transform, steps_widget

from qeff_lab.views.dashboard import Dashboard, dashboard
from qeff_lab.views.graph import NetronServer, graph_view
from qeff_lab.views.report import report_html, write_report

__all__ = ["html_table", "render_steps", "render_step", "render_transform", "steps_widget",
           "Dashboard", "dashboard", "NetronServer", "graph_view", "report_html", "write_report"]
