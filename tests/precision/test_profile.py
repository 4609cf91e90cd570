"""Range profiling: exact statistics, attribution to module path + op, streaming (bounded) records."""
import math

import torch
from torch import nn

from qeff_lab.precision import FP16_MAX, RangeProfiler, analyze, find_issues, tensor_stats
from qeff_lab.precision.profile import op_name, site_of

from tests.precision.real_models import tiny_llama


def test_tensor_stats_counts_exactly():
    t = torch.tensor([0.0, 1e-9, -2.0**-25, 1e-6, -3e-5, 1.0, -7e4, 65504.0, 65505.0])
    n, hi, lo, over, sub, flush, nonfinite = tensor_stats(t)
    assert (n, over, sub, flush, nonfinite) == (9, 2, 2, 2, 0)  # flush: 1e-9 and 2^-25 (the tie rounds to 0)
    assert hi == 7e4 and math.isclose(lo, 1e-9, rel_tol=1e-6)
    # the same verdicts fp16 itself gives
    h = t.half().float()
    assert int((h[t != 0] == 0).sum()) == flush and int(torch.isinf(h).sum()) == 1  # 65505 rounds to 65504
    assert tensor_stats(torch.tensor([1.0, float("inf")]))[1] == math.inf


def test_op_names_normalise_spellings():
    assert op_name(torch.Tensor.__mul__) == op_name(torch.Tensor.__rmul__) == op_name(torch.mul) == "mul"
    assert op_name(torch.Tensor.pow) == op_name(torch.Tensor.pow_) == "pow"
    assert op_name(torch.Tensor.view) is None and op_name(torch.Tensor.transpose) is None
    assert site_of("model.layers.7.input_layernorm", "pow") == "input_layernorm: pow"


class NaiveNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = NaiveNorm(16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.norm(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_overflow_inside_a_norm_is_attributed_to_module_and_op():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 16)
    x[..., 3] = 1000.0  # squares to 1e6 inside the norm; the norm's output is ~4
    with torch.no_grad(), RangeProfiler(net) as prof:
        net(x)
    profile = prof.profile()
    sq = profile.get("layers.0.norm", "mul")
    assert sq is not None and sq.abs_max > FP16_MAX and sq.n_over > 0
    assert profile.get("layers.0.norm").abs_max < 10  # the module's output looks harmless
    assert profile.get("layers.0.proj", "linear") is not None
    assert profile.get("<root>").abs_max >= 1000
    findings = find_issues(profile)
    norm_findings = findings.of_kind("norm-square")
    assert {f.module for f in norm_findings} == {"layers.0.norm", "layers.1.norm"}
    assert all(not f.visible_at_output and f.severity == "error" and f.fix == "SafeNorm" for f in norm_findings)
    frame = profile.to_frame()
    assert {"layer", "site", "abs_max", "frac_flush", "headroom_bits"} <= set(frame.columns)
    assert profile.heatmap_frame().loc[0, "norm: mul"] < 0  # negative headroom: overflow


def test_records_are_bounded_and_accumulate_over_calls():
    net = Net().eval()
    with torch.no_grad(), RangeProfiler(net) as prof:
        net(torch.randn(1, 3, 16))
        sites = len(prof.profile().records)
        for _ in range(5):
            net(torch.randn(1, 3, 16))
    profile = prof.profile()
    assert len(profile.records) == sites  # streaming: more inputs, same number of records
    assert profile.get("layers.1.proj", "linear").calls == 6
    assert profile.inputs == 6
    with torch.no_grad():  # hooks are gone afterwards
        net(torch.randn(1, 3, 16))
    assert profile.get("layers.1.proj", "linear").calls == 6


class Attn(nn.Module):
    """Fused attention with an fp32-minimum additive mask and huge q, k."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_fused_attention_scores_and_fp32_min_mask_are_found():
    q = torch.randn(1, 4, 6, 8) * 300
    k = torch.randn(1, 4, 6, 8) * 300
    v = torch.randn(1, 4, 6, 8)
    mask = torch.full((1, 1, 6, 6), torch.finfo(torch.float32).min).triu(1)
    m = Attn()
    with torch.no_grad(), RangeProfiler(m) as prof:
        m(q, k, v, mask)
    findings = find_issues(prof.profile())
    kinds = {f.kind for f in findings}
    assert {"attention-scores", "mask-constant"} <= kinds
    scores = [f for f in findings if f.intermediate == "attn_scores"][0]  # sdpa intermediates are named now
    expected = (q @ k.transpose(-1, -2) / math.sqrt(8)).abs().max().item()
    assert math.isclose(scores.value, expected, rel_tol=1e-5)
    assert [f for f in findings if f.kind == "mask-constant"][0].severity == "warning"


def test_softmax_input_and_underflow_findings():
    class M(nn.Module):
        def forward(self, x):
            torch.softmax(x * 3e3, dim=-1)  # the softmax input overflows fp16
            return x * 1e-11  # and this flushes to zero in fp16

    with torch.no_grad(), RangeProfiler(M()) as prof:
        M()(torch.randn(4, 32) * 30)
    findings = find_issues(prof.profile())
    assert findings.of_kind("softmax-input") and findings.of_kind("underflow")
    assert findings.of_kind("underflow")[0].severity == "info"


def test_analyze_tiny_llama_per_decode_step():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 9))
    report = analyze(model, {"input_ids": ids}, decode_steps=3, per_step=True, progress=False)
    steps = {r.step for r in report.profile.records}
    assert steps == {0, 1, 2, 3}
    assert report.tokens == 12 and report.inputs == 1
    merged = report.profile.get("model.layers.1.self_attn", "attn_scores")
    assert merged.calls == 4
    assert not report.findings.of_kind("norm-square")  # random tiny weights stay in range
    assert set(report.weights["parameter"]) >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert "PrecisionReport" in repr(report)


def test_chunked_statistics_equal_one_pass(monkeypatch):
    import qeff_lab.precision.numerics as numerics

    g = torch.Generator().manual_seed(0)
    t = torch.randn(300_001, generator=g) * 2e4
    t[::997] = 0.0
    t[5], t[299_999] = 1e-9, 3e-6
    chunked = numerics.tensor_stats(t)
    monkeypatch.setattr(numerics, "CHUNK", 1 << 30)
    assert numerics.tensor_stats(t) == chunked
    assert chunked[1] == t.abs().max().item() and chunked[5] == 1
