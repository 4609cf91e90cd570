"""The accuracy ladder on a tiny Llama (every rung, ONNX Runtime included) and the shipped text."""
import copy

import numpy as np
import pytest
import torch

from qeff_lab.accuracy import (EmulatedRunner, HFCausalRunner, causal_lm_rungs, run_ladder, shipped_text,
                               teacher_forced_logits)

from tests.precision.real_models import tiny_llama


def test_shipped_text_is_a_few_thousand_tokens():
    from transformers import AutoTokenizer

    from qeff_lab.loading import resolve

    text = shipped_text()
    assert text.startswith("First Citizen:")
    tok = AutoTokenizer.from_pretrained(resolve("HuggingFaceTB/SmolLM2-135M-Instruct").path)
    assert 3000 <= len(tok(text)["input_ids"]) <= 6000


def test_teacher_forcing_chunked_equals_token_by_token():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (40,)).tolist()
    chunked = teacher_forced_logits(HFCausalRunner(model, prefill_seq_len=16), ids)
    full = model(torch.tensor([ids])).logits[0].detach().numpy()
    np.testing.assert_allclose(chunked, full, rtol=1e-4, atol=1e-4)

    class StepOnly:  # a runner without step_all is driven one token per call
        def __init__(self, inner):
            self.inner, self.batch_size, self.prefill_seq_len, self.ctx_len = inner, 1, 16, 64

        def step(self, i, p):
            return self.inner.step(i, p)

    np.testing.assert_allclose(teacher_forced_logits(StepOnly(HFCausalRunner(model)), ids), full, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    mp = pytest.MonkeyPatch()
    mp.setenv("QEFF_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    hf = tiny_llama()
    q = QEFFAutoModelForCausalLM.from_model(copy.deepcopy(hf), name="tiny-ladder")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (9,), generator=g).tolist(), torch.randint(0, 1000, (37,), generator=g).tolist()]
    text = torch.randint(0, 1000, (48,), generator=g).tolist()
    yield run_ladder(causal_lm_rungs(hf, q, ctx_len=128), prompts, text, generation_len=8, progress=False)
    mp.undo()


def test_ladder_rungs_and_fp32_parity(ladder):
    s = ladder.summary.set_index("rung")
    assert list(s.index) == ["HF fp32", "transformed fp32", "ORT fp32", "fp16 (no fixes)", "fp16 (fixes)",
                             "fp16 + MXFP6", "fp16 + MXFP6 + MXINT8 KV"]
    for rung in ["HF fp32", "transformed fp32", "ORT fp32"]:
        assert s.loc[rung, "token_match"] == 1.0 and s.loc[rung, "top1_agreement"] == 1.0
        assert s.loc[rung, "max_abs_logit_diff"] < 1e-4 and s.loc[rung, "kl_max"] < 1e-6
    assert s.loc["HF fp32", "first_divergence"] is None or np.isnan(s.loc["HF fp32", "first_divergence"])
    # fp16 moves the logits a little, MXFP6 more: the ladder sees the order
    assert 0 < s.loc["fp16 (fixes)", "mean_abs_logit_diff"] < s.loc["fp16 + MXFP6", "mean_abs_logit_diff"]
    assert 0 < s.loc["fp16 (fixes)", "kl_mean"] < s.loc["fp16 + MXFP6", "kl_mean"]  # KL sees the same order
    assert s.loc["fp16 (fixes)", "kl_mean"] <= s.loc["fp16 (fixes)", "kl_p99"] <= s.loc["fp16 (fixes)", "kl_max"]
    table = ladder.table().set_index("rung")  # the text form: exact results, noise as "<tol"
    assert table.loc["ORT fp32", "max_abs_logit_diff"] == "<1e-03" and table.loc["ORT fp32", "kl_mean"] == "<1e-06"
    assert table.loc["ORT fp32", "token_match"] == "100%" and "seconds" not in table.columns
    assert np.isfinite(s["perplexity"]).all() and (s["perplexity"] > 1).all()
    assert len(ladder.per_prompt) == 2 * len(s)
    assert "7 rungs" in repr(ladder)


def test_mxint8_kv_runner_quantizes_the_cache():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (20,)).tolist()
    runner = EmulatedRunner(HFCausalRunner(model, prefill_seq_len=8), fp16=False, mxint8_kv=True)
    teacher_forced_logits(runner, ids)
    keys = runner.inner.cache.layers[0].keys
    from qeff_lab.precision.mx import mx_qdq

    assert torch.equal(keys, mx_qdq(keys, "int8"))  # every stored key is on the MXINT8 grid
