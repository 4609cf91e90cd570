"""What changed between two exports of one model (e.g. before and after `fix_precision`): node by node, by scope."""
from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import onnx
import pandas as pd

from qeff_lab.onnx.inspect import op_key
from qeff_lab.views.tables import details_html, html_table


def _path(source) -> Path:
    path = getattr(source, "path", source)
    path = getattr(path, "path", path)  # a model's export_result, or an ExportResult, or a path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No ONNX file at {path}: export the model first (model.export()).")
    return path


BOOKKEEPING = {"Constant", "Identity"}  # numbered anew by every export: left out of the diff
TOP = "(graph top level)"


def _ops_by_scope(path: Path) -> dict[str, Counter]:
    """Node scope (the exporter's module path: the node name without its last part) -> op counts there."""
    graph = onnx.load(str(path), load_external_data=False).graph
    scopes: dict[str, Counter] = {}
    for node in graph.node:
        if node.op_type in BOOKKEEPING:
            continue
        scope = node.name.rsplit("/", 1)[0] if "/" in node.name else TOP
        scopes.setdefault(scope, Counter())[op_key(node)] += 1
    return scopes


def graph_diff_frame(before, after) -> pd.DataFrame:
    """One row per scope whose ops differ: the ops before and after (each `op xN`), in graph order (Constant and
    Identity nodes left out: exports number them anew)."""
    b, a = _ops_by_scope(_path(before)), _ops_by_scope(_path(after))

    def text(c: Counter) -> str:
        return ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(c.items()))

    rows = [{"scope": s, "before": text(b.get(s, Counter())), "after": text(a.get(s, Counter()))}
            for s in dict.fromkeys([*b, *a]) if b.get(s, Counter()) != a.get(s, Counter())]
    return pd.DataFrame(rows, columns=["scope", "before", "after"])


def render_graph_diff(before, after, max_rows: int = 400) -> str:
    """A summary (how many scopes went from which ops to which) with every changed scope one click away."""
    frame = graph_diff_frame(before, after)
    if frame.empty:
        return "<div><b>graph diff</b>: the two graphs have the same ops in every scope</div>"
    groups = frame.groupby(["before", "after"], sort=False).size().reset_index(name="scopes")
    groups = groups[["scopes", "before", "after"]]
    return (f"<div><b>graph diff</b>: {len(frame)} scope(s) changed — {html.escape(_path(before).parent.name)} "
            f"→ {html.escape(_path(after).parent.name)}</div>"
            + html_table(groups, caption="what became what (scopes)", css_class="qeff-summary")
            + details_html(f"all {len(frame)} changed scopes", html_table(frame, max_rows=max_rows)))
