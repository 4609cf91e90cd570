"""QEFFAutoModelForSequenceClassification: encoder classifiers (the third kind, to show what a kind declares)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qeff_lab.contracts import ATTENTION_MASK, INPUT_IDS, LOGITS
from qeff_lab.models.base import ExportSpec, UnsupportedModelError
from qeff_lab.models.encoder import QEFFAutoModel
from qeff_lab.transforms.encoders import SUPPORTED_ENCODER_TYPES, fp16_safe_mask_transform


class ClassifierLogits(nn.Module):
    """The exported graph: (input_ids, attention_mask) -> logits [batch, num_labels]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class QEFFAutoModelForSequenceClassification(QEFFAutoModel):
    """A sequence classifier (BERT, RoBERTa, XLM-R heads) prepared like an encoder: same transforms, seq_len
    buckets and batching; the graph returns `logits`, and `classify(texts)` gives labels.

    >>> model = QEFFAutoModelForSequenceClassification.from_pretrained("<card or folder>")
    >>> model.compile(seq_len=[32, 128])
    >>> model.classify(["I loved it", "Never again"])   # [("POSITIVE", 0.98), ...]
    """

    _hf_auto_class = "AutoModelForSequenceClassification"
    _kind = "sequence_classification"

    def __init__(self, model: nn.Module, resolved):
        super().__init__(model, resolved, pooling=None)

    @classmethod
    def check_supported(cls, config, what: str) -> None:
        if config.model_type not in SUPPORTED_ENCODER_TYPES:
            raise UnsupportedModelError(
                f"{what} is a {config.model_type!r} model; QEFFAutoModelForSequenceClassification supports the "
                f"encoder families {', '.join(sorted(SUPPORTED_ENCODER_TYPES))}.")

    @classmethod
    def _check_kind_options(cls, **options: Any) -> None:
        pass

    def _load_details(self, config) -> dict:
        return {"num_labels": config.num_labels, "labels": dict(config.id2label)}

    def _pytorch_transforms(self):
        return [fp16_safe_mask_transform]

    def export_spec(self) -> ExportSpec:
        axes = {INPUT_IDS: {0: "batch_size", 1: "seq_len"}, ATTENTION_MASK: {0: "batch_size", 1: "seq_len"},
                LOGITS: {0: "batch_size"}}
        return ExportSpec(
            ClassifierLogits(self.model),
            {INPUT_IDS: torch.ones(1, 8, dtype=torch.long), ATTENTION_MASK: torch.ones(1, 8, dtype=torch.long)},
            [LOGITS], axes, {"num_labels": self.model.config.num_labels})

    def _output_name(self) -> str:
        return LOGITS

    @property
    def _per_token(self) -> bool:
        return False

    def classify(self, texts: list[str] | str) -> list[tuple[str, float]]:
        """(label, probability) of the top class for each text, in order (softmax over the compiled logits)."""
        logits = self.embed(texts)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = self.model.config.id2label
        return [(labels[int(i)], float(p[i])) for p, i in zip(probs, probs.argmax(-1))]
