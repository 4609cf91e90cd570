"""Accuracy metrics on hand-made numbers."""
import math

import numpy as np

from qeff_lab.accuracy.metrics import (cosine_similarity, first_divergence, kl_divergence, kl_stats, logit_errors,
                                       perplexity, token_match_rate)


def test_token_match_and_first_divergence_with_margin():
    ref, cand = [5, 6, 7, 8], [5, 6, 9, 8]
    assert token_match_rate(ref, cand) == 0.75
    logits = np.zeros((4, 10))
    logits[2, 7], logits[2, 9] = 3.0, 2.5
    d = first_divergence(ref, cand, logits)
    assert d.step == 2 and math.isclose(d.margin, 0.5)
    assert first_divergence(ref, ref).step is None
    assert first_divergence(ref, ref[:2]).step == 2


def test_logit_errors_and_perplexity():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    assert math.isclose(perplexity(ref, [0, 1, 2]), 4.0)  # p(1) = 0.25 at step 0, p(2) = 0.25 at step 1
    cand = ref.copy()
    cand[0, 0] += 0.1
    e = logit_errors(ref, cand)
    assert math.isclose(e["max_abs_logit_diff"], 0.1, rel_tol=1e-9) and e["argmax_agreement"] == 1.0
    bad = ref.copy()
    bad[1, 1] = np.nan
    assert logit_errors(ref, bad)["max_abs_logit_diff"] == math.inf and perplexity(bad, [0, 1, 2]) == math.inf


def test_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(a, np.array([[2.0, 0.0], [-1.0, -1.0]])), [1.0, -1.0])


def test_kl_divergence_and_top1_agreement():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    kl = kl_divergence(p, q + 3.0)  # logits: a constant shift changes nothing
    assert math.isclose(kl[0], 0.5 * math.log(2) + 0.25 * math.log(0.5), rel_tol=1e-12) and abs(kl[1]) < 1e-15
    s = kl_stats(p, q)
    assert s["top1_agreement"] == 0.5 and math.isclose(s["kl_max"], kl[0]) and math.isclose(s["kl_p99"], kl[0])
    bad = q.copy()
    bad[1, 0] = np.nan
    s = kl_stats(p, bad)
    assert s["kl_max"] == math.inf and s["kl_p99"] == math.inf and s["kl_mean"] == math.inf
