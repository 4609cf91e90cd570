"""Overflow-safe RMSNorm / LayerNorm: same values as the plain forms in fp32, finite where fp16 overflows,
and the same numbers from the exported ONNX function in ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from qeff_lab.ops.safe_norm import DOMAIN, layer_norm_op, rms_norm_op, safe_layer_norm, safe_rms_norm


def _rows(seed=0, big=2.2e4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 576, generator=g) * 3
    x[0, :, 7] = big  # a "massive activation" channel, as in SmolLM2's residual stream
    x[1, 2] = torch.randn(576, generator=g) * 1e-4  # a tiny row
    return x


def test_rms_norm_matches_plain_form_in_fp32():
    x, w = _rows(), torch.randn(576)
    torch.testing.assert_close(safe_rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(safe_rms_norm(x, w, 1e-6, weight_offset=1.0), F.rms_norm(x, (576,), w + 1, 1e-6),
                               rtol=1e-5, atol=1e-5)


def test_layer_norm_matches_plain_form_in_fp32():
    x, w, b = _rows(1), torch.randn(576), torch.randn(576)
    torch.testing.assert_close(safe_layer_norm(x, w, b, 1e-5), F.layer_norm(x, (576,), w, b, 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_fp16_naive_norm_overflows_and_safe_norm_does_not():
    x, w = _rows(), torch.randn(576)
    ref = F.rms_norm(x, (576,), w, 1e-5)
    h = x.half()
    naive = h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-5) * w.half()
    assert (naive[0].float().abs().amax(-1) == 0).all(), "the naive fp16 form zeroes the rows holding 2.2e4"
    safe = safe_rms_norm(h, w.half(), 1e-5).float()
    assert torch.isfinite(safe).all()
    assert (safe - ref).abs().max() < 0.02 * ref.abs().max()
    safe_ln = safe_layer_norm(h, w.half(), None, 1e-5).float()
    assert (safe_ln - F.layer_norm(x, (576,), w, None, 1e-5)).abs().max() < 0.05


class _Both(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))

    def forward(self, x):
        return rms_norm_op(x, self.w, 1e-6) * 2 + layer_norm_op(x, self.w, self.b, 1e-5)


def test_onnx_function_runs_in_onnxruntime_with_the_same_numbers(tmp_path):
    m = _Both().eval()
    x = torch.randn(2, 7, 64) * 5e3
    path = tmp_path / "n.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "s"}})
    proto = onnx.load(str(path))
    assert {(n.domain, n.op_type) for n in proto.graph.node} >= {(DOMAIN, "SafeRMSNorm"), (DOMAIN, "SafeLayerNorm")}
    assert {f.name for f in proto.functions} == {"SafeRMSNorm", "SafeLayerNorm"}
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, m(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    other = torch.randn(1, 3, 64)  # dynamic axes really are dynamic
    y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": other.numpy()})[0]
    np.testing.assert_allclose(y2, m(other).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 8), (4, 16)])
def test_all_zero_rows_stay_finite(shape):
    z = torch.zeros(shape)
    assert torch.equal(safe_rms_norm(z, torch.ones(shape[-1]), 1e-6), z)
    assert torch.isfinite(safe_layer_norm(z.half(), None, None, 1e-5)).all()
