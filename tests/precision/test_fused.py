"""Overflow hidden inside fused ops: one tiny model built to trigger each kind. The lab must name module, op,
intermediate, value and limit; emulated fp16 must be broken without the fix and restored with it (or, where
IEEE inf arithmetic already gives the right value, say so)."""
import copy
import math

import pytest
import torch
from torch import nn

from qeff_lab.accuracy import EmulatedRunner, HFCausalRunner, token_match_rate
from qeff_lab.precision import (FP16_MAX, Fp16Emulation, RangeProfiler, analyze, apply_fixes, find_issues,
                                fp16_weights, revert_fixes)
from qeff_lab.runtime.generation import generate_ids

from tests.precision.real_models import tiny_llama


def _cos_min(a, b):
    c = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    return torch.where(torch.isfinite(c), c, torch.full_like(c, -1.0)).min().item()


def _profile(module, *inputs):
    with torch.no_grad(), RangeProfiler(module) as prof:
        module(*inputs)
    return prof.profile()


# ----------------------------------------------------------------------------- layer_norm (the issue's BERT)
@pytest.fixture(scope="module")
def bert():
    """A tiny BERT whose layer-1 FFN output reaches ~2e3 (fits fp16): the centered square inside that layer's
    LayerNorm reaches ~4e6 (does not)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128)).eval()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight *= 3e4
    return model, torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))


def test_layer_norm_centered_square_is_named_and_the_safe_norm_restores_fp16(bert):
    model, ids = bert
    report = analyze(model, {"input_ids": ids}, progress=False)
    ffn = report.profile.get("encoder.layer.1.output.dense", "linear").abs_max
    assert 1e3 < ffn < FP16_MAX  # the FFN output itself fits fp16
    errors = [f for f in report.findings if f.severity == "error"]
    assert [(f.module, f.op, f.intermediate) for f in errors] == [
        ("encoder.layer.1.output.LayerNorm", "layer_norm", "centered_square")]
    f = errors[0]
    assert f.kind == "norm-square" and f.fix == "SafeNorm" and f.limit == FP16_MAX and not f.visible_at_output
    # the value is the real (x - mean)² maximum of the LayerNorm's input
    with torch.no_grad():
        seen = {}
        h = model.encoder.layer[1].output.LayerNorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        model(ids)
        h.remove()
    d = seen["x"] - seen["x"].mean(-1, keepdim=True)
    assert math.isclose(f.value, (d * d).max().item(), rel_tol=1e-5) and f.value > 1e6
    assert "centered_square" in f.place and "layer_norm" in f.place
    causes = report.findings.causes()
    assert causes[0].title.startswith("1 LayerNorm: layer_norm [centered_square]") and "SafeNorm" in causes[0].title

    with torch.no_grad():
        ref = model(ids).last_hidden_state
        m16 = fp16_weights(model)
        with Fp16Emulation():
            broken = m16(ids).last_hidden_state
        fixes = apply_fixes(m16, report.findings)
        assert [c.place for r in fixes for c in r.changes] == ["encoder.layer.1.output.LayerNorm"]
        with Fp16Emulation():
            fixed = m16(ids).last_hidden_state
    print(f"min cosine vs fp32: {_cos_min(ref, broken):.3f} without the fix, {_cos_min(ref, fixed):.6f} with it")
    assert _cos_min(ref, broken) < 0.5
    assert _cos_min(ref, fixed) > 0.999
    assert not find_issues(_profile(m16, ids)).of_kind("norm-square")  # the safe form forms no big square


# ----------------------------------------------------------------------------- attention: q·kᵀ before the scale
@pytest.fixture(scope="module")
def loud_attention():
    """A tiny Llama whose q and k are large: q·kᵀ reaches ~1.2e5 before the 1/sqrt(16) scale, ~3e4 after."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 500
            layer.self_attn.k_proj.weight *= 500
    return model, torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(2))


