"""Encoders: the generic path for any HF text encoder, the fp16-safe mask swap of the BERT / RoBERTa / XLM-R
families, and the pooling heads.

- `encoder_transform(model)`: the BERT, RoBERTa and XLM-R families keep their swap (`fp16_safe_mask_transform`,
  what the real MiniLM result was measured with); every other text encoder goes through
  `generic_encoder_transform`.
- `generic_encoder_transform(model)`: transformers' own extension points, no per-model code. The attention is the
  module's own `eager_attention_forward` registered in `AttentionInterface` (relative positions, rotary, ALiBi stay
  the model's code); the padding mask comes from `AttentionMaskInterface` (the model's `create_bidirectional_mask`
  / `create_causal_mask` call), always built from the `attention_mask` input with the fp16-safe MASK_VALUE. A model
  whose attention does not dispatch through the interface (DeBERTa, MPNet, ...) keeps its own attention; its mask
  still goes through the interface when it calls `create_bidirectional_mask`, else it is the model's own
  (reported: exact in fp32, check fp16 with the precision lab).
- `encoder_obstacle(config)`: why a config is not a text encoder (encoder-decoder, decoder-only, multimodal), so
  `QEFFAutoModel` refuses it at load with the model type, the obstacle and what to do.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertModel
from transformers.models.roberta.modeling_roberta import RobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaModel

from qeff_lab.contracts import MASK_VALUE
from qeff_lab.pipeline import Change, TransformResult
from qeff_lab.transforms.base import swap_modules
from qeff_lab.transforms.generic import interfaces
from qeff_lab.transforms.generic.cache import UnsupportedArchitectureError

# qeff_lab.contracts.MASK_VALUE: exp(score + MASK_VALUE) is exactly 0 in fp16 and fp32, and adding it to any
# realistic attention score stays finite in fp16. torch.finfo(float32).min, which HF uses, is -inf in fp16 and
# turns a fully padded row into NaN.


def fp16_safe_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 padding mask -> additive [B, 1, 1, S] mask built with `where` (0 keep, MASK_VALUE drop)."""
    keep = attention_mask[:, None, None, :].to(torch.bool)
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.full((), MASK_VALUE, dtype=dtype))


class Fp16SafeMaskMixin:
    """Replaces HF's `_create_attention_masks` for encoders.

    HF builds the mask with `torch.finfo(float32).min` (eager) or returns None when the mask is all ones
    (sdpa), which would silently drop `attention_mask` from an exported graph. This always builds the
    mask from the input, in an fp16-safe form.
    """

    def _create_attention_masks(self, attention_mask, encoder_attention_mask, embedding_output,
                                encoder_hidden_states, cache):
        if attention_mask is None:
            attention_mask = torch.ones(embedding_output.shape[:2], dtype=torch.long, device=embedding_output.device)
        return fp16_safe_padding_mask(attention_mask, embedding_output.dtype), None


class QEffBertModel(Fp16SafeMaskMixin, BertModel):
    pass


class QEffRobertaModel(Fp16SafeMaskMixin, RobertaModel):
    pass


class QEffXLMRobertaModel(Fp16SafeMaskMixin, XLMRobertaModel):
    pass


ENCODER_SWAPS: dict[type, type] = {
    BertModel: QEffBertModel,
    RobertaModel: QEffRobertaModel,
    XLMRobertaModel: QEffXLMRobertaModel,
}
SUPPORTED_ENCODER_TYPES = {"bert": BertModel, "roberta": RobertaModel, "xlm-roberta": XLMRobertaModel}

_MASK_WHY = ("attention mask built with torch.finfo(float32).min (-inf in fp16; NaN on padded rows) or "
             "dropped when all ones -> where(mask, 0, -1e4), always from the attention_mask input")


def fp16_safe_mask_transform(model: nn.Module) -> TransformResult:
    return swap_modules(model, ENCODER_SWAPS, "Fp16SafeAttentionMask", _MASK_WHY)


# ----------------------------------------------------------------------------- the generic path
ENCODER_ATTENTION = "qeff_encoder"
GENERIC_NAME = "GenericEncoder"
MULTIMODAL = ("vision_config", "audio_config", "speech_config", "vq_config", "audio_encoder_config")
_calls = {"attention": 0, "mask": 0}


def _encoder_attention(module, query, key, value, attention_mask, **kwargs):
    _calls["attention"] += 1
    return interfaces.retained_attention(module, query, key, value, attention_mask, **kwargs)


def _encoder_mask(*args, **kwargs):
    _calls["mask"] += 1
    return interfaces.retained_mask(*args, **kwargs)


def register_encoder_interfaces() -> None:
    """Idempotent, class-level (a name missing from AttentionMaskInterface's mapping silently means no mask)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ENCODER_ATTENTION, _encoder_attention)
    AttentionMaskInterface.register(ENCODER_ATTENTION, _encoder_mask)


def encoder_obstacle(config) -> str | None:
    """Why `config` is not a text encoder QEFFAutoModel can take (model type, obstacle, what to do), else None."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES)

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return (f"{mt} is an encoder-decoder model; QEFFAutoModel takes encoder-only text models (BERT-like). "
                "Encoder-decoders are not supported by qeff_lab.")
    multimodal = [k for k in MULTIMODAL if getattr(config, k, None) is not None]
    if multimodal:
        return (f"{mt} is a multimodal model ({', '.join(multimodal)}); QEFFAutoModel takes text-only encoders "
                "(input_ids, attention_mask).")
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return f"{mt} is a decoder-only (causal LM) model; use QEFFAutoModelForCausalLM."
    if mt not in MODEL_MAPPING_NAMES:
        return (f"{mt} has no AutoModel class in the installed transformers; QEFFAutoModel loads text encoders "
                "through AutoModel.")
    return None


