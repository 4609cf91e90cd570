"""The real case: SmolLM2-135M's residual stream reaches ~2.2e4, so an RMSNorm that squares in fp16
overflows and greedy text turns to garbage. The lab must name those RMSNorms, and the safe-norm fix must
bring the fp16 text back to the fp32 text."""

import pytest

from qeff_lab.accuracy.metrics import token_match_rate
from qeff_lab.accuracy.runners import EmulatedRunner, HFCausalRunner
from qeff_lab.precision import FP16_MAX, analyze, fp16_weights, revert_safe_norm, safe_norm_transform
from qeff_lab.runtime.generation import generate_ids

from tests.precision.real_models import CHAT_PROMPTS, chat_ids, smollm2

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def report():
    model, tok = smollm2()
    return analyze(model, chat_ids(tok, CHAT_PROMPTS[0]), progress=False)


@pytest.fixture(scope="module")
def reference():
    model, tok = smollm2()
    prompt = chat_ids(tok, CHAT_PROMPTS[0])[0].tolist()
    ids, _, _ = generate_ids(HFCausalRunner(model), [prompt], NEW_TOKENS)
    return prompt, ids[0]


def test_residual_stream_reaches_about_2e4_but_stays_below_fp16_max(report):
    model, _ = smollm2()
    residual = [report.profile.get(f"model.layers.{i}").abs_max for i in range(model.config.num_hidden_layers)]
    assert 1e4 < max(residual) < FP16_MAX  # the residual itself fits fp16...
    worst = max(f.value for f in report.findings.of_kind("norm-square"))
    assert worst > 1e8  # ...its square does not (2.2e4^2 ~ 5e8)


def test_lab_names_the_rmsnorms_and_only_them(report):
    model, _ = smollm2()
    errors = [f for f in report.findings if f.severity == "error"]
    assert errors and all(f.kind == "norm-square" for f in errors)
    names = report.findings.modules("norm-square")
    modules = dict(model.named_modules())
    assert all(type(modules[n]).__name__ == "LlamaRMSNorm" for n in names)
    layers_hit = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert len(layers_hit) >= 20 and {0, 1}.isdisjoint(layers_hit)  # early layers have not built up yet
    assert "model.layers.12.input_layernorm" in names and "model.layers.12.post_attention_layernorm" in names
    assert len(names) >= 40 and "model.norm" in names
    assert {f.op for f in errors} >= {"pow"}
    assert not any(f.visible_at_output for f in errors)  # every one is hidden inside the module
    assert report.findings.to_frame().loc[0, "limit"] == FP16_MAX


def test_safe_norm_fix_restores_fp16_greedy_text(report, reference):
    model, tok = smollm2()
    prompt, ref = reference
    assert tok.decode(ref).startswith("The capital of France is Paris")
    m16 = fp16_weights(model)
    broken, _, _ = generate_ids(EmulatedRunner(HFCausalRunner(m16)), [prompt], NEW_TOKENS)
    fix = safe_norm_transform(m16, only=report.findings.modules("norm-square"))
    assert len(fix.changes) == len(report.findings.modules("norm-square"))
    fixed, _, _ = generate_ids(EmulatedRunner(HFCausalRunner(m16)), [prompt], NEW_TOKENS)
    before, after = token_match_rate(ref, broken[0]), token_match_rate(ref, fixed[0])
    print(f"fp16 token match vs fp32: {before:.0%} without the fix, {after:.0%} with it")
    assert before <= 0.25, tok.decode(broken[0])
    assert after >= 0.9, tok.decode(fixed[0])
    assert revert_safe_norm(m16).modified  # and the fix switches off again
    assert not any(type(m).__name__.startswith("Safe") for m in m16.modules())
