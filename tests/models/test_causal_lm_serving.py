"""Serving-style generate() through the public API on a tiny Llama saved as a real HF folder (SmolLM2's
tokenizer, random weights): from_pretrained(continuous_batching=True), compile(full_batch_size), texts per prompt
equal to each prompt alone, per-request generation_len, sampling with seeds, digits-only guided decoding."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from qeff_lab import QEFFAutoModelForCausalLM
from tests.transforms.tiny_decoders import hf_greedy, tiny_model

PROMPTS = ["Hi", "Once upon a time, in a small village by the sea, there lived an old fisherman who",
           "The capital of France is", "1, 2, 3,", "Write a very long story about a dragon and a knight who meet"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("tiny-llama-serving")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    hf = tiny_model("llama", seed=8, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(folder), continuous_batching=True)
    model.compile(prefill_seq_len=8, ctx_len=64, full_batch_size=2)
    return model, hf, tok


def test_texts_equal_each_prompt_alone_with_per_request_lengths(served):
    model, hf, tok = served
    lengths = [6, 3, 10, 1, 8]
    out = model.generate(tok, PROMPTS, generation_len=lengths, verbose=False)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    reference = [hf_greedy(hf, [p], n)[0] for p, n in zip(ids, lengths)]
    for got, ref, n in zip(out.ids, reference, lengths):
        assert got == ref[:len(got)] and (len(got) == n or got[-1] == tok.eos_token_id)
    assert out.texts == [tok.decode(i, skip_special_tokens=True) for i in out.ids]
    assert len(out.metrics.requests) == 5 and model.steps["generate"].summary.startswith("5 prompt(s)")


def test_sampling_is_reproducible_with_a_seed_and_greedy_at_temperature_zero(served):
    model, _, tok = served
    a = model.generate(tok, PROMPTS[:3], 8, do_sample=True, temperature=0.9, top_p=0.9, seed=7, verbose=False)
    b = model.generate(tok, PROMPTS[:3], 8, do_sample=True, temperature=0.9, top_p=0.9, seed=7, verbose=False)
    assert a.ids == b.ids
    greedy = model.generate(tok, PROMPTS[:3], 8, verbose=False)
    assert model.generate(tok, PROMPTS[:3], 8, do_sample=True, temperature=0.0, seed=1, verbose=False).ids == greedy.ids


def test_digits_only_bitmask(served):
    model, _, tok = served
    vocab = len(tok)
    mask = np.zeros(vocab, bool)
    mask[[i for s, i in tok.get_vocab().items() if s and all(c in "0123456789" for c in s)]] = True
    out = model.generate(tok, PROMPTS, 6, token_bitmasks=mask, do_sample=True, temperature=1.5, seed=3, verbose=False)
    assert all(t.isdigit() and len(t) >= 6 for t in out.texts), out.texts


def test_full_batch_size_needs_continuous_batching(served):
    model, hf, _ = served
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=8), "tiny-plain-serving")
    with pytest.raises(ValueError, match="continuous_batching=True"):
        plain.compile(prefill_seq_len=8, ctx_len=64, full_batch_size=2)
    with pytest.raises(ValueError, match="continuous_batching must be True or False"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=8), "x", continuous_batching="yes")


def test_a_generic_path_model_serves_from_its_folder(tmp_path, smollm2_path):
    """A model type without a hand-written family (starcoder2: GQA, biases, sliding window of 6) saved as an HF
    folder: from_pretrained(continuous_batching=True) takes the generic path, and the texts equal HF greedy alone."""
    from tests.transforms.test_generic_kv import tiny

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    hf = tiny("starcoder2", seed=8, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(tmp_path), continuous_batching=True)
    assert model.path == "generic"
    model.compile(prefill_seq_len=8, ctx_len=64, full_batch_size=2)
    lengths = [6, 3, 10, 1, 8]
    out = model.generate(tok, PROMPTS, generation_len=lengths, verbose=False)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    for got, p, n in zip(out.ids, ids, lengths):
        assert got == hf_greedy(hf, [p], n)[0][:len(got)] and (len(got) == n or got[-1] == tok.eos_token_id)
    assert len(out.metrics.requests) == 5 and out.metrics.full_batch_size == 2
