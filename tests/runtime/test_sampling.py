"""The host-side reference sampler: HF's logits processors/warpers give the same scores on the same logits, and
the same tokens on the same uniform random numbers; per-row parameters; seeds; bad parameters."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from qeff_lab.runtime.sampling import (HostSampler, RequestSampling, SamplingParams, choose_tokens, gumbel_choice,
                                       params_tensors, penalize, resolve_sampling, warp)

V = 300
CASES = [
    SamplingParams(do_sample=True),  # HF defaults: temperature 1, top_k 50
    SamplingParams(do_sample=True, temperature=0.7, top_k=0, top_p=0.9),
    SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(do_sample=True, temperature=0.5, top_k=0, min_p=0.2, repetition_penalty=0.8),
    SamplingParams(do_sample=True, temperature=2.0, top_k=5, top_p=0.5),
]


def _hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """What transformers' generate builds for these settings (same order, same skips)."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs


def _logits_and_history(seed: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    history = torch.randint(0, V, (rows, 12), generator=g)
    seen = torch.zeros(rows, V, dtype=torch.bool).scatter(1, history, True)
    return logits, history, seen


@pytest.mark.parametrize("case", range(len(CASES)))
def test_scores_and_tokens_equal_hf_processors_on_the_same_numbers(case):
    p = CASES[case]
    logits, history, seen = _logits_and_history(case, rows=4)
    hf_scores = _hf_processors(p)(history, logits.clone())
    ours = warp(penalize(logits, torch.full((4,), p.repetition_penalty), torch.zeros(4), seen, None),
                **{k: v for k, v in params_tensors([p] * 4).items() if k in ("temperatures", "top_ks", "top_ps", "min_ps")})
    assert torch.equal(torch.isinf(ours), torch.isinf(hf_scores))
    torch.testing.assert_close(ours[~torch.isinf(ours)], hf_scores[~torch.isinf(hf_scores)], rtol=1e-6, atol=1e-6)
    for draw in range(20):  # the same uniforms: the same token as Gumbel-max over HF's scores
        u = torch.from_numpy(np.random.default_rng([case, draw]).random((4, V), dtype=np.float32)).clamp(1e-7, 1 - 6e-8)
        order = torch.sort(hf_scores, descending=True, stable=True).indices  # u[:, r] goes to rank r
        hf_token = order.gather(1, (hf_scores.gather(1, order) - torch.log(-torch.log(u))).argmax(-1, keepdim=True))[:, 0]
        tokens = choose_tokens(logits, params_tensors([p] * 4), u, seen, torch.zeros_like(seen))
        assert torch.equal(tokens, hf_token)
        assert torch.isfinite(hf_scores.gather(1, tokens[:, None])).all()  # never a filtered token


def test_gumbel_max_draws_follow_the_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    rng = np.random.default_rng(0)
    draws = [int(gumbel_choice(scores, torch.from_numpy(rng.random((1, 4), dtype=np.float32)))) for _ in range(6000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, torch.softmax(scores, -1)[0].numpy(), atol=0.02)
    assert freq[3] == 0


def test_greedy_rows_and_sampling_rows_side_by_side_with_their_own_parameters():
    logits, history, seen = _logits_and_history(7, rows=3)
    params = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.0), SamplingParams(do_sample=True, top_k=1)]
    u = torch.rand(3, V)
    tokens = choose_tokens(logits, params_tensors(params), u, seen, torch.zeros_like(seen))
    assert torch.equal(tokens, logits.argmax(-1))  # greedy, temperature 0, and top_k=1 all pick the argmax


def test_presence_penalty_counts_generated_tokens_only_and_repetition_the_prompt_too():
    logits = torch.zeros(1, 5)
    logits[0, 1], logits[0, 2] = 2.0, 1.9
    seen = torch.tensor([[False, True, False, False, False]])
    generated = torch.zeros_like(seen)
    p = SamplingParams(repetition_penalty=2.0)
    assert int(choose_tokens(logits, params_tensors([p]), None, seen, generated)) == 2  # 2.0 / 2 < 1.9
    p = SamplingParams(presence_penalty=1.0)
    assert int(choose_tokens(logits, params_tensors([p]), None, seen, generated)) == 1  # prompt-only: no presence
    assert int(choose_tokens(logits, params_tensors([p]), None, seen, seen)) == 2


def test_bitmask_allows_only_masked_in_tokens():
    allowed = np.zeros(V, bool)
    allowed[[10, 11, 12]] = True
    state = RequestSampling(SamplingParams(do_sample=True, temperature=5.0, top_k=0, seed=3), V, [1, 2], 0, allowed)
    sampler = HostSampler(V)
    logits = np.random.default_rng(0).normal(size=(1, V)).astype(np.float32) * 4
    assert {int(sampler.choose(logits, [state])[0]) for _ in range(50)} <= {10, 11, 12}


def test_seed_makes_runs_reproducible_and_requests_independent():
    logits = np.random.default_rng(1).normal(size=(2, V)).astype(np.float32)
    p = SamplingParams(do_sample=True, top_k=0, seed=42)

    def run(indices):
        states = [RequestSampling(p, V, [3], i) for i in indices]
        sampler = HostSampler(V)
        return np.stack([sampler.choose(logits[:len(indices)], states) for _ in range(10)], 1)

    a, b = run([0, 1]), run([0, 1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # two requests, two streams
    np.testing.assert_array_equal(run([0])[0], a[0])  # request 0 draws the same numbers alone


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(seed=-3), "seed must be"),
])
def test_bad_parameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(do_sample=True, **kwargs)


def test_resolve_sampling_one_for_all_or_one_per_prompt():
    assert resolve_sampling(2, temperature=None, do_sample=True)[1] == SamplingParams(do_sample=True)
    per = [SamplingParams(), SamplingParams(do_sample=True)]
    assert resolve_sampling(2, per) == per
    with pytest.raises(ValueError, match="one per prompt"):
        resolve_sampling(3, per)
    with pytest.raises(TypeError, match="not both"):
        resolve_sampling(2, per, temperature=0.5)
