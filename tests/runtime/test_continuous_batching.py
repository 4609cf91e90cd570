"""Continuous batching on tiny decoders: QEfficient's I/O (batch_index, full_batch_size), greedy tokens of each
prompt equal to running it alone (HF generate), for fewer / as many / more prompts than slots, very different
prompt lengths and per-request generation_len (on the embedded backend's GroupQueryAttention graph, and on the
exported graph); slots handed over at once; per-request metrics; bad input."""
import json

import numpy as np
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.runtime.continuous_batching import ServingMetrics, generate_continuous
from qeff_lab.runtime.generation import TorchKVRunner, generate_ids
from qeff_lab.runtime.kv_session import OrtKVSession
from qeff_lab.runtime.sampling import SamplingParams
from tests.transforms.tiny_decoders import hf_greedy, prompts, tiny_model

PREFILL, CTX, FBS = 8, 64, 3
LENGTHS = (3, 29, 9, 41, 1, 16, 8)  # one token to five prefill chunks
GEN = [12, 5, 20, 9, 14, 1, 7]  # per request; 41 + 9 and 29 + 5 stay inside ctx 64


@pytest.fixture(scope="module")
def served():
    hf = tiny_model("llama", seed=5)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-llama-cb", continuous_batching=True)
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, full_batch_size=FBS)
    prompt_ids = prompts(seed=21, lengths=LENGTHS)
    reference = [r[:g] for r, g in zip(hf_greedy(hf, prompt_ids, max(GEN)), GEN)]
    return model, hf, prompt_ids, reference


def test_graph_and_specializations_follow_qefficient(served):
    model, *_ = served
    io = model.onnx_io().set_index("name")
    assert io.loc["batch_index", "shape"] == "['batch_size', 1]" and io.loc["batch_index", "dtype"] == "int64"
    assert io.loc["past_key.0", "shape"].startswith("['full_batch_size', ")
    assert io.loc["past_value.1_RetainedState", "shape"].startswith("['full_batch_size', ")
    assert list(io.index[io.direction == "input"])[-1] == "batch_index"  # QEfficient's input order
    specs = json.loads(model.compile_artifacts()["specializations.json"])["specializations"]
    symbols = [s.get("symbols", s) for s in specs]
    assert [{k: int(v) for k, v in s.items()} for s in symbols] == [
        {"batch_size": 1, "seq_len": PREFILL, "ctx_len": CTX, "full_batch_size": FBS},
        {"batch_size": FBS, "seq_len": 1, "ctx_len": CTX, "full_batch_size": FBS}]
    assert model.export_result.custom_ops == {"CtxGatherCB": 4, "CtxScatterCB": 4, "CustomRMSNorm": 5}


@pytest.mark.parametrize("n", [2, 3, 7])  # fewer than, as many as, more than full_batch_size
def test_each_prompt_gets_the_tokens_it_gets_alone(served, n):
    model, _, prompt_ids, reference = served
    out = model.generate_from_ids(prompt_ids[:n], GEN[:n])
    assert out.ids == reference[:n]
    assert out.stopped == ["length"] * n
    assert isinstance(out.metrics, ServingMetrics) and out.metrics.generated_tokens == sum(GEN[:n])


def test_the_embedded_backend_serves_on_its_gqa_graph_as_on_the_exported_graph(served):
    """The compile's GroupQueryAttention graph runs (cache row = slot); the exported graph (OrtKVSession) gives the
    same tokens, also with prefix reuse."""
    model, _, prompt_ids, reference = served
    runner = model.runner()
    assert type(runner).__name__ == "OrtGqaKVSession" and runner.full_batch_size == FBS
    result = model.compile_result
    exported = OrtKVSession(result.onnx_path, result.specializations)
    assert generate_continuous(exported, prompt_ids, GEN)[0] == reference
    shared, gen = _shared_prefix_prompts()
    fresh = generate_continuous(exported, shared, gen)[0]
    assert generate_continuous(runner, shared, gen, prefix_caching=True)[0] == fresh
    assert generate_continuous(exported, shared, gen, prefix_caching=True)[0] == fresh


