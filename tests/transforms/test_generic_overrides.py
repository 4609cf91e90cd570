"""Named overrides of the generic retained-state path (qeff_lab/transforms/generic/overrides/): model types the
interfaces cannot reach as they are. HF eager greedy tokens == retained-state PyTorch tokens == ONNX Runtime tokens,
exactly, for 16 new tokens on a right-padded batch of 2 prompts (5 and 13 tokens), on tiny random configs covering
each model's variants: Falcon multi-query / multi-head + ALiBi / new decoder architecture, GPT-Neo local windows
shorter than the sequence, Bloom and MPT ALiBi, Llama 4's complex rotary and NoPE temperature, OpenAI GPT (no HF
KV cache at all), TrOCR (positions from the cache length). DBRX's dense experts against its own expert loop."""
import importlib
import pkgutil

import pytest
import torch
import transformers as tf

from qeff_lab.commands.support_matrix import tiny_config
from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM
from qeff_lab.runtime.generation import TorchKVRunner, generate_ids
from qeff_lab.transforms.generic import (RetainedStateCausalLM, check_support, generic_kv_transform,
                                         undo_generic_kv_transform)
from qeff_lab.transforms.generic import overrides
from tests.transforms.tiny_decoders import hf_greedy

VOCAB, NEW, CTX, PREFILL = 128, 16, 48, 8
PROMPT_LENGTHS = (5, 13)
WINDOW = 4  # GPT-Neo local window < both prompts + new tokens
FALCON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

CASES = {
    "falcon": (tf.FalconConfig, FALCON),  # multi-query (one K/V head), parallel attention, rotary
    "falcon-alibi": (tf.FalconConfig, {**FALCON, "alibi": True, "multi_query": False, "parallel_attn": False}),
    "falcon-new-decoder": (tf.FalconConfig, {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt_neo": (tf.GPTNeoConfig, dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                      vocab_size=VOCAB, max_position_embeddings=256, window_size=WINDOW,
                                      attention_types=[[["global", "local"], 1]], bos_token_id=1, eos_token_id=2)),
    "bloom": (tf.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=1,
                                   eos_token_id=2)),
    "mpt": (tf.MptConfig, dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256,
                               vocab_size=VOCAB)),
    "xglm": (tf.XGLMConfig, dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
                                 max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt_neox_japanese": (tf.GPTNeoXJapaneseConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_multiple_size=2, vocab_size=VOCAB,
                                                         max_position_embeddings=256, bos_token_id=1,
                                                         eos_token_id=2)),
    # complex rotary (real pairs here), chunked attention, MoE; NoPE layer 1's attention temperature grows every
    # floor_scale positions: 4 < the prompts, so it acts (the default 8192 would leave it 1 throughout; the
    # default attn_scale 0.1 barely moves these tiny logits)
    "llama4_text": (lambda **kw: _changed(tiny_config("llama4_text"), **kw),
                    dict(floor_scale=4, attn_scale=1.0)),
    # positions from cache.get_seq_length() in HF (no position_ids): learned and sinusoidal tables
    "trocr": (tf.TrOCRConfig, dict(d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
                                   vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)),
    "trocr-sinusoidal": (tf.TrOCRConfig, dict(d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                              decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=256,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                              use_learned_position_embeddings=False)),
    # no KV cache in HF at all: the override threads the retained cache through model, blocks and attention
    "openai-gpt": (tf.OpenAIGPTConfig, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256)),
}


def _changed(config, **changes):
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(case: str, seed: int = 0, **changes):
    config_cls, kwargs = CASES[case]
    config = config_cls(**{**kwargs, **changes})
    config.initializer_range = 0.1  # livelier logits than 0.02: fewer near-ties in the greedy comparison
    if hasattr(config, "init_std"):  # xglm's and trocr's name for it (at 0.02 their tokens hardly see positions)
        config.init_std = 0.1
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_match_hf_in_pytorch_and_onnxruntime(case, tmp_path, monkeypatch):
    monkeypatch.setenv("QEFF_LAB_CACHE", str(tmp_path))
    model = tiny(case)
    prompt_ids = prompts()
    reference = hf_greedy(model, prompt_ids, NEW)
    assert reference[0] != reference[1]  # different prompts, different answers
    with torch.no_grad():  # logits too: tiny random models' greedy tokens barely react to a wrong absolute position
        hf_logits = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompt_ids])
    qeff = QEFFAutoModelForCausalLM.from_model(model, name=f"tiny-{case}")
    assert isinstance(qeff.model, RetainedStateCausalLM)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.full((2, width), -1, dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, :len(p)], pos[i, :len(p)] = torch.tensor(p), torch.arange(len(p))
    with torch.no_grad():
        logits, _ = qeff.model(ids, pos, qeff.model.new_kv_cache(2, CTX))
    torch.testing.assert_close(logits[:, 0], hf_logits, atol=1e-4, rtol=0)
    for prefill in (16, 4):  # one chunk; four chunks (the last one padded with -1)
        ids, _, _ = generate_ids(TorchKVRunner(qeff.model, 2, prefill, CTX), prompt_ids, NEW)
        assert ids == reference, f"{case}, prefill {prefill}: retained-state PyTorch tokens differ from HF"
    qeff.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2, backend="onnxruntime")
    assert qeff.generate_from_ids(prompt_ids, NEW, runtime="compiled").ids == reference, \
        f"{case}: ONNX Runtime tokens differ from HF"


