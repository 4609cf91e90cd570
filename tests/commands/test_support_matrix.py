"""`qeff-lab support-matrix`: a small mix of model types run end to end (HF eager vs transformed PyTorch vs ONNX
Runtime), the markdown and JSON it writes, worker isolation (a hang or a crash is one row), the shrinker, and a
CLI that stays light (`--help` imports no torch)."""
import json
import subprocess
import sys

import pytest

from qeff_lab.cli import main
from qeff_lab.commands import support_matrix as sm

MIX = ["llama", "qwen3", "gpt2", "mamba", "bert", "t5"]


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    """One run of the command over MIX (--json), as the CLI does it: (rows by type, markdown text)."""
    out = tmp_path_factory.mktemp("matrix") / "support_matrix.md"
    capture = tmp_path_factory.mktemp("stdout") / "rows.json"
    real_stdout = sys.stdout
    with open(capture, "w") as f:
        sys.stdout = f
        try:
            rc = main(["support-matrix", "--only", *MIX, "--output", str(out), "--json", "--quiet"])
        finally:
            sys.stdout = real_stdout
    assert rc == 0
    rows = json.loads(capture.read_text())  # --json: valid JSON, a list of rows
    return {r["model_type"]: r for r in rows}, out.read_text()


def test_statuses_of_a_small_mix(mix_run):
    rows, _ = mix_run
    assert list(rows) == MIX
    for t in ("llama", "qwen3", "gpt2"):
        assert rows[t]["status"] == "pass", rows[t]
        assert rows[t]["kind"] == "decoder"
    assert rows["llama"]["path"] == "family Llama" and rows["qwen3"]["path"] == "generic"
    assert rows["mamba"]["status"] == "unsupported" and "Mamba" in rows["mamba"]["reason"]
    assert rows["bert"]["status"] == "pass" and rows["bert"]["kind"] == "encoder"
    assert rows["t5"]["status"] in ("skipped", "unsupported") and "encoder-decoder" in rows["t5"]["reason"]
    assert all("\n" not in r["reason"] for r in rows.values())
    assert all(r["seconds"] >= 0 for r in rows.values())


def test_markdown_has_header_counts_and_rows(mix_run):
    rows, text = mix_run
    import transformers

    assert text.startswith("# Support matrix")
    assert f"transformers {transformers.__version__}" in text
    assert "`qeff-lab support-matrix --only llama qwen3 gpt2 mamba bert t5 --json`" in text
    assert "| all | 4 | 0 | 1 | 1 | 6 |" in text  # pass, fail, unsupported, skipped, total
    for t, r in rows.items():
        assert f"| {t} | {r['kind']} | " in text
    assert "| qwen3 | decoder | generic | pass |" in text
    mamba = next(line for line in text.splitlines() if line.startswith("| mamba |"))
    assert "unsupported" in mamba and "MambaMixer" in mamba


def test_a_crash_and_a_hang_cost_one_row_each(monkeypatch):
    """t5's worker dies; a fresh worker takes mamba, which hangs and is stopped at the limit; the run returns."""
    monkeypatch.setenv(sm.FAULT_ENV, "t5:crash,mamba:hang")
    rows = sm.run_matrix(["t5", "mamba"], timeout=4, progress=False)
    assert [(r.model_type, r.status, r.reason) for r in rows] == [
        ("t5", "fail", "worker process died (exit code 3)"), ("mamba", "fail", "timed out after 4 s")]


def test_shrinker_sets_the_size_like_attributes_that_exist():
    defaults = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096,
                "sliding_window": 4096, "num_local_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 31999,
                "image_token_id": 32001, "layer_types": ["sliding_attention"] * 31 + ["full_attention"],
                "per_layer_config": {"5": {"num_attention_heads": 64}}, "n_inner": None, "rope_theta": 1e4,
                "id2label": {0: "A", 1: "B"}}
    out = sm.shrink_overrides(defaults, 32)
    assert out["hidden_size"] == 64 and out["num_hidden_layers"] == 2 and out["num_attention_heads"] == 4
    assert out["num_key_value_heads"] == 2 and out["intermediate_size"] == 128 and out["vocab_size"] == 128
    assert out["max_position_embeddings"] >= 256 and out["sliding_window"] == 6
    assert out["num_local_experts"] == 4 and out["num_experts_per_tok"] == 2
    assert out["eos_token_id"] == 2 and out["image_token_id"] < 128
    assert out["layer_types"] == ["sliding_attention", "full_attention"]
    assert out["per_layer_config"] == {"1": {"num_attention_heads": 4}}
    assert "n_inner" not in out and "rope_theta" not in out and "id2label" not in out
    config = sm.tiny_config("mistral")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.sliding_window) == (64, 2, 128, 6)


def test_unknown_type_is_a_clear_error(capsys):
    assert main(["support-matrix", "--only", "no_such_model", "--output", ""]) == 2
    assert "unknown model type(s) no_such_model" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = ("import sys; from qeff_lab.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-1000:]
    help_text = subprocess.run([sys.executable, "-m", "qeff_lab.cli", "support-matrix", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert "--only" in help_text and "--json" in help_text