def test_pytorch_runner_serves_the_same_tokens(served):
    model, _, prompt_ids, reference = served
    runner = TorchKVRunner(model.model, 1, PREFILL, CTX, full_batch_size=FBS)
    assert generate_continuous(runner, prompt_ids, GEN)[0] == reference


def test_a_finished_request_hands_its_slot_to_the_next_prompt_at_once(served):
    model, _, prompt_ids, _ = served
    m = model.generate_from_ids(prompt_ids, GEN).metrics
    reqs = m.requests
    assert [r.slot for r in reqs[:FBS]] == list(range(FBS))
    assert all(r.queue_wait_s <= reqs[i + 1].queue_wait_s for i, r in enumerate(reqs[:-1]))  # FIFO
    for r in reqs[FBS:]:  # a later request starts right after the one it replaced on its slot finished
        before = [q for q in reqs if q.slot == r.slot and q.index < r.index][-1]
        assert before.finish_s <= r.prefill_start_s
        gap = r.prefill_start_s - before.finish_s
        assert gap < 0.05, gap
    assert reqs[5].generated_tokens == 1 and reqs[5].stopped == "length"  # done at prefill: slot reused at once
    for r in reqs:
        assert 0 <= r.queue_wait_s <= r.ttft_s <= r.finish_s
    assert m.full_batch_size == FBS and m.prompts == 7 and m.throughput_tok_s > 0
    assert m.decode_steps < sum(GEN)  # decode steps are shared between slots
    frame = m.requests_frame()
    assert list(frame.columns) == ["request", "slot", "prompt tokens", "new tokens", "queue wait s", "TTFT s",
                                   "decode tok/s", "stopped", "prefix reused"] and len(frame) == 7
    assert "throughput" in m.to_frame()["metric"].tolist() and "Continuous batching: 7 requests on 3 slots" in m.report()


def test_eos_frees_a_slot_early(served):
    model, _, prompt_ids, reference = served
    eos = reference[0][2]
    assert eos not in reference[0][:2]
    out = model.generate_from_ids(prompt_ids[:4], 6, eos_token_ids=[eos])
    assert out.ids[0] == reference[0][:3] and out.stopped[0] == "eos"
    for i in (1, 2, 3):
        ref = reference[i] if len(reference[i]) >= 6 else None
        if ref is not None and eos not in ref[:6]:
            assert out.ids[i] == ref[:6]


def test_sampling_per_slot_equals_the_batched_loop_on_the_same_seeds(served):
    model, _, prompt_ids, _ = served
    params = [SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=1),
              SamplingParams(),
              SamplingParams(do_sample=True, top_p=0.7, repetition_penalty=1.3, presence_penalty=0.5, seed=2),
              SamplingParams(do_sample=True, temperature=1.5, top_k=0, min_p=0.1, seed=3)]
    cb = model.generate_from_ids(prompt_ids[:4], 8, sampling=params).ids
    runner = TorchKVRunner(model.model, 2, PREFILL, CTX)  # the plain loop, two batches of two
    assert generate_ids(runner, prompt_ids[:4], 8, sampling=params)[0] == cb
    assert model.generate_from_ids(prompt_ids[:4], 8, sampling=params).ids == cb  # seeds: reproducible


def test_guided_decoding_allows_only_digits(served, smollm2_path):
    from transformers import AutoTokenizer

    model, _, prompt_ids, _ = served
    tok = AutoTokenizer.from_pretrained(smollm2_path)  # the tiny model's ids < 1000 are SmolLM2's base tokens
    mask = np.zeros(1000, bool)
    digits = [i for s, i in tok.get_vocab().items() if s and all(c in "0123456789" for c in s) and i < 1000]
    mask[digits] = True
    out = model.generate_from_ids(prompt_ids[:4], 10, token_bitmasks=mask,
                                  sampling=[SamplingParams(), SamplingParams(do_sample=True, temperature=2.0, seed=4)] * 2)
    for ids in out.ids:
        assert set(ids) <= set(digits) and tok.decode(ids).isdigit()


