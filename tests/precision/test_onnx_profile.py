"""The ONNX side of the precision lab: the exported graph in ONNX Runtime, functions inlined, must find the same
causes as the PyTorch side, and name the ONNX node, op type, function and module of each place."""
import pytest
import torch

from qeff_lab import QEFFAutoModel, QEFFAutoModelForCausalLM
from qeff_lab.precision import FP16_MAX, analyze
from qeff_lab.precision.npi import write_npi_yaml
from tests.precision.real_models import tiny_llama


def _causes(report):
    return [(c.kind, c.module_class, c.fix, tuple(sorted(c.modules))) for c in report.findings.causes()
            if c.severity == "error"]


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama whose embeddings put |x| ~ 1e3 into the residual stream: the squares inside the RMSNorms
    (inside CustomRMSNorm's body in the exported graph) pass 65504."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight *= 3e4
    qeff = QEFFAutoModelForCausalLM.from_model(model)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    return qeff, ids


def test_decoder_onnx_side_finds_the_square_inside_custom_rms_norm_like_the_pytorch_side(llama, tmp_path):
    qeff, ids = llama
    torch_side = qeff.analyze(ids, progress=False)
    onnx_side = qeff.analyze(ids, on="onnx", progress=False)
    assert onnx_side.profile.source == "onnx" and "on the ONNX graph" in onnx_side.summary()
    assert _causes(onnx_side) == _causes(torch_side) != []
    assert _causes(onnx_side)[0][:3] == ("norm-square", "QEffLlamaRMSNorm", "SafeNorm")
    squares = [f for f in onnx_side.findings.of_kind("norm-square") if f.op == "pow"]
    assert squares and all(f.op_type == "Pow" and f.function == "CustomRMSNorm" for f in squares)
    f = squares[0]
    assert f.node.startswith(f"/model/{f.module.replace('.', '/').replace('/layers/', '/layers.')}/CustomRMSNorm/")
    assert "Pow in CustomRMSNorm" in f.place and f.value > FP16_MAX
    torch_worst = max(x.value for x in torch_side.findings.of_kind("norm-square"))
    assert max(x.value for x in onnx_side.findings.of_kind("norm-square")) == pytest.approx(torch_worst, rel=1e-4)
    # each ONNX-side place maps to the node the compiler sees: the CustomRMSNorm call
    npi = write_npi_yaml(onnx_side.findings, tmp_path / "npi.yaml", qeff.export_result.path)
    outs = {c.place for c in npi.changes}
    assert outs == {f"/model/{m.replace('.', '/').replace('/layers/', '/layers.')}/CustomRMSNorm_output_0"
                    for m in onnx_side.findings.modules("norm-square")}


def test_values_are_fetched_in_chunks_with_the_same_statistics(llama):
    qeff, ids = llama
    path = qeff.export()
    whole = analyze(qeff.model, ids, on="onnx", onnx_model=path, progress=False).profile.to_frame()
    chunked = analyze(qeff.model, ids, on="onnx", onnx_model=path, progress=False, max_outputs=5).profile.to_frame()
    assert len(whole) == len(chunked) > 50
    assert whole.equals(chunked)


@pytest.fixture(scope="module")
def bert():
    """The issue's BERT: the layer-1 FFN output reaches ~2e3 (fits fp16), the centered square inside that
    layer's LayerNorm (one LayerNormalization node in ONNX) ~4e6 (does not)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128)).eval()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight *= 3e4
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))
    return QEFFAutoModel.from_model(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_encoder_onnx_side_recomputes_the_layer_norm_centered_square(bert):
    qeff, enc = bert
    torch_side = qeff.analyze(enc, progress=False)
    onnx_side = qeff.analyze(enc, on="onnx", progress=False)
    assert _causes(onnx_side) == _causes(torch_side) == [
        ("norm-square", "LayerNorm", "SafeNorm", ("encoder.layer.1.output.LayerNorm",))]
    f, = [f for f in onnx_side.findings if f.severity == "error"]
    assert (f.op, f.intermediate, f.op_type, f.function) == ("layer_norm", "centered_square", "LayerNormalization", "")
    assert f.node.endswith("/encoder/layer.1/output/LayerNorm/LayerNormalization")  # the exporter's scope
    t, = [t for t in torch_side.findings if t.severity == "error"]
    assert f.value == pytest.approx(t.value, rel=1e-4) and f.value > 1e6


def test_bad_requests_say_what_to_do(llama):
    qeff, ids = llama
    with pytest.raises(ValueError, match="onnx_model="):
        analyze(qeff.model, ids, on="onnx")
    with pytest.raises(ValueError, match="on must be one of"):
        analyze(qeff.model, ids, on="tflite")
    with pytest.raises(ValueError, match="max_outputs"):
        analyze(qeff.model, ids, on="onnx", onnx_model=qeff.export(), max_outputs=0)


@pytest.mark.slow
def test_smollm2_onnx_side_names_the_same_cause_inside_custom_rms_norm():
    """The real case: the square of SmolLM2's residual stream (~6.2e8) inside each CustomRMSNorm's body."""
    from tests.precision.real_models import SMOLLM2, chat_ids

    qeff = QEFFAutoModelForCausalLM.from_pretrained(SMOLLM2)
    ids = chat_ids(qeff.tokenizer, "What is the capital of France?")
    torch_side = qeff.analyze(ids, progress=False)
    onnx_side = qeff.analyze(ids, on="onnx", progress=False)
    assert _causes(onnx_side) == _causes(torch_side)
    cause = onnx_side.findings.causes()[0]
    assert (cause.kind, cause.module_class, cause.fix) == ("norm-square", "QEffLlamaRMSNorm", "SafeNorm")
    assert len(cause.modules) >= 40 and 5e8 < cause.worst.value < 8e8
    assert (cause.worst.op_type, cause.worst.function) == ("Pow", "CustomRMSNorm")
    assert onnx_side.findings.counts()["places"] == torch_side.findings.counts()["places"]
