"""Fixtures for compile tests: a tiny ONNX graph, an isolated artifact cache, and the fake SDK (a TEST DOUBLE)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

FAKE_SDK_SOURCE = Path(__file__).resolve().parents[1] / "fake_sdk"


def make_tiny_onnx(path: Path, scale: float = 2.0) -> Path:
    """input_ids [batch_size, seq_len] int64 -> output = float(input_ids) * scale (dynamic batch_size, seq_len)."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq_len"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", "seq_len"])
    scale_t = helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])
    nodes = [helper.make_node("Cast", ["input_ids"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "scale"], ["output"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [scale_t]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def make_onnx():
    """make_tiny_onnx, for tests that need more than one graph."""
    return make_tiny_onnx


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    return make_tiny_onnx(tmp_path / "export" / "model.onnx")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QEFF_LAB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_sdk(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "no-sdk-here"
    monkeypatch.setenv("QEFF_LAB_QAIC_ROOT", str(root))
    return root


@dataclass
class FakeSdk:
    """A copy of tests/fake_sdk (TEST DOUBLE of the AI 100 SDK) that QEFF_LAB_QAIC_ROOT points at."""

    root: Path
    record: Path
    monkeypatch: pytest.MonkeyPatch

    def calls(self) -> list[list[str]]:
        if not self.record.exists():
            return []
        return [json.loads(line)["argv"] for line in self.record.read_text().splitlines()]

    def mode(self, mode: str) -> None:
        self.monkeypatch.setenv("FAKE_QAIC_MODE", mode)

    def cards(self, status: str | None = None, nsp_free: str | None = None, variant: str | None = None) -> None:
        """Per-card qaic-util fields (comma lists), read by the fake qaic-util and tests/qaicrt_double alike."""
        for name, value in (("FAKE_QAIC_STATUS", status), ("FAKE_QAIC_NSP_FREE", nsp_free),
                            ("FAKE_QAIC_VARIANT", variant)):
            if value is not None:
                self.monkeypatch.setenv(name, value)


def write_version(root: Path, version: str) -> None:
    base, _, build = version.rpartition(".")
    (root / "versions" / "apps.xml").write_text(
        f"<versions>\n  <ci_build>\n    <base_name>AIC</base_name>\n    <base_version>{base}</base_version>\n"
        f"    <build_id>{build}</build_id>\n  </ci_build>\n</versions>\n")


@pytest.fixture
def fake_sdk_factory(tmp_path, monkeypatch):
    """make(compiler, devices, version): qaic-compile of SDK 1.23.0 by default (takes named specializations);
    version="1.22.0" is a qaic-compile that takes only flat ones; compiler="qaic-exec" an older SDK."""
    def make(compiler: str = "qaic-compile", devices: int = 2, version: str | None = None) -> FakeSdk:
        root = tmp_path / f"fake-sdk-{compiler}-{version or 'default'}"
        shutil.copytree(FAKE_SDK_SOURCE, root)
        if compiler != "qaic-compile":
            (root / "exec" / "qaic-compile").rename(root / "exec" / compiler)
        if version is not None:
            write_version(root, version)
        record = tmp_path / f"{compiler}-calls.jsonl"
        monkeypatch.setenv("QEFF_LAB_QAIC_ROOT", str(root))
        monkeypatch.setenv("FAKE_QAIC_RECORD", str(record))
        monkeypatch.setenv("FAKE_QAIC_DEVICES", str(devices))
        for name in ("FAKE_QAIC_MODE", "FAKE_QAIC_HANDSHAKE", "FAKE_QAIC_STATUS", "FAKE_QAIC_NSP_FREE",
                     "FAKE_QAIC_VARIANT"):
            monkeypatch.delenv(name, raising=False)
        return FakeSdk(root, record, monkeypatch)

    return make


@pytest.fixture
def fake_sdk(fake_sdk_factory) -> FakeSdk:
    return fake_sdk_factory()
