"""GPT-2: learned absolute positions, LayerNorm, fused Conv1D qkv, no RoPE; blocks and swap table."""
import torch
from transformers.models.gpt2 import modeling_gpt2 as hf

from qeff_lab.transforms.kv_cache import Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel


class QEffGPT2LMHeadModel(KVCausalLM, hf.GPT2LMHeadModel):
    base_name = "transformer"


class QEffGPT2Model(KVDecoderModel, hf.GPT2Model):
    layers_name, norm_name, rotary_name = "h", "ln_f", None

    def embed(self, input_ids, position_ids):
        # padding (-1) looks up position 0; its row is masked and writes nothing
        return self.wte(input_ids) + self.wpe(position_ids.clamp(min=0))


class QEffGPT2Block(KVDecoderLayer, hf.GPT2Block):
    norm1_name, attn_name, norm2_name, mlp_name = "ln_1", "attn", "ln_2", "mlp"


class QEffGPT2Attention(KVAttention, hf.GPT2Attention):
    def kv_heads_and_dim(self):
        return self.num_heads, self.head_dim

    def project_qkv(self, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2))

    def project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.c_proj(attn_output)


GPT2 = Family("GPT-2", "gpt2", hf.GPT2LMHeadModel, {
    hf.GPT2LMHeadModel: QEffGPT2LMHeadModel,
    hf.GPT2Model: QEffGPT2Model,
    hf.GPT2Block: QEffGPT2Block,
    hf.GPT2Attention: QEffGPT2Attention,
}, why={hf.GPT2Model: "learned positions indexed by position_ids (padding clamped); retained KV buffers per layer"},
    uses_rope=False)