def test_unscaled_attention_product_is_named_and_prescaling_restores_fp16(loud_attention):
    model, ids = loud_attention
    report = analyze(model, {"input_ids": ids}, progress=False)
    errors = [f for f in report.findings if f.severity == "error"]
    assert {(f.module, f.op, f.intermediate) for f in errors} == {
        (f"model.layers.{i}.self_attn", "scaled_dot_product_attention", "qk_product") for i in (0, 1)}
    assert all(f.fix == "PrescaledAttention" and f.kind == "attention-scores" for f in errors)
    scaled = report.profile.get("model.layers.0.self_attn", "scaled_dot_product_attention", "attn_scores")
    assert scaled.abs_max < FP16_MAX < errors[0].value  # the scaled scores fit: folding the scale is enough
    assert len(report.findings.causes()) == 1

    prompt = ids[0].tolist()
    ref = generate_ids(HFCausalRunner(model), [prompt], 12)[0][0]
    m16 = fp16_weights(model)
    broken = generate_ids(EmulatedRunner(HFCausalRunner(m16)), [prompt], 12)[0][0]
    result = apply_fixes(m16, report.findings)[0]
    assert [c.place for c in result.changes] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert m16.model.layers[0].self_attn.scaling == 1.0
    fixed = generate_ids(EmulatedRunner(HFCausalRunner(m16)), [prompt], 12)[0][0]
    before, after = token_match_rate(ref, broken), token_match_rate(ref, fixed)
    print(f"fp16 token match vs fp32: {before:.0%} without the fix, {after:.0%} with it")
    assert before <= 0.25 and after >= 0.9
    # exact in fp32, same weights, switchable
    fixed32 = copy.deepcopy(model)
    apply_fixes(fixed32, report.findings)
    assert fixed32.model.layers[0].self_attn.q_proj.weight.data_ptr() != 0
    with torch.no_grad():
        torch.testing.assert_close(fixed32(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert list(fixed32.state_dict()) == list(model.state_dict())
    assert revert_fixes(fixed32)[1].modified and fixed32.model.layers[0].self_attn.scaling == 0.25
    assert type(fixed32.model.layers[0].self_attn.q_proj) is nn.Linear


# ----------------------------------------------------------------------------- tanh-GELU: x³
def test_tanh_gelu_cube_is_named_and_the_safe_form_is_exact():
    """x³ overflows for |x| > 40.3. Under IEEE arithmetic inf flows through tanh to ±1, the right value, so
    emulated fp16 is not broken by it (a warning, not an error); the safe form removes the inf anyway."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                                         hidden_act="gelu_pytorch_tanh")).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight *= 400
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    findings = analyze(model, {"input_ids": ids}, progress=False).findings
    cube = findings.of_kind("gelu-cube")
    assert [(f.module, f.op, f.intermediate, f.severity, f.fix) for f in cube] == [
        ("model.layers.0.mlp.act_fn", "gelu", "cube", "warning", "SafeGELU")]
    assert cube[0].value > FP16_MAX and cube[0].limit == FP16_MAX
    fixed = copy.deepcopy(model)
    (result,) = apply_fixes(fixed, findings)
    assert result.changes[0].after == "SafeGELUTanh"
    with torch.no_grad():
        torch.testing.assert_close(fixed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        with Fp16Emulation():
            a, b = fp16_weights(model)(ids).logits, fp16_weights(fixed)(ids).logits
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert not find_issues(_profile(fixed, ids)).of_kind("gelu-cube")


# ----------------------------------------------------------------------------- kinds without an exact fix: NPI
class Softplus(nn.Module):
    """A Mamba-style step size: softplus of values around 15 (exp(15) = 3.3e6 > 65504, below threshold 20)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.softplus(self.proj(x))


class WideSoftmax(nn.Module):
    """A softmax over 70000 positions with near-equal scores: Σ exp(x - max) ~ 7e4 > 65504."""

    def forward(self, x):
        return torch.softmax(x, dim=-1)


class OldAttention(nn.Module):
    """GPT-2-era scores: baddbmm(bias, q, kᵀ, alpha=1/8) forms q·kᵀ before alpha."""

    def forward(self, q, k):
        bias = torch.zeros(q.shape[0], q.shape[1], k.shape[1])
        return torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.0, alpha=0.125)


def test_softplus_exp_is_named_and_emulated_fp16_breaks():
    torch.manual_seed(0)
    m = Softplus().eval()
    with torch.no_grad():
        m.proj.bias.fill_(15.0)
    x = torch.randn(4, 8) * 0.1
    (f,) = find_issues(_profile(m, x)).of_kind("exp-overflow")
    assert (f.module, f.op, f.intermediate, f.fix, f.severity) == ("<root>", "softplus", "exp", "NPI", "error")
    assert f.value > 1e6
    with torch.no_grad(), Fp16Emulation():
        out = m(x)
    assert torch.isinf(out).any()  # log1p(inf): the device's softplus is inf where fp32 says ~15


def test_softmax_denominator_over_a_long_row():
    x = torch.randn(1, 70000) * 1e-3
    (f,) = find_issues(_profile(WideSoftmax(), x)).of_kind("softmax-sum")
    assert (f.op, f.intermediate, f.fix) == ("softmax", "sum_exp", "NPI") and 69000 < f.value < 70001
    with torch.no_grad(), Fp16Emulation():
        out = WideSoftmax()(x)
    assert out.sum() == 0  # the sum overflows: every probability rounds to 0


def test_baddbmm_product_before_alpha():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 16) * 100, torch.randn(2, 6, 16) * 100
    profile = _profile(OldAttention(), q, k)
    (f,) = [f for f in find_issues(profile) if f.intermediate == "product"]
    assert f.op == "baddbmm" and math.isclose(f.value, (q @ k.transpose(1, 2)).abs().max().item(), rel_tol=1e-5)
    assert profile.get("<root>", "baddbmm").abs_max < FP16_MAX  # the scaled result fits
    with torch.no_grad(), Fp16Emulation():
        assert torch.isinf(OldAttention()(q, k)).any()


