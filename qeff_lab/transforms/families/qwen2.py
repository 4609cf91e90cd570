"""Qwen2: retained-state blocks and the swap table."""
from transformers.models.qwen2 import modeling_qwen2 as hf

from qeff_lab.transforms.kv_cache import (Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel, KVRMSNorm,
                                          KVRotaryTable)


class QEffQwen2ForCausalLM(KVCausalLM, hf.Qwen2ForCausalLM):
    pass


class QEffQwen2Model(KVDecoderModel, hf.Qwen2Model):
    def sliding_windows(self, num_layers):  # as HF Qwen2: the window only on "sliding_attention" layers
        window = self.config.sliding_window
        return [window if t == "sliding_attention" else None for t in self.config.layer_types[:num_layers]]


class QEffQwen2DecoderLayer(KVDecoderLayer, hf.Qwen2DecoderLayer):
    pass


class QEffQwen2Attention(KVAttention, hf.Qwen2Attention):
    pass


class QEffQwen2RMSNorm(KVRMSNorm, hf.Qwen2RMSNorm):
    pass


class QEffQwen2RotaryEmbedding(KVRotaryTable, hf.Qwen2RotaryEmbedding):
    pass


QWEN2 = Family("Qwen2", "qwen2", hf.Qwen2ForCausalLM, {
    hf.Qwen2ForCausalLM: QEffQwen2ForCausalLM,
    hf.Qwen2Model: QEffQwen2Model,
    hf.Qwen2DecoderLayer: QEffQwen2DecoderLayer,
    hf.Qwen2Attention: QEffQwen2Attention,
    hf.Qwen2RMSNorm: QEffQwen2RMSNorm,
    hf.Qwen2RotaryEmbedding: QEffQwen2RotaryEmbedding,
})
