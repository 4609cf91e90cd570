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


def test_infer_continuous_batching_from_a_prompts_file_matches_each_prompt_alone(tiny_folder, tmp_path, capsys):
    folder, model, tok = tiny_folder
    prompts = ["The capital of France is", "Hello", "One two three four five six seven eight nine ten"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts[1:]) + "\n\n")
    code = main(["infer", "--model", str(folder), "--prompt", prompts[0], "--prompts-file", str(file),
                 "--prompt-len", "8", "--ctx-len", "32", "--generation-len", "5", "--full-batch-size", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == prompts and len(out["ids"]) == 3  # three requests on two slots
    eos = tok.eos_token_id
    reference = hf_greedy(model, [tok(p)["input_ids"] for p in prompts], 5)
    assert out["ids"] == [r[:r.index(eos) + 1] if eos in r else r for r in reference]


def test_infer_sampling_is_reproducible_with_a_seed(tiny_folder, capsys):
    folder, *_ = tiny_folder
    argv = ["infer", "--model", str(folder), "--prompt", "Hello", "--prompt-len", "8", "--ctx-len", "32",
            "--generation-len", "8", "--do-sample", "--temperature", "1.5", "--top-k", "40", "--json"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(argv + ["--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["ids"][0])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_infer_needs_a_prompt_and_valid_sampling(tiny_folder, capsys):
    folder, *_ = tiny_folder
    assert main(["infer", "--model", str(folder)]) == 2
    assert "no prompt: give --prompt" in capsys.readouterr().err
    code = main(["infer", "--model", str(folder), "--prompt", "hi", "--prompt-len", "8", "--ctx-len", "32",
                 "--do-sample", "--top-p", "1.5"])
    assert code == 2 and "top_p" in capsys.readouterr().err
