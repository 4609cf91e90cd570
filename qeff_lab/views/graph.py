"""Graph view of an exported ONNX file: netron embedded in the notebook, op counts before/after the passes, I/O shapes."""
from __future__ import annotations

import atexit
import html
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets
import pandas as pd

from qeff_lab.onnx.inspect import GraphReport, graph_report, weightless_copy
from qeff_lab.views.fallback import StaticFallback
from qeff_lab.views.tables import COLORS, details_html, html_table

LARGE_LAYOUT = 2000  # nodes: above this netron's in-browser layout takes a minute or more
WEIGHTLESS_ABOVE = 32 << 20  # serve netron a weights-free copy of graphs larger than this (browsers choke on GBs)
_servers: "set[NetronServer]" = set()
_lock = threading.Lock()


def _quiet_netron_logger() -> None:
    logging.getLogger("netron").setLevel(logging.WARNING)


@contextmanager
def _no_root_basic_config():
    """netron.serve() calls logging.basicConfig(INFO) when the root logger has no handler, which would make every
    library's INFO messages appear in the notebook. A NullHandler for the duration of the call prevents that."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


def proxy_prefix() -> str | None:
    """The JupyterHub/Binder URL prefix (jupyter-server-proxy serves /proxy/<port>/ under it), or None when local."""
    return os.environ.get("JUPYTERHUB_SERVICE_PREFIX")


class NetronServer:
    """netron serving one ONNX file on a free loopback port, in this process (a thread).

    `url` is what the browser should load: `http://127.0.0.1:<port>/` when the browser runs on this machine, or
    `<JUPYTERHUB_SERVICE_PREFIX>proxy/<port>/` behind jupyter-server-proxy (Binder, JupyterHub).
    `stop()` ends it; every server still running is stopped when the kernel exits.
    With `outputs`, netron gets only the part of the graph that computes those tensors (weights left out).
    """

    def __init__(self, path: str | Path, weightless: bool | None = None, scratch: Path | None = None,
                 outputs: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No ONNX file at {self.path}: export the model first (model.export()).")
        self.outputs = list(outputs) if outputs else None
        if self.outputs:
            weightless = True
        if weightless is None:
            weightless = self.path.stat().st_size > WEIGHTLESS_ABOVE or self.path.with_name(
                self.path.name + ".data").exists()
        self.weightless = weightless
        self._scratch = scratch
        self.address: tuple[str, int] | None = None

    @property
    def served_path(self) -> Path:
        if not self.weightless:
            return self.path
        from qeff_lab.pipeline import cache_root

        from qeff_lab.pipeline import fingerprint

        base = self._scratch or cache_root() / "netron"
        part = f"-part-{fingerprint(self.outputs)[:8]}" if self.outputs else ""
        return base / f"{self.path.parent.name}-{self.path.stem}-weightless{part}.onnx"

    def start(self) -> "NetronServer":
        import netron

        if self.running:
            return self
        _quiet_netron_logger()
        served = self.served_path
        if self.weightless and not (served.is_file() and served.stat().st_mtime_ns >= self.path.stat().st_mtime_ns):
            weightless_copy(self.path, served, outputs=self.outputs)
        with _no_root_basic_config():
            self.address = netron.start(str(served), address=("127.0.0.1", 0), browse=False)
        with _lock:
            _servers.add(self)
        return self

    def stop(self) -> None:
        import netron

        if self.address is not None:
            netron.stop(self.address)
        with _lock:
            _servers.discard(self)
        self.address = None

    @property
    def running(self) -> bool:
        import netron

        return self.address is not None and netron.status(self.address)

    @property
    def port(self) -> int | None:
        return self.address[1] if self.address else None

    @property
    def url(self) -> str:
        if not self.running:
            raise RuntimeError("netron is not running: call start() first.")
        prefix = proxy_prefix()
        if prefix is not None:
            return f"{prefix.rstrip('/')}/proxy/{self.port}/"
        return f"http://{self.address[0]}:{self.port}/"

    def iframe_html(self, height: int = 520) -> str:
        return (f"<iframe class='qeff-netron' src='{html.escape(self.url)}' title='netron: {html.escape(self.path.name)}' "
                f"style='width:100%;height:{height}px;border:1px solid #ddd'></iframe>")

    def __enter__(self) -> "NetronServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # no port: it changes every run
        return f"<NetronServer {self.path.name}: {'running' if self.running else 'stopped'}>"


def stop_all() -> int:
    """Stop every netron server this process started; returns how many were running."""
    with _lock:
        servers = list(_servers)
    for s in servers:
        s.stop()
    return len(servers)


atexit.register(stop_all)


# ----------------------------------------------------------------------------- HTML pieces (also used by report.py)
def graph_header_html(report: GraphReport) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in sorted(report.opsets.items()))
    funcs = f"; functions: {', '.join(report.functions)}" if report.functions else ""
    return (f"<div class='qeff-graph-head'><b>{html.escape(report.path.name)}</b> — {report.nodes} nodes, "
            f"{len(report.op_counts)} op types, {report.initializers} initializers "
            f"({report.weight_bytes / 2**20:.1f} MiB), opset {html.escape(opsets)}{html.escape(funcs)}</div>")


def io_summary_frame(report: GraphReport) -> pd.DataFrame:
    """Inputs and outputs with numbered names folded: `past_key.{i}` (i = 0..29) is one row with its count."""
    df = report.io_frame()
    df["name"] = [re.sub(r"(?<=[._])\d+(?=[._]|$)", "{i}", n) for n in df["name"]]
    return (df.groupby(["kind", "name", "dtype", "shape"], sort=False).size().reset_index(name="count")
            [["kind", "count", "name", "dtype", "shape"]])


# Short columns kept on one line: in the narrow side panel every other cell may break anywhere, and these broke
# inside their words ("inpu" / "t", "floa" / "t32", "cou" / "nt").
IO_NOWRAP = ("kind", "count", "dtype")
OP_NOWRAP = ("before passes", "after passes", "change")


def io_table_html(report: GraphReport, full_lists: bool = True) -> str:
    """The inputs and outputs, numbered ones folded (the full list one click away when folding helped)."""
    full = report.io_frame()
    folded = io_summary_frame(report)
    if len(folded) == len(full):
        return html_table(full, caption="inputs and outputs", max_rows=len(full), nowrap=IO_NOWRAP)
    return (html_table(folded, caption=f"inputs and outputs ({len(full)} tensors; numbered names folded)",
                       css_class="qeff-summary", nowrap=IO_NOWRAP)
            + (details_html(f"all {len(full)} inputs and outputs",
                            html_table(full, max_rows=len(full), nowrap=IO_NOWRAP))
               if full_lists else ""))


def op_table_html(report: GraphReport, max_rows: int = 12, full_lists: bool = True) -> str:
    """Op counts before / after the passes: the most frequent first, every op type one click away."""
    frame = report.op_frame()
    note = ""
    if report.op_counts_before is None:
        note = ("<div style='font-size:11px;color:%s'>counts before the passes were not recorded for this export "
                "(it predates raw_op_counts.json); re-export to see them</div>" % COLORS["muted"])
    elif frame["change"].eq("").all():
        note = ("<div style='font-size:11px;color:%s'>the passes changed no node counts (they rewrite constants and "
                "storage, not ops)</div>" % COLORS["muted"])
    caption = "op counts before / after the ONNX passes"
    if len(frame) <= max_rows:
        return html_table(frame, caption=caption, max_rows=len(frame), nowrap=OP_NOWRAP) + note
    custom = frame[frame["op"].str.contains("::")]
    top = pd.concat([frame.head(max_rows), custom]).drop_duplicates("op")
    return (html_table(top, caption=f"{caption}: the {max_rows} most frequent and the custom ops "
                                    f"(of {len(frame)} op types)", max_rows=len(top), nowrap=OP_NOWRAP)
            + (details_html(f"all {len(frame)} op types", html_table(frame, max_rows=len(frame), nowrap=OP_NOWRAP))
               if full_lists else "")
            + note)


def passes_html(report: GraphReport, full_lists: bool = True) -> str:
    from qeff_lab.views.tables import render_transform

    return "".join(render_transform(p, full_lists) for p in report.passes)


def graph_tables_html(report: GraphReport, full_lists: bool = True) -> str:
    """The tables beside netron: I/O, op counts, what the passes did (each summarised; `full_lists=False` leaves
    out the folded full lists: the live widget's narrow side panel shows summaries only; the static copy and the
    export step's view keep them)."""
    return (io_table_html(report, full_lists) + op_table_html(report, full_lists=full_lists)
            + passes_html(report, full_lists))


# The side panel: narrow, so its tables wrap long names instead of widening the box; it scrolls vertically.
SIDE_STYLE = ("<style>.qeff-graph-tables table{max-width:100%;table-layout:auto}"
              ".qeff-graph-tables td,.qeff-graph-tables th{overflow-wrap:anywhere;font-size:11px;line-height:1.35}"
              ".qeff-graph-tables th{overflow-wrap:normal}</style>")  # headers break between words only
NETRON_CONSENT = ("netron may first show a cookie notice over the graph (it asks once per browser): "
                  "accept it to see the graph.")


# ----------------------------------------------------------------------------- the widget
class GraphView(StaticFallback, widgets.VBox):
    """netron (when started) beside the I/O, op-count and passes tables. `stop()` ends its netron server."""

    static_note = "a static copy of the graph view: run the notebook to browse the graph in netron"

    def __init__(self, report: GraphReport, netron: bool = True, height: int = 520,
                 netron_outputs: list[str] | None = None):
        self.report = report
        self.netron_outputs = list(netron_outputs) if netron_outputs else None
        self.server: NetronServer | None = None
        self.height = height
        self.frame = widgets.HTML(layout=widgets.Layout(width="60%", min_width="0"))
        self.open_button = widgets.Button(description="Open in netron", icon="sitemap",
                                          tooltip="Start netron for this graph (a local server in this kernel)")
        self.stop_button = widgets.Button(description="Stop netron", icon="stop", disabled=True)
        self.netron_note = widgets.HTML()
        self.netron_note.add_class("qeff-netron-state")
        self.open_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        side = widgets.HTML(SIDE_STYLE + graph_tables_html(report, full_lists=False), layout=widgets.Layout(
            width="40%", min_width="0", max_height=f"{height + 40}px", overflow_y="auto", overflow_x="hidden"))
        side.add_class("qeff-graph-tables")
        self.add_class("qeff-graph-view")
        super().__init__(children=[
            widgets.HTML(graph_header_html(report)),
            widgets.HBox([self.open_button, self.stop_button, self.netron_note], layout=widgets.Layout(align_items="center")),
            widgets.HBox([self.frame, side], layout=widgets.Layout(width="100%")),
        ])
        self._show_stopped()
        if netron:
            self.start()

    def static_html(self) -> str:
        return graph_header_html(self.report) + graph_tables_html(self.report)

    def _show_stopped(self) -> None:
        self.frame.value = (f"<div style='color:{COLORS['muted']};padding:8px'>netron is not running — "
                            "press <i>Open in netron</i> to browse the graph.</div>")
        self.netron_note.value = ""

    def start(self) -> None:
        if self.server is None:
            self.server = NetronServer(self.report.path, outputs=self.netron_outputs)
        self.server.start()
        note = ""
        if self.netron_outputs:
            note = (f"<div style='font-size:11px;color:{COLORS['muted']}'>netron shows the part of the graph that "
                    f"computes {html.escape(', '.join(self.netron_outputs))}, weights left out; "
                    f"the tables show all {self.report.nodes} nodes</div>")
        elif self.server.weightless:
            note = (f"<div style='font-size:11px;color:{COLORS['muted']}'>structure only: weights left out of the copy "
                    "netron shows, so the browser loads kilobytes, not the model</div>")
        if not self.netron_outputs and self.report.nodes > LARGE_LAYOUT:
            note += (f"<div style='font-size:11px;color:{COLORS['muted']}'>netron lays out {self.report.nodes} nodes "
                     "slowly (a minute or more); graph_view(model, netron_outputs=[...]) shows just the part "
                     "that computes some outputs</div>")
        if proxy_prefix() is not None:
            note += (f"<div style='font-size:11px;color:{COLORS['muted']}'>served through jupyter-server-proxy "
                     "(JUPYTERHUB_SERVICE_PREFIX)</div>")
        note += f"<div style='font-size:11px;color:{COLORS['muted']}'>{html.escape(NETRON_CONSENT)}</div>"
        self.frame.value = self.server.iframe_html(self.height) + note
        self.open_button.disabled, self.stop_button.disabled = True, False
        self.open_button.tooltip = "netron is already running below; Stop netron ends it"
        self.netron_note.value = (f"<span style='font-size:12px;color:{COLORS['muted']}'>netron is running below "
                            "(<i>Open in netron</i> is off until you stop it)</span>")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self._show_stopped()
        self.open_button.disabled, self.stop_button.disabled = False, True
        self.open_button.tooltip = "Start netron for this graph (a local server in this kernel)"

    def __repr__(self) -> str:
        state = "netron running" if self.server is not None and self.server.running else "netron stopped"
        return f"<GraphView {self.report.path.name}: {state}>"  # node counts are in the view, not the repr


def graph_view(source, netron: bool = True, height: int = 520, netron_outputs: list[str] | None = None) -> GraphView:
    """The graph view of a model (after export), an ExportResult, an .onnx path, or a GraphReport.

    `netron=True` starts netron at once (else a button does); `netron_outputs` limits what netron draws to the part
    of the graph that computes those tensors (e.g. one decoder layer's cache), which it lays out in seconds."""
    report = source if isinstance(source, GraphReport) else graph_report(source)
    return GraphView(report, netron=netron, height=height, netron_outputs=netron_outputs)
