"""fp16 limits and the streaming range statistics of one tensor (abs max, smallest non-zero, over/under counts)."""
from __future__ import annotations

import math

import numpy as np

import torch

from qeff_lab.contracts import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL  # noqa: F401  (re-exported)

FLUSH_LIMIT = 2.0**-25  # |x| <= this rounds to 0 in fp16 (round-to-nearest-even: the tie goes to 0)



def headroom_bits(abs_max: float) -> float:
    """log2(65504 / abs_max): bits of fp16 headroom left (negative: overflow). inf for an all-zero tensor."""
    if abs_max <= 0:
        return math.inf
    if not math.isfinite(abs_max):
        return -math.inf
    return math.log2(FP16_MAX / abs_max)


CHUNK = 1 << 18  # elements per pass: temporaries stay ~1-2 MB whatever the tensor's size


@torch.no_grad()
def tensor_stats(t: torch.Tensor) -> tuple[int, float, float, int, int, int, int]:
    """(numel, abs max, smallest non-zero abs, n above fp16 max, n fp16-subnormal, n flushing to zero,
    n non-finite) of a float tensor, in a few passes over chunks of CHUNK elements, keeping nothing.

    "Subnormal" counts values that land in fp16's subnormal range and survive (FLUSH_LIMIT < |x| <= 2^-14);
    "flush" counts non-zero values that fp16 rounds to 0 (0 < |x| <= 2^-25). Non-finite values (inf/NaN
    already in fp32) are counted in n_nonfinite and as above the fp16 max.
    """
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0, 0.0, math.inf, 0, 0, 0, 0
    hi_v, lo_v, over, sub, flush, nonfinite = 0.0, math.inf, 0, 0, 0, 0
    for start in range(0, n, CHUNK):
        a = flat[start:start + CHUNK]
        a = (a.float() if a.dtype != torch.float32 else a).abs()
        lo, hi = (v.item() for v in torch.aminmax(a))
        # Count only what the extremes say can be there: most tensors need no count at all.
        zeros = 0
        if lo == 0:
            zeros = int(torch.count_nonzero(a == 0))
            lo = torch.where(a > 0, a, torch.full((), math.inf)).amin().item() if zeros < a.numel() else math.inf
        if not math.isfinite(hi):  # inf or NaN already in fp32
            bad = int(torch.count_nonzero(~torch.isfinite(a)))
            nonfinite += bad
            over += bad + int(torch.count_nonzero(torch.isfinite(a) & (a > FP16_MAX)))
            hi_v = math.inf
        else:
            if hi > FP16_MAX:
                over += int(torch.count_nonzero(a > FP16_MAX))
            hi_v = max(hi_v, hi)
        if lo <= FP16_MIN_NORMAL:
            small = int(torch.count_nonzero(a <= FP16_MIN_NORMAL)) - zeros
            tiny = int(torch.count_nonzero(a <= FLUSH_LIMIT)) - zeros if lo <= FLUSH_LIMIT else 0
            sub += small - tiny
            flush += tiny
        lo_v = min(lo_v, lo)
    return n, hi_v, lo_v, over, sub, flush, nonfinite


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))


def kl_divergence(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) per position of two [positions, vocab] logit arrays, in nats (as llama.cpp's
    `--kl-divergence` reports against base logits). A position with non-finite candidate logits is inf."""
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    bad = ~np.isfinite(cand).all(-1)
    cand = np.where(np.isfinite(cand), cand, 0.0)
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-17
    kl[bad] = np.inf
    return kl
