"""openai-gpt: the HF model has no KV cache at all; this threads the retained cache through it.

Every HF generate step re-reads the whole sequence (no AttentionInterface either). Model, blocks and attention get
subclasses that pass the retained cache down; the mask is the retained causal mask at position_ids instead of the
top-left slice of the attention's `bias` buffer.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.models.openai.modeling_openai import Attention, Block, OpenAIGPTLMHeadModel, OpenAIGPTModel


class CachedAttention(Attention):
    """The model's projections and scaling; keys / values go through cache.update(layer_idx); the mask is the
    retained causal mask (position_ids against arange(ctx_len)) instead of the top-left slice of `self.bias`."""

    def forward(self, x, attention_mask=None, cache=None, layer_idx: int = 0):
        query, key, value = (self.split_heads(t) for t in self.c_attn(x).split(self.split_size, dim=2))
        if cache is not None:
            key, value = cache.update(key, value, layer_idx)
        w = torch.matmul(query, key.transpose(-1, -2))
        if self.scale:
            w = w / math.sqrt(value.size(-1))
        if attention_mask is not None:
            w = w + attention_mask
        w = self.attn_dropout(nn.functional.softmax(w, dim=-1))
        return [self.resid_dropout(self.c_proj(self.merge_heads(torch.matmul(w, value))))]


class CachedBlock(Block):
    def forward(self, x, attention_mask=None, cache=None, layer_idx: int = 0):  # Block.forward with the cache passed on
        n = self.ln_1(x + self.attn(x, attention_mask, cache, layer_idx)[0])
        return [self.ln_2(n + self.mlp(n))]


class CachedOpenAIGPTModel(OpenAIGPTModel):
    def forward(self, input_ids, position_ids, past_key_values=None, **kwargs):
        hidden = self.drop(self.tokens_embed(input_ids) + self.positions_embed(position_ids))
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=past_key_values, position_ids=position_ids)
        for i, block in enumerate(self.h):
            hidden = block(hidden, mask, past_key_values, i)[0]
        return BaseModelOutput(last_hidden_state=hidden)


class CachedOpenAIGPTLMHeadModel(OpenAIGPTLMHeadModel):
    def forward(self, input_ids, position_ids, past_key_values=None, **kwargs):
        hidden = self.transformer(input_ids, position_ids, past_key_values).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden))


SWAPS = {Attention: CachedAttention, Block: CachedBlock, OpenAIGPTModel: CachedOpenAIGPTModel,
         OpenAIGPTLMHeadModel: CachedOpenAIGPTLMHeadModel}
