"""Precision views draw reports (heatmap, findings, ladder) without computing; checked without a kernel."""
import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qeff_lab.accuracy.ladder import SUMMARY_COLUMNS, LadderReport  # noqa: E402
from qeff_lab.precision import RangeProfiler, find_issues  # noqa: E402
from qeff_lab.precision.islands import IslandSearch  # noqa: E402
from qeff_lab.views.precision import (FIGURE_WIDTH_IN, HEATMAP_LABEL_PT, HEATMAP_WIDTH_IN, heatmap_figure,  # noqa: E402
                                      heatmap_pair_figure, ladder_figure, profile_heatmap, render_findings,
                                      render_ladder, render_profile)

from tests.precision.test_profile import Net  # noqa: E402


def _profile():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 4, 16)
    x[..., 0] = 1000.0
    with torch.no_grad(), RangeProfiler(net) as prof:
        net(x)
    return prof.profile()


def test_heatmap_has_sites_by_layers_sized_for_a_notebook_and_an_underflow_panel():
    profile = _profile()
    headroom = profile.heatmap_frame()
    assert list(headroom.index) == [0, 1] and "norm: mul" in headroom.columns
    fig = profile_heatmap(profile)
    assert fig.get_size_inches()[0] == HEATMAP_WIDTH_IN  # 1000 px at 100 dpi: shown unscaled in a notebook
    heat, _colorbar, flush = fig.axes
    assert heat.get_title().startswith("fp16 headroom")
    assert [t.get_text() for t in heat.get_yticklabels()] == list(headroom.columns)  # one labelled row per site
    assert {t.get_fontsize() for t in heat.get_yticklabels() + heat.get_xticklabels()} == {HEATMAP_LABEL_PT}
    shares = profile.heatmap_frame("frac_flush").max()
    flushing = [t.get_text() for t in flush.get_yticklabels()]  # only the sites that flush anything get a bar
    expected = set(shares[shares >= 1e-4].index)
    if expected:
        assert set(flushing) == expected
    else:  # nothing flushes: the panel says so instead of drawing an empty (white) map
        assert "no site flushes" in flush.texts[0].get_text()
    single = heatmap_figure(headroom)
    assert len(single.axes) == 2


def test_before_after_pair_compares_module_roles():
    before = _profile()
    fig = heatmap_pair_figure(before, before)
    left, right, _bar = fig.axes
    assert left.get_title().startswith("before the fix") and right.get_title().startswith("after the fix")
    roles = [t.get_text() for t in left.get_xticklabels()]
    assert roles and all(":" not in r for r in roles)  # module roles, whatever ops a fix puts inside them
    with pytest.raises(KeyError, match="not in both profiles"):
        heatmap_pair_figure(before, before, roles=["no_such_module"])


def test_findings_and_profile_html():
    profile = _profile()
    findings = find_issues(profile)
    page = render_findings(findings)
    assert "layers.0.norm: mul" in page and "SafeNorm" in page and "error" in page
    assert "least headroom first" in render_profile(profile)
    assert "none" in render_findings(find_issues(type(profile)([])))


def test_ladder_table_and_plot():
    rows = [{"rung": "HF fp32", "token_match": 1.0, "first_divergence": None, "margin_at_divergence": None,
             "top1_agreement": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "kl_max": 0.0, "max_abs_logit_diff": 4.315e-05,
             "mean_abs_logit_diff": 0.0, "perplexity": 30.0, "seconds": 1.5, "note": "reference"},
            {"rung": "fp16 (no fixes)", "token_match": 0.875, "first_divergence": 0, "margin_at_divergence": 0.1234,
             "top1_agreement": 0.0, "kl_mean": 3.21, "kl_p99": float("inf"), "kl_max": float("inf"),
             "max_abs_logit_diff": 40.0, "mean_abs_logit_diff": 6.0, "perplexity": float("inf"), "seconds": 2.5,
             "note": ""}]
    ladder = LadderReport(pd.DataFrame(rows, columns=SUMMARY_COLUMNS), pd.DataFrame(), "HF fp32", 64, 8)
    html = render_ladder(ladder)
    assert "fp16 (no fixes)" in html and "seconds" not in html and "inf" in html
    assert "seconds" in render_ladder(ladder, timings=True)
    # headers in words, so they wrap and the eleven columns fit a notebook's output area (snake_case did not)
    assert "<th" in html and "max abs logit diff" in html and "max_abs_logit_diff" not in html
    assert "white-space:nowrap'>&lt;1e-03</td>" in html  # and the values on one line ("<1e-" / "06" read badly)
    # the text form is the same on every CPU: noise below its tolerance, 2 significant digits otherwise
    table = ladder.table().set_index("rung")
    assert table.loc["HF fp32", "max_abs_logit_diff"] == "<1e-03" and "4.315e-05" not in html
    assert table.loc["fp16 (no fixes)", "token_match"] == "87.5%" and table.loc["HF fp32", "token_match"] == "100%"
    assert table.loc["fp16 (no fixes)", "kl_mean"] == "3.2" and table.loc["fp16 (no fixes)", "kl_p99"] == "inf"
    assert table.loc["fp16 (no fixes)", "margin_at_divergence"] == "0.12" and "seconds" not in table.columns
    fig = ladder_figure(ladder)
    top1, kl, ppl = fig.axes
    assert fig.get_size_inches()[0] == FIGURE_WIDTH_IN  # ~1000 px at 100 dpi: shown at its own size, not scaled down
    assert [t.get_text() for t in top1.get_xticklabels()] == ["HF fp32", "fp16 (no fixes)"]
    assert "top-1 agreement" in top1.get_title() and kl.get_yscale() == "log" and ppl.get_yscale() == "log"
    assert [t.get_text() for t in top1.texts] == ["100%", "0%"]  # each bar labelled with its value
    assert "inf" in [t.get_text() for t in ppl.texts]


def _islands(n: int) -> IslandSearch:
    islands = [f"model.layers.{i}.input_layernorm" for i in range(n)]
    steps = pd.DataFrame([{"step": 0, "phase": "baseline", "units_fp32": 0, "value": 0.05, "meets_target": False,
                           "note": "nothing in fp32"},
                          {"step": 1, "phase": "baseline", "units_fp32": n, "value": 1.0, "meets_target": True,
                           "note": "every module in fp32"}])
    return IslandSearch(islands, {m: f"fp32 island: {m}: pow reaches |x| 6.2e+08" for m in islands}, steps,
                        "token_match", 1.0, None, True, 1.0, 0.05, n)


def test_island_search_html_folds_a_long_list_of_islands():
    many = _islands(53)._repr_html_()  # SmolLM2's search keeps 53 norms: ~1900 px of rows when shown flat
    assert "fp32 islands</b>: fp16, token_match target 1: 53 of 53 modules in fp32" in many
    assert "nothing in fp32" in many and "0.05" in many  # the steps, shown
    assert many.index("<details") < many.index("model.layers.52.input_layernorm")  # the islands, one click away
    assert "the 53 modules kept in fp32" in many and many.count("fp32 island: model.layers.") == 53
    few = _islands(3)._repr_html_()
    assert "<details" not in few and few.count("fp32 island: model.layers.") == 3
