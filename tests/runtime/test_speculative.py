"""Speculative decoding: the target graph's k + 1 logits, stale KV at rejected positions overwritten and never read,
greedy tokens identical to HF greedy with prompt lookup, a draft model and a scripted drafter (every acceptance count),
acceptance metrics, and each bad input a clear error. SmolLM2 with a prompt that repeats its input at the end."""
import numpy as np
import pytest
import torch
import transformers as tf

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.runtime.generation import TorchKVRunner
from qeff_lab.runtime.kv_session import OrtKVSession
from qeff_lab.runtime.sampling import SamplingParams
from qeff_lab.runtime.speculative import PromptLookupDrafter, feed, generate_speculative
from tests.conftest import SMOLLM2
from tests.transforms.tiny_decoders import COMMON, hf_greedy, prompts, tiny_model

PREFILL, CTX, K, NEW = 8, 64, 3, 20
TARGET = {"speculative_model_type": "target"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    hf = tiny_model("llama", seed=7)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=7), "tiny-llama-target", qaic_config=TARGET)
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, num_speculative_tokens=K)
    prompt_ids = prompts(seed=1)
    return model, hf, prompt_ids, hf_greedy(hf, prompt_ids, NEW)


def _session(model) -> OrtKVSession:
    return OrtKVSession(model.export_result.path, model.compile_result.specializations)


def _hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


def test_target_graph_returns_logits_for_every_verified_position(target):
    model, hf, prompt_ids, _ = target
    io = model.onnx_io().set_index("name")
    assert io.loc["num_logits_to_keep", "shape"] == "['num_logits_to_keep', 1]"
    assert io.loc["logits", "shape"] == "['batch_size', 'num_logits_to_keep', 1000]"
    assert model.compile_result.specializations == [
        {"batch_size": 1, "seq_len": PREFILL, "ctx_len": CTX, "num_logits_to_keep": 1},
        {"batch_size": 1, "seq_len": K + 1, "ctx_len": CTX, "num_logits_to_keep": K + 1}]
    session = _session(model)
    assert session.num_speculative_tokens == K
    prompt, window = prompt_ids[0], [17, 18, 19, 20]
    assert feed(session, prompt, 0).shape == (1000,)  # prefill: one position's logits (num_logits_to_keep 1)
    pos = np.arange(len(prompt), len(prompt) + 4)[None]
    logits = session.step(np.array([window]), pos, num_logits_to_keep=K + 1)
    assert logits.shape == (1, K + 1, 1000)
    np.testing.assert_allclose(logits[0], _hf_logits(hf, prompt + window)[-4:], atol=1e-4)
    # two valid positions, two of padding: the first two rows are theirs
    logits = session.step(np.array([[window[0], 5, 0, 0]]), np.array([[len(prompt), len(prompt) + 1, -1, -1]]),
                          num_logits_to_keep=K + 1)
    np.testing.assert_allclose(logits[0, :2], _hf_logits(hf, prompt + [window[0], 5])[-2:], atol=1e-4)


def test_stale_kv_at_rejected_positions_is_overwritten_and_never_read(target):
    """Rejected drafts leave their KV at positions p+1 .. p+k; the next step must not see them (a query at p attends
    only positions <= p, and the gather stops at the step's largest position) and must overwrite what it feeds."""
    model, hf, prompt_ids, _ = target
    session, prompt = _session(model), prompt_ids[1]
    p = len(prompt)
    feed(session, prompt, 0)
    fresh = session.kv_state()
    session.step(np.array([[901, 902, 903, 904]]), np.arange(p, p + 4)[None], num_logits_to_keep=K + 1)  # all wrong
    stale = session.kv_state()
    assert all(np.abs(stale[n][0, :, p:p + 4] - fresh[n][0, :, p:p + 4]).max() > 0 for n in fresh)  # written
    logits = session.step(np.array([[42, 0, 0, 0]]), np.array([[p, -1, -1, -1]]), num_logits_to_keep=K + 1)
    np.testing.assert_allclose(logits[0, 0], _hf_logits(hf, prompt + [42])[-1], atol=1e-4)
    reference = TorchKVRunner(model.model, 1, PREFILL, CTX)  # a plain run over the same tokens
    feed(reference, prompt + [42], 0)
    for i, (key, value) in enumerate(reference.cache):
        got = session.kv_state()
        np.testing.assert_allclose(got[f"past_key.{i}"][0, :, :p + 1], key[0, :, :p + 1].numpy(), atol=1e-5)
        np.testing.assert_allclose(got[f"past_value.{i}"][0, :, :p + 1], value[0, :, :p + 1].numpy(), atol=1e-5)


