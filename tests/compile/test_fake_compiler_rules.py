"""The fake compiler (tests/fake_sdk, a TEST DOUBLE) checks what the public sources say the real one checks, not
what qeff_lab emits: each case names its source (QEfficient = github.com/quic/efficient-transformers)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qeff_lab.compile.command import dedup_specializations, specializations_json
from qeff_lab.compile.sdk import DeviceInfo, SdkInfo


def run(sdk, *args: str, specs=None, tmp: Path) -> subprocess.CompletedProcess:
    onnx = tmp / "m.onnx"
    onnx.write_bytes(b"not read")
    spec_file = tmp / "specializations.json"
    spec_file.write_text(json.dumps(specs if specs is not None else {"specializations": [{"seq_len": "8"}]}))
    exe = next(p for p in (sdk.root / "exec").iterdir())
    argv = [str(exe), "-aic-hw", f"-m={onnx}", f"-network-specialization-config={spec_file}",
            f"-aic-binary-dir={tmp / 'qpc'}", *args]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True)


NAMED = {"specializations": [{"name": "Prefill", "symbols": {"seq_len": "8"}}]}


@pytest.mark.parametrize("compiler, version, args, specs, rc, words", [
    # flat entries must hold strings; a flat-only reader fails like issue #1129 (exit 255, nlohmann type_error.302)
    ("qaic-compile", "1.22.0", [], NAMED, 255, "type must be string, but is object"),
    ("qaic-compile", "1.22.0", [], {"specializations": [{"seq_len": 8}]}, 255, "type must be string, but is number"),
    ("qaic-compile", "1.23.0", [], NAMED, 0, "Compilation done."),
    ("qaic-exec", "1.20.2", ["-compile-only"], NAMED, 255, "type must be string, but is object"),
    # qaic-exec compiles only with -compile-only (constants.py COMPILER, #669)
    ("qaic-exec", "1.20.2", [], None, 2, "-compile-only not given"),
    # -compile-only is deprecated for qaic-compile and ignored (#946, #1140)
    ("qaic-compile", "1.23.0", ["-compile-only"], None, 0, "deprecated and ignored"),
    # -aic-hw-version: ai100 / ai200, 2.0 the older spelling (#528)
    ("qaic-compile", "1.23.0", ["-aic-hw-version=ai200"], None, 0, "Compilation done."),
    ("qaic-compile", "1.23.0", ["-aic-hw-version=2.0"], None, 0, "Compilation done."),
    ("qaic-compile", "1.23.0", ["-aic-hw-version=ai300"], None, 2, "invalid value 'ai300'"),
    ("qaic-compile", "1.23.0", ["-aic-num-cores=17"], None, 2, "-aic-num-cores"),
    ("qaic-compile", "1.23.0", ["-no-such-flag"], None, 1, "Unknown command line argument"),
])
def test_rules(fake_sdk_factory, tmp_path, compiler, version, args, specs, rc, words):
    sdk = fake_sdk_factory(compiler, version=version)
    proc = run(sdk, *args, specs=specs, tmp=tmp_path)
    assert proc.returncode == rc and words in proc.stdout, proc.stdout


def test_duplicate_graph_names_are_rejected_and_never_written(fake_sdk_factory, tmp_path):
    sdk = fake_sdk_factory()
    twice = {"specializations": [{"name": "Decode", "symbols": {"seq_len": "1"}}] * 2}
    assert "is not unique" in run(sdk, specs=twice, tmp=tmp_path).stdout
    # qeff_lab suffixes a repeated name (QEfficient _utils.py to_named_specializations) ...
    names = [e["name"] for e in specializations_json([{"seq_len": 1}, {"seq_len": 1, "x": 2}], ["D", "D"])[
        "specializations"]]
    assert names == ["D_0", "D_1"]
    # ... and drops exact duplicate shapes first, naming the survivor by its shape (#1006: PL=1 is "Decode")
    pl1 = {"batch_size": 1, "seq_len": 1, "ctx_len": 32}
    assert dedup_specializations([pl1, dict(pl1)], ["Prefill", "Decode"]) == ([pl1], ["Decode"])
    assert dedup_specializations([{"seq_len": 8}, {"seq_len": 8}], None) == ([{"seq_len": 8}], None)
    assert dedup_specializations([{"seq_len": 8}, {"seq_len": 1}], ["P", "D"]) == (
        [{"seq_len": 8}, {"seq_len": 1}], ["P", "D"])


def test_the_stand_in_qpc_records_what_the_runtime_double_needs(fake_sdk, tmp_path):
    proc = run(fake_sdk, "-retained-state", "-aic-num-cores=8", specs={"specializations": [{"seq_len": "8"}]},
               tmp=tmp_path)
    qpc = json.loads((tmp_path / "qpc" / "programqpc.bin").read_text())
    assert proc.returncode == 0 and qpc["specializations"] == [{"seq_len": 8}]
    assert qpc["retained_state"] is True and qpc["num_cores"] == 8 and qpc["aic_hw_version"] == "ai100"


@pytest.mark.parametrize("compiler, version, named", [
    ("qaic-compile", "1.23.0", True), ("qaic-compile", "1.22.0", False), ("qaic-compile", None, False),
    ("qaic-exec", "1.23.0", False)])
def test_named_format_follows_the_sdk_version(compiler, version, named):
    info = SdkInfo(True, Path("/opt/qti-aic"), [f"/opt/qti-aic/exec/{compiler}"], version)
    assert info.takes_named_specializations is named


def test_hw_version_from_the_firmware_variant():
    assert DeviceInfo(0, fw_image_variant="AIC100.REL").aic_hw_version == "ai100"
    assert DeviceInfo(0, fw_image_variant="AIC200.REL").aic_hw_version == "ai200"
    assert DeviceInfo(0).aic_hw_version is None
