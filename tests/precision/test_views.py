"""Precision views draw reports (heatmap, findings, ladder) without computing; checked without a kernel."""
import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from qeff_lab.accuracy.ladder import SUMMARY_COLUMNS, LadderReport  # noqa: E402
from qeff_lab.precision import RangeProfiler, find_issues  # noqa: E402
from qeff_lab.views.precision import (heatmap_figure, ladder_figure, profile_heatmap, render_findings,  # noqa: E402
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


def test_heatmap_has_layers_by_sites_and_an_underflow_panel():
    profile = _profile()
    headroom = profile.heatmap_frame()
    assert list(headroom.index) == [0, 1] and "norm: mul" in headroom.columns
    fig = profile_heatmap(profile)
    assert len(fig.axes) == 4  # two panels, two colour bars
    assert fig.axes[0].get_title().startswith("fp16 headroom")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(headroom.columns)
    single = heatmap_figure(headroom)
    assert len(single.axes) == 2


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
    # the text form is the same on every CPU: noise below its tolerance, 2 significant digits otherwise
    table = ladder.table().set_index("rung")
    assert table.loc["HF fp32", "max_abs_logit_diff"] == "<1e-03" and "4.315e-05" not in html
    assert table.loc["fp16 (no fixes)", "token_match"] == "87.5%" and table.loc["HF fp32", "token_match"] == "100%"
    assert table.loc["fp16 (no fixes)", "kl_mean"] == "3.2" and table.loc["fp16 (no fixes)", "kl_p99"] == "inf"
    assert table.loc["fp16 (no fixes)", "margin_at_divergence"] == "0.12" and "seconds" not in table.columns
    fig = ladder_figure(ladder)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["HF fp32", "fp16 (no fixes)"]
