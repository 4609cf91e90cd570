"""`qeff-lab export / compile / execute` on tiny local models (a random BERT and a random Llama, each saved with
a small word-piece tokenizer), with and without the fake SDK (a TEST DOUBLE of the AI 100 compiler)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qeff_lab.cli import build_parser, main
from qeff_lab.commands.device import parse_device_group

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "my", "name", "is", "hello", "world", "the", "a", "cat"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 eos_token_id=3, bos_token_id=2)).save_pretrained(folder)
    _tokenizer(folder)
    return folder


def test_qefficient_argument_names_parse():
    args = build_parser().parse_args(
        ["compile", "--model_name", "m", "--num_cores", "8", "--prompt_len", "16", "--ctx_len", "64", "--mxfp6",
         "--mxint8", "--device_group", "[0,1]", "--dry-run", "--extra-flag=-stats-level=70", "--backend", "qaic"])
    assert (args.model_name, args.num_cores, args.prompt_len, args.ctx_len) == ("m", 8, 16, 64)
    assert args.mxfp6 and args.mxint8 and args.dry_run and args.extra_flags == ["-stats-level=70"]
    assert args.device_group == "[0,1]" and args.backend == "qaic"
    assert build_parser().parse_args(["execute", "--model-name", "m", "--generation-len", "5"]).generation_len == 5


@pytest.mark.parametrize("text, ids", [("[0]", [0]), ("[0,1]", [0, 1]), ("0, 2", [0, 2]), ("1 3", [1, 3])])
def test_device_group(text, ids):
    assert parse_device_group(text) == ids


def test_bad_device_group():
    with pytest.raises(ValueError, match="expected device ids"):
        parse_device_group("[a]")


def test_export(tiny_bert, capsys):
    assert main(["export", "--model-name", str(tiny_bert)]) == 0
    out = capsys.readouterr().out
    assert "(encoder)" in out and "model.onnx" in out


def test_compile_dry_run_prints_the_command(tiny_llama, no_sdk, capsys):
    rc = main(["compile", "--model-name", str(tiny_llama), "--prompt-len", "8", "--ctx-len", "32", "--mxfp6",
               "--mxint8", "--device-group", "[0,1]", "--mos", "1", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(causal-lm)" in out and "dry run (compiler not run)" in out
    command = next(line for line in out.splitlines() if line.startswith("command  "))
    for flag in ("-retained-state", "-mxfp6-matmul", "-mos=1", "-mdp-load-partition-config=",
                 "-network-specialization-config=", "-custom-IO-list-file="):
        assert flag in command
    folder = Path(next(line for line in out.splitlines() if line.startswith("folder   ")).split(None, 1)[1])
    q = json.loads((folder / "qconfig.json").read_text())
    assert q["num_devices"] == 2 and set(q["custom_io"].values()) == {"mxint8"}
    assert q["model"]["class"] == "QEffLlamaForCausalLM" and q["model"]["mxint8_kv_cache"] is True


def test_compile_errors_are_one_line_messages(tiny_bert, no_sdk, capsys):
    assert main(["compile", "--model-name", str(tiny_bert), "--backend", "qaic"]) == 2
    err = capsys.readouterr().err
    assert "qeff-lab compile: error: backend='qaic' needs the Cloud AI 100 SDK" in err
    assert main(["compile", "--model-name", str(tiny_bert), "--mxint8"]) == 2
    assert "an encoder has no KV cache" in capsys.readouterr().err
    assert main(["compile", "--model-name", str(tiny_bert), "--extra-flag=-aic-num-cores=2"]) == 2
    assert "use that instead" in capsys.readouterr().err


def test_compile_with_the_fake_sdk_runs_the_compiler(tiny_bert, fake_sdk, capsys):
    rc = main(["compile", "--model-name", str(tiny_bert), "--seq-len", "8,16", "--num-cores", "4", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "backend  qaic: Cloud AI 100 SDK found" in out and "qpc/ (1 file(s))" in out
    (argv,) = fake_sdk.calls()
    assert "-aic-num-cores=4" in argv and "-retained-state" not in argv


def test_execute_encoder_on_the_embedded_backend(tiny_bert, no_sdk, capsys):
    rc = main(["execute", "--model-name", str(tiny_bert), "--seq-len", "8", "--prompt", "my name is",
               "--prompt", "hello world", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert "backend  onnxruntime: no Cloud AI 100 SDK" in "\n".join(lines)
    data = json.loads(lines[-1])
    assert data["shape"] == [2, 32]


def test_execute_causal_lm_on_the_embedded_backend(tiny_llama, no_sdk, capsys):
    rc = main(["execute", "--model-name", str(tiny_llama), "--prompt-len", "8", "--ctx-len", "32",
               "--prompt", "the cat is", "--generation-len", "4", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(data["ids"]) == 1 and 1 <= len(data["ids"][0]) <= 4


def test_execute_on_qaic_without_qaicrt_is_a_clear_error(tiny_llama, fake_sdk, capsys):
    rc = main(["execute", "--model-name", str(tiny_llama), "--prompt-len", "8", "--ctx-len", "32", "--quiet",
               "--prompt", "the cat", "--device-group", "[1]"])
    assert rc == 2
    assert "Cannot import 'qaicrt'" in capsys.readouterr().err
    assert len(fake_sdk.calls()) == 1  # it compiled (with the test double), then could not run
