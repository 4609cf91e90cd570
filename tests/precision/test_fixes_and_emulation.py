"""The safe-norm transform (weight-preserving, switchable, exported as an ONNX function) and fp16 emulation."""
import copy
import math

import torch

from qeff_lab.precision import Fp16Emulation, fp16_weights, revert_safe_norm, round_fp16, safe_norm_transform
from qeff_lab.precision.emulate import _sdpa_fp16

from tests.precision.real_models import tiny_llama


def test_safe_norm_swap_keeps_weights_and_outputs_and_switches_off():
    model = tiny_llama()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    result = safe_norm_transform(model)
    assert len(result.changes) == 5  # 2 layers x 2 norms + final norm
    assert {c.before for c in result.changes} == {"LlamaRMSNorm"} and result.changes[0].after == "SafeLlamaRMSNorm"
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    again = safe_norm_transform(model)
    assert not again.modified and again.notes  # nothing left to do, and it says so
    assert len(revert_safe_norm(model).changes) == 5
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    only = safe_norm_transform(model, only=["model.norm", "lm_head"])
    assert [c.place for c in only.changes] == ["model.norm"] and "lm_head" in only.notes[0]


def test_fp16_emulation_rounds_every_op_like_the_device():
    x = torch.tensor([300.0, 1.0, 1e-8, 0.1])
    with Fp16Emulation():
        sq = x * x
        y = x.to(torch.float32).pow(2).mean()
        z = torch.zeros(4)
        z.add_(torch.tensor([0.1, 70000.0, 0.0, 0.0]))
    assert sq[0] == math.inf and sq[2] == 0 and sq[3] == torch.tensor(0.01).half().float()
    assert y == math.inf  # the cast to fp32 HF inserts does not save the square on the device
    assert z[1] == math.inf and z[0] == torch.tensor(0.1).half().float()
    assert sq.dtype == torch.float32  # storage stays fp32: fast CPU kernels
    assert torch.equal(round_fp16(torch.tensor([65519.0, 65520.0])), torch.tensor([65504.0, math.inf]))


def test_decomposed_attention_matches_fused_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mode = Fp16Emulation()
    out = _sdpa_fp16(mode, q, k, v, is_causal=True, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_fp16_weights_copy_keeps_ties_and_leaves_original():
    model = tiny_llama()
    before = model.lm_head.weight.detach().clone()
    m16 = fp16_weights(model)
    assert m16.lm_head.weight is m16.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, before)
    assert torch.equal(m16.lm_head.weight, before.half().float())


def test_safe_norm_survives_export_in_a_retained_state_model(tmp_path, monkeypatch):
    """QEFFAutoModelForCausalLM: analyze, fix, export: the graph carries SafeRMSNorm nodes and ONNX Runtime
    generates HF's tokens."""
    import onnx

    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    monkeypatch.setenv("QEFF_LAB_CACHE", str(tmp_path))
    hf = tiny_llama()
    q = QEFFAutoModelForCausalLM.from_model(copy.deepcopy(hf), name="tiny-safe")
    report = q.analyze(torch.randint(0, 1000, (1, 8)), progress=False)
    assert "analyze" in q.steps and q.steps["analyze"].details is report
    assert not report.findings.of_kind("norm-square")  # random weights: the report asks for no norm fix...
    assert not q.fix_precision().details[0].modified
    q.precision_report = None  # ...without a report, every exact fix applies: norms, attention scale, GELU
    step = q.fix_precision()
    assert [(r.name, len(r.changes)) for r in step.details] == [("SafeNorm", 5), ("PrescaledAttention", 2),
                                                                ("SafeGELU", 0)]
    assert len(q.unfix_precision().details[0].changes) == 5 and not q.precision_fix_key()
    q.fix_precision()
    assert {k.split(":")[0] for k in q.precision_fix_key()} == {"SafeNorm", "PrescaledAttention"}
    path = q.export()
    proto = onnx.load(str(path))
    assert sum(n.op_type == "SafeRMSNorm" for n in proto.graph.node) == 5
    q.compile(prefill_seq_len=8, ctx_len=64, backend="onnxruntime")
    prompt = torch.randint(0, 1000, (11,)).tolist()
    ids = q.generate_from_ids([prompt], generation_len=10).ids[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, 11:].tolist()
    assert ids == ref