def generic_encoder_transform(model: nn.Module) -> TransformResult:
    """Any HF text encoder onto the fp16-safe, exportable path (see the module docstring); reports every change.

    Raises UnsupportedArchitectureError (model type, obstacle, what to do) before changing anything when the
    model cannot take (input_ids, attention_mask) or its forward fails."""
    config = model.config
    mt = config.model_type
    result = TransformResult(GENERIC_NAME)
    if config._attn_implementation == ENCODER_ATTENTION:
        result.notes.append("already on the generic encoder path")
        return result
    params = inspect.signature(type(model).forward).parameters
    if "input_ids" not in params or "attention_mask" not in params:
        raise UnsupportedArchitectureError(
            f"{mt}: {type(model).__name__}.forward takes no input_ids / attention_mask "
            f"({', '.join(list(params)[1:4])}, ...); QEFFAutoModel exports text encoders (input_ids, attention_mask) "
            "-> hidden states; this model needs its own export.")
    register_encoder_interfaces()
    old = config._attn_implementation
    try:
        model.set_attn_implementation(ENCODER_ATTENTION)
    except (ValueError, NotImplementedError):
        pass  # the model refuses the interface for its attention: only its mask can go through it
    own_attention = config._attn_implementation == ENCODER_ATTENTION
    if not own_attention:
        # attention hard-coded in the modeling file; the config's implementation name still selects the mask
        # that `create_bidirectional_mask` builds
        config._attn_implementation = ENCODER_ATTENTION
    ids = torch.arange(3, 19, device=model.device)[None] % config.vocab_size  # 16 tokens (pooling models shrink it)
    mask = (torch.arange(16, device=model.device) < 14).long()[None]
    before = dict(_calls)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except Exception as e:
        config._attn_implementation = old
        raise UnsupportedArchitectureError(
            f"{mt}: a forward with (input_ids, attention_mask) failed on the generic encoder path "
            f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); this model needs a named override.") from e
    used_attention = _calls["attention"] > before["attention"]
    used_mask = _calls["mask"] > before["mask"]
    attention = ("AttentionInterface: the module's own eager attention" if used_attention else
                 "the model's own attention (it does not dispatch through AttentionInterface)")
    masking = ("AttentionMaskInterface: additive where(mask, 0, MASK_VALUE) from the attention_mask input, "
               "fp16-safe, never dropped" if used_mask else
               "the model's own mask (not built through AttentionMaskInterface): exact in fp32; in fp16 check it "
               "with the precision lab")
    result.changes.append(Change("config._attn_implementation", str(old), ENCODER_ATTENTION,
                                 f"{attention}; mask: {masking}"))
    if not used_mask:
        result.notes.append(f"{mt}: padding mask built by the model itself (not fp16-safe by construction)")
    return result


def encoder_transform(model: nn.Module) -> TransformResult:
    """The BERT / RoBERTa / XLM-R family swap where it applies, else the generic encoder path."""
    if type(model) in ENCODER_SWAPS or type(model) in ENCODER_SWAPS.values():
        return fp16_safe_mask_transform(model)
    return generic_encoder_transform(model)


# ----------------------------------------------------------------------------- pooling
def mean_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden_states.dtype)
    return (last_hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def average_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the unmasked tokens (zeroing padded rows with `where` first, as e5-style models do)."""
    keep = attention_mask.unsqueeze(-1).to(torch.bool)
    summed = torch.where(keep, last_hidden_states, torch.zeros_like(last_hidden_states)).sum(1)
    return summed / attention_mask.sum(1, keepdim=True).to(last_hidden_states.dtype)


def max_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    keep = attention_mask.unsqueeze(-1).to(torch.bool)
    lowest = torch.finfo(last_hidden_states.dtype).min
    return torch.where(keep, last_hidden_states, torch.full((), lowest, dtype=last_hidden_states.dtype)).amax(1)


def cls_pooling(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return last_hidden_states[:, 0]


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean_pooling,
    "avg": average_pooling,
    "max": max_pooling,
    "cls": cls_pooling,
}

Pooling = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def pooling_fn(pooling: Pooling) -> Callable | None:
    if pooling is None or callable(pooling):
        return pooling
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}, None, "
                         "or a callable (last_hidden_states, attention_mask) -> tensor.")
    return POOLINGS[pooling]


def pooling_key(pooling: Pooling) -> str:
    """What identifies a pooling in a cache key: its name, or a callable's source (or qualified name)."""
    if pooling is None or isinstance(pooling, str):
        return str(pooling)
    try:
        return inspect.getsource(pooling)
    except (OSError, TypeError):
        return f"{getattr(pooling, '__module__', '?')}.{getattr(pooling, '__qualname__', repr(pooling))}"


class PooledEncoder(nn.Module):
    """The exported graph: encoder + optional pooling, inputs (input_ids, attention_mask) -> output."""

    def __init__(self, encoder: nn.Module, pooling: Pooling):
        super().__init__()
        self.encoder = encoder
        self.pool = pooling_fn(pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden if self.pool is None else self.pool(hidden, attention_mask)
