"""The qeff-lab command line, run as a user would (a subprocess of the installed entry point)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def qeff_lab(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "qeff_lab.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_embed_json_matches_the_python_api():
    from qeff_lab import QEFFAutoModel

    out = json.loads(qeff_lab("embed", "--json", "--seq-len", "32", "My name is", "Hello world").stdout)
    assert out["shape"] == [2, 384]
    model = QEFFAutoModel.from_pretrained(out["model"], pooling="mean")
    model.compile(seq_len=32)
    np.testing.assert_allclose(np.array(out["embeddings"]), model.embed(["My name is", "Hello world"]), atol=1e-5)


def test_embed_summary_prints_shape_and_first_values():
    out = qeff_lab("embed", "--seq-len", "32", "--pooling", "cls", "My name is").stdout
    assert "embeddings (1, 384)" in out and "(onnxruntime)" in out
    assert len(out.strip().splitlines()[-1].split()) >= 6


def test_unknown_model_is_a_clear_error():
    proc = qeff_lab("embed", "--model", "nobody/nothing", "x", check=False)
    assert proc.returncode == 2
    assert "Could not find model 'nobody/nothing'. Tried:" in proc.stderr


@pytest.mark.parametrize("argv", [["embed"], ["no-such-command"]])
def test_bad_usage_exits_nonzero(argv):
    assert qeff_lab(*argv, check=False).returncode == 2


def test_setup_models_fills_a_fresh_hf_home_and_leaves_the_users_own_download(tmp_path):
    """setup-models, as make runs it, into an empty HF_HOME where SmolLM2 is the user's own download: MiniLM is
    written (then already present), SmolLM2's entry is left byte for byte, and each line says which."""
    from tests.test_loading import USER_COMMIT, fake_genuine_snapshot, tree_state

    hub = tmp_path / "hub"
    users = fake_genuine_snapshot(hub, "HuggingFaceTB/SmolLM2-135M-Instruct")
    before = tree_state(users)
    env = {**{k: v for k, v in ENV.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")},
           "HF_HOME": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-m", "qeff_lab.cli", "setup-models"], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = (dict(line.split(": ", 1) for line in p.stdout.strip().splitlines()) for p in runs)
    assert first["sentence-transformers/all-MiniLM-L6-v2"].startswith("written: ")
    assert second["sentence-transformers/all-MiniLM-L6-v2"].startswith("already present: ")
    for lines in (first, second):
        assert lines["HuggingFaceTB/SmolLM2-135M-Instruct"].startswith("left your copy: ")
        assert USER_COMMIT in lines["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert tree_state(users) == before
    minilm = hub / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (minilm / "snapshots" / (minilm / "refs" / "main").read_text() / "config.json").is_file()
