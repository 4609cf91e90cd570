"""QEFFAutoModel end to end: parity with sentence-transformers and HF, shapes, cache, bad input."""
import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from qeff_lab import QEFFAutoModel
from qeff_lab.models.base import UnsupportedModelError
from qeff_lab.models.encoder import SeqLenTooLongError
from qeff_lab.transforms.encoders import pooling_fn

from tests.models.sentences import LONG, MEDIUM, SENTENCES, SHORT
from tests.transforms.test_encoders import CONFIGS, tiny

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def minilm():
    model = QEFFAutoModel.from_pretrained(MINILM, pooling="mean")
    model.compile(seq_len=[32, 64, 128, 256], batch_size=4)
    return model


@pytest.fixture(scope="module")
def reference(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


def test_the_readme_example(minilm_path):
    model = QEFFAutoModel.from_pretrained(MINILM, pooling="mean")
    model.compile(num_cores=16)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    output = model.generate(tokenizer("My name is", return_tensors="pt"))
    assert list(output) == ["output"] and output["output"].shape == (1, 384)
    assert list(model.steps) == ["load", "transform", "export", "compile", "generate"]
    assert model.steps["generate"].summary == "1 input(s) of up to 5 tokens -> seq_len 32, 1 batch(es) of 1; output (1, 384)"
    assert model.compile_result.backend == "onnxruntime"
    assert "no Cloud AI 100 SDK" in model.compile_result.reason
    spec = (model.compile_result.folder / "specializations.json").read_text()
    assert '"seq_len": "32"' in spec and '"batch_size": "1"' in spec


@pytest.mark.parametrize("group", ["short", "medium", "long", "mixed"])
def test_parity_with_sentence_transformers(minilm, reference, group):
    texts = {"short": SHORT, "medium": MEDIUM, "long": LONG, "mixed": SENTENCES}[group]
    ours = minilm.embed(texts)
    ref = reference.encode(texts, batch_size=32, convert_to_numpy=True)
    cos = cosine(ours, ref)
    assert len(cos) == len(texts) and cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())])


def test_each_sentence_alone_picks_the_smallest_fitting_seq_len(minilm, reference):
    tok = minilm.tokenizer
    for text in (SHORT[0], MEDIUM[0], LONG[1]):
        enc = tok(text, return_tensors="np")
        out = minilm.generate(enc)["output"]
        assert cosine(out[0], reference.encode(text)) >= 0.9999
    assert minilm._pick_seq_len(5) == 32 and minilm._pick_seq_len(33) == 64 and minilm._pick_seq_len(256) == 256


def test_too_long_input_names_the_largest_seq_len(minilm):
    ids = np.ones((1, 300), np.int64)
    with pytest.raises(SeqLenTooLongError, match=r"300 tokens but the largest compiled seq_len is 256.*compile\(seq_len="):
        minilm.generate({"input_ids": ids, "attention_mask": ids})


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "avg", None, "callable"])
def test_tiny_random_encoders_match_hf(kind, pooling):
    ref = tiny(kind)
    pool = (lambda h, m: (h * m.unsqueeze(-1)).sum(1) * 0.5) if pooling == "callable" else pooling
    model = QEFFAutoModel.from_model(tiny(kind), pooling=pool, name=f"tiny-{kind}")
    model.compile(seq_len=[8, 16], batch_size=2)
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (3, 11))
    mask = torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] * 2 + [0] * 9])
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        want = h if pool is None else pooling_fn(pool)(h, mask)
    got = model.generate({"input_ids": ids, "attention_mask": mask})["output"]
    if pool is None:
        assert got.shape == (3, 11, 32)
        for row, n in enumerate(mask.sum(1).tolist()):
            np.testing.assert_allclose(got[row, :n], want[row, :n].numpy(), atol=2e-5)
    else:
        assert got.shape == (3, 32)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5)


