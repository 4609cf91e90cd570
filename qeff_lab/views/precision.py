"""Precision views: range heatmap, findings table, accuracy ladder table and plot. They draw reports; they compute nothing."""
from __future__ import annotations

import html
import math

import pandas as pd

from qeff_lab.views.tables import COLORS, SUMMARY_ABOVE, details_html, findings_html, html_table

SEVERITY_COLORS = {"error": COLORS["overflow"], "warning": COLORS["underflow"], "info": "#757575"}


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def _formatted(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda col: col.map(_fmt)) if not df.empty else df


CAUSE_VIEW_COLUMNS = ["severity", "cause", "modules", "places", "times_limit", "fix"]
PLACE_VIEW_COLUMNS = ["severity", "place", "intermediate", "value", "limit", "visible_at_output"]


def render_findings(findings, max_rows: int = 40, css_class: str = "qeff-precision-findings") -> str:
    """The one grouped view of findings: the counts (`findings.headline()`, the same words everywhere), one row per
    root cause (severity in colour, worst first), then each cause expandable (<details>) to its fix, said once,
    and its places, largest value first. The grouping of `findings.to_frame()`. Tables carry `css_class` (causes)
    and `css_class`-places."""
    if not len(findings):
        return "<div><b>Findings</b>: none — every profiled value fits fp16</div>"
    causes = findings.causes()
    shown = findings.to_frame()[CAUSE_VIEW_COLUMNS].copy()
    shown["times_limit"] = [f"{v:.2g}x" for v in shown["times_limit"]]
    parts = [f"<div><b>Findings</b>: {html.escape(findings.headline())}</div>",
             findings_html(shown, caption="one row per root cause, worst first", css_class=css_class)]
    for i, c in enumerate(causes):
        places = c.to_frame().sort_values("value", ascending=False, kind="stable")[PLACE_VIEW_COLUMNS]
        parts.append(
            f"<details class='qeff-cause'><summary><span style='color:{SEVERITY_COLORS[c.severity]}'>"
            f"{html.escape(c.severity)}</span> {html.escape(c.title)}</summary>"
            f"<div style='font-size:12px'>fix: {html.escape(c.remedy)}</div>"
            + html_table(_formatted(places), caption=f"cause {i}: {len(places)} place(s) in {len(c.modules)} "
                                                     "module(s), largest value first",
                         max_rows=max_rows, css_class=f"{css_class}-places") + "</details>")
    return "".join(parts)


def render_profile(profile, max_rows: int = 20) -> str:
    df = profile.to_frame().sort_values("headroom_bits").head(max_rows)
    cols = ["module", "op", "abs_max", "min_nonzero", "n_over", "frac_subnormal", "frac_flush", "headroom_bits"]
    return html_table(_formatted(df[cols]), caption=f"{profile!r} — least headroom first")


def render_report(report, findings: bool = True) -> str:
    """What was profiled, then the grouped findings (`findings=False`: the profile line only)."""
    head = (f"<div><b>Precision report</b>: {report.inputs} input(s), {report.tokens} tokens, "
            f"{report.sites} sites profiled</div>")
    return head + (render_findings(report.findings, max_rows=15) if findings else "")


def render_ladder(ladder, timings: bool = False) -> str:
    """The ladder's table as `ladder.table()` words it (the same on every CPU: noise-level differences shown
    against their tolerance, 2 significant digits), then what each rung generated; seconds per rung only with
    `timings`."""
    df = ladder.table()
    if timings and "seconds" in ladder.summary:
        df.insert(len(df.columns) - 1 if "note" in df.columns else len(df.columns), "seconds",
                  [f"{v:.2f}" for v in ladder.summary["seconds"]])
    df.columns = [c.replace("_", " ") for c in df.columns]  # headers that wrap: the table fits the output area
    out = html_table(df, caption=f"accuracy ladder ({ladder.kind}) vs {ladder.reference}", css_class="qeff-ladder",
                     nowrap=tuple(c for c in df.columns if c not in ("rung", "note")))  # the values on one line
    texts = ladder_texts(ladder)
    if texts is not None:
        out += html_table(texts, caption=f"what each rung generated (greedy, {ladder.generation_len} new tokens)",
                          max_rows=len(texts), css_class="qeff-ladder-texts")
    if ladder.notes:
        out += f"<div style='font-size:11px;color:{COLORS['muted']}'>{html.escape('; '.join(ladder.notes))}</div>"
    return out


