"""The embedded backend's own compile result: the GroupQueryAttention rewrite of retained-KV decoders. Tokens equal
HF greedy on tiny families (padded batch 2, prompts longer than the prefill chunk); graphs it does not fit keep the
exported graph and say why; a rewrite that disagrees with the exported graph is not used."""
import json

import onnx
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.compile import ort_rewrite
from tests.transforms.tiny_decoders import hf_greedy, prompts, tiny_model

NEW = 12
LENGTHS = (5, 8, 13)  # shorter than, equal to and longer than the prefill chunk of 8; batch 2 pads the shorter row


@pytest.mark.parametrize("family,graph", [("llama", "gqa"), ("phi3", "gqa"), ("qwen2", "gqa"), ("gpt2", "exported")])
def test_tokens_equal_hf_greedy_and_the_report_says_which_graph_ran(family, graph):
    hf = tiny_model(family, seed=3)
    prompt_ids = prompts(lengths=LENGTHS)
    reference = hf_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model(family, seed=3), f"tiny-{family}-ort")
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == graph, report["why"]
    assert json.loads((model.compile_result.folder / "qconfig.json").read_text())["ort_graph"] == report
    if graph == "gqa":
        assert report["max_logit_diff"] < 1e-4 and report["layers"] == 2
        assert report["nodes_after"] < report["nodes_before"]
        graph_file = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False)
        ops = {n.op_type for n in graph_file.graph.node}
        assert "GroupQueryAttention" in ops and not ops & {"CtxScatter", "CtxGather"}
        assert type(model.runner()).__name__ == "OrtGqaKVSession"
        assert "runs its GroupQueryAttention graph (2 layers" in model.compile_result.reason
    else:
        assert report["why"].startswith("exported graph kept:") and report["path"] is None
        assert type(model.runner()).__name__ == "OrtKVSession"
        assert "runs the exported graph (layer 0:" in model.compile_result.reason
    out = model.generate_from_ids(prompt_ids, NEW)
    assert out.ids == reference


def test_continuous_batching_keeps_the_exported_graph():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-ort-cb",
                                                continuous_batching=True)
    model.compile(prefill_seq_len=8, ctx_len=32, full_batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "exported" and "continuous batching" in report["why"]


@pytest.fixture(scope="module")
def exported_llama():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-ort-unit")
    return model.export()


SPECS = [{"batch_size": 1, "seq_len": 8, "ctx_len": 32}, {"batch_size": 1, "seq_len": 1, "ctx_len": 32}]


def test_a_rewrite_that_disagrees_with_the_exported_graph_is_not_used(exported_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(ort_rewrite, "TOLERANCE", -1.0)  # any difference, even 0, now counts as disagreeing
    plan = ort_rewrite.plan_ort_graph(exported_llama, tmp_path, SPECS)
    assert plan.graph == "exported" and "differed by" in plan.why and plan.max_logit_diff is not None
    assert not (tmp_path / ort_rewrite.ORT_GRAPH).exists()


def test_the_environment_can_keep_the_exported_graph(exported_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(ort_rewrite.GRAPH_ENV, "exported")
    plan = ort_rewrite.plan_ort_graph(exported_llama, tmp_path, SPECS)
    assert plan.graph == "exported" and ort_rewrite.GRAPH_ENV in plan.why
    assert ort_rewrite.graph_choice_key() == "exported"  # a different compile folder than the rewrite's
    monkeypatch.delenv(ort_rewrite.GRAPH_ENV)
    assert ort_rewrite.graph_choice_key() == ort_rewrite.REWRITE_VERSION


def test_graphs_without_the_pattern_are_refused_with_the_reason(exported_llama, tmp_path):
    proto = onnx.load(str(exported_llama), load_external_data=False)
    scatter = next(n for n in proto.graph.node if n.op_type == "CtxScatter")
    scatter.op_type = "ScatterND"  # the cache write is no longer the one the rewrite replaces
    with pytest.raises(ort_rewrite.RewriteNotApplicable, match="is not written by one CtxScatter"):
        ort_rewrite.rewrite_gqa(proto)
    assert ort_rewrite.plan_ort_graph(exported_llama, tmp_path, [{"batch_size": 1, "seq_len": 8}]).graph == "exported"