def test_group_norm_has_no_safe_form_here_so_it_gets_an_fp32_island():
    norm = nn.GroupNorm(2, 8).eval()
    x = torch.randn(2, 8, 4, 4)
    x[:, :, 0, 0] = 3000.0
    (f,) = [f for f in find_issues(_profile(norm, x)) if f.severity == "error"]
    assert (f.op, f.intermediate, f.kind, f.fix) == ("group_norm", "centered_square", "norm-square", "NPI")
    with torch.no_grad():
        ref = norm(x)
        with Fp16Emulation():
            out = norm(x)
    assert _cos_min(ref, out) < 0.5


# ----------------------------------------------------------------------------- streaming: blocks = one pass
def test_fused_statistics_do_not_depend_on_the_block_size(monkeypatch):
    import qeff_lab.precision.numerics as numerics

    torch.manual_seed(0)
    x = torch.randn(3, 50, 64) * 300
    q, k = torch.randn(1, 4, 40, 16) * 50, torch.randn(1, 2, 40, 16) * 50
    mask = torch.zeros(1, 1, 40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -1e4)

    def run():
        with torch.no_grad(), RangeProfiler(nn.Identity()) as prof:
            torch.nn.functional.layer_norm(x, (64,))
            torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
        return {(r.op, r.intermediate): (r.numel, r.abs_max, r.n_over) for r in prof.profile().records}

    small = (monkeypatch.setattr(numerics, "CHUNK", 100), run())[1]
    monkeypatch.setattr(numerics, "CHUNK", 1 << 30)
    big = run()
    assert small.keys() == big.keys() and ("layer_norm", "centered_square") in big
    for key in big:
        assert small[key][0] == big[key][0] and small[key][2] == big[key][2], key
        assert math.isclose(small[key][1], big[key][1], rel_tol=1e-6), key
    d = x - x.mean(-1, keepdim=True)
    assert math.isclose(big[("layer_norm", "centered_square")][1], (d * d).max().item(), rel_tol=1e-5)
    kr = k.repeat_interleave(2, dim=1)
    assert math.isclose(big[("scaled_dot_product_attention", "qk_product")][1],
                        (q @ kr.transpose(-1, -2)).abs().max().item(), rel_tol=1e-5)