def test_export_cache_is_reused_and_keyed_by_pooling():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    first = a.export()
    b = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    assert b.export() == first and b.steps["export"].status == "reused"
    c = QEFFAutoModel.from_model(tiny("bert"), pooling="cls")
    assert c.export() != first


def test_export_cache_is_keyed_by_weights():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    other = tiny("bert")
    with torch.no_grad():
        other.embeddings.word_embeddings.weight[0, 0] += 1.0
    b = QEFFAutoModel.from_model(other, pooling="mean")
    assert a.export() != b.export()


def test_truncated_export_is_rebuilt_not_trusted():
    a = QEFFAutoModel.from_model(tiny("roberta"), pooling="mean")
    path = a.export()
    path.write_bytes(path.read_bytes()[:100])
    b = QEFFAutoModel.from_model(tiny("roberta"), pooling="mean")
    assert b.export() == path and b.steps["export"].status == "done"
    onnx.checker.check_model(str(path))


def test_exported_graph_has_dynamic_axes():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    graph = onnx.load(str(a.export())).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch_size", "seq_len"], "attention_mask": ["batch_size", "seq_len"]}


def test_external_data_export_runs_the_same():
    a = QEFFAutoModel.from_model(tiny("xlm-roberta"), pooling="mean")
    a.export(external_data=True)
    assert (a.export_result.folder / "model.onnx.data").is_file()
    assert a.steps["export"].details.passes[1].modified
    a.compile(seq_len=8)
    b = QEFFAutoModel.from_model(tiny("xlm-roberta"), pooling="mean")
    b.compile(seq_len=8)
    ids = torch.randint(5, 100, (1, 8))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    np.testing.assert_allclose(a.generate(feed)["output"], b.generate(feed)["output"], atol=1e-6)


def test_generate_before_compile():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    with pytest.raises(RuntimeError, match=r"compile\(\.\.\.\) before generate"):
        a.generate({"input_ids": np.ones((1, 4), np.int64)})


def test_unsupported_architecture_fails_at_load(tmp_path):
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"gpt2 is a decoder-only \(causal LM\) model; use QEFFAutoModelForCausalLM"):
        QEFFAutoModel.from_pretrained(str(tmp_path))


def test_bad_options_are_refused():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean")
    with pytest.raises(TypeError, match="Did you mean 'mxfp6_matmul'"):
        a.compile(mxfp6=True)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        a.compile(seq_len=[0])
    with pytest.raises(RuntimeError, match="needs the Cloud AI 100 SDK"):
        a.compile(backend="qaic")
    with pytest.raises(ValueError, match="Unknown pooling"):
        QEFFAutoModel.from_model(tiny("bert"), pooling="median")


def test_reprs_are_short_and_deterministic():
    a = QEFFAutoModel.from_model(tiny("bert"), pooling="mean", name="tiny")
    assert repr(a) == "QEFFAutoModel('tiny'; steps: load, transform)"
    assert repr(a.steps["transform"]).startswith("<transform: done, 1 change(s)")
    html = a._repr_html_()
    assert "<table" in html and "transform" in html
    assert "QEffBertModel" in a.steps["transform"]._repr_html_()


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "avg", None])
def test_generic_encoder_every_pooling_in_onnxruntime(pooling):
    """A type outside the BERT families (MPNet: relative position buckets, its own attention) through the whole
    pipeline: the exported graph's output equals HF's hidden states, pooled the same way, at the real tokens."""
    from tests.transforms.test_encoders import padded_batch, tiny_generic

    hf = tiny_generic("mpnet")
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = hidden if pooling is None else pooling_fn(pooling)(hidden, mask)
    model = QEFFAutoModel.from_model(tiny_generic("mpnet"), pooling=pooling, name="tiny-mpnet")
    assert model.transforms_applied == ["GenericEncoder"]
    model.compile(seq_len=ids.shape[1], batch_size=2)
    out = model.generate({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["output"]
    if pooling is None:
        real = mask.numpy().astype(bool)
        np.testing.assert_allclose(out[real], expected.numpy()[real], atol=1e-4)
    else:
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-4)
