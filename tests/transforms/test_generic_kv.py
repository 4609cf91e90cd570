"""The generic retained-state path (transformers' Cache / AttentionInterface / AttentionMaskInterface /
ExpertsInterface): HF eager greedy tokens == retained-state PyTorch tokens (== ONNX Runtime for a few), exactly,
for 16 new tokens, a right-padded batch of 2 prompts of different lengths, prefill in one chunk and in several;
and unsupported architectures refused at load with one line naming the model type and the obstacle."""
import pytest
import torch
import transformers as tf

from qeff_lab.runtime.generation import TorchKVRunner, generate_ids
from tests.transforms.tiny_decoders import hf_greedy as family_hf_greedy
from qeff_lab.transforms.generic import (RetainedStateCausalLM, UnsupportedArchitectureError, check_support,
                                         generic_kv_transform, max_ctx_len, undo_generic_kv_transform)

VOCAB, NEW, CTX = 128, 16, 40
PROMPT_LENGTHS = (5, 13)  # 13 > every sliding window below: the windows are exercised
WINDOW = 6
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
              max_position_embeddings=256, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, COMMON),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**COMMON, "head_dim": 16}),  # qk-norm
    # soft-capping (attention and final logits), alternating sliding / full layers, window < sequence
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               {**COMMON, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {**COMMON, "sliding_window": WINDOW}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,  # layer 0 full, layer 1 sliding
              {**COMMON, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, {**COMMON, "partial_rotary_factor": 0.5}),  # partial rotary
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,  # parallel residual, fused qkv, 25% rotary
                 {**COMMON, "num_key_value_heads": 4, "rotary_pct": 0.25, "use_parallel_residual": True}),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, {**GPT, "rotary_dim": 8}),
    "gpt_bigcode": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, {**GPT, "multi_query": True}),  # MQA
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, {**COMMON, "sliding_window": WINDOW}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, COMMON),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM,
                {**COMMON, "embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {**COMMON, "use_qk_norm": True, "logit_scale": 0.5}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, GPT),  # learned position table (padding must not index -1)
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # sizes its padding mask from cache.get_seq_length() (past + new = the retained buffer); learned positions
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, {**COMMON, "ffn_dim": 128, "word_embed_proj_dim": 64}),
    "apertus": (tf.ApertusConfig, tf.ApertusForCausalLM, COMMON),  # xIELU activation: aten::expm1 at export
    "glm": (tf.GlmConfig, tf.GlmForCausalLM, {**COMMON, "head_dim": 16}),  # interleaved RoPE: repeat_interleave
    "bitnet": (tf.BitNetConfig, tf.BitNetForCausalLM, COMMON),  # relu2, sub-norms
    # layer 0 full, layer 1 sliding (window 6 < the 13-token prompt)
    "modernbert-decoder": (tf.ModernBertDecoderConfig, tf.ModernBertDecoderForCausalLM,
                           {**COMMON, "sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"]}),
    # BERT-style stack: causal and cached only as a decoder (is_decoder=False is refused, see below)
    "bert-generation": (tf.BertGenerationConfig, tf.BertGenerationDecoder, {**COMMON, "is_decoder": True}),
    # mixture of attention heads + MoE MLP with data-dependent split sizes: jetmoe.py's dense override
    "jetmoe": (tf.JetMoeConfig, tf.JetMoeForCausalLM,
               {**COMMON, "kv_channels": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # input / looped recurrent / output layers; the second loop writes cache layer 3, past the model's 3 layers
    "dory": (tf.DoryConfig, tf.DoryForCausalLM,
             {**COMMON, "head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 3, "n_input_layers": 1,
              "n_recurrent_layers": 1, "n_output_layers": 1, "n_recurrent_loops": 2,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(model_type: str, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = CASES[model_type]
    torch.manual_seed(seed)
    config = config_cls(**{**kwargs, **overrides})
    config.initializer_range = 0.1  # livelier logits than 0.02: fewer near-ties, less repetitive references
    model = model_cls(config).eval()
    model.set_attn_implementation("eager")
    return model


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompt_ids, new_tokens: int = NEW) -> list[list[int]]:
    return family_hf_greedy(model, prompt_ids, new_tokens)


@pytest.mark.parametrize("model_type", list(CASES))
def test_greedy_tokens_match_hf(model_type):
    model = tiny(model_type)
    prompt_ids = prompts()
    reference = hf_greedy(model, prompt_ids)
    assert reference[0] != reference[1]  # different prompts, different answers
    result = generic_kv_transform(model)
    assert isinstance(model, RetainedStateCausalLM) and result.modified
    for prefill in (16, 4):  # one chunk; four chunks (the last one padded with -1)
        ids, _, _ = generate_ids(TorchKVRunner(model, 2, prefill, CTX), prompt_ids, NEW)
        assert ids == reference, f"{model_type}, prefill {prefill}: retained-state tokens differ from HF"


def test_report_layout_and_state_dict():
    model = tiny("mixtral")
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    result = generic_kv_transform(model)
    places = {c.place: c for c in result.changes}
    assert places["<root>"].after == "RetainedMixtralForCausalLM"
    assert places["config._attn_implementation"].after == "qeff_retained"
    assert "modeling_mixtral.eager_attention_forward" in places["config._attn_implementation"].why
    assert places["AttentionMaskInterface"].after == "qeff_retained"
    assert places["config._experts_implementation"].after == "qeff_dense"
    assert places["lm_head"].after == "Linear (+ pre-hook)"
    assert places["cache.layers.1"].why.startswith("[batch, 2, ctx_len, 16]")
    assert "tables [256, 16]" in places["model.rotary_emb"].after
    assert list(model.state_dict()) == keys  # tables are non-persistent; no key changes
    assert all(p is params[n] for n, p in model.named_parameters())  # the same parameter objects
    assert model.kv_cache_layout() == [(2, 16), (2, 16)]
    assert [tuple(k.shape) for k, _ in model.new_kv_cache(3, 32)] == [(3, 2, 32, 16)] * 2
    assert generic_kv_transform(model).notes == ["already on the generic retained-state path"]
    undo_generic_kv_transform(model)
    assert type(model) is tf.MixtralForCausalLM and model.config._attn_implementation == "eager"
    assert "qeff_cos_table" not in model.model.rotary_emb._buffers


def test_layouts_of_mqa_and_full_heads():
    assert generic_kv_transform(m := tiny("gpt_bigcode")) and m.kv_cache_layout() == [(1, 16), (1, 16)]
    assert generic_kv_transform(m := tiny("gpt_neox")) and m.kv_cache_layout() == [(4, 16), (4, 16)]


def test_cache_layers_past_the_models_own_keep_their_buffers():
    """dory's second loop of its recurrent layer writes its own cache layer (3, after the model's 3): the retained
    cache has a buffer pair for it, so HF's copy-on-first-call (a deep copy, cut off from the graph inputs) never
    runs. (Its ONNX Runtime tokens: test_onnx_export_runs_in_onnxruntime_with_hf_tokens.)"""
    model = tiny("dory")
    generic_kv_transform(model)
    assert len(model.kv_cache_layout()) == 4 and model._qeff_sliding == [True, False, True, False]


def test_padding_writes_nothing_and_garbage_beyond_the_context_cannot_leak():
    model = tiny("llama")
    generic_kv_transform(model)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    pos = torch.tensor([[0, 1, 2, -1], [0, 1, -1, -1]])
    clean = model.new_kv_cache(2, 8)
    dirty = [(torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) for k, v in clean]
    with torch.no_grad():
        logits_clean, past = model(ids, pos, clean)
        logits_dirty, past_dirty = model(ids, pos, dirty)
    assert logits_clean.shape == (2, 1, VOCAB) and logits_clean.dtype == torch.float32
    assert torch.equal(logits_clean, logits_dirty)  # NaN in unused slots changes nothing
    k = past[0][0]
    assert k[0, :, :3].abs().sum() > 0 and torch.equal(k[0, :, 3:], torch.zeros_like(k[0, :, 3:]))
    assert torch.isnan(past_dirty[0][0][1, :, 2:]).all()  # row 1 wrote slots 0-1 only


def test_sliding_window_is_applied_beyond_the_window():
    """Control: the same weights with the window removed give other tokens, so the window really acts."""
    windowed, full = tiny("mistral"), tiny("mistral", sliding_window=None)
    prompt_ids = prompts()
    for m in (windowed, full):
        generic_kv_transform(m)
    out_windowed, _, _ = generate_ids(TorchKVRunner(windowed, 2, 4, CTX), prompt_ids, NEW)
    out_full, _, _ = generate_ids(TorchKVRunner(full, 2, 4, CTX), prompt_ids, NEW)
    assert out_windowed != out_full
    assert max_ctx_len(windowed.config)[0] == 256  # the window does not cap ctx_len on this path


@pytest.mark.parametrize("build, expected", [
    (lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, state_size=4)),
     r"^mamba: MambaMixer .*recurrent state.*transformers. own generate"),
    (lambda: tf.RwkvForCausalLM(tf.RwkvConfig(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB,
                                              attention_hidden_size=32, intermediate_size=64, context_length=64)),
     r"^rwkv: RwkvForCausalLM.forward takes a `state` in place of a cache, a state-space / recurrent state"),
    (lambda: tf.xLSTMForCausalLM(tf.xLSTMConfig(hidden_size=32, embedding_dim=32, num_hidden_layers=2, num_blocks=2,
                                                num_heads=2, vocab_size=VOCAB)),
     r"^xlstm: xLSTMCache \(not a transformers Cache\) holds its state, a state-space / recurrent state"),
    (lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=VOCAB)),
     r"^t5: encoder-decoder"),
    (lambda: tf.BertGenerationDecoder(tf.BertGenerationConfig(**{**COMMON, "is_decoder": False})),
     r"^bert-generation: is_decoder=False makes its attention bidirectional.*Load it with is_decoder=True"),
])
def test_unsupported_architectures_fail_at_load_with_a_reason(build, expected):
    model = build().eval()
    support = check_support(model.config)
    assert not support and "\n" not in support.reason
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedArchitectureError, match=expected):
        generic_kv_transform(model)
    assert not isinstance(model, RetainedStateCausalLM) and model.config._attn_implementation == before