def test_bad_input_is_a_clear_error(served):
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-plain")
    with pytest.raises(ValueError, match="full_batch_size=4 needs a continuous-batching model"):
        plain.compile(prefill_seq_len=PREFILL, ctx_len=CTX, full_batch_size=4)
    model, _, prompt_ids, _ = served
    cb = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-cb2", continuous_batching=True)
    with pytest.raises(ValueError, match="needs full_batch_size=N"):
        cb.compile(prefill_seq_len=PREFILL, ctx_len=CTX)
    with pytest.raises(ValueError, match="batch_size=2 with continuous batching"):
        cb.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2, full_batch_size=4)
    with pytest.raises(ValueError, match="generation_len has 2 value"):
        model.generate_from_ids(prompt_ids[:3], [4, 5])
    with pytest.raises(ValueError, match="temperature must be >= 0"):  # checked before anything is tokenized
        model.generate(None, ["Hello"], 3, do_sample=True, temperature=-1.0, verbose=False)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(None, ["Hello"], 3, do_sample=True, top_p=1.5, verbose=False)
    runner = model.runner()
    with pytest.raises(ValueError, match="needs batch_index"):
        runner.step(np.zeros((1, PREFILL), np.int64), np.zeros((1, PREFILL), np.int64))
    with pytest.raises(ValueError, match="distinct slot"):
        runner.step(np.zeros((1, PREFILL), np.int64), np.zeros((1, PREFILL), np.int64), np.array([[FBS]]))


def _shared_prefix_prompts():
    system = prompts(seed=3, lengths=(19,))[0]  # a "system prompt" of 19 tokens: two prefill chunks and a bit
    return [system + s for s in prompts(seed=22, lengths=(3, 12, 1, 7, 5))] + [system[:10]], [6, 9, 4, 7, 5, 3]


def test_prefix_caching_gives_the_fresh_tokens_and_saves_prefill(served):
    model, *_ = served
    prompt_ids, gen = _shared_prefix_prompts()
    fresh = model.generate_from_ids(prompt_ids, gen)
    events = []
    reused = model.generate_from_ids(prompt_ids, gen, prefix_caching=True,
                                     on_event=lambda *e: events.append(e))
    assert reused.ids == fresh.ids
    m = reused.metrics
    # request 0 finds nothing; 1..4 reuse the 19 system tokens (copied from another slot, or their own);
    # request 5 is a prefix of the system prompt itself: all but its last token
    assert [r.prefix_reused for r in m.requests] == [0, 19, 19, 19, 19, 9]
    assert m.prefill_tokens_saved == 4 * 19 + 9 and fresh.metrics.prefill_tokens_saved == 0
    assert m.prefill_steps < fresh.metrics.prefill_steps
    assert m.requests_frame()["prefix reused"].sum() == m.prefill_tokens_saved
    assert [e[:3] for e in events if e[0] == "prefill"] == [("prefill", r.index, r.slot) for r in m.requests]
    assert sum(e[0] == "token" for e in events) == m.generated_tokens
    assert [e[1] for e in events if e[0] == "finish"] == sorted(range(6), key=lambda i: m.requests[i].finish_s)


def test_prefix_caching_on_smollm2_with_a_chat_template_system_prompt(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(smollm2_path), continuous_batching=True)
    model.compile_shapes = {"prefill_seq_len": 16, "ctx_len": 64, "batch_size": 1, "full_batch_size": 2}  # no export
    system = "You are a concise assistant. Answer in one short sentence."
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    texts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                     tokenize=False, add_generation_prompt=True) for q in questions]
    fresh = model.generate(tok, texts, 3, runtime="pytorch", verbose=False)
    reused = model.generate(tok, texts, 3, runtime="pytorch", verbose=False, prefix_caching=True)
    assert reused.ids == fresh.ids
    shared = len(tok(texts[0])["input_ids"]) - len(tok(questions[0])["input_ids"])  # about the system part
    saved = [r.prefix_reused for r in reused.metrics.requests]
    assert saved[0] == 0 and min(saved[1:]) >= shared - 8 and reused.metrics.prefill_tokens_saved == sum(saved)


