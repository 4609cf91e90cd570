"""HTML for a CompileResult: backend and why, the exact command, the artifacts (a pure function of the result)."""
from __future__ import annotations

import html

import pandas as pd


def render_compile_result(result) -> str:
    from qeff_lab.views.tables import html_table

    what = "qaic (dry run: compiler not run)" if result.dry_run else result.backend
    opts = result.options.non_default() if result.options else {}
    opts_html = html_table(pd.DataFrame({"option": list(opts), "value": [repr(v) for v in opts.values()]}),
                           caption="options (non-default)") if opts else "<div>options: all defaults</div>"
    return (f"<div><b>compile</b>: backend <b>{html.escape(what)}</b> — {html.escape(result.reason)}"
            "</div>"  # no cache state: stored notebook outputs must not depend on what ran before
            f"<div style='font-size:11px'>folder <code>{html.escape(str(result.folder))}</code></div>"
            + html_table(pd.DataFrame(result.specializations), caption="specializations")
            + opts_html
            + f"<div style='font-size:11px'>artifacts: {html.escape(', '.join(result.artifacts))}</div>"
            + f"<div style='font-size:12px;margin-top:4px'><b>{html.escape(command_label(result))}</b></div>"
            + f"<pre style='white-space:pre-wrap;font-size:11px'>{html.escape(result.command_line)}</pre>")


def command_label(result) -> str:
    """What the command line below it is: the one that ran, or the one a Cloud AI 100 machine would run."""
    if result.dry_run:
        return "device compile command (dry run: written, not run)"
    if result.backend == "qaic":
        return "device compile command (run)"
    return (f"device compile command (not run here: {result.backend} ran this graph; "
            "on a machine with the Cloud AI 100 SDK this is what compiles it)")