def render_islands(search) -> str:
    """An fp32 island search: its one-line summary, every step of the search, then the modules kept in fp32 with
    why, folded under a one-line summary when there are more than a screen's worth."""
    steps = search.steps.copy()
    steps["value"] = steps["value"].map(_fmt)
    islands = html_table(search.to_frame(), max_rows=len(search.islands), css_class="qeff-islands")
    if len(search.islands) > SUMMARY_ABOVE:
        islands = details_html(f"the {len(search.islands)} modules kept in fp32, each with why", islands)
    return (f"<div><b>fp32 islands</b>: {html.escape(search.summary())}</div>"
            + html_table(steps, caption="the search, one emulated run a step", max_rows=len(steps)) + islands)


def ladder_texts(ladder) -> pd.DataFrame | None:
    """One row per rung (and prompt, when several): the text it generated, or None when the ladder kept none."""
    pp = ladder.per_prompt
    if "text" not in pp.columns or pp.empty:
        return None
    several = pp["prompt"].nunique() > 1
    cols = ["rung", "prompt", "text"] if several else ["rung", "text"]
    return pp[cols].reset_index(drop=True)


def ladder_summary(ladder) -> str:
    """One line for the dashboard: what each rung costs, by its main measure."""
    s = ladder.summary
    rest = s.iloc[1:]
    if ladder.kind == "encoder":
        parts = [f"{r.rung} {r.min_cosine:.4f}" for r in rest.itertuples()]
        return f"{len(s)} rungs vs {ladder.reference}, min cosine: " + ", ".join(parts)
    parts = [f"{r.rung} {r.top1_agreement:.0%}" for r in rest.itertuples()]
    return f"{len(s)} rungs vs {ladder.reference}, top-1 agreement (teacher-forced): " + ", ".join(parts)


FIGURE_WIDTH_IN = 10.0  # inches at 100 dpi: 1000 px, the width of a notebook's output area, so nothing is scaled down
HEATMAP_WIDTH_IN = FIGURE_WIDTH_IN
HEATMAP_LABEL_PT = 9  # every label's size: 12.5 px at 100 dpi, readable at 100% zoom
FLUSH_SHOWN_FROM = 1e-4  # sites where at least this share of values flushes to zero get a bar


def _headroom_colors(clip_bits: float):
    """The headroom colour scale of both heatmaps: red below 0 bits (overflow), white at 0, green above."""
    from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm

    cmap = LinearSegmentedColormap.from_list("headroom", [COLORS["overflow"], "#ffffff", COLORS["headroom"]])
    return cmap, TwoSlopeNorm(0.0, -clip_bits, clip_bits)


