"""The model classes compile through qeff_lab.compile and run through the session factory: dry run, the fake SDK
(a TEST DOUBLE of the AI 100 compiler), the embedded backend, device_ids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qeff_lab import QEFFAutoModel
from qeff_lab.runtime.qaic_session import QaicRuntimeUnavailable


@pytest.fixture
def tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64))
    return QEFFAutoModel.from_model(hf, pooling="mean", name="tiny-bert")


@pytest.fixture
def tiny_decoder():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    return QEFFAutoModelForCausalLM.from_model(hf, name="tiny-llama")


INPUTS = {"input_ids": np.array([[2, 5, 6, 7, 3]]), "attention_mask": np.ones((1, 5), np.int64)}


def test_encoder_dry_run_records_everything(no_sdk, tiny_encoder):
    tiny_encoder.compile(seq_len=[8, 16], mxfp6_matmul=True, num_devices=2, dry_run=True)
    r = tiny_encoder.compile_result
    assert r.dry_run and r.num_devices == 2 and "-mxfp6-matmul" in r.command
    q = r.qconfig
    assert q["model"]["name"] == "tiny-bert" and q["model"]["pooling"] == "mean"
    assert q["model"]["config"]["hidden_size"] == 32 and q["model"]["transforms"]
    assert q["options"]["mxfp6_matmul"] is True and "dry_run" not in q["options"]
    assert "dry run" in tiny_encoder.steps["compile"].summary
    with pytest.raises(RuntimeError, match="is a dry run"):
        tiny_encoder.generate(INPUTS)


def test_encoder_option_errors_come_before_the_export(no_sdk, tiny_encoder):
    with pytest.raises(TypeError, match="Did you mean 'mxfp6_matmul'"):
        tiny_encoder.compile(mxfp6=True)
    assert tiny_encoder.export_result is None  # validated first: nothing slow ran for a typo


def test_encoder_embedded_backend_and_device_ids(no_sdk, tiny_encoder):
    tiny_encoder.compile(seq_len=8)
    assert tiny_encoder.generate(INPUTS)["output"].shape == (1, 32)
    with pytest.raises(ValueError, match="selects AI 100 cards"):
        tiny_encoder.generate(INPUTS, device_ids=[0])


def test_encoder_on_the_fake_sdk_compiles_then_needs_qaicrt_to_run(fake_sdk, tiny_encoder):
    tiny_encoder.compile(seq_len=[8, 16], num_cores=8, stream=False)
    r = tiny_encoder.compile_result
    assert r.backend == "qaic" and (r.qpc_path / "programqpc.bin").is_file() and len(fake_sdk.calls()) == 1
    assert "-retained-state" not in r.command and "-aic-num-cores=8" in r.command
    with pytest.raises(QaicRuntimeUnavailable, match="qaicrt"):
        tiny_encoder.generate(INPUTS)


def test_decoder_on_the_fake_sdk(fake_sdk, tiny_decoder):
    tiny_decoder.compile(prefill_seq_len=8, ctx_len=32, mxint8_kv_cache=True, mos=1, stream=False)
    r = tiny_decoder.compile_result
    (argv,) = fake_sdk.calls()
    assert {"-retained-state", "-mos=1"} <= set(argv) and any(a.startswith("-custom-IO-list-file=") for a in argv)
    assert "Precision: mxint8" in (r.folder / "custom_io.yaml").read_text()
    assert r.qconfig["specialization_names"] == ["Prefill", "Decode"]
    with pytest.raises(QaicRuntimeUnavailable):
        tiny_decoder.runner(device_ids=[1])


def test_decoder_checks_options_and_backend_before_exporting(no_sdk, tiny_decoder):
    with pytest.raises(TypeError, match="Did you mean 'mxint8_kv_cache'"):
        tiny_decoder.compile(prefill_seq_len=8, ctx_len=32, mxint8=True)
    with pytest.raises(RuntimeError, match="needs the Cloud AI 100 SDK"):
        tiny_decoder.compile(prefill_seq_len=8, ctx_len=32, backend="qaic")
    assert tiny_decoder.export_result is None


def test_encoder_backend_qaic_without_sdk_fails_before_exporting(no_sdk, tiny_encoder):
    with pytest.raises(RuntimeError, match="needs the Cloud AI 100 SDK"):
        tiny_encoder.compile(backend="qaic")
    with pytest.raises(ValueError, match="no compiler to dry-run"):
        tiny_encoder.compile(backend="onnxruntime", dry_run=True)
    assert tiny_encoder.export_result is None