class ScriptedDrafter:
    """A drafter that knows the greedy answer and proposes `good` right tokens, then wrong ones; `good` cycles
    0 .. k so that every acceptance count (none, some, all) occurs."""

    name = "scripted"

    def __init__(self, prompt_ids, answers):
        self.answers = {tuple(p): a for p, a in zip(prompt_ids, answers)}
        self.calls = 0

    def start(self, prompt_ids):
        self.prompt, self.answer = prompt_ids, self.answers[tuple(prompt_ids)]

    def propose(self, tokens, k):
        done = len(tokens) - len(self.prompt)
        good = self.calls % (k + 1)
        self.calls += 1
        right = self.answer[done:done + k]
        return right[:good] + [(t + 1) % 1000 for t in right[good:]]


def test_every_acceptance_count_gives_the_greedy_tokens_and_the_plain_cache(target):
    model, _, prompt_ids, reference = target
    drafter = ScriptedDrafter(prompt_ids, reference)
    runner = model.runner()
    ids, stopped, metrics = generate_speculative(runner, prompt_ids, NEW, drafter=drafter)
    assert ids == reference and stopped == ["length"] * 3
    assert 0 < metrics.accepted_tokens < metrics.proposed_tokens
    assert metrics.decode_tokens == 3 * (NEW - 1) == metrics.target_steps + metrics.accepted_tokens
    assert 1 < metrics.mean_tokens_per_step <= K + 1
    # the retained cache holds exactly what plain greedy leaves for every fed position of the last prompt
    seq = prompt_ids[-1] + ids[-1][:-1]
    plain = TorchKVRunner(model.model, 1, PREFILL, CTX)
    feed(plain, seq, 0)
    state = runner.kv_state()
    for i, (key, value) in enumerate(plain.cache):
        np.testing.assert_allclose(state[f"past_key.{i}"][0, :, :len(seq)], key[0, :, :len(seq)].numpy(), atol=1e-4)
        np.testing.assert_allclose(state[f"past_value.{i}"][0, :, :len(seq)], value[0, :, :len(seq)].numpy(),
                                   atol=1e-4)


def test_prompt_lookup_proposes_what_followed_the_first_match():
    drafter = PromptLookupDrafter(max_matching_ngram_size=2)
    assert drafter.propose([1, 2, 3, 4, 5, 1, 2], 3) == [3, 4, 5]
    assert drafter.propose([7, 1, 2, 9, 1, 2, 8, 2], 2) == [9, 1]  # 2-gram [8, 2] unseen; 1-gram [2] first at 2
    assert drafter.propose([1, 2, 3], 4) == []
    assert drafter.propose([5, 6, 5], 4) == [6, 5]  # no more than what follows
    with pytest.raises(ValueError, match="max_matching_ngram_size must be a positive int"):
        PromptLookupDrafter(0)


def test_prompt_lookup_and_plain_target_decode_equal_hf_greedy(target):
    model, hf, *_ = target
    g = torch.Generator().manual_seed(3)
    repetitive = [(torch.randint(5, 1000, (6,), generator=g).tolist() * 3)[:n] for n in (11, 17)]
    reference = hf_greedy(hf, repetitive, NEW)
    out = model.generate_from_ids(repetitive, NEW, prompt_lookup_num_tokens=K)
    assert out.ids == reference
    m = out.metrics
    assert m.drafter == "prompt lookup" and m.num_speculative_tokens == K and m.proposed_tokens > 0
    assert m.acceptance_rate == m.accepted_tokens / m.proposed_tokens
    assert m.mean_tokens_per_step == m.decode_tokens / m.target_steps
    frame = m.to_frame().set_index("metric")["value"]
    assert frame["acceptance rate"] == f"{m.acceptance_rate:.1%}" and "Speculative decoding (prompt lookup" in m.report()
    plain = model.generate_from_ids(repetitive, NEW)  # a target without drafts: one token per step
    assert plain.ids == reference and plain.metrics.proposed_tokens == 0
    assert plain.metrics.target_steps == plain.metrics.decode_tokens == 2 * (NEW - 1)