def heatmap_figure(headroom: pd.DataFrame, underflow: pd.DataFrame | None = None, title: str = "fp16 headroom",
                   clip_bits: float = 16.0):
    """Site (rows: `input_layernorm: pow`, ...) x layer (columns), coloured by fp16 headroom in bits
    (log2(65504 / abs max)): red below 0 (overflow), green above, each row labelled. Below it, for the sites where
    values flush to zero in fp16 (underflow) at all, one bar each: the largest share and in how many layers (the
    sites where nothing flushes are left out, so the panel shows only what matters).
    The figure is HEATMAP_WIDTH_IN wide whatever the number of layers and sites (it grows in height), so a
    notebook shows it at its own size. Inputs are `RangeProfile.heatmap_frame("headroom_bits")` /
    `heatmap_frame("frac_flush")` (layers x sites)."""
    import matplotlib.pyplot as plt

    data = headroom.astype(float).clip(-clip_bits, clip_bits).T  # sites x layers
    flush = None
    if underflow is not None and not underflow.empty:
        share = underflow.astype(float).reindex(columns=headroom.columns)
        worst = share.max().fillna(0.0)
        layers = (share >= FLUSH_SHOWN_FROM).sum()
        flush = pd.DataFrame({"share": worst, "layers": layers})
        flush = flush[flush["share"] >= FLUSH_SHOWN_FROM].sort_values("share")
    heat_h = 0.2 * data.shape[0] + 1.4
    bars_h = (0.28 * max(len(flush), 1) + 1.1) if flush is not None else 0.0
    fig = plt.figure(figsize=(HEATMAP_WIDTH_IN, heat_h + bars_h))
    grid = fig.add_gridspec(2 if flush is not None else 1, 2, width_ratios=[40, 1],
                            height_ratios=[heat_h, bars_h] if flush is not None else [1])
    ax = fig.add_subplot(grid[0, 0])
    cmap, norm = _headroom_colors(clip_bits)
    im = ax.imshow(data.values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(f"{title} in bits, log2(65504 / |x| max): red < 0 overflows", fontsize=HEATMAP_LABEL_PT + 1)
    ax.set_yticks(range(data.shape[0]), data.index, fontsize=HEATMAP_LABEL_PT)
    ax.set_xticks(range(data.shape[1]), [str(c) for c in data.columns], fontsize=HEATMAP_LABEL_PT)
    ax.set_xlabel("layer", fontsize=HEATMAP_LABEL_PT)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    bar = fig.colorbar(im, cax=fig.add_subplot(grid[0, 1]))
    bar.ax.tick_params(labelsize=HEATMAP_LABEL_PT)
    if flush is not None:
        ax2 = fig.add_subplot(grid[1, 0])
        if flush.empty:
            ax2.text(0.5, 0.5, f"no site flushes {FLUSH_SHOWN_FROM:.0e} or more of its values to zero in fp16",
                     ha="center", va="center", fontsize=HEATMAP_LABEL_PT, transform=ax2.transAxes)
            ax2.set_axis_off()
        else:
            ax2.barh(range(len(flush)), flush["share"], color=COLORS["underflow"])
            ax2.set_yticks(range(len(flush)), flush.index, fontsize=HEATMAP_LABEL_PT)
            for y, (v, n) in enumerate(zip(flush["share"], flush["layers"])):
                ax2.text(v, y, f" {v:.2%} (in {n} layer{'s' if n != 1 else ''})", va="center",
                         fontsize=HEATMAP_LABEL_PT)
            ax2.set_xscale("log")
            ax2.set_xlim(FLUSH_SHOWN_FROM / 2, 5.0)  # room for the labels right of the bars
            ax2.tick_params(axis="x", labelsize=HEATMAP_LABEL_PT)
            ax2.set_title(f"underflow: the sites where values flush to zero in fp16 (largest share over the layers; "
                          f"{len(data) - len(flush)} other sites: none)", fontsize=HEATMAP_LABEL_PT + 1)
    fig.tight_layout()
    return fig


def profile_heatmap(profile, sites: list[str] | None = None):
    """heatmap_figure of a RangeProfile's own layer x site tables."""
    return heatmap_figure(profile.heatmap_frame("headroom_bits", sites), profile.heatmap_frame("frac_flush", sites))


def module_headroom(profile) -> pd.DataFrame:
    """Layers x module role (`input_layernorm`, `mlp.down_proj`, ...): the least fp16 headroom (bits) over every op
    inside it. Comparable across a fix that changes the ops inside a module (e.g. SafeRMSNorm)."""
    h = profile.heatmap_frame("headroom_bits")
    if h.empty:
        return h
    return h.T.groupby(lambda site: site.split(":")[0], sort=False).min().T


def heatmap_pair_figure(before, after, roles: list[str] | None = None, clip_bits: float = 16.0,
                        titles: tuple[str, str] = ("before the fix", "after the fix")):
    """Two profiles side by side (e.g. before and after `fix_precision`): layers x module role, the least fp16
    headroom inside each module. `roles`: default, the roles where `before` overflows (headroom < 0) anywhere."""
    import matplotlib.pyplot as plt

    b, a = module_headroom(before), module_headroom(after)
    if roles is None:
        roles = [r for r in b.columns if (b[r] < 0).any()] or list(b.columns)
    missing = [r for r in roles if r not in b.columns or r not in a.columns]
    if missing:
        raise KeyError(f"Module role(s) {missing} not in both profiles; roles in both: "
                       f"{sorted(set(b.columns) & set(a.columns))}.")
    cmap, norm = _headroom_colors(clip_bits)
    fig, axes = plt.subplots(1, 2, figsize=(HEATMAP_WIDTH_IN, 0.2 * len(b) + 2.0), sharey=True)
    for ax, frame, title in zip(axes, (b, a), titles):
        data = frame[roles].astype(float).clip(-clip_bits, clip_bits)
        im = ax.imshow(data.values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(roles)), roles, fontsize=HEATMAP_LABEL_PT, rotation=20, ha="right")
        ax.set_yticks(range(len(data)), [str(i) for i in data.index], fontsize=HEATMAP_LABEL_PT - 1)
        worst = float(frame[roles].min().min())
        ax.set_title(f"{title}: least headroom {worst:+.1f} bits", fontsize=HEATMAP_LABEL_PT + 1)
    axes[0].set_ylabel("layer", fontsize=HEATMAP_LABEL_PT)
    bar = fig.colorbar(im, ax=list(axes), fraction=0.04)
    bar.set_label("fp16 headroom (bits; < 0 overflows)", fontsize=HEATMAP_LABEL_PT)
    bar.ax.tick_params(labelsize=HEATMAP_LABEL_PT)
    return fig


