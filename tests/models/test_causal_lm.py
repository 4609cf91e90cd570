"""QEFFAutoModelForCausalLM end to end: SmolLM2-135M (real weights) token parity with HF generate on the
embedded backend, export/compile artifacts, streaming, and every documented bad input."""
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.models.base import UnsupportedModelError
from qeff_lab.runtime.generation import GenerationResult, PromptTooLongError
from qeff_lab.runtime.session import ShapeNotCompiledError
from tests.conftest import SMOLLM2
from tests.transforms.tiny_decoders import hf_greedy, prompts, tiny_model

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Give me three tips for learning to code.", "Why is the sky blue?"]
PLAIN = "Once upon a time, in a small village by the sea,"  # no chat template: shorter than one prefill chunk
NEW = 32


@pytest.fixture(scope="module")
def smol(smollm2_path):
    """SmolLM2 compiled for the embedded backend (batch 1, prefill 32, ctx 128) with HF references computed
    first on a separate HF copy (the transform changes a model in place)."""
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS] + [PLAIN]
    prompt_ids = [tok(t)["input_ids"] for t in texts]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    reference = hf_greedy(hf, prompt_ids, NEW)
    del hf
    model = QEFFAutoModelForCausalLM.from_pretrained(SMOLLM2)
    model.compile(prefill_seq_len=32, ctx_len=128, batch_size=1)
    return model, tok, texts, prompt_ids, reference


@pytest.mark.slow
def test_smollm2_onnxruntime_tokens_equal_hf_generate(smol):
    model, _, _, prompt_ids, reference = smol
    assert any(len(p) > 32 for p in prompt_ids) and any(len(p) <= 32 for p in prompt_ids)  # chunked prefill too
    out = model.generate_from_ids(prompt_ids, NEW)  # EOS ignored on both sides: 5 x 32 tokens compared
    assert out.metrics.backend == "onnxruntime"
    assert model.compile_result.ort_graph["graph"] == "gqa"  # the embedded backend's own GroupQueryAttention graph
    for i, (got, want) in enumerate(zip(out.ids, reference)):
        assert got == want, f"prompt {i}: first difference at token {next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)}"


@pytest.mark.slow
def test_smollm2_generate_texts_stream_and_metrics(smol, capsys):
    model, tok, texts, _, reference = smol
    out = model.generate(tok, texts[:1], generation_len=NEW, stream=True)
    printed = capsys.readouterr().out
    expected_ids = reference[0][:reference[0].index(2) + 1] if 2 in reference[0] else reference[0]
    assert out.ids[0] == expected_ids and out.stopped[0] == ("eos" if 2 in reference[0] else "length")
    assert out.texts[0] == tok.decode(expected_ids, skip_special_tokens=True)
    assert "Paris" in out.texts[0]
    assert f"Completion: {out.texts[0]}" in printed  # streamed, then the QEfficient-style figures
    assert "Decode is=" in printed and "Average Prefill time a.k.a TTFT is=" in printed
    m = out.metrics
    assert m.prompts == 1 and m.generated_tokens == len(out.ids[0]) and m.decode_tokens == len(out.ids[0]) - 1
    assert 0 < m.ttft_s < m.e2e_s and m.decode_tok_s > 0
    assert isinstance(out, GenerationResult) and repr(out).startswith("<GenerationResult 1 prompt(s)")
    assert "generation metrics" in out._repr_html_()


@pytest.mark.slow
def test_smollm2_graph_io_and_compile_artifacts(smol):
    model, *_ = smol
    io = model.onnx_io()
    names = io["name"].tolist()
    assert names[:4] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert names[-2:] == ["past_key.29_RetainedState", "past_value.29_RetainedState"]
    assert "logits" in names and len(names) == 2 + 60 + 1 + 60
    row = io.set_index("name").loc["past_key.0"]
    assert row["shape"] == "['batch_size', 3, 'ctx_len', 64]"
    assert io.set_index("name").loc["logits", "shape"] == "['batch_size', 1, 49152]"
    folder = model.compile_result.folder
    specs = json.loads((folder / "specializations.json").read_text())["specializations"]
    # no SDK here: flat entries, what every SDK generation reads (named ones only from SDK 1.23; see compile/command.py)
    assert specs == [{"batch_size": "1", "seq_len": "32", "ctx_len": "128"},
                     {"batch_size": "1", "seq_len": "1", "ctx_len": "128"}]
    custom = yaml.safe_load((folder / "custom_io.yaml").read_text())
    assert len(custom) == 120 and {c["Precision"] for c in custom} == {"float16"}
    assert {"IOName": "past_value.29_RetainedState", "Precision": "float16"} in custom
    assert model.steps["export"].status in ("done", "reused")
    model.export()
    assert model.steps["export"].status == "reused"


@pytest.mark.slow
def test_smollm2_string_level_bad_input(smol):
    model, tok, *_ = smol
    with pytest.raises(ValueError, match="no prompts"):
        model.generate(tok, [])
    with pytest.raises(ValueError, match="Prompt 1 is an empty string"):
        model.generate(tok, ["Hello", ""])
    with pytest.raises(PromptTooLongError, match=r"Prompt 0 has \d+ tokens but the compiled ctx_len is 128"):
        model.generate(tok, ["word " * 200], verbose=False)


# ----------------------------------------------------------------------------- tiny model: fast checks
@pytest.fixture(scope="module")
def tiny():
    hf = tiny_model("llama", seed=3)
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=3), "tiny-llama-bad-input")
    model.compile(prefill_seq_len=8, ctx_len=32, batch_size=2)
    return model, hf


