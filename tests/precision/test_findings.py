"""Findings a person can read: one row per root cause, worst first, expandable to its places."""
import torch

from qeff_lab.precision import RangeProfiler, find_issues
from qeff_lab.precision.findings import FIXES, Finding, Findings
from qeff_lab.views.precision import render_findings

from tests.precision.test_profile import Net


def _f(module, op, kind, value, cls, severity="error", intermediate=""):
    fix, text = FIXES[kind]
    place = f"{module}: {op}" + (f" [{intermediate}]" if intermediate else "")
    return Finding(place, module, op, kind, severity, value, 65504.0, fix, text, cls, False, 1, intermediate)


def test_every_op_of_the_same_norm_kind_is_one_cause_sorted_by_how_far_past_the_limit():
    findings = Findings([_f(f"model.layers.{i}.{n}", op, "norm-square", v * (i + 1), "LlamaRMSNorm")
                         for i in range(3) for n in ("input_layernorm", "post_attention_layernorm")
                         for op, v in (("pow", 6e8), ("mean", 2e8), ("add", 2e8))]
                        + [_f("model.layers.1.mlp.down_proj", "linear", "activation", 9e4, "Linear"),
                           _f("model.layers.2.mlp.down_proj", "linear", "activation", 8e4, "Linear"),
                           _f("model.layers.0.mlp", "mul", "near-overflow", 4e4, "LlamaMLP", "warning")])
    frame = findings.to_frame()
    assert list(frame["kind"]) == ["norm-square", "activation", "near-overflow"]  # severity, then x the limit
    top = frame.iloc[0]
    assert (top["modules"], top["places"], top["fix"]) == (6, 18, "SafeNorm") and top["value"] == 1.8e9
    assert top["cause"] == ("6 LlamaRMSNorms: pow reaches 1.8e9 (2.7e4x the fp16 max 65504); fix: SafeNorm "
                            "(one call)")
    assert frame.iloc[1]["modules"] == 2 and frame.iloc[1]["worst_place"] == "model.layers.1.mlp.down_proj: linear"
    places = findings.places_frame()
    assert len(places) == len(findings) and set(places["cause_id"]) == {0, 1, 2}
    assert (places.groupby("cause_id").size() == [18, 2, 1]).all()
    assert "3 causes over 21 places in 9 modules (2 errors, 1 warning, 0 info)" in repr(findings)
    assert findings.counts() == {"causes": 3, "places": 21, "modules": 9, "error": 2, "warning": 1, "info": 0,
                                 "error_places": 20}


def test_the_view_shows_causes_expandable_to_places():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    x[..., 3] = 1000.0
    net = Net().eval()
    with torch.no_grad(), RangeProfiler(net) as prof:
        net(x)
    findings = find_issues(prof.profile())
    causes = findings.causes()
    assert causes[0].kind == "norm-square" and causes[0].modules == ["layers.0.norm", "layers.1.norm"]
    page = render_findings(findings)
    assert page.count("<details class='qeff-cause'>") == len(causes)
    assert "class='qeff-precision-findings'" in page and "class='qeff-precision-findings-places'" in page
    assert causes[0].title in page.replace("&#x27;", "'") and "layers.1.norm: mul" in page