def test_prefix_caching_needs_continuous_batching(served):
    plain = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-plain-prefix")
    with pytest.raises(ValueError, match="prefix_caching need\\(s\\) continuous batching"):
        plain.generate_from_ids([[5, 6, 7]], 2, runtime="pytorch", prefix_caching=True)


# ----------------------------------------------------------------------------- the generic path
# transformers' own attention through the interfaces, the retained cache's update() with CtxScatterCB / CtxGatherCB
GENERIC = ("gemma2", "qwen3", "gpt_bigcode")  # sliding-window layers + soft-capping; qk-norm; MQA + learned positions


def _small_vocab(ids: list[list[int]]) -> list[list[int]]:
    return [[3 + t % 120 for t in p] for p in ids]  # the generic tiny models have 128 tokens


@pytest.fixture(scope="module", params=GENERIC)
def generic_served(request):
    from tests.transforms.test_generic_kv import hf_greedy as generic_hf_greedy, tiny

    hf = tiny(request.param, seed=5)
    model = QEFFAutoModelForCausalLM.from_model(tiny(request.param, seed=5), f"tiny-{request.param}-cb",
                                                continuous_batching=True)
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, full_batch_size=FBS)
    prompt_ids = _small_vocab(prompts(seed=21, lengths=LENGTHS))
    reference = [r[:g] for r, g in zip(generic_hf_greedy(hf, prompt_ids, max(GEN)), GEN)]
    return model, hf, prompt_ids, reference


def test_generic_path_graph_has_the_batch_index_ops(generic_served):
    model, hf, *_ = generic_served
    assert model.path == "generic"
    io = model.onnx_io().set_index("name")
    assert list(io.index[io.direction == "input"])[-1] == "batch_index"
    assert io.loc["past_key.0", "shape"].startswith("['full_batch_size', ")
    layers = hf.config.num_hidden_layers
    ops = model.export_result.custom_ops
    assert ops["CtxScatterCB"] == ops["CtxGatherCB"] == 2 * layers
    assert "CtxScatter" not in ops and "CtxGather" not in ops


def test_generic_path_serves_each_prompt_as_alone_and_as_hf(generic_served):
    """7 prompts of 1 to 41 tokens on 3 slots, per-request lengths, on ONNX Runtime: HF eager's greedy tokens, the
    same as each prompt served alone, and as the PyTorch runner."""
    model, _, prompt_ids, reference = generic_served
    out = model.generate_from_ids(prompt_ids, GEN)
    assert out.ids == reference and out.stopped == ["length"] * len(GEN)
    assert out.metrics.backend == "onnxruntime" and max(r.slot for r in out.metrics.requests) == FBS - 1
    assert [model.generate_from_ids([p], [g]).ids[0] for p, g in zip(prompt_ids, GEN)] == reference
    runner = TorchKVRunner(model.model, 1, PREFILL, CTX, full_batch_size=FBS)
    assert generate_continuous(runner, prompt_ids, GEN)[0] == reference


def test_generic_path_prefix_caching(generic_served):
    model, *_ = generic_served
    prompt_ids, gen = _shared_prefix_prompts()
    prompt_ids = _small_vocab(prompt_ids)
    fresh = model.generate_from_ids(prompt_ids, gen)
    reused = model.generate_from_ids(prompt_ids, gen, prefix_caching=True)
    assert reused.ids == fresh.ids
    saved = [r.prefix_reused for r in reused.metrics.requests]  # a slot also holds its generated tokens: >= 19
    assert saved[0] == 0 and min(saved[1:5]) >= 19 and saved[5] == 9
    assert reused.metrics.prefill_steps < fresh.metrics.prefill_steps
