"""The embedded backend's own compile result: the GroupQueryAttention rewrite of retained-KV decoders. Tokens equal
HF greedy on tiny families (padded batch 2, prompts longer than the prefill chunk; continuous batching on 2 slots);
graphs it does not fit keep the exported graph and say why; a rewrite that disagrees with the exported graph is not
used."""
import json

import numpy as np
import onnx
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.compile import ort_rewrite
from tests.transforms.tiny_decoders import hf_greedy, prompts, tiny_model

NEW = 12
LENGTHS = (5, 8, 13)  # shorter than, equal to and longer than the prefill chunk of 8; batch 2 pads the shorter row


# (family, config overrides, layers whose rotary moves into the op; None: the model has no rotary): the tiny
# phi3's partial rotary is 8 of 16 dims, too narrow for ORT's kernel (R/2 a multiple of 8), so it stays outside; at
# head_dim 32 it moves inside. gpt2: learned positions, Div-scaled scores, Conv1D (Gemm) projections.
@pytest.mark.parametrize("family,overrides,rotary", [
    ("llama", {}, 2), ("phi3", {}, 0), ("phi3", {"hidden_size": 128}, 2), ("qwen2", {}, 2), ("gpt2", {}, None)])
def test_tokens_equal_hf_greedy_and_the_report_says_which_graph_ran(family, overrides, rotary):
    hf = tiny_model(family, seed=3, **overrides)
    prompt_ids = prompts(lengths=LENGTHS)
    reference = hf_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model(family, seed=3, **overrides), f"tiny-{family}-ort")
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert json.loads((model.compile_result.folder / "qconfig.json").read_text())["ort_graph"] == report
    assert report["max_logit_diff"] < 1e-4 and report["layers"] == 2
    assert report["nodes_after"] < report["nodes_before"]
    graph_file = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False)
    ops = {n.op_type for n in graph_file.graph.node}
    assert "GroupQueryAttention" in ops and not ops & {"CtxScatter", "CtxGather"}
    # where the rotary embedding moved into the op, no rotate_half (Neg) is left
    assert report["rotary_layers"] == (rotary or 0) and ("Neg" in ops) == (rotary == 0)
    assert ("rotary inside the op in 2" in report["why"]) == (rotary == 2)
    assert type(model.runner()).__name__ == "OrtGqaKVSession"
    assert "runs its GroupQueryAttention graph (2 layers" in model.compile_result.reason
    out = model.generate_from_ids(prompt_ids, NEW)
    assert out.ids == reference


def test_where_the_rewrite_does_not_apply_the_exported_graph_runs_and_says_why():
    """mpt adds an ALiBi bias through its mask (GQA takes none): the exported graph runs, HF-greedy tokens."""
    model, prompt_ids, reference = _matrix_model("mpt")
    report = model.compile_result.ort_graph
    assert report["graph"] == "exported" and report["path"] is None
    assert report["why"].startswith("exported graph kept:") and "ALiBi" in report["why"]
    assert type(model.runner()).__name__ == "OrtKVSession"
    assert "runs the exported graph (layer 0:" in model.compile_result.reason
    assert model.generate_from_ids(prompt_ids, NEW).ids == reference


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_continuous_batching_runs_the_gqa_graph_with_hf_greedy_tokens(family):
    """CtxScatterCB/CtxGatherCB replaced like CtxScatter/CtxGather; batch_index leaves the graph (cache row = slot);
    5 prompts on 2 slots give HF greedy tokens."""
    hf = tiny_model(family, seed=3)
    prompt_ids = prompts(lengths=(5, 13, 8, 1, 11))
    reference = hf_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model(family, seed=3), f"tiny-{family}-ort-cb",
                                                continuous_batching=True)
    model.compile(prefill_seq_len=8, ctx_len=32, full_batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert report["layers"] == 2 and report["max_logit_diff"] < 1e-4 and report["nodes_after"] < report["nodes_before"]
    graph = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops and not ops & {"CtxScatterCB", "CtxGatherCB", "CtxScatter", "CtxGather"}
    assert "batch_index" not in [i.name for i in graph.input]
    runner = model.runner()
    assert type(runner).__name__ == "OrtGqaKVSession" and runner.continuous_batching and runner.full_batch_size == 2
    out = model.generate_from_ids(prompt_ids, NEW)
    assert out.ids == reference and max(r.slot for r in out.metrics.requests) == 1


def test_a_batch_index_with_another_reader_keeps_the_exported_graph():
    """The in-graph sampler reads batch_index (its penalty buffers have one row per slot): the rewrite says so, the
    exported graph runs, and serves the same greedy tokens as the plain model's GQA graph."""
    prompt_ids = prompts(lengths=(5, 13, 8))
    sampler = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-ort-cb-sampler",
                                                  continuous_batching=True, qaic_config={"include_sampler": True})
    sampler.compile(prefill_seq_len=8, ctx_len=32, full_batch_size=2)
    report = sampler.compile_result.ort_graph
    assert report["graph"] == "exported" and "batch_index also read by" in report["why"], report["why"]
    assert type(sampler.runner()).__name__ == "OrtKVSession"
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-ort-cb",
                                                continuous_batching=True)
    plain.compile(prefill_seq_len=8, ctx_len=32, full_batch_size=2)
    assert plain.compile_result.ort_graph["graph"] == "gqa"
    assert sampler.generate_from_ids(prompt_ids, NEW).ids == plain.generate_from_ids(prompt_ids, NEW).ids


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