def test_mla_is_named():
    config = tf.DeepseekV3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
                                 kv_lora_rank=16, q_lora_rank=None)
    assert "multi-head latent attention" in check_support(config).reason
    assert check_support(tf.LlamaConfig()).ok


def test_greedy_reference_keeps_eos_and_the_retained_path_decodes_past_it():
    """The reference is plain argmax: a token the model calls EOS is emitted (not banned by a min-length rule) and
    decoding goes on after it, as the retained-state loop does."""
    model = tiny("llama")
    prompt_ids = prompts()
    free = hf_greedy(model, prompt_ids)
    eos = free[0][2]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    reference = hf_greedy(model, prompt_ids)
    assert reference == free and eos in reference[0][:NEW - 1]
    generic_kv_transform(model)
    ids, _, _ = generate_ids(TorchKVRunner(model, 2, 4, CTX), prompt_ids, NEW)
    assert ids == reference


def test_jetmoe_dense_override_equals_its_grouped_experts():
    """The dense MoE MLP / mixture-of-attention projections give JetMoE's own numbers, on a batch where every
    expert gets a different number of tokens, and are swapped back by the undo."""
    from transformers.models.jetmoe import modeling_jetmoe as hf_jetmoe

    from qeff_lab.transforms.generic.overrides.jetmoe import DenseJetMoeMoA, DenseJetMoeMoE

    model = tiny("jetmoe")
    layer = model.model.layers[0]
    moe, moa = layer.mlp, layer.self_attention.experts
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_mlp = moe(x)
        want_q, _, topo = moa.map(x)
        want_out = moa.reduce(want_q, topo)
    result = generic_kv_transform(model)
    assert type(moe) is DenseJetMoeMoE and type(moa) is DenseJetMoeMoA
    assert {c.after for c in result.changes} >= {"DenseJetMoeMoE", "DenseJetMoeMoA"}
    with torch.no_grad():
        got_q, _, dense_topo = moa.map(x)
        torch.testing.assert_close(moe(x), want_mlp, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_q, want_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(moa.reduce(want_q, dense_topo), want_out, rtol=0, atol=1e-6)
    undo_generic_kv_transform(model)
    assert type(moe) is hf_jetmoe.JetMoeMoE and type(moa) is hf_jetmoe.JetMoeMoA


# ----------------------------------------------------------------------------- export: the same graph contract
# modernbert-decoder and dory: rotary modules taking a layer_type, one table per layer type
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_neox", "mixtral", "apertus", "glm", "jetmoe",
                                        "modernbert-decoder", "dory"])
