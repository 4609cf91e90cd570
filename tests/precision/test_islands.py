"""The fp32-island search: the fewest modules in fp32 so emulated fp16 reaches a target, as NPI YAML the compile
step accepts; on SmolLM2 without the safe-norm fix, no more islands than the findings-based YAML, same accuracy."""
import re

import pytest
import torch
import yaml

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.precision import analyze
from qeff_lab.precision.islands import find_fp32_islands, island_accuracy
from tests.precision.real_models import smollm2, tiny_llama


@pytest.fixture(scope="module")
def hot_llama():
    """A tiny Llama whose embeddings reach |x| ~ 1e3: every RMSNorm's square passes 65504 in fp16."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight *= 3e4
    return QEFFAutoModelForCausalLM.from_model(model), torch.randint(0, 1000, (1, 10),
                                                                      generator=torch.Generator().manual_seed(0))


def test_islands_reach_the_target_and_the_yaml_is_what_compile_accepts(hot_llama, tmp_path):
    qeff, ids = hot_llama
    result = qeff.find_fp32_islands(ids, metric="kl", target=0.01, npi_path=tmp_path / "islands.yaml", max_evals=12,
                                    progress=False)
    assert result.reached and result.baseline > 0.01 >= result.value  # fp16 alone misses, the islands reach it
    steps = result.steps
    assert steps.iloc[0]["units_fp32"] == 0 and not steps.iloc[0]["meets_target"]
    assert set(steps["phase"]) >= {"baseline", "bisect by range"} and len(steps) <= 12
    assert result.islands and all("norm" in m for m in result.islands)  # the search lands on the norms
    # re-run: the islands it reports do reach the target
    assert island_accuracy(qeff.model, ids, result.islands, metric="kl") == pytest.approx(result.value)
    # the YAML: one node per island (the CustomRMSNorm call), each with its reason; the compile step checks it
    text = (tmp_path / "islands.yaml").read_text()
    names = yaml.safe_load(text)["FP32NodeInstanceNames"]
    assert names == result.nodes and len(names) == len(result.islands)
    assert all(n.endswith("/CustomRMSNorm_output_0") for n in names)
    assert all(re.search(r"# model\.\S+: fp32 island: .*reaches \|x\|", line) for line in text.splitlines()[3:])
    from qeff_lab.compile.backend import check_npi_names

    check_npi_names(tmp_path / "islands.yaml", qeff.export_result.path)  # raises on unknown node names
    assert "fp32" in result._repr_html_() and "token_match" not in result.summary()


def test_bad_options_are_clear_errors(hot_llama):
    qeff, ids = hot_llama
    with pytest.raises(ValueError, match="metric must be one of"):
        find_fp32_islands(qeff.model, ids, metric="bleu")
    with pytest.raises(ValueError, match="weights must be"):
        find_fp32_islands(qeff.model, ids, weights="int4")
    with pytest.raises(ValueError, match="onnx_model="):
        find_fp32_islands(qeff.model, ids, npi_path="x.yaml")


@pytest.mark.slow
def test_smollm2_islands_are_no_more_than_the_findings_and_as_accurate():
    """Without the safe-norm fix. Every norm finding maps to one CustomRMSNorm node in the export, and so does
    every norm island, so fewer modules here is fewer NPI nodes."""
    model, tok = smollm2()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    findings = analyze(model, ids, progress=False).findings
    from_findings = findings.modules("norm-square")
    result = find_fp32_islands(model, ids, metric="token_match", target=1.0, max_evals=16, progress=False)
    findings_accuracy = island_accuracy(model, ids, from_findings, metric="token_match")
    print(result.summary())
    assert result.baseline < 0.5 and findings_accuracy == 1.0
    assert result.reached and result.value == findings_accuracy
    assert 0 < len(result.islands) <= len(from_findings)
    assert len(result.steps) <= 16  # runs; each one emulated forward of one short prompt (seconds: noisy here)


def test_mxfp6_weights_and_an_unreachable_target_are_reported(hot_llama):
    qeff, ids = hot_llama
    reachable = find_fp32_islands(qeff.model, ids, metric="cosine", target=0.9, weights="mxfp6", max_evals=10,
                                  progress=False)
    assert reachable.reached and reachable.value >= 0.9 > reachable.baseline and reachable.weights == "mxfp6"
    assert "fp16 + MXFP6 weights" in reachable.summary()
    fig = reachable.plot()
    assert fig.axes[0].get_ylabel() == "cosine"
    # MXFP6 weights stay MXFP6 in an fp32 island: a zero-KL target cannot be reached by islands (a plain HF
    # model here: its logits are not saturated like the hot model's)
    out_of_reach = find_fp32_islands(tiny_llama(seed=1), ids, metric="kl", target=0.0, weights="mxfp6",
                                     progress=False)
    assert not out_of_reach.reached and out_of_reach.islands == [] and "relax the target" in out_of_reach.notes[0]
    assert list(out_of_reach.steps["units_fp32"]) == [0, out_of_reach.units]
