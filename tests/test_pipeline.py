"""The content-addressed artifact cache: complete or absent, verified before reuse."""
import json

import pytest

from qeff_lab.pipeline import build_artifact, fingerprint, verify_artifact


def _writer(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "a.bin").write_bytes(b"x" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hello")
    return build


def test_built_once_then_reused(tmp_path):
    calls = []
    folder, reused = build_artifact(tmp_path / "art", {"k": 1}, _writer(calls))
    assert not reused and verify_artifact(folder)
    assert json.loads((folder / "manifest.json").read_text())["key"] == {"k": 1}
    folder2, reused2 = build_artifact(tmp_path / "art", {"k": 1}, _writer(calls))
    assert reused2 and folder2 == folder and len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_folder_is_rebuilt(tmp_path, damage):
    calls = []
    folder, _ = build_artifact(tmp_path / "art", {}, _writer(calls))
    target = folder / "a.bin"
    if damage == "truncate":
        target.write_bytes(b"x" * 10)
    elif damage == "flip":
        target.write_bytes(b"y" * 100)  # same size, foreign content
    elif damage == "delete":
        target.unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    assert not verify_artifact(folder)
    _, reused = build_artifact(tmp_path / "art", {}, _writer(calls))
    assert not reused and len(calls) == 2 and verify_artifact(folder)


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half.bin").write_bytes(b"1")
        raise RuntimeError("compiler died")

    with pytest.raises(RuntimeError, match="compiler died"):
        build_artifact(tmp_path / "art", {}, build)
    assert [p.name for p in tmp_path.iterdir()] == [".art.lock"]  # the (empty) lock file only: no folder, no temp


def _build_slowly(folder, log):
    """Run in a child process: build `folder`, taking a while, and say whether it built or reused it."""
    import time

    def build(tmp):
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        time.sleep(0.5)
        (tmp / "b.bin").write_bytes(b"y" * 1000)

    _, reused = build_artifact(folder, {"k": 1}, build)
    with open(log, "a") as f:
        f.write("reused\n" if reused else "built\n")


def test_two_processes_building_one_folder_build_it_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_build_slowly, args=(tmp_path / "art", log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(log.read_text().split()) == ["built", "reused"]
    assert verify_artifact(tmp_path / "art")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