def test_onnx_export_runs_in_onnxruntime_with_hf_tokens(model_type):
    import onnx

    from qeff_lab.contracts import past_names, retained
    from qeff_lab.models.causal_lm import KVExportWrapper
    from qeff_lab.onnx.export import export_module
    from qeff_lab.runtime.kv_session import OrtKVSession

    model = tiny(model_type)
    prompt_ids = prompts()
    reference = hf_greedy(model, prompt_ids)
    generic_kv_transform(model)
    layout = model.kv_cache_layout()
    past = past_names(len(layout))
    batch, seq, ctx = 2, 8, 32  # the example shapes models/causal_lm.py's export() uses
    example = {"input_ids": torch.ones(batch, seq, dtype=torch.long),
               "position_ids": torch.arange(seq, dtype=torch.long)[None].repeat(batch, 1)}
    for i, (heads, dim) in enumerate(layout):
        example[f"past_key.{i}"] = torch.zeros(batch, heads, ctx, dim)
        example[f"past_value.{i}"] = torch.zeros(batch, heads, ctx, dim)
    axes = {"input_ids": {0: "batch_size", 1: "seq_len"}, "position_ids": {0: "batch_size", 1: "seq_len"},
            "logits": {0: "batch_size"}}
    for name in past:
        axes[name] = axes[retained(name)] = {0: "batch_size", 2: "ctx_len"}
    outputs = ["logits", *[retained(n) for n in past]]
    result = export_module(KVExportWrapper(model).eval(), example, outputs, axes,
                           {"kind": "generic-kv-test", "model": model_type}, name=f"generic-{model_type}")
    graph = onnx.load(str(result.path), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids", "position_ids", *past]
    assert [o.name for o in graph.graph.output] == outputs
    assert {f.name for f in graph.functions} >= {"CtxScatter", "CtxGather"}
    ops = {n.op_type for n in graph.graph.node}
    assert {"CtxScatter", "CtxGather"} <= ops and not {"Sin", "Cos"} & ops  # RoPE from tables

    specs = [{"batch_size": 2, "seq_len": 4, "ctx_len": CTX}, {"batch_size": 2, "seq_len": 1, "ctx_len": CTX}]
    ids, _, _ = generate_ids(OrtKVSession(result.path, specs, threads=1), prompt_ids, NEW)
    assert ids == reference, f"{model_type}: ONNX Runtime tokens differ from HF"
