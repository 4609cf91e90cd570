"""CtxScatter, CtxGather, CustomRMSNorm: the eager reference and the ONNX function give the same numbers,
exported as single nodes of their custom domains, run by ONNX Runtime from the same file."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qeff_lab.ops import CUSTOM_OPS, custom_op_counts, ctx_gather, ctx_gather_reference, ctx_scatter, ctx_scatter_reference, rms_norm


class _Ops(torch.nn.Module):
    def forward(self, data, position_ids, updates, ctx_indices, x, weight):
        return ctx_scatter(data, position_ids, updates), ctx_gather(data, ctx_indices), rms_norm(x, weight, 1e-5)


@pytest.fixture(scope="module")
def ops_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "ops.onnx"
    example = (torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 3, 4),
               torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 3, 16), torch.ones(16))
    names = ["data", "position_ids", "updates", "ctx_indices", "x", "weight"]
    torch.onnx.export(_Ops(), example, str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["scattered", "gathered", "normed"],
                      dynamic_axes={"data": {0: "b", 2: "c"}, "position_ids": {0: "b", 1: "s"},
                                    "updates": {0: "b", 2: "s"}, "ctx_indices": {0: "b", 1: "k"},
                                    "x": {0: "b", 1: "s"}})
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 3, 8, 4, generator=g)
    position_ids = torch.tensor([[0, 1, 2, 3, -1], [6, 7, -1, -1, -1]])  # row 1: two real tokens, three pads
    updates = torch.randn(2, 3, 5, 4, generator=g)
    ctx_indices = torch.tensor([[0, 1, 2, 3, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5, 6, 7]])
    x = torch.randn(2, 5, 16, generator=g) * 100
    return data, position_ids, updates, ctx_indices, x, torch.randn(16, generator=g)


def test_exported_as_custom_domain_nodes_with_function_bodies(ops_session):
    model, _ = ops_session
    used = ["CtxScatter", "CtxGather", "CustomRMSNorm"]
    nodes = {(n.domain, n.op_type) for n in model.graph.node}
    assert {(CUSTOM_OPS[op].domain, op) for op in used} <= nodes
    assert {f.name for f in model.functions} >= set(used)
    assert {o.domain for o in model.opset_import} >= {CUSTOM_OPS[op].domain for op in used}
    assert custom_op_counts(model) == {op: 1 for op in sorted(used)}


def test_registry_rejects_an_unknown_custom_node_and_a_missing_body(ops_session):
    from qeff_lab.ops.registry import UnknownCustomOpError

    model, _ = ops_session
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    del broken.functions[:]
    with pytest.raises(UnknownCustomOpError, match="no function body"):
        custom_op_counts(broken)
    broken.CopyFrom(model)
    next(n for n in broken.graph.node if n.op_type == "CtxGather").op_type = "CtxGatherV9"
    with pytest.raises(UnknownCustomOpError, match="does not know"):
        custom_op_counts(broken)


def test_scatter_writes_real_positions_and_padding_touches_nothing():
    data, position_ids, updates, *_ = _case()
    out = ctx_scatter_reference(data, position_ids, updates)
    for s in range(4):
        torch.testing.assert_close(out[0, :, s], updates[0, :, s], rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 4:], data[0, :, 4:], rtol=0, atol=0)  # -1 wrote nothing (not slot 7)
    torch.testing.assert_close(out[1, :, 6:], updates[1, :, :2], rtol=0, atol=0)
    torch.testing.assert_close(out[1, :, :6], data[1, :, :6], rtol=0, atol=0)
    assert out.data_ptr() != data.data_ptr() and not torch.equal(out, data)  # functional: input untouched


def test_gather_zeroes_invalid_slots_even_when_they_hold_nan():
    data, _, _, ctx_indices, *_ = _case()
    data[:, :, 5] = float("nan")
    out = ctx_gather_reference(data, ctx_indices)
    assert torch.equal(out[0, :, 4:], torch.zeros_like(out[0, :, 4:]))
    torch.testing.assert_close(out[0, :, :4], data[0, :, :4], rtol=0, atol=0)
    assert torch.isnan(out[1, :, 5]).all()  # a valid slot is read as it is


def test_onnx_functions_match_eager_references(ops_session):
    _, session = ops_session
    case = _case(1)
    case[0][1, :, 3] = float("nan")  # an unused slot holding NaN must not leak through the gather
    case[3][1, 3:] = -1
    feeds = dict(zip(["data", "position_ids", "updates", "ctx_indices", "x", "weight"], [t.numpy() for t in case]))
    scattered, gathered, normed = session.run(None, feeds)
    data, position_ids, updates, ctx_indices, x, weight = case
    np.testing.assert_array_equal(scattered, ctx_scatter_reference(data, position_ids, updates).numpy())
    np.testing.assert_array_equal(gathered, ctx_gather_reference(data, ctx_indices).numpy())
    assert not np.isnan(gathered[1, :, 3:]).any()
    np.testing.assert_allclose(normed, rms_norm(x, weight, 1e-5).numpy(), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_hf_llama_rmsnorm_and_survives_fp16_massive_activations():
    hf = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16))
    x = torch.randn(3, 16)
    torch.testing.assert_close(rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)
    big = torch.randn(2, 16).half()
    big[:, 3] = 2.2e4  # SmolLM2's residual stream reaches this: x*x is inf in fp16
    naive = big * torch.rsqrt((big * big).mean(-1, keepdim=True) + 1e-5)
    assert (naive == 0).all()  # the failure the op exists to avoid: x*x = inf, rsqrt(inf) = 0, the row is zeroed
    out = rms_norm(big, torch.ones(16, dtype=torch.half), 1e-5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), rms_norm(big.float(), torch.ones(16), 1e-5), rtol=2e-3, atol=2e-3)
