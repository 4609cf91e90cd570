"""`qeff-lab infer` on a tiny Llama saved as a real HF folder (SmolLM2's tokenizer, random weights)."""
import json

import pytest
from transformers import AutoTokenizer

from qeff_lab.cli import build_parser, main
from tests.transforms.tiny_decoders import hf_greedy, tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("tiny-llama-cli")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = tiny_model("llama", seed=5, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_infer_is_registered_with_its_options():
    args = build_parser().parse_args(["infer", "--prompt", "hi", "--prompt", "there", "--ctx-len", "64"])
    assert args.func.__name__ == "cmd_infer" and args.prompt == ["hi", "there"] and args.ctx_len == 64
    assert args.prompt_len == 32 and args.generation_len is None and args.batch_size == 1


def test_infer_json_matches_hf_greedy(tiny_folder, capsys):
    folder, model, tok = tiny_folder
    code = main(["infer", "--model", str(folder), "--prompt", "The capital of France is", "--prompt", "Hello",
                 "--prompt-len", "8", "--ctx-len", "32", "--generation-len", "6", "--batch-size", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "onnxruntime" and len(out["texts"]) == 2
    prompt_ids = [tok(p)["input_ids"] for p in ["The capital of France is", "Hello"]]
    reference = hf_greedy(model, prompt_ids, 6)
    eos = tok.eos_token_id
    expected = [r[:r.index(eos) + 1] if eos in r else r for r in reference]
    assert out["ids"] == expected
    assert out["metrics"]["generated_tokens"] == sum(map(len, expected))


def test_infer_prints_text_and_metrics(tiny_folder, capsys):
    folder, *_ = tiny_folder
    assert main(["infer", "--model", str(folder), "--prompt", "Hello", "--prompt-len", "8", "--ctx-len", "32",
                 "--generation-len", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Prompt: Hello\nCompletion: " in printed and "Decode is=" in printed


def test_infer_reports_bad_input_as_an_error(tiny_folder, capsys):
    folder, *_ = tiny_folder
    code = main(["infer", "--model", str(folder), "--prompt", "word " * 40, "--prompt-len", "8", "--ctx-len", "32"])
    assert code == 2
    assert "qeff-lab infer: error: Prompt 0 has" in capsys.readouterr().err
    code = main(["infer", "--model", str(folder), "--prompt", "hi", "--prompt-len", "64", "--ctx-len", "32"])
    assert code == 2 and "cannot exceed ctx_len" in capsys.readouterr().err
