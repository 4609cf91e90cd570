"""Widgets that carry a static HTML copy of themselves in their output bundle.

A stored notebook shows a widget only where its live model exists: JupyterLab renders untrusted (not yet run)
notebooks with "safe" renderers only, and GitHub, nbviewer and nbconvert have no kernel. With a `text/html` entry
beside the widget's own mime type, each of those shows the same content as static HTML, and a live front end
still prefers the widget."""
from __future__ import annotations

import html

STATIC_CLASS = "qeff-static"


class StaticFallback:
    """Mixin for an ipywidgets widget: `static_html()` goes into the output bundle as text/html."""

    static_note = "a static copy of this view: run the notebook for the live widget"

    def static_html(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        data["text/html"] = (f"<div class='{STATIC_CLASS}'>{self.static_html()}"
                             f"<div style='font-size:11px;color:#757575'>{html.escape(self.static_note)}</div></div>")
        return data
