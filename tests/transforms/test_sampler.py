"""The in-graph sampler (qaic_config include_sampler): QEfficient's I/O names in the exported graph, the same tokens
as the host reference sampler on the same random numbers (continuous batching, different parameters per slot,
and the static batch loop), a digit-only token bitmask, probs, bad input."""
import numpy as np
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.contracts import NEXT_TOKENS, PROBS, SAMPLER_INPUTS, TOKEN_BITMASKS, retained
from qeff_lab.runtime import open_kv_runner
from qeff_lab.runtime.continuous_batching import generate_continuous
from qeff_lab.runtime.sampling import SamplingParams, TokenChooser
from tests.transforms.tiny_decoders import prompts, tiny_model

PREFILL, CTX, FBS, K = 8, 64, 3, 64
LENGTHS = (3, 29, 9, 41, 1)
GEN = [12, 5, 20, 9, 14]
QAIC = {"include_sampler": True, "include_guided_decoding": True, "return_pdfs": True, "max_top_k_ids": K}
PARAMS = [SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7),
          SamplingParams(do_sample=True, temperature=1.2, top_k=0, min_p=0.05, presence_penalty=0.5, seed=8),
          SamplingParams(repetition_penalty=1.5),  # greedy with a penalty
          SamplingParams(do_sample=True, top_k=5, top_p=0.8, presence_penalty=1.0, seed=9),
          SamplingParams(do_sample=True, temperature=0.5, top_k=0, top_p=0.7, min_p=0.1, repetition_penalty=1.1,
                         presence_penalty=0.2, seed=10)]


@pytest.fixture(scope="module")
def pair():
    """The same tiny llama twice, continuous batching: with the in-graph sampler, and plain (logits out)."""
    sampler = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-sampler", continuous_batching=True,
                                                  qaic_config=QAIC)
    sampler.compile(prefill_seq_len=PREFILL, ctx_len=CTX, full_batch_size=FBS)
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-sampler-ref", continuous_batching=True)
    plain.compile(prefill_seq_len=PREFILL, ctx_len=CTX, full_batch_size=FBS)
    return sampler, plain, prompts(seed=21, lengths=LENGTHS)


def host_reference(plain, prompt_ids, gen, sampling, token_bitmasks=None):
    """The host sampler over the plain graph's logits, drawing K numbers per step as the graph does."""
    runner = open_kv_runner(plain.compile_result)
    runner.max_top_k_ids = K  # the host sampler's candidate count (TokenChooser.for_runner reads it)
    return generate_continuous(runner, prompt_ids, gen, sampling=sampling, token_bitmasks=token_bitmasks)[0]


def test_graph_io_follows_qefficient(pair):
    sampler, _, _ = pair
    io = sampler.onnx_io()
    inputs = list(io.name[io.direction == "input"])
    outputs = list(io.name[io.direction == "output"])
    assert inputs[inputs.index("batch_index") + 1:] == [*SAMPLER_INPUTS, TOKEN_BITMASKS]
    assert outputs[:2] == [PROBS, NEXT_TOKENS] and "logits" not in outputs
    assert outputs[-2:] == [retained("past_repetition_penalty_buffer"), retained("past_presence_penalty_buffer")]
    shapes = io.set_index("name")["shape"]
    assert shapes["random_numbers"] == f"['batch_size', {K}]" and shapes["top_ks"] == "['batch_size', 1]"
    assert shapes["past_repetition_penalty_buffer"] == "['full_batch_size', 1000]"
    assert shapes[NEXT_TOKENS] == "['batch_size', 1, 1]"


def test_same_tokens_as_the_host_sampler_with_per_slot_parameters(pair):
    sampler, plain, prompt_ids = pair
    assert sampler.generate_from_ids(prompt_ids, GEN).ids == plain.generate_from_ids(prompt_ids, GEN).ids  # greedy
    graph = sampler.generate_from_ids(prompt_ids, GEN, sampling=PARAMS).ids
    assert graph == host_reference(plain, prompt_ids, GEN, PARAMS)
    assert graph != plain.generate_from_ids(prompt_ids, GEN).ids  # it did sample
    assert sampler.generate_from_ids(prompt_ids, GEN, sampling=PARAMS).ids == graph  # seeds: reproducible
    assert sampler.runner().last_probs.shape == (FBS, 1, 1000)


def test_static_batches_sample_in_the_graph_too():
    qaic = {"include_sampler": True, "max_top_k_ids": K}
    sampler = QEFFAutoModelForCausalLM.from_model(tiny_model("qwen2", seed=3), "tiny-sampler-static", qaic_config=qaic)
    sampler.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)
    prompt_ids = prompts(seed=4, lengths=(5, 13, 8))
    graph = sampler.generate_from_ids(prompt_ids, 10, sampling=PARAMS[:3]).ids
    # the transformed PyTorch model (logits out) with the host sampler over the same K candidates
    assert sampler.generate_from_ids(prompt_ids, 10, sampling=PARAMS[:3], runtime="pytorch").ids == graph
    assert graph != sampler.generate_from_ids(prompt_ids, 10).ids


def test_digit_only_bitmask_in_the_graph(pair, smollm2_path):
    from transformers import AutoTokenizer

    sampler, plain, prompt_ids = pair
    tok = AutoTokenizer.from_pretrained(smollm2_path)  # the tiny model's ids < 1000 are SmolLM2's base tokens
    digits = [i for s, i in tok.get_vocab().items() if s and all(c in "0123456789" for c in s) and i < 1000]
    mask = np.zeros(1000, bool)
    mask[digits] = True
    sampling = [SamplingParams(), SamplingParams(do_sample=True, temperature=2.0, top_k=0, seed=4)] * 2
    out = sampler.generate_from_ids(prompt_ids[:4], 10, sampling=sampling, token_bitmasks=mask).ids
    for ids in out:
        assert set(ids) <= set(digits) and tok.decode(ids).isdigit()
    assert out == host_reference(plain, prompt_ids[:4], 10, sampling, token_bitmasks=mask)
    sampler.generate_from_ids(prompt_ids[:1], 3, sampling=sampling[1], token_bitmasks=mask)
    probs = sampler.runner().last_probs[0, 0]  # the one request ran in slot 0: the distribution of its last draw
    assert probs.sum() == pytest.approx(1.0, rel=1e-5) and (probs[~mask] == 0).all() and (probs[mask] > 0).sum() > 1


def test_bad_qaic_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown qaic_config key\(s\) \['include_samplr'\]"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config={"include_samplr": True})
    with pytest.raises(ValueError, match="need include_sampler=True"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config={"return_pdfs": True})
    with pytest.raises(ValueError, match="max_top_k_ids'\\] must be a positive int"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config={"include_sampler": True, "max_top_k_ids": 0})


def test_bitmask_without_guided_decoding_is_a_clear_error():
    with pytest.raises(ValueError, match="include_guided_decoding"):
        TokenChooser([[1, 2]], token_bitmasks=np.ones(10, bool), in_graph=True, guided=False)


def test_prefix_caching_with_the_in_graph_sampler_is_a_clear_error(pair):
    sampler, _, prompt_ids = pair
    with pytest.raises(ValueError, match="in-graph sampler, whose penalty history starts at position 0"):
        sampler.generate_from_ids(prompt_ids[:2], 2, prefix_caching=True)
