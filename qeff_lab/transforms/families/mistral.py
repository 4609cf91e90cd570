"""Mistral: retained-state blocks and the swap table."""
from transformers.models.mistral import modeling_mistral as hf

from qeff_lab.transforms.kv_cache import (Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel, KVRMSNorm,
                                          KVRotaryTable)


class QEffMistralForCausalLM(KVCausalLM, hf.MistralForCausalLM):
    pass


class QEffMistralModel(KVDecoderModel, hf.MistralModel):
    pass


class QEffMistralDecoderLayer(KVDecoderLayer, hf.MistralDecoderLayer):
    pass


class QEffMistralAttention(KVAttention, hf.MistralAttention):
    pass


class QEffMistralRMSNorm(KVRMSNorm, hf.MistralRMSNorm):
    pass


class QEffMistralRotaryEmbedding(KVRotaryTable, hf.MistralRotaryEmbedding):
    pass


MISTRAL = Family("Mistral", "mistral", hf.MistralForCausalLM, {
    hf.MistralForCausalLM: QEffMistralForCausalLM,
    hf.MistralModel: QEffMistralModel,
    hf.MistralDecoderLayer: QEffMistralDecoderLayer,
    hf.MistralAttention: QEffMistralAttention,
    hf.MistralRMSNorm: QEffMistralRMSNorm,
    hf.MistralRotaryEmbedding: QEffMistralRotaryEmbedding,
})
