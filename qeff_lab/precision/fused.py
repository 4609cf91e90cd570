"""Intermediates hidden inside fused ops: from a call's real inputs, the range of what the device forms in fp16.

One op call (`F.layer_norm`, `F.scaled_dot_product_attention`, `F.gelu(approximate="tanh")`, ...) is one
event for a TorchFunctionMode: its centered squares, attention scores or x³ never appear as tensors. A graph
compiled to fp16 decomposes the op and rounds each of those intermediates to fp16, so each handler here
recomputes them from the call's inputs, block by block (about numerics.CHUNK elements at a time), and folds
each block into running statistics (numerics.tensor_stats); no block outlives its loop iteration.

`HANDLERS[op](args, kwargs)` -> {intermediate name: stats tuple}. INTERMEDIATES says what each name is.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from qeff_lab.precision import numerics
from qeff_lab.precision.numerics import FP16_MAX, tensor_stats

Stats = tuple  # (numel, abs max, min non-zero, n over, n subnormal, n flush, n non-finite)

INTERMEDIATES = {
    "centered_square": "(x - mean)², the square inside the variance",
    "sum_centered_square": "the row sum of (x - mean)² (before dividing by n)",
    "square": "x², the square inside the mean of squares",
    "sum_square": "the row sum of x² (before dividing by n)",
    "qk_product": "q·kᵀ before the 1/sqrt(d) scale",
    "attn_scores": "q·kᵀ · scale",
    "softmax_input": "the scores entering softmax (mask added)",
    "attn_mask": "the additive float mask",
    "sum_exp": "Σ exp(x - max) in the softmax denominator",
    "cube": "x³ inside tanh-GELU (0.79·(x + 0.044715·x³))",
    "exp": "exp(β·x) inside softplus (below its linear threshold)",
    "product": "batch1 @ batch2 before alpha and beta",
    "running_sum": "the running sum (every partial sum is an output)",
}


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _Fold:
    """Running statistics over blocks: tensor_stats of each block, combined."""

    def __init__(self):
        self.stats: Stats | None = None

    def add(self, t: torch.Tensor) -> None:
        s = tensor_stats(t)
        if s[0] == 0:
            return
        if self.stats is None:
            self.stats = s
            return
        a = self.stats
        self.stats = (a[0] + s[0], max(a[1], s[1]), min(a[2], s[2]), a[3] + s[3], a[4] + s[4], a[5] + s[5],
                      a[6] + s[6])


def _done(**folds: _Fold) -> dict[str, Stats]:
    return {k: f.stats for k, f in folds.items() if f.stats is not None}


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.detach().reshape(-1, n)


def _blocks(rows: torch.Tensor):
    """Row blocks of about CHUNK elements (at least one row each), as fp32."""
    step = max(1, numerics.CHUNK // max(1, rows.shape[-1]))
    for i in range(0, rows.shape[0], step):
        b = rows[i:i + step]
        yield b.float() if b.dtype != torch.float32 else b


def _centered(rows: torch.Tensor) -> dict[str, Stats]:
    sq, sums = _Fold(), _Fold()
    for b in _blocks(rows):
        d = b - b.mean(-1, keepdim=True)
        d = d * d
        sq.add(d)
        sums.add(d.sum(-1))
    return _done(centered_square=sq, sum_centered_square=sums)


def _squares(rows: torch.Tensor) -> dict[str, Stats]:
    sq, sums = _Fold(), _Fold()
    for b in _blocks(rows):
        b = b * b
        sq.add(b)
        sums.add(b.sum(-1))
    return _done(square=sq, sum_square=sums)


def _float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0


# ----------------------------------------------------------------------------- norms
def layer_norm(args, kwargs) -> dict[str, Stats]:
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    if not _float(x) or shape is None:
        return {}
    n = math.prod([shape] if isinstance(shape, int) else shape)
    return _centered(_rows(x, n))


def group_norm(args, kwargs) -> dict[str, Stats]:
    x, groups = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "num_groups")
    if not _float(x) or not groups or x.dim() < 2:
        return {}
    return _centered(x.detach().reshape(x.shape[0] * groups, -1))


def rms_norm(args, kwargs) -> dict[str, Stats]:
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    if not _float(x) or shape is None:
        return {}
    return _squares(_rows(x, math.prod([shape] if isinstance(shape, int) else shape)))


def normalize(args, kwargs) -> dict[str, Stats]:
    """F.normalize with p=2 (sentence embeddings, qk-norm): x² and its sum along `dim`."""
    x, p, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "p", 2.0), _arg(args, kwargs, 2, "dim", 1)
    if not _float(x) or p != 2 or not isinstance(dim, int):
        return {}
    return _squares(x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]))


# ----------------------------------------------------------------------------- attention
def _mask_block(mask: torch.Tensor, i: int, step: int, hk: int, g: int) -> torch.Tensor:
    """The mask rows of query block [i, i+step), shaped to broadcast with scores [b, hk, g, blk, L]."""
    m = mask if mask.shape[-2] == 1 else mask[..., i:i + step, :]
    if m.dim() == 4:
        return m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], hk, g, *m.shape[2:])
    return m


def sdpa(args, kwargs) -> dict[str, Stats]:
    """scaled_dot_product_attention: q·kᵀ before and after the scale, the softmax input (mask applied: float
    masks added, boolean / causal masks leave masked positions out), and the float mask itself. Computed per
    block of query rows, grouped-query heads included."""
    q, k = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
    mask = _arg(args, kwargs, 3, "attn_mask")
    causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale")
    if not (_float(q) and _float(k)) or q.dim() != 4 or k.dim() != 4:
        return {}
    b, h, s, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    g = h // hk if hk and h % hk == 0 else 1
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = (q.reshape(b, hk, g, s, d) if g > 1 else q.unsqueeze(2)).float()
    kt = k.float().transpose(-1, -2).unsqueeze(2)  # [b, hk, 1, d, L]
    prod, scores, soft, mfold = _Fold(), _Fold(), _Fold(), _Fold()
    float_mask = isinstance(mask, torch.Tensor) and mask.is_floating_point()
    if float_mask:
        mfold.add(mask)
    step = max(1, numerics.CHUNK // max(1, b * h * length))
    for i in range(0, s, step):
        p = torch.matmul(qg[..., i:i + step, :], kt)  # [b, hk, g, blk, L]
        prod.add(p)
        p = p * scale
        scores.add(p)
        if float_mask:
            p = p + _mask_block(mask, i, step, hk, g).float()
        elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            p = torch.where(_mask_block(mask, i, step, hk, g), p, torch.zeros((), dtype=p.dtype))
        if causal:
            rows = torch.arange(i, min(i + step, s))[:, None] + (length - s)
            p = torch.where(torch.arange(length)[None, :] <= rows, p, torch.zeros((), dtype=p.dtype))
        soft.add(p)
        del p
    return _done(qk_product=prod, attn_scores=scores, softmax_input=soft, attn_mask=mfold)


# ----------------------------------------------------------------------------- softmax-like reductions
def _sum_exp(x: torch.Tensor, dim: int) -> _Fold:
    """Σ exp(x - max) per row along `dim`. It lies in [1, n], so rows of n <= 65504 cannot overflow and are
    skipped: the cost is paid only for very long rows (vocabularies beyond 65504)."""
    fold = _Fold()
    n = x.shape[dim] if x.dim() else 1
    if n <= FP16_MAX:
        return fold
    for blk in _blocks(x.detach().movedim(dim, -1).reshape(-1, n)):
        m = blk.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
        fold.add(torch.exp(blk - m).sum(-1))
    return fold


def _dim(x: torch.Tensor, dim) -> int:
    return -1 if dim is None else int(dim)


def softmax(args, kwargs) -> dict[str, Stats]:
    x = _arg(args, kwargs, 0, "input")
    if not _float(x):
        return {}
    inp = _Fold()
    inp.add(x)
    return _done(softmax_input=inp, sum_exp=_sum_exp(x, _dim(x, _arg(args, kwargs, 1, "dim"))))


def logsumexp(args, kwargs) -> dict[str, Stats]:
    x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim")
    if not _float(x):
        return {}
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    return _done(sum_exp=_sum_exp(x, _dim(x, dim))) if isinstance(dim, int) or dim is None else {}


def cross_entropy(args, kwargs) -> dict[str, Stats]:
    x = _arg(args, kwargs, 0, "input")
    if not _float(x):
        return {}
    return _done(sum_exp=_sum_exp(x, 1 if x.dim() > 1 else 0))


# ----------------------------------------------------------------------------- activations
def _flat_blocks(x: torch.Tensor):
    flat = x.detach().reshape(-1)
    for i in range(0, flat.numel(), numerics.CHUNK):
        yield flat[i:i + numerics.CHUNK].float()


def gelu(args, kwargs) -> dict[str, Stats]:
    """tanh-GELU forms x³ (|x| > 40.3 passes 65504); the erf form has no such intermediate."""
    x, approximate = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "approximate", "none")
    if not _float(x) or approximate != "tanh":
        return {}
    cube = _Fold()
    for b in _flat_blocks(x):
        cube.add(b * b * b)
    return _done(cube=cube)


def softplus(args, kwargs) -> dict[str, Stats]:
    """softplus(x) = log(1 + exp(βx))/β below `threshold` (linear above): exp(βx) passes 65504 for βx > 11.09."""
    x = _arg(args, kwargs, 0, "input")
    beta, threshold = _arg(args, kwargs, 1, "beta", 1.0), _arg(args, kwargs, 2, "threshold", 20.0)
    if not _float(x):
        return {}
    fold = _Fold()
    for b in _flat_blocks(x):
        z = b * beta
        fold.add(torch.exp(torch.where(z <= threshold, z, torch.full((), -math.inf))))
    return _done(exp=fold)


def baddbmm(args, kwargs) -> dict[str, Stats]:
    """beta·input + alpha·(batch1 @ batch2): the product is formed before alpha scales it (old attention code
    passes alpha = 1/sqrt(d) here)."""
    b1, b2 = _arg(args, kwargs, 1, "batch1"), _arg(args, kwargs, 2, "batch2")
    if not (_float(b1) and _float(b2)) or b1.dim() != 3:
        return {}
    fold = _Fold()
    step = max(1, numerics.CHUNK // max(1, b1.shape[1] * b2.shape[-1]))
    for i in range(0, b1.shape[0], step):
        fold.add(torch.bmm(b1[i:i + step].float(), b2[i:i + step].float()))
    return _done(product=fold)


HANDLERS: dict[str, Callable[[tuple, dict], dict[str, Stats]]] = {
    "layer_norm": layer_norm, "group_norm": group_norm, "rms_norm": rms_norm, "normalize": normalize,
    "scaled_dot_product_attention": sdpa, "softmax": softmax, "log_softmax": softmax, "logsumexp": logsumexp,
    "cross_entropy": cross_entropy, "gelu": gelu, "softplus": softplus, "baddbmm": baddbmm,
}
# Ops whose own result is the intermediate worth naming (recorded as the op's output under this name).
RESULT_NAMES = {"cumsum": "running_sum"}
