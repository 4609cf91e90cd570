"""The `qaicrt_double` fixture: puts tests/qaicrt_double (a TEST DOUBLE of qaicrt and QAicApi_pb2) first on
sys.path, so qeff_lab's QaicSession imports it as `qaicrt`; a fresh module per test (its cards' held cores and
error log start empty). Import the fixture into a test module to use it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NAMES = ("qaicrt", "QAicApi_pb2")


@pytest.fixture
def qaicrt_double(monkeypatch):
    for name in NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(HERE))
    import qaicrt

    yield qaicrt
    for name in NAMES:
        sys.modules.pop(name, None)


@pytest.fixture
def qaic_device(tmp_path, monkeypatch, qaicrt_double):
    """A machine with the AI 100 SDK, as far as tests can have one: a copy of tests/fake_sdk (TEST DOUBLE of the
    compiler and qaic-util, SDK 1.23.0, two Ready cards of 16 free cores) and the qaicrt double. Returns a
    function setting the cards' qaic-util fields (comma lists): cards(status="Ready,Error", nsp_free="16,4")."""
    import shutil

    root = tmp_path / "fake-sdk"
    shutil.copytree(HERE.parent / "fake_sdk", root)
    monkeypatch.setenv("QEFF_LAB_QAIC_ROOT", str(root))
    monkeypatch.setenv("FAKE_QAIC_DEVICES", "2")
    monkeypatch.setenv("QEFF_LAB_CACHE", str(tmp_path / "cache"))
    for name in ("FAKE_QAIC_MODE", "FAKE_QAIC_HANDSHAKE", "FAKE_QAIC_RECORD", "FAKE_QAIC_STATUS",
                 "FAKE_QAIC_NSP_FREE", "FAKE_QAIC_VARIANT"):
        monkeypatch.delenv(name, raising=False)

    def cards(devices: int | None = None, status: str | None = None, nsp_free: str | None = None) -> None:
        for name, value in (("FAKE_QAIC_DEVICES", devices), ("FAKE_QAIC_STATUS", status),
                            ("FAKE_QAIC_NSP_FREE", nsp_free)):
            if value is not None:
                monkeypatch.setenv(name, str(value))

    cards.root = root
    return cards