def test_draft_model_tokens_equal_greedy_and_the_same_weights_accept_everything(target):
    model, _, prompt_ids, reference = target
    same = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=7), "tiny-llama-draft")
    same.compile(prefill_seq_len=PREFILL, ctx_len=CTX)
    out = model.generate_from_ids(prompt_ids, NEW, draft_model=same)
    assert out.ids == reference
    assert out.metrics.acceptance_rate == 1.0 and out.metrics.mean_tokens_per_step > K
    fewer = model.generate_from_ids(prompt_ids, NEW, draft_model=same, num_speculative_tokens=1)
    assert fewer.ids == reference and fewer.metrics.num_speculative_tokens == 1
    assert fewer.metrics.mean_tokens_per_step <= 2 < out.metrics.mean_tokens_per_step


def test_a_different_draft_is_partly_accepted_on_the_pytorch_runtime(target):
    """A perturbed copy as the draft (its cache re-fed after each rejection), the target on the PyTorch runtime."""
    model, _, prompt_ids, reference = target
    draft = tiny_model("llama", seed=7)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.004)
    draft = QEFFAutoModelForCausalLM.from_model(draft, "tiny-llama-perturbed")
    draft.compile_shapes = {"prefill_seq_len": PREFILL, "ctx_len": CTX, "batch_size": 1}  # shapes, no export
    out = model.generate_from_ids(prompt_ids[1:], NEW, draft_model=draft, runtime="pytorch")
    assert out.ids == reference[1:] and out.metrics.backend == "pytorch"
    assert 0 < out.metrics.acceptance_rate < 1


def test_generic_path_target_verifies_k_positions():
    """A decoder on the generic path (transformers' interfaces; qk-norm) as a target on the PyTorch runner."""
    torch.manual_seed(4)
    hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16)).eval()
    model = QEFFAutoModelForCausalLM.from_model(tf.Qwen3ForCausalLM(hf.config).eval(), qaic_config=TARGET)
    model.model.load_state_dict(hf.state_dict())
    assert model.path == "generic"
    prompt_ids = [[5, 6, 7, 8, 9, 5, 6, 7, 8]]
    runner = TorchKVRunner(model.model, 1, PREFILL, CTX, num_speculative_tokens=K)
    ids, _, metrics = generate_speculative(runner, prompt_ids, 12, drafter=PromptLookupDrafter())
    assert ids == hf_greedy(hf, prompt_ids, 12) and metrics.proposed_tokens > 0


@pytest.mark.parametrize("model_type", ["gemma2", "qwen3"])  # sliding window + soft-capping; qk-norm
def test_generic_path_target_on_onnxruntime(model_type):
    """The generic path's exported target graph (num_logits_to_keep through the head's pre-hook) on ONNX Runtime:
    prompt-lookup speculative decoding gives HF greedy's tokens, rejected drafts' KV never read."""
    from tests.transforms.test_generic_kv import tiny

    hf = tiny(model_type, seed=3)
    model = QEFFAutoModelForCausalLM.from_model(tiny(model_type, seed=3), f"tiny-{model_type}-target",
                                                qaic_config=TARGET)
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, num_speculative_tokens=K)
    assert model.path == "generic" and model.onnx_io().set_index("name").loc["logits", "shape"].startswith(
        "['batch_size', 'num_logits_to_keep', ")
    repeat = [5, 61, 17, 90, 33, 8]
    prompt_ids = [repeat * 3 + repeat[:2], [7, 100, 3, 45, 66, 12, 9, 120, 31, 77, 4, 58, 19]]
    out = model.generate_from_ids(prompt_ids, NEW, prompt_lookup_num_tokens=K)
    assert out.ids == hf_greedy(hf, prompt_ids, NEW) and out.metrics.backend == "onnxruntime"
    assert out.metrics.proposed_tokens > 0


