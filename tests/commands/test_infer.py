"""`qeff-lab infer --prompt-lookup K` / `--draft-model CARD --num-speculative-tokens K`: HF greedy's tokens with the
acceptance figures, and each unsupported combination a clear error (tiny Llama folders with SmolLM2's tokenizer)."""
import json
import re

import pytest
from transformers import AutoTokenizer

from qeff_lab.cli import build_parser, main
from tests.transforms.tiny_decoders import hf_greedy, tiny_model

PROMPT = "one two three four one two three four one two"
ARGS = ["--prompt", PROMPT, "--prompt-len", "8", "--ctx-len", "32", "--generation-len", "8", "--json"]


def _save(folder, tok, seed: int):
    model = tiny_model("llama", seed=seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_path, minilm_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    target = tmp_path_factory.mktemp("tiny-llama-target")
    model = _save(target, tok, seed=5)
    other = tmp_path_factory.mktemp("tiny-llama-other-tokenizer")  # same vocab size, another tokenizer
    other_model = tiny_model("llama", seed=6, vocab_size=len(tok))
    other_model.save_pretrained(other)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(other)
    ids = tok(PROMPT)["input_ids"]
    reference = hf_greedy(model, [ids], 8)[0]
    eos = tok.eos_token_id
    return target, other, (reference[:reference.index(eos) + 1] if eos in reference else reference)


def test_speculative_options_are_registered():
    args = build_parser().parse_args(["infer", "--prompt", "hi", "--draft-model", "d", "--num-speculative-tokens", "3"])
    assert args.draft_model == "d" and args.num_speculative_tokens == 3 and args.prompt_lookup is None
    assert build_parser().parse_args(["infer", "--prompt", "hi", "--prompt-lookup", "2"]).prompt_lookup == 2


def test_prompt_lookup_gives_greedy_tokens_and_acceptance_figures(folders, capsys):
    target, _, reference = folders
    assert main(["infer", "--model", str(target), "--prompt-lookup", "3", *ARGS]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert out["ids"] == [reference]
    assert m["drafter"] == "prompt lookup" and m["num_speculative_tokens"] == 3 and m["proposed_tokens"] > 0
    assert m["mean_tokens_per_step"] == (len(reference) - 1) / m["target_steps"]


def test_draft_model_of_the_same_weights_is_always_accepted(folders, capsys):
    target, _, reference = folders
    assert main(["infer", "--model", str(target), "--draft-model", str(target), "--num-speculative-tokens", "2",
                 *ARGS[:-1]]) == 0
    printed = capsys.readouterr().out
    assert "Speculative decoding (draft model, k=2: acceptance rate 100.0%" in printed
    text = AutoTokenizer.from_pretrained(target).decode(reference, skip_special_tokens=True)
    assert f"Prompt: {PROMPT}\nCompletion: {text}\n" in printed


@pytest.mark.parametrize("extra, message", [
    (["--prompt-lookup", "3", "--full-batch-size", "2"], "does not combine with --full-batch-size"),
    (["--prompt-lookup", "3", "--do-sample"], "does not combine with --do-sample"),
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens goes with --draft-model"),
    (["--prompt-lookup", "8"], r"needs prefill_seq_len >= num_speculative_tokens \+ 1 \(9\)"),
    (["--prompt-lookup", "0"], "--prompt-lookup must be at least 1"),
])
def test_bad_speculative_options_are_clear_errors(folders, capsys, extra, message):
    target, *_ = folders
    assert main(["infer", "--model", str(target), *extra, *ARGS]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_draft_with_another_tokenizer_is_refused(folders, capsys):
    target, other, _ = folders
    assert main(["infer", "--model", str(target), "--draft-model", str(other), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "qeff-lab infer: error: The draft model" in err and "uses another tokenizer" in err
