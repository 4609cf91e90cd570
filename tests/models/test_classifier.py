"""QEFFAutoModelForSequenceClassification, the third kind: parity with HF on tiny configs and on MiniLM's real
encoder weights (no packaged classifier exists offline, so its head is a seeded random one, the same in both)."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config

from qeff_lab import QEFFAutoModelForSequenceClassification
from qeff_lab.models.base import UnsupportedModelError

from tests.models.sentences import SENTENCES
from tests.transforms.test_encoders import CONFIGS

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def tiny_classifier(kind: str, num_labels: int = 3):
    torch.manual_seed(0)
    config = CONFIGS[kind].__class__(**{**CONFIGS[kind].to_dict(), "num_labels": num_labels})
    return AutoModelForSequenceClassification.from_config(config).eval()


def padded_batch(vocab: int, lengths=(5, 9, 3)):
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_tiny_classifier_logits_match_hf(kind):
    hf = tiny_classifier(kind)
    ids, mask = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    model = QEFFAutoModelForSequenceClassification.from_model(hf, name=f"tiny-{kind}")
    model.compile(seq_len=[8, 16], batch_size=2)
    got = model.generate({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert list(got) == ["logits"] and got["logits"].shape == (3, 3)
    np.testing.assert_allclose(got["logits"], expected, atol=1e-5, rtol=1e-4)
    assert list(model.steps) == ["load", "transform", "export", "compile", "generate"]
    assert model.steps["transform"].details[0].name == "Fp16SafeAttentionMask"
    assert model.export_result.key["kind"] == "sequence_classification"
    assert "qeff_lab.transforms.encoders" in model.export_result.key["code_modules"]


def test_real_minilm_body_with_a_seeded_head_matches_hf(minilm_path):
    torch.manual_seed(0)
    model = QEFFAutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    reference = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=torch.float32)
    reference.load_state_dict(model.model.state_dict())  # the same (seeded, random) head in both
    reference.eval()
    model.compile(seq_len=[32, 64, 128, 256], batch_size=4)
    tok = model.tokenizer
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**enc).logits.numpy()
    got = model.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 2)
    assert np.abs(got - expected).max() < 1e-4
    labels = model.classify(SENTENCES[:3])
    assert [label for label, _ in labels] == [reference.config.id2label[int(i)] for i in expected[:3].argmax(-1)]
    assert all(0.5 <= p <= 1.0 for _, p in labels)


def test_a_decoder_is_refused_with_the_supported_list():
    from transformers import GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' model; QEFFAutoModelForSequenceClassification supports"):
        QEFFAutoModelForSequenceClassification.from_model(model)


def test_export_key_covers_the_code_that_shapes_the_graph():
    """A precision fix swaps in classes from another module: the key then names that code too."""
    model = QEFFAutoModelForSequenceClassification.from_model(tiny_classifier("bert"), name="tiny-key")
    spec = model.export_spec()
    before = model.artifact_key(spec)
    model.fix_precision()
    after = model.artifact_key(model.export_spec())
    assert before["code"] != after["code"] and before["transforms"] != after["transforms"]
    assert any(m.startswith("qeff_lab.precision") or m.startswith("qeff_lab.ops") for m in
               set(after["code_modules"]) - set(before["code_modules"]))