# ----------------------------------------------------------------------------- bad input
def test_compile_rejects_bad_speculative_settings():
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="speculative_model_type': 'target'"):
        plain.compile(prefill_seq_len=8, ctx_len=32, num_speculative_tokens=3)
    tlm = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config=TARGET)
    with pytest.raises(TypeError, match="needs num_speculative_tokens=k"):
        tlm.compile(prefill_seq_len=8, ctx_len=32)
    with pytest.raises(ValueError, match="num_speculative_tokens must be a positive int"):
        tlm.compile(prefill_seq_len=8, ctx_len=32, num_speculative_tokens=0)
    with pytest.raises(ValueError, match=r"needs prefill_seq_len >= num_speculative_tokens \+ 1 \(9\)"):
        tlm.compile(prefill_seq_len=8, ctx_len=32, num_speculative_tokens=8)
    with pytest.raises(ValueError, match="speculative decoding runs batch 1 here"):
        tlm.compile(prefill_seq_len=8, ctx_len=32, num_speculative_tokens=3, batch_size=2)
    with pytest.raises(ValueError, match="qaic_config .* is not supported"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config={"speculative_model_type": "draft"})
    with pytest.raises(ValueError, match="runs batch 1 without continuous batching"):
        QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), qaic_config=TARGET, continuous_batching=True)


def test_generate_rejects_what_speculative_decoding_cannot_do(target):
    model, *_ = target
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="need\\(s\\) a speculative-decoding target"):
        plain.generate_from_ids([[5, 6]], 4, prompt_lookup_num_tokens=3, runtime="pytorch")
    cb = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), continuous_batching=True)
    with pytest.raises(ValueError, match="without continuous batching"):
        cb.generate_from_ids([[5, 6]], 4, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="greedy only"):
        model.generate_from_ids([[5, 6]], 4, prompt_lookup_num_tokens=3, sampling=SamplingParams(do_sample=True))
    with pytest.raises(ValueError, match="verifies at most the 3 it was compiled for"):
        model.generate_from_ids([[5, 6]], 4, prompt_lookup_num_tokens=4)
    with pytest.raises(ValueError, match="num_speculative_tokens goes with draft_model"):
        model.generate_from_ids([[5, 6]], 4, num_speculative_tokens=2)
    other_vocab = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", vocab_size=900))
    with pytest.raises(ValueError, match="vocabulary has 900 tokens, the target's 1000"):
        model.generate_from_ids([[5, 6]], 4, draft_model=other_vocab)
    with pytest.raises(ValueError, match="either prompt_lookup_num_tokens .* or draft_model"):
        model.generate_from_ids([[5, 6]], 4, draft_model=plain, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="draft model is not compiled"):
        model.generate_from_ids([[5, 6]], 4, draft_model=plain)


def test_smollm2_prompt_lookup_repeats_its_input_exactly_like_greedy(smollm2_path):
    """The real model asked to repeat a passage: prompt lookup proposes the passage, most drafts are accepted, and the
    answer is HF greedy's, token for token."""
    hf = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model = QEFFAutoModelForCausalLM.from_pretrained(SMOLLM2, qaic_config=TARGET)
    tok = model.tokenizer
    text = "The old lighthouse keeper climbed the stairs every night, lit the lamp, and watched the ships pass."
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Repeat this sentence exactly:\n{text}"}],
                                     tokenize=False, add_generation_prompt=True)
    model.compile(prefill_seq_len=32, ctx_len=128, num_speculative_tokens=4)
    out = model.generate(tok, [prompt], 24, prompt_lookup_num_tokens=4, verbose=False)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert out.ids[0] == ref
    assert out.metrics.acceptance_rate > 0.5 and out.metrics.mean_tokens_per_step > 2