CB_SPECS = [{"batch_size": 1, "seq_len": 8, "ctx_len": 32, "full_batch_size": 2},
            {"batch_size": 2, "seq_len": 1, "ctx_len": 32, "full_batch_size": 2}]


@pytest.fixture(scope="module")
def exported_llama_cb():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-ort-cb-unit",
                                                continuous_batching=True)
    return model.export()


def test_a_continuous_batching_rewrite_is_checked_against_the_exported_graph(exported_llama_cb, tmp_path, monkeypatch):
    plan = ort_rewrite.plan_ort_graph(exported_llama_cb, tmp_path, CB_SPECS)
    assert plan.graph == "gqa" and plan.max_logit_diff < 1e-4  # the exported CB graph ran (batch_index [[0]])
    monkeypatch.setattr(ort_rewrite, "TOLERANCE", -1.0)
    plan = ort_rewrite.plan_ort_graph(exported_llama_cb, tmp_path, CB_SPECS)
    assert plan.graph == "exported" and "differed by" in plan.why
    assert not (tmp_path / ort_rewrite.ORT_GRAPH).exists()


def test_a_batch_index_read_outside_attention_is_refused(exported_llama_cb):
    proto = onnx.load(str(exported_llama_cb), load_external_data=False)
    proto.graph.node.append(onnx.helper.make_node("Identity", ["batch_index"], ["slot_out"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("slot_out", onnx.TensorProto.INT64, None))
    with pytest.raises(ort_rewrite.RewriteNotApplicable, match=r"batch_index also read by \['Identity'\]"):
        ort_rewrite.rewrite_gqa(proto, ctx_len=32)


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


# ----------------------------------------------------------------------------- the generic path's attention
# (model type, generic-path config overrides, windows and soft-capping the GQA nodes carry per layer); llama and
# mistral have families: the generic path is forced by taking the type out of FAMILIES for the test. The windows
# (6) are shorter than the 13-token prompt + 12 new tokens, so they act. The rotary embedding moves into the op
# (head_dim 16: R/2 = 8).
GENERIC = [("qwen3", {}, [None, None], None), ("llama", {}, [None, None], None),
           ("gemma2", {}, [6, None], 5.0), ("mistral", {}, [6, 6], None)]


def _generic_model(monkeypatch, model_type, name, **options):
    from qeff_lab.transforms.families import FAMILIES
    from tests.transforms.test_generic_kv import tiny

    if model_type in FAMILIES:
        monkeypatch.delitem(FAMILIES, model_type)
    model = QEFFAutoModelForCausalLM.from_model(tiny(model_type, seed=3), name, **options)
    assert model.path == "generic"
    return model


def _gqa_attributes(model):
    report = model.compile_result.ort_graph
    graph = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops and not ops & {"CtxScatter", "CtxGather", "CtxScatterCB", "CtxGatherCB"}
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    return [a.get("local_window_size") for a in attrs], {a.get("softcap") for a in attrs}


@pytest.mark.parametrize("model_type,overrides,windows,softcap", GENERIC)
def test_generic_path_runs_the_gqa_graph_with_hf_greedy_tokens(model_type, overrides, windows, softcap, monkeypatch):
    """Padded batch 2, a prompt (13) longer than the prefill chunk (8); sliding windows and soft-capping as GQA
    attributes, the window read from the exported mask itself."""
    from tests.transforms.test_generic_kv import hf_greedy as generic_hf_greedy, prompts as generic_prompts, tiny

    prompt_ids = generic_prompts()
    reference = generic_hf_greedy(tiny(model_type, seed=3), prompt_ids, NEW)
    model = _generic_model(monkeypatch, model_type, f"tiny-{model_type}-generic-ort")
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert report["layers"] == 2 and report["max_logit_diff"] < 1e-4 and report["nodes_after"] < report["nodes_before"]
    assert _gqa_attributes(model) == (windows, {softcap})
    assert report["rotary_layers"] == 2 and "rotary inside the op in 2" in report["why"]
    assert type(model.runner()).__name__ == "OrtGqaKVSession"
    assert model.generate_from_ids(prompt_ids, NEW).ids == reference


def test_generic_continuous_batching_runs_the_gqa_graph(monkeypatch):
    """gemma2 (a sliding and a full layer, soft-capping) on 2 slots, 5 prompts: CtxScatterCB/CtxGatherCB replaced,
    HF greedy tokens."""
    import torch

    from tests.transforms.test_generic_kv import VOCAB, hf_greedy as generic_hf_greedy, tiny

    g = torch.Generator().manual_seed(2)
    prompt_ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 8, 1, 11)]
    reference = generic_hf_greedy(tiny("gemma2", seed=3), prompt_ids, NEW)
    model = _generic_model(monkeypatch, "gemma2", "tiny-gemma2-generic-ort-cb", continuous_batching=True)
    model.compile(prefill_seq_len=8, ctx_len=32, full_batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert _gqa_attributes(model) == ([6, None], {5.0})
    runner = model.runner()
    assert type(runner).__name__ == "OrtGqaKVSession" and runner.continuous_batching
    out = model.generate_from_ids(prompt_ids, NEW)
    assert out.ids == reference and max(r.slot for r in out.metrics.requests) == 1


@pytest.fixture(scope="module")
def exported_generic_qwen3():
    from tests.transforms.test_generic_kv import tiny

    return QEFFAutoModelForCausalLM.from_model(tiny("qwen3", seed=3), "tiny-qwen3-generic-ort-unit").export()


def _change_mask(path, op, value):
    """The exported graph with every score Add's mask replaced by op(mask, value)."""
    proto = onnx.load(str(path), load_external_data=False)
    nodes = list(proto.graph.node)
    softmax_inputs = {n.input[0] for n in nodes if n.op_type == "Softmax"}
    const = onnx.helper.make_node("Constant", [], ["test/value"], value=onnx.numpy_helper.from_array(
        np.array(value, np.float32)))
    for mask in {n.input[1] for n in nodes if n.op_type == "Add" and n.output[0] in softmax_inputs}:
        proto.graph.node.append(onnx.helper.make_node(op, [mask, "test/value"], [mask + "/changed"]))
        for add in (n for n in nodes if n.op_type == "Add" and n.output[0] in softmax_inputs and n.input[1] == mask):
            add.input[1] = mask + "/changed"
    proto.graph.node.insert(0, const)
    return ort_rewrite.rewrite_gqa(_sorted(proto), ctx_len=32)


def _sorted(proto):
    """Nodes in an order ONNX Runtime accepts (the appended ones after their inputs)."""
    graph, done, order = proto.graph, {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}, []
    pending = list(graph.node)
    while pending:
        ready = [n for n in pending if all(i in done or not i for i in n.input)]
        order += ready
        done.update(o for n in ready for o in n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(order)
    return proto


def test_generic_masks_gqa_cannot_express_are_refused(exported_generic_qwen3):
    """The mask is evaluated, not assumed: a bias in it (as ALiBi folds in) or a mask that lets every query see every
    slot (bidirectional) keeps the exported graph, saying why."""
    with pytest.raises(ort_rewrite.RewriteNotApplicable, match=r"values other than 0 and <= -10000 \(a bias"):
        _change_mask(exported_generic_qwen3, "Add", 0.5)
    with pytest.raises(ort_rewrite.RewriteNotApplicable, match="neither causal nor a causal sliding window"):
        _change_mask(exported_generic_qwen3, "Mul", 0.0)
    with pytest.raises(ort_rewrite.RewriteNotApplicable, match="mask is proven for one ctx_len; none given"):
        ort_rewrite.rewrite_gqa(onnx.load(str(exported_generic_qwen3), load_external_data=False))
    model, layers = _change_mask(exported_generic_qwen3, "Mul", 1.0)  # the same mask: still rewritten
    assert layers == 2


def test_a_window_the_check_cannot_reach_keeps_the_exported_graph(monkeypatch, tmp_path):
    """A window of 31 slots at ctx_len 32 acts only at position 31 (its first slot drops out); the check sequence
    ends at 30: refused. At ctx_len 48 the check reaches past it and the rewrite is used."""
    model = _generic_model(monkeypatch, "mistral", "tiny-mistral-generic-ort-w31")
    model.model.config.sliding_window = 31
    path = model.export()
    plan = ort_rewrite.plan_ort_graph(path, tmp_path, SPECS)
    assert plan.graph == "exported" and "sliding window of 31 acts only at positions" in plan.why, plan.why
    plan = ort_rewrite.plan_ort_graph(path, tmp_path, [{**s, "ctx_len": 48} for s in SPECS])
    assert plan.graph == "gqa" and plan.max_logit_diff < 1e-4, plan.why


@pytest.mark.parametrize("family,overrides,windows", [
    ("mistral", {"sliding_window": 6}, [6, 6]),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, [None, 6])])
def test_family_sliding_windows_become_gqa_windows(family, overrides, windows):
    """The family blocks' sliding windows (a boolean Where mask) are proven over ctx_len like the generic path's and
    carried as local_window_size; before, the op attended the whole context and only verify (when its check sequence
    reached past the window) kept the exported graph."""
    hf = tiny_model(family, seed=3, **overrides)
    prompt_ids = prompts(lengths=LENGTHS)
    reference = hf_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model(family, seed=3, **overrides), f"tiny-{family}-ort-window")
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert _gqa_attributes(model) == (windows, {None})
    assert model.generate_from_ids(prompt_ids, NEW).ids == reference


