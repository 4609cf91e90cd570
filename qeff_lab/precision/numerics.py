"""fp16 limits and the streaming range statistics of one tensor (abs max, smallest non-zero, over/under counts)."""
from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0  # largest finite fp16
FP16_MIN_NORMAL = 2.0**-14  # ~6.1e-5; below this fp16 is subnormal (fewer significant bits)
FP16_MIN_SUBNORMAL = 2.0**-24  # ~6e-8
FLUSH_LIMIT = 2.0**-25  # |x| <= this rounds to 0 in fp16 (round-to-nearest-even: the tie goes to 0)

_BOUNDS = torch.tensor([FLUSH_LIMIT, FP16_MIN_NORMAL, FP16_MAX], dtype=torch.float32)


def headroom_bits(abs_max: float) -> float:
    """log2(65504 / abs_max): bits of fp16 headroom left (negative: overflow). inf for an all-zero tensor."""
    if abs_max <= 0:
        return math.inf
    if not math.isfinite(abs_max):
        return -math.inf
    return math.log2(FP16_MAX / abs_max)


@torch.no_grad()
def tensor_stats(t: torch.Tensor) -> tuple[int, float, float, int, int, int, int]:
    """(numel, abs max, smallest non-zero abs, n above fp16 max, n fp16-subnormal, n flushing to zero,
    n non-finite) of a float tensor, in a few passes and without keeping anything.

    "Subnormal" counts values that land in fp16's subnormal range and survive (FLUSH_LIMIT < |x| <= 2^-14);
    "flush" counts non-zero values that fp16 rounds to 0 (0 < |x| <= 2^-25). Non-finite values (inf/NaN
    already in fp32) are counted in n_nonfinite and as above the fp16 max.
    """
    a = t.detach().reshape(-1)
    if a.dtype != torch.float32:
        a = a.float()
    a = a.abs()
    n = a.numel()
    if n == 0:
        return 0, 0.0, math.inf, 0, 0, 0, 0
    lo, hi = torch.aminmax(a)
    if lo.item() == 0:
        lo = torch.where(a > 0, a, torch.full((), math.inf)).amin()
    buckets = torch.bucketize(a, _BOUNDS)  # 0: <=2^-25 (zeros too), 1: <=2^-14, 2: <=65504, 3: above / inf / NaN
    counts = torch.bincount(buckets, minlength=4).tolist()
    zeros = int((a == 0).sum()) if counts[0] else 0
    nonfinite = int((~torch.isfinite(a)).sum()) if counts[3] else 0
    hi_v = math.inf if nonfinite else hi.item()
    return n, hi_v, lo.item(), counts[3], counts[1], counts[0] - zeros, nonfinite
