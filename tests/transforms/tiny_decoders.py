"""Tiny random causal LMs, one per family (fixed seeds), and HF greedy references for parity tests."""
import torch
import transformers as tf

from qeff_lab.accuracy import runners

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
              max_position_embeddings=256, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, COMMON),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, COMMON),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, COMMON),
    # partial rotary: half of each head rotates (the rest passes through)
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
             {**COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=1, eos_token_id=2)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {**COMMON, "head_dim": 16}),
}

PREFILL, CTX, NEW_TOKENS = 8, 64, 24
PROMPT_LENGTHS = (5, 8, 13)  # shorter than, equal to and longer than the prefill chunk (two chunks)


def tiny_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = CONFIGS[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**kwargs, **overrides})).eval()


def prompts(seed: int = 1, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt_ids: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """HF `generate`, one prompt at a time, plain argmax, EOS an ordinary token: exactly `new_tokens` each."""
    return runners.hf_greedy(model, prompt_ids, new_tokens)
