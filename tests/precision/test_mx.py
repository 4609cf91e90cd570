"""MX quantize-dequantize against the OCP Microscaling rules (blocks of 32, shared power-of-two scale)."""
import torch
from torch import nn

from qeff_lab.precision.mx import FP6_E2M3, INT8, mx_qdq, mxfp6_weights, mxint8_qdq_cache


def test_fp6_e2m3_grid_and_shared_scale():
    # one block whose max is 6.0: shared exponent floor(log2 6) - 2 = 0, so elements are the E2M3 grid itself
    x = torch.tensor([6.0, 7.4, 7.9, 0.3, 0.0625, 0.07, 1.06, -2.6] + [0.0] * 24)
    q = mx_qdq(x, FP6_E2M3)
    expected = torch.tensor([6.0, 7.5, 7.5, 0.25, 0.0, 0.125, 1.0, -2.5] + [0.0] * 24)
    assert torch.equal(q, expected)  # 7.9 saturates; 0.0625 is a tie -> even (0); 0.07 -> 1/8 (subnormal step)


def test_scale_is_a_power_of_two_per_block_of_32():
    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 1e3, 3e4])[:, None]
    q = mx_qdq(x, "fp6_e2m3")
    for row in range(4):
        for b in range(2):
            blk, qb = x[row, 32 * b:32 * (b + 1)], q[row, 32 * b:32 * (b + 1)]
            scale = 2.0 ** (torch.floor(torch.log2(blk.abs().max())) - 2)
            elems = qb / scale
            assert torch.equal(elems, mx_qdq(elems, "fp6_e2m3"))  # on the element grid
            assert elems.abs().max() <= 7.5
    rel = ((q - x).norm() / x.norm()).item()
    assert rel < 0.1


def test_mxint8_is_idempotent_and_fine():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 64)
    q = mx_qdq(x, INT8)
    assert torch.equal(mx_qdq(q, INT8), q)
    assert ((q - x).abs().max() / x.abs().max()) < 2 ** -5
    assert mx_qdq(torch.randn(5, 40), INT8).shape == (5, 40)  # a ragged last block is padded, then cut


def test_mxfp6_weights_reports_every_linear_and_unties_the_head():
    emb = nn.Embedding(10, 64)
    head = nn.Linear(64, 10, bias=False)
    head.weight = emb.weight  # tied, like SmolLM2
    model = nn.ModuleDict({"emb": emb, "proj": nn.Linear(64, 64), "head": head})
    before = emb.weight.detach().clone()
    q, report = mxfp6_weights(model)
    assert [c.place for c in report.changes] == ["proj", "head"]
    assert all("relative RMS error" in c.why for c in report.changes)
    assert torch.equal(q["emb"].weight, before)  # the Gather keeps full precision
    assert not torch.equal(q["head"].weight, before) and q["head"].weight is not q["emb"].weight
    assert torch.equal(model["proj"].weight, nn.ModuleDict(model)["proj"].weight)  # the original is untouched


def test_kv_cache_lists_and_hf_caches_are_quantized_in_place():
    from transformers import DynamicCache

    torch.manual_seed(0)
    cache = [(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64))]
    k0 = cache[0][0].clone()
    mxint8_qdq_cache(cache)
    assert not torch.equal(cache[0][0], k0) and torch.equal(cache[0][0], mx_qdq(k0, INT8))
    hf = DynamicCache()
    hf.update(k0, k0.clone(), 0)
    mxint8_qdq_cache(hf)
    assert torch.equal(hf.layers[0].keys, mx_qdq(k0, INT8))