# ----------------------------------------------------------------------------- other attention forms
# The support matrix's tiny models of types whose attention differs from llama's in how the scores are scaled, how
# the cache is cast or how the context reaches the output projection; each runs the GQA graph with HF-greedy
# tokens. (scale: GQA's `scale` attribute for head_dim 16; context: whether the context is rebuilt under its own
# name, everything after it kept as exported.)
OTHER_FORMS = [
    ("falcon", 0.25, False),   # Div(scores, sqrt(head_dim))
    ("gpt_neo", 1.0, True),    # no scaling at all (and its merge_heads sized by Shape)
    ("gptj", 0.25, False),     # the gathered keys / values and the query cast to fp32
    ("gpt2", 0.25, True),      # Conv1D: Reshape -> Gemm with bias, the context's reshapes sized by Shape
    ("afmoe", 0.25, True),     # gated attention: context * sigmoid(gate) before the projection
    ("bitnet", 0.25, True),    # repeat_kv (2 query heads per KV head), a norm on the context before the projection
    ("xglm", 1.0, False),      # bmm on batch x heads merged, the query scaled before, scores clamped at fp32 min
    ("gpt_neox_japanese", 0.25, True),  # keys merged for baddbmm, whose beta * zeros term is added to the scores
]


def _matrix_model(model_type):
    """The support matrix's tiny model of `model_type`, compiled as the matrix compiles it: (model, prompts, HF
    plain-argmax tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qeff_lab.accuracy.runners import hf_greedy as plain_greedy
    from qeff_lab.commands import support_matrix as sm

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(sm.tiny_config(model_type), attn_implementation="eager").float().eval()
    sm.randomize_zero_matrices(hf, 0.02)
    prompt_ids = sm.prompt_ids()
    reference = plain_greedy(hf, prompt_ids, NEW)
    model = QEFFAutoModelForCausalLM.from_model(hf, f"tiny-{model_type}-matrix")
    model.compile(prefill_seq_len=8, ctx_len=48, batch_size=2)
    return model, prompt_ids, reference


@pytest.mark.parametrize("model_type,scale,rebuilt", OTHER_FORMS)
def test_other_attention_forms_run_the_gqa_graph(model_type, scale, rebuilt):
    model, prompt_ids, reference = _matrix_model(model_type)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert report["max_logit_diff"] < 1e-4
    graph = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == report["layers"] == 2
    scales = [next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "scale") for n in gqa]
    assert scales == pytest.approx([scale, scale])
    assert any(n.name.endswith("/context") for n in graph.node) == rebuilt
    assert model.generate_from_ids(prompt_ids, NEW).ids == reference


@pytest.mark.parametrize("model_type", ["gpt_oss", "flint", "mimo_v2_flash", "granite_swa"])
def test_attention_sinks_become_gqa_head_sink(model_type):
    """Scores concatenated with a learned per-head logit, softmaxed, the sink column dropped (gpt_oss and
    mimo_v2_flash with max-subtraction, mimo's other layers without sinks; flint without), or the context scaled by
    sigmoid(logsumexp(scores) - sinks) (granite_swa): GQA's head_sink input, fed from each layer's own sinks."""
    model, prompt_ids, reference = _matrix_model(model_type)
    report = model.compile_result.ort_graph
    assert report["graph"] == "gqa", report["why"]
    assert report["max_logit_diff"] < 1e-4
    graph = onnx.load(str(model.compile_result.folder / report["path"]), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == report["layers"] == 2
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    expected = [m.sinks.detach().numpy() for m in model.model.modules() if getattr(m, "sinks", None) is not None]
    fed = []  # the values each layer's head_sink reads (the exporter names the reshaped sinks as it likes)
    for node in gqa:
        if len(node.input) == 12 and node.input[11]:
            reshape = producers[node.input[11]]
            assert reshape.op_type == "Reshape" and reshape.input[0] in inits
            fed.append(onnx.numpy_helper.to_array(inits[reshape.input[0]]).reshape(-1))
    assert expected and len(fed) == len(expected)  # mimo_v2_flash: its sliding-window layers only
    for got, want in zip(fed, expected):
        np.testing.assert_array_equal(got, want)
    assert not any(n.op_type == "Softmax" and "attn" in n.name for n in graph.node)  # the sink block is gone
    assert model.generate_from_ids(prompt_ids, NEW).ids == reference


def test_profile_env_turns_on_onnx_runtime_profiler(tmp_path, monkeypatch):
    """QEFF_LAB_ORT_PROFILE=<prefix>: every embedded-backend session writes ONNX Runtime's per-kernel profile there
    (benchmarks/profile_ops.py reads it); unset, no profiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    monkeypatch.delenv("QEFF_LAB_ORT_PROFILE", raising=False)
    assert not ort_rewrite.session_options(1).enable_profiling
    monkeypatch.setenv("QEFF_LAB_ORT_PROFILE", str(tmp_path / "prof"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), ort_rewrite.session_options(1),
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones(2, np.float32)})
    profile = session.end_profiling()
    assert profile.startswith(str(tmp_path / "prof"))
    events = json.loads(open(profile).read())
    assert any(e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Add" for e in events)