def test_generate_before_compile_says_what_to_do():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), "not-compiled")
    with pytest.raises(RuntimeError, match=r"Call compile\(...\) before generate"):
        model.generate_from_ids([[5, 6, 7]], 4)
    out = model.generate_from_ids([[5, 6, 7]], 4, runtime="pytorch")  # the PyTorch path needs no compile
    assert len(out.ids[0]) == 4


def test_prompt_longer_than_ctx_len(tiny):
    model, _ = tiny
    with pytest.raises(PromptTooLongError, match="Prompt 1 has 32 tokens but the compiled ctx_len is 32"):
        model.generate_from_ids([[5] * 4, [5] * 32], 4)


def test_generation_len_past_ctx_len_is_clamped_with_a_warning(tiny):
    model, hf = tiny
    prompt = prompts(lengths=(20,))
    with pytest.warns(UserWarning, match=r"clamped to ctx_len - prompt_len \(\[12\] tokens\)"):
        out = model.generate_from_ids(prompt, 50)
    assert len(out.ids[0]) == 12 and out.stopped == ["length"]
    assert out.ids == hf_greedy(hf, prompt, 12)


def test_no_generation_len_fills_each_rows_context(tiny):
    model, _ = tiny
    out = model.generate_from_ids(prompts(lengths=(5, 13)), None)
    assert [len(i) for i in out.ids] == [27, 19]


def test_more_prompts_than_batch_size_run_in_successive_batches(tiny):
    model, hf = tiny
    many = prompts(seed=7, lengths=(3, 9, 4, 12, 6))
    out = model.generate_from_ids(many, 10)
    assert out.metrics.batches == 3 and out.metrics.prompts == 5
    assert out.ids == hf_greedy(hf, many, 10)


def test_empty_inputs_and_bad_lengths(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="no prompts"):
        model.generate_from_ids([], 4)
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        model.generate_from_ids([[5], []], 4)
    with pytest.raises(ValueError, match="generation_len must be a positive int"):
        model.generate_from_ids([[5]], 0)


def test_compiled_backend_runs_only_the_compiled_shapes(tiny):
    import numpy as np

    model, _ = tiny
    session = model.runner()
    with pytest.raises(ShapeNotCompiledError):
        session.step(np.zeros((2, 5), np.int64), np.zeros((2, 5), np.int64))  # seq_len 5 was never compiled
    with pytest.raises(ShapeNotCompiledError):
        session.step(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))  # nor batch 1


def test_compile_arguments_are_checked(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"prefill_seq_len \(64\) cannot exceed ctx_len \(32\)"):
        model.compile(prefill_seq_len=64, ctx_len=32)
    with pytest.raises(ValueError, match=r"ctx_len=512 exceeds this model's max_position_embeddings \(256\)"):
        model.compile(ctx_len=512)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.compile(batch_size=0)
    with pytest.raises(TypeError, match="unknown option 'num_core'"):
        model.compile(num_core=4)


def test_mxint8_kv_cache_changes_only_the_custom_io_dtype():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama"), "tiny-mxint8")
    folder = model.compile(prefill_seq_len=8, ctx_len=32, mxint8_kv_cache=True)
    custom = yaml.safe_load((folder / "custom_io.yaml").read_text())
    assert [c["IOName"] for c in custom[:2]] == ["past_key.0", "past_key.0_RetainedState"]
    assert {c["Precision"] for c in custom} == {"mxint8"} and len(custom) == 8
    assert not [a for a in model.compile_result.command if a.startswith("-mx")]  # not a compiler flag


def test_sliding_window_does_not_limit_ctx_len():
    """The window moves over the retained buffer (tests/transforms/test_kv_families.py decodes beyond it);
    ctx_len is limited by the position tables only."""
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("mistral", sliding_window=16), "tiny-mistral-window")
    assert model.max_ctx_len() == (256, "max_position_embeddings")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.compile(prefill_seq_len=8, ctx_len=512)


def test_unsupported_architecture_from_pretrained(minilm_path):
    with pytest.raises(UnsupportedModelError, match="'bert' model.*an encoder.*For encoders use QEFFAutoModel"):
        QEFFAutoModelForCausalLM.from_pretrained(str(minilm_path))


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gpt_neox"])
def test_a_model_type_without_a_family_runs_end_to_end_on_the_generic_path(model_type):
    """Not one of the hand-written families: QEFFAutoModelForCausalLM takes it through transformers' own
    interfaces, exports, compiles for ONNX Runtime and generates the tokens HF eager generates."""
    from tests.transforms.test_generic_kv import hf_greedy, prompts, tiny

    hf = tiny(model_type)
    prompt_ids = prompts()
    expected = hf_greedy(hf, prompt_ids)
    model = QEFFAutoModelForCausalLM.from_model(hf, name=f"tiny-{model_type}")
    assert model.path == "generic" and model.steps["transform"].summary.startswith("generic retained-state path")
    model.compile(prefill_seq_len=8, ctx_len=40, batch_size=2)
    out = model.generate_from_ids(prompt_ids, generation_len=16)
    assert out.ids == expected
    key = model.export_result.key
    assert key["options"]["path"] == "generic"
    assert f"transformers.models.{model_type}.modeling_{model_type}" in key["code_modules"]
    assert "qeff_lab.transforms.generic.cache" in key["code_modules"]


def test_an_architecture_no_path_can_take_is_refused_with_the_obstacle():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4))
    with pytest.raises(UnsupportedModelError, match="mamba.*Mamba"):
        QEFFAutoModelForCausalLM.from_model(model)
