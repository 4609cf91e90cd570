"""Llama (SmolLM2 is one): retained-state blocks and the swap table."""
from transformers.models.llama import modeling_llama as hf

from qeff_lab.transforms.kv_cache import (Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel, KVRMSNorm,
                                          KVRotaryTable)


class QEffLlamaForCausalLM(KVCausalLM, hf.LlamaForCausalLM):
    pass


class QEffLlamaModel(KVDecoderModel, hf.LlamaModel):
    pass


class QEffLlamaDecoderLayer(KVDecoderLayer, hf.LlamaDecoderLayer):
    pass


class QEffLlamaAttention(KVAttention, hf.LlamaAttention):
    pass


class QEffLlamaRMSNorm(KVRMSNorm, hf.LlamaRMSNorm):
    pass


class QEffLlamaRotaryEmbedding(KVRotaryTable, hf.LlamaRotaryEmbedding):
    pass


LLAMA = Family("Llama", "llama", hf.LlamaForCausalLM, {
    hf.LlamaForCausalLM: QEffLlamaForCausalLM,
    hf.LlamaModel: QEffLlamaModel,
    hf.LlamaDecoderLayer: QEffLlamaDecoderLayer,
    hf.LlamaAttention: QEffLlamaAttention,
    hf.LlamaRMSNorm: QEffLlamaRMSNorm,
    hf.LlamaRotaryEmbedding: QEffLlamaRotaryEmbedding,
})
