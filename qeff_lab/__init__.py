"""qeff_lab: prepare HuggingFace transformers for Qualcomm Cloud AI 100, showing every step.

The import is light: the model classes (and torch, transformers, onnx behind them) load on first use."""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "QEFFAutoModel": "qeff_lab.models.encoder",
    "QEFFAutoModelForCausalLM": "qeff_lab.models.causal_lm",
    "QEFFAutoModelForSequenceClassification": "qeff_lab.models.classifier",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qeff_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
