"""Real and tiny models for the precision and accuracy tests, each built once per test process."""
from __future__ import annotations

import functools

import torch

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT_PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


@functools.lru_cache(maxsize=None)
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, eval mode. Shared: deepcopy before changing it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qeff_lab.loading import resolve

    path = resolve(SMOLLM2).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()
