"""Encoder families (BERT, RoBERTa, XLM-RoBERTa): the fp16-safe mask swap table and pooling heads."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertModel
from transformers.models.roberta.modeling_roberta import RobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaModel

from qeff_lab.contracts import MASK_VALUE
from qeff_lab.pipeline import TransformResult
from qeff_lab.transforms.base import swap_modules

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