def test_gpt_neo_local_window_really_acts():
    """Control: the same weights with a window longer than the sequence give other tokens."""
    prompt_ids = prompts()
    outs = []
    for window in (WINDOW, 256):
        model = tiny("gpt_neo", window_size=window)
        generic_kv_transform(model)
        outs.append(generate_ids(TorchKVRunner(model, 2, 4, CTX), prompt_ids, NEW)[0])
    assert outs[0] != outs[1]


def test_llama4_temperature_really_acts():
    """Control: with the default floor_scale the NoPE layer's temperature stays 1, and the tokens differ."""
    prompt_ids = prompts()
    outs = []
    for floor_scale in (4, 8192):
        model = tiny("llama4_text", floor_scale=floor_scale)
        assert not model.model.layers[1].self_attn.use_rope and model.config.attn_temperature_tuning
        generic_kv_transform(model)
        outs.append(generate_ids(TorchKVRunner(model, 2, 4, CTX), prompt_ids, NEW)[0])
    assert outs[0] != outs[1]


def test_positions_from_the_cache_length_are_still_refused_without_an_override():
    reason = check_support(tf.CONFIG_MAPPING["moshi"]()).reason
    assert reason.startswith("moshi: MoshiDepthDecoder.forward builds positions from cache.get_seq_length()")


def test_falcon_new_decoder_cache_keeps_only_the_kv_heads():
    model = tiny("falcon-new-decoder")
    generic_kv_transform(model)
    assert model.kv_cache_layout() == [(2, 16), (2, 16)]  # not the 4 broadcast copies per layer
    multi_query = tiny("falcon")
    generic_kv_transform(multi_query)
    assert multi_query.kv_cache_layout() == [(1, 16), (1, 16)]


def test_report_names_the_override_and_undo_restores_the_model():
    model = tiny("gpt_neo")
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    result = generic_kv_transform(model)
    places = {c.place: c for c in result.changes}
    attn = places["config._attn_implementation"]
    assert attn.after == "qeff_retained" and attn.why.startswith("named override gpt_neo.py: gpt_neo: ")
    assert places["transformer.h.1.attn.attention"].after == "RetainedGPTNeoSelfAttention"
    assert list(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    assert model.kv_cache_layout() == [(4, 16), (4, 16)]
    undo_generic_kv_transform(model)
    assert type(model) is tf.GPTNeoForCausalLM and model.config._attn_implementation == "eager"
    assert type(model.transformer.h[1].attn.attention).__name__ == "GPTNeoSelfAttention"


@pytest.mark.parametrize("case", ["openai-gpt", "trocr", "llama4_text", "falcon-alibi", "bloom"])
def test_undo_restores_every_class_and_hf_generate(case):
    model = tiny(case)
    classes = [type(m) for m in model.modules()]
    reference = hf_greedy(model, prompts(), 4)
    generic_kv_transform(model)
    assert type(model).__name__.startswith("Retained")
    undo_generic_kv_transform(model)
    assert [type(m) for m in model.modules()] == classes and model.config._attn_implementation == "eager"
    assert hf_greedy(model, prompts(), 4) == reference


def test_every_override_file_is_registered_and_says_why_on_its_first_line():
    files = {m.name for m in pkgutil.iter_modules(overrides.__path__)}
    assert files == set(overrides.OVERRIDES.values())
    for model_type, name in overrides.OVERRIDES.items():
        module = importlib.import_module(f"{overrides.__name__}.{name}")
        assert overrides.why(module).startswith(f"{model_type}: "), name
        reason = check_support(tf.CONFIG_MAPPING[model_type]()).reason  # the source checks an override answers
        assert "AttentionInterface" not in reason and "get_seq_length" not in reason, reason


def test_dbrx_dense_experts_equal_its_expert_loop():
    """Every expert on every token, weighed by the router's top-k weights: DBRX's own numbers on a batch where the
    experts get different numbers of tokens (4 experts, top-2), swapped back by the undo."""
    from transformers.models.dbrx import modeling_dbrx as hf_dbrx

    from qeff_lab.transforms.generic.overrides.dbrx import DenseDbrxExperts

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("dbrx"), attn_implementation="eager").eval()
    ffn = model.transformer.blocks[0].ffn
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, picked = ffn.route_tokens_to_experts(ffn.router(x))
        want = ffn(x)
    assert len(set(torch.bincount(picked.flatten(), minlength=4).tolist())) > 1
    generic_kv_transform(model)
    assert type(ffn.experts) is DenseDbrxExperts
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), want, rtol=0, atol=1e-6)
    undo_generic_kv_transform(model)
    assert type(ffn.experts) is hf_dbrx.DbrxExperts


@pytest.mark.parametrize("heads", [4, 12, 71])
def test_falcon_alibi_twin_is_bit_identical(heads):
    from qeff_lab.transforms.generic.overrides import falcon

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 2048, dtype=torch.long)
    mask[1, :100] = 0  # left padding
    mask[2] = (torch.rand(2048, generator=g) > 0.2).long()
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(falcon.build_alibi_tensor(mask, heads, dtype), falcon.ORIGINAL(mask, heads, dtype))