def _bar_labels(ax, values, fmt) -> None:
    for i, v in enumerate(values):
        ax.annotate(fmt(v), (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def ladder_figure(ladder):
    """What each rung costs. Decoders: teacher-forced top-1 agreement and mean KL against the reference (over the
    same text), and perplexity on a log scale, each bar labelled with its value; encoders: min / median cosine
    and max abs difference."""
    import matplotlib.pyplot as plt

    s = ladder.summary
    names = list(s["rung"])
    if ladder.kind == "encoder":
        fig, axes = plt.subplots(1, 2, figsize=(FIGURE_WIDTH_IN, 3.6))
        axes[0].bar(names, s["min_cosine"], color=COLORS["reused"])
        _bar_labels(axes[0], s["min_cosine"], lambda v: f"{v:.4f}")
        axes[0].set_title("min cosine vs HF fp32")
        axes[1].bar(names, s["max_abs_diff"], color=COLORS["underflow"])
        _bar_labels(axes[1], s["max_abs_diff"], lambda v: f"{v:.2g}")
        axes[1].set_title("max abs difference")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(FIGURE_WIDTH_IN, 3.8))
        top1 = s["top1_agreement"].astype(float)
        colors = [COLORS["done"] if v >= 0.95 else COLORS["underflow"] if v >= 0.5 else COLORS["overflow"]
                  for v in top1]
        axes[0].bar(names, top1, color=colors)
        _bar_labels(axes[0], top1, lambda v: f"{v:.0%}")
        axes[0].set_ylim(0, 1.15)
        axes[0].set_title("top-1 agreement (teacher-forced)", fontsize=10)
        floor = 1e-6  # KL below this is noise; drawn at the floor and labelled as such
        kl = s["kl_mean"].astype(float)
        axes[1].bar(names, kl.clip(lower=floor), color=COLORS["underflow"])
        _bar_labels(axes[1], kl.clip(lower=floor), lambda v: "<1e-6" if v <= floor else f"{v:.2g}")
        axes[1].set_yscale("log")
        axes[1].set_title(f"mean KL vs {ladder.reference} (nats, log)", fontsize=10)
        ppl = s["perplexity"].astype(float)
        finite = ppl.where(ppl.map(math.isfinite))
        axes[2].bar(names, finite, color=COLORS["reused"])
        _bar_labels(axes[2], finite.fillna(finite.min() if finite.notna().any() else 1.0),
                    lambda v: f"{v:.3g}")
        for i, v in enumerate(ppl):
            if not math.isfinite(v):
                axes[2].text(i, 1, "inf", ha="center", va="bottom", color=COLORS["overflow"])
        axes[2].set_yscale("log")
        axes[2].set_title(f"perplexity, {ladder.text_tokens} tokens (log)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.margins(y=0.15)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    fig.tight_layout()
    return fig
