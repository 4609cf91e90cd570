"""Accuracy metrics against a reference: token match, first divergence, logit error, KL, perplexity, cosine."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qeff_lab.precision.numerics import kl_divergence  # noqa: F401  (one KL for the ladder and the island search)


def token_match_rate(ref: Sequence[int], cand: Sequence[int]) -> float:
    """Share of positions (over the reference's length) where the candidate's token is the reference's."""
    if not len(ref):
        return math.nan
    return sum(int(a == b) for a, b in zip(ref, cand)) / len(ref)


@dataclass
class Divergence:
    """Where a greedy continuation first leaves the reference (None: never), and the reference's top-2
    logit margin there (small: a near tie, benign; large: a real numerical error)."""

    step: int | None
    margin: float | None


def first_divergence(ref: Sequence[int], cand: Sequence[int], ref_logits: np.ndarray | None = None) -> Divergence:
    """`ref_logits[i]`: the reference's logits that chose ref[i] (teacher-forced on the reference)."""
    for i, (a, b) in enumerate(zip(ref, cand)):
        if a != b:
            margin = None
            if ref_logits is not None and i < len(ref_logits):
                top2 = np.sort(np.asarray(ref_logits[i], dtype=np.float64))[-2:]
                margin = float(top2[1] - top2[0])
            return Divergence(i, margin)
    if len(cand) < len(ref):
        return Divergence(len(cand), None)
    return Divergence(None, None)


def logit_errors(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """max / mean abs difference, and argmax agreement, of two [positions, vocab] logit arrays.
    Non-finite candidate logits count as infinite error."""
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    diff = np.abs(ref - cand)
    diff[~np.isfinite(diff)] = np.inf
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "argmax_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean())}


def kl_stats(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """mean, 99th percentile and max of the per-position KL divergence, and top-1 agreement (the share of
    positions whose argmax is the reference's; llama.cpp's "same top p")."""
    kl = kl_divergence(ref, cand)
    p99 = float(np.percentile(kl, 99, method="higher"))  # no interpolation: an inf stays an inf, not a NaN
    return {"kl_mean": float(kl.mean()), "kl_p99": p99, "kl_max": float(kl.max()),
            "top1_agreement": float((np.asarray(ref).argmax(-1) == np.asarray(cand).argmax(-1)).mean())}


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under logits[:-1] (logits[i] predicts ids[i+1])."""
    logits = np.asarray(logits, np.float64)[:-1]
    target = np.asarray(ids[1:])
    if not np.isfinite(logits).all():
        return math.inf
    m = logits.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    nll = logz - logits[np.arange(len(target)), target]
    return float(np.exp(nll.mean()))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays (NaN/inf rows give NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den
