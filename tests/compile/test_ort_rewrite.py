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


# (family, config overrides, graph, layers whose rotary moves into the op): the tiny phi3's partial rotary is 8 of
# 16 dims, too narrow for ORT's kernel (R/2 a multiple of 8), so it stays outside; at head_dim 32 it moves inside
@pytest.mark.parametrize("family,overrides,graph,rotary", [
    ("llama", {}, "gqa", 2), ("phi3", {}, "gqa", 0), ("phi3", {"hidden_size": 128}, "gqa", 2), ("qwen2", {}, "gqa", 2),
    ("gpt2", {}, "exported", 0)])
def test_tokens_equal_hf_greedy_and_the_report_says_which_graph_ran(family, overrides, graph, rotary):
    hf = tiny_model(family, seed=3, **overrides)
    prompt_ids = prompts(lengths=LENGTHS)
    reference = hf_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model(family, seed=3, **overrides), f"tiny-{family}-ort")
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
        # where the rotary embedding moved into the op, no rotate_half (Neg) is left
        assert report["rotary_layers"] == rotary and ("Neg" in ops) == (rotary == 0)
        assert ("rotary inside the op in 2" in report["why"]) == (rotary == 2)
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


def test_a_rotation_inside_the_op_that_disagrees_is_moved_back_outside(exported_llama, tmp_path, monkeypatch):
    real = ort_rewrite._rope_caches

    def wrong_sign(graph, *args):  # sin cache negated: the op rotates the other way
        names = real(graph, *args)
        sin = next(i for i in graph.initializer if i.name == names[1])
        sin.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(sin), sin.name))
        return names

    monkeypatch.setattr(ort_rewrite, "_rope_caches", wrong_sign)
    plan = ort_rewrite.plan_ort_graph(exported_llama, tmp_path, SPECS)
    assert plan.graph == "gqa" and plan.rotary_layers == 0 and plan.max_logit_diff < 1e-4
    assert "rotary kept outside: inside the op, the GroupQueryAttention rewrite differed by" in plan.why
    graph = onnx.load(str(tmp_path / plan.path), load_external_data=False)
    assert all(a.i == 0 for n in graph.graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "do_rotary")
