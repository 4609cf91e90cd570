"""Phi-3: fused qkv projection and partial rotary; retained-state blocks and the swap table."""
from transformers.models.phi3 import modeling_phi3 as hf

from qeff_lab.transforms.kv_cache import (Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel, KVRMSNorm,
                                          KVRotaryTable)


class QEffPhi3ForCausalLM(KVCausalLM, hf.Phi3ForCausalLM):
    pass


class QEffPhi3Model(KVDecoderModel, hf.Phi3Model):
    pass


class QEffPhi3DecoderLayer(KVDecoderLayer, hf.Phi3DecoderLayer):
    pass  # resid dropouts are identities in eval


class QEffPhi3Attention(KVAttention, hf.Phi3Attention):
    def project_qkv(self, hidden_states):
        qkv = self.qkv_proj(hidden_states)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.num_key_value_heads * self.head_dim
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = qkv[..., :q_size].view(shape).transpose(1, 2)
        k = qkv[..., q_size:q_size + kv_size].view(shape).transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(shape).transpose(1, 2)
        return q, k, v


class QEffPhi3RMSNorm(KVRMSNorm, hf.Phi3RMSNorm):
    pass


class QEffPhi3RotaryEmbedding(KVRotaryTable, hf.Phi3RotaryEmbedding):
    pass


PHI3 = Family("Phi-3", "phi3", hf.Phi3ForCausalLM, {
    hf.Phi3ForCausalLM: QEffPhi3ForCausalLM,
    hf.Phi3Model: QEffPhi3Model,
    hf.Phi3DecoderLayer: QEffPhi3DecoderLayer,
    hf.Phi3Attention: QEffPhi3Attention,
    hf.Phi3RMSNorm: QEffPhi3RMSNorm,
    hf.Phi3RotaryEmbedding: QEffPhi3RotaryEmbedding,
})
