"""The streamed export route: weights never all in memory (peak measured in a child process), logits equal to
PyTorch, the same I/O contract and custom ops as the traced route, and which route export() chooses and why."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as tf

from qeff_lab.contracts import past_names, retained
from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM
from qeff_lab.onnx import export as export_mod
from tests.transforms.tiny_decoders import COMMON

SMALL = {**COMMON, "num_hidden_layers": 5}  # 5 layers: two traced, three cloned


def _save(folder, dtype=torch.float32, seed=0, **config):
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**SMALL, "initializer_range": 0.1, **config})).eval()
    model.to(dtype).save_pretrained(folder)
    return tf.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # the checkpoint, in fp32


@pytest.fixture(autouse=True)
def stream_every_checkpoint(monkeypatch):
    """These checkpoints are small: without this they would take the traced route (see STREAM_ABOVE)."""
    monkeypatch.setattr(export_mod, "STREAM_ABOVE", 0)


def _ort_logits(path, ids, ctx=32):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(len(ids))[None].astype(np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros((1, i.shape[1], ctx, i.shape[3]), np.float32)
    return session.run(["logits"], feeds)[0][0, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_logits_equal_pytorch_and_the_traced_route(tmp_path, dtype):
    reference = _save(tmp_path, dtype)
    ids = [1, 17, 230, 5, 999, 42, 7]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1].numpy()
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path))
    streamed = model.export()
    assert model.export_result.route == "streamed"
    moved = next(p for p in model.export_result.passes if p.name == "ExternalData")
    assert any("tensor(s) read from the checkpoint" in n for n in moved.notes)
    if dtype == torch.bfloat16:
        assert any("converted to float32 tensor by tensor" in n for n in moved.notes)
    got = _ort_logits(streamed, ids)
    assert np.abs(got - expected).max() < 1e-5
    if dtype == torch.float32:  # the same numbers as today's route
        traced = model.export(route="traced")
        assert model.export_result.route == "traced" and traced != streamed
        assert np.array_equal(_ort_logits(traced, ids), got)


def test_streamed_graph_keeps_the_contract_and_custom_ops(tmp_path):
    _save(tmp_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path))
    import onnx

    graph = onnx.load(str(model.export()), load_external_data=False).graph
    past = past_names(5)
    assert [i.name for i in graph.input] == ["input_ids", "position_ids", *past]
    assert [o.name for o in graph.output] == ["logits", *map(retained, past)]
    assert model.export_result.custom_ops == {"CtxGather": 10, "CtxScatter": 10, "CustomRMSNorm": 11}
    weights = {t.name for t in graph.initializer}
    assert {f"model.model.layers.{i}.self_attn.q_proj.weight" for i in range(5)} <= weights  # cloned layers' own
    assert "5 identical layers" in model.export_result.route_reason


def test_continuous_batching_takes_the_streamed_route_too(tmp_path):
    _save(tmp_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path), continuous_batching=True)
    import onnx

    graph = onnx.load(str(model.export()), load_external_data=False).graph
    assert model.export_result.route == "streamed"
    assert [i.name for i in graph.input][-1] == "batch_index" and len(graph.input) == 2 + 10 + 1
    assert model.export_result.custom_ops["CtxScatterCB"] == 10


def test_small_checkpoints_take_the_traced_route_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "STREAM_ABOVE", 1 << 30)
    _save(tmp_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path))
    plan, why = model.export_route(model.export_spec())
    assert plan is None and "is under 1 GiB" in why and "route='streamed' forces" in why
    model.export(route="streamed")
    assert model.export_result.route == "streamed"


def test_route_choice_is_reported(tmp_path):
    in_memory = QEFFAutoModelForCausalLM.from_model(_save(tmp_path))
    plan, why = in_memory.export_route(in_memory.export_spec())
    assert plan is None and "built in memory" in why
    in_memory.export(route="streamed")  # possible on request: weights from memory
    assert in_memory.export_result.route == "streamed" and "weights from memory" in in_memory.export_result.route_reason
    assert "streamed route" in in_memory.steps["export"].summary
    with pytest.raises(ValueError, match="route must be"):
        in_memory.export(route="fast")
    loaded = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path))
    loaded.fix_precision()
    plan, why = loaded.export_route(loaded.export_spec())
    assert plan is None and "precision fixes" in why
    with pytest.raises(ValueError, match="cannot apply: precision fixes"):
        loaded.export(route="streamed")


_CHILD = textwrap.dedent("""
    import json, os, sys
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    model = QEFFAutoModelForCausalLM.from_pretrained(sys.argv[1])
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on is the export's
        f.write("5")
    model.export(route=sys.argv[2])
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_streamed_export_memory_does_not_grow_with_the_weights(tmp_path):
    """A ~300 MB checkpoint: the streamed export adds less than 0.4x the weights to the process at its peak
    (the traced route adds several times the weights)."""
    _save(tmp_path, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
          vocab_size=32000, num_hidden_layers=8, tie_word_embeddings=True)
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert 250e6 < weights < 350e6
    env = {**os.environ, "QEFF_LAB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), "streamed"], capture_output=True, text=True,
                         env=env, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    added = rss["peak"] - rss["before"]
    assert added < 0.4 * weights, f"streamed export added {added / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


def test_the_embedded_backend_runs_the_streamed_graph_as_its_groupqueryattention_graph(tmp_path):
    from tests.transforms.tiny_decoders import hf_greedy

    reference = _save(tmp_path)
    prompt_ids = [[1, 17, 230, 5, 999], [4, 8, 15, 16, 23, 42, 99, 100, 101, 7, 3]]
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path))
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    assert model.export_result.route == "streamed"
    plan = model.compile_result.ort_graph  # o_proj is MatMul(x, Transpose(W)) and the rotary constants are folded
    assert plan["graph"] == "gqa" and plan["layers"] == 5 and plan["rotary_layers"] == 5, plan["why"]
    assert model.generate_from_ids(prompt_ids, 10).ids == hf_greedy(reference, prompt_ids, 10)
