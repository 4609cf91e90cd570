"""Fixtures for the view tests: a tiny real encoder taken through load, transform, export and compile."""
import pytest
import torch
from transformers import BertConfig, BertModel

from qeff_lab import QEFFAutoModel

TINY = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=120,
            max_position_embeddings=64)


def tiny_model(name: str = "tiny-bert") -> QEFFAutoModel:
    torch.manual_seed(0)
    return QEFFAutoModel.from_model(BertModel(BertConfig(**TINY)).eval(), pooling="mean", name=name)


@pytest.fixture(scope="session")
def compiled_tiny():
    """load -> transform -> export -> compile on the embedded backend (a real ONNX file on disk)."""
    model = tiny_model()
    model.compile(seq_len=[16, 32])
    return model


@pytest.fixture
def fresh_tiny():
    return tiny_model()
