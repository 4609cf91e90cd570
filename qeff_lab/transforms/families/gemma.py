"""Gemma: RMSNorm scaled by (1 + weight), scaled embeddings (kept as HF has them); blocks and swap table."""
from transformers.models.gemma import modeling_gemma as hf

from qeff_lab.transforms.kv_cache import (Family, KVAttention, KVCausalLM, KVDecoderLayer, KVDecoderModel, KVRMSNorm,
                                          KVRotaryTable)


class QEffGemmaForCausalLM(KVCausalLM, hf.GemmaForCausalLM):
    pass


class QEffGemmaModel(KVDecoderModel, hf.GemmaModel):
    pass  # embed_tokens is GemmaTextScaledWordEmbedding: it multiplies by sqrt(hidden) itself


class QEffGemmaDecoderLayer(KVDecoderLayer, hf.GemmaDecoderLayer):
    pass


class QEffGemmaAttention(KVAttention, hf.GemmaAttention):
    pass


class QEffGemmaRMSNorm(KVRMSNorm, hf.GemmaRMSNorm):
    def _rms_weight(self):
        return 1.0 + self.weight.float()


class QEffGemmaRotaryEmbedding(KVRotaryTable, hf.GemmaRotaryEmbedding):
    pass


GEMMA = Family("Gemma", "gemma", hf.GemmaForCausalLM, {
    hf.GemmaForCausalLM: QEffGemmaForCausalLM,
    hf.GemmaModel: QEffGemmaModel,
    hf.GemmaDecoderLayer: QEffGemmaDecoderLayer,
    hf.GemmaAttention: QEffGemmaAttention,
    hf.GemmaRMSNorm: QEffGemmaRMSNorm,
    hf.GemmaRotaryEmbedding: QEffGemmaRotaryEmbedding,
}, why={hf.GemmaRMSNorm: "CustomRMSNorm op with weight 1 + w (fp32 inside)"})
