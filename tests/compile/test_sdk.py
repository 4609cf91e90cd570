"""SDK detection: the root (overridable), the compiler (new or old), its version, the cards `qaic-util -q` lists."""
from __future__ import annotations

from pathlib import Path

from qeff_lab.compile import choose_backend, detect_sdk
from qeff_lab.compile.sdk import parse_qaic_util

# Two cards as the real `qaic-util -q` prints them (fields trimmed), the second busy.
QAIC_UTIL_Q = """Number of devices: 2
QID 0
        Status:Ready
        PCI Address:0000:01:00.0
        HW Version:0.2.0.0
        FW Version:1.5.6
        Nsp Total:16
        Nsp Free:16
QID 1
        Status:Error
        HW Version:0.2.0.0
        Nsp Total:14
        Nsp Free:0
"""


# One card as the Platform SDK's `qaic-util -q` prints it: a public record (an AEDK setup guide's output), verbatim.
PUBLIC_RECORD = """LRT QC_IMAGE_VERSION: LRT.AIC.6.7.1.6.52
LRT IMAGE_VARIANT: LRT.AIC.REL
Number of devices: 1
QID 0
        Status:Ready
        PCI Address:0002:01:00.0
        PCI Info:Unassigned class [ff00] Qualcomm Device a100
        HW Version:0.2.0.0
        HW Serial:0x2b36e75d
        FW Version:1.6.36
        FW QC_IMAGE_VERSION:QSM.AIC.1.6.36
        FW OEM_IMAGE_VERSION:
        FW IMAGE_VARIANT:AIC100.REL
        NSP Version:1.6.18
        NSP QC_IMAGE_VERSION:NSP.AIC.1.6.18
        NSP OEM_IMAGE_VERSION:
        NSP IMAGE_VARIANT:aic100.nsp.prodQ
        Compiler Version:0
        Dram Total:8116 MB
        Dram Free:8116 MB
        Vc Total:16
        Vc Free:16
        Nsp Total:8
        Nsp Free:8
        Networks Loaded:0
        Networks Active:0
        Board serial:
"""


def test_parse_the_public_record():
    (dev,) = parse_qaic_util(PUBLIC_RECORD)
    assert (dev.qid, dev.status, dev.hw_version, dev.nsp_total, dev.nsp_free) == (0, "Ready", "0.2.0.0", 8, 8)
    assert dev.fw_image_variant == "AIC100.REL" and dev.aic_hw_version == "ai100"
    assert dev.usable(8) and not dev.usable(16)


def test_parse_qaic_util_reads_each_card():
    devs = parse_qaic_util(QAIC_UTIL_Q)
    assert [d.qid for d in devs] == [0, 1]
    assert devs[0].ready and not devs[1].ready
    assert (devs[0].hw_version, devs[0].nsp_total, devs[0].nsp_free) == ("0.2.0.0", 16, 16)
    assert (devs[1].nsp_total, devs[1].nsp_free) == (14, 0)
    assert parse_qaic_util("") == []


def test_no_root_means_no_sdk(no_sdk):
    info = detect_sdk()
    assert not info.present and info.root == no_sdk
    assert repr(info) == f"<SdkInfo: no Cloud AI 100 SDK at {no_sdk}>"
    backend, why = choose_backend(None, info)
    assert backend == "onnxruntime" and "no Cloud AI 100 SDK" in why
    assert info.command_prefix() == [str(no_sdk / "exec" / "qaic-compile")]  # what a dry run shows


def test_root_without_compiler_is_not_an_sdk(tmp_path, monkeypatch):
    root = tmp_path / "qti-aic"
    (root / "exec").mkdir(parents=True)
    monkeypatch.setenv("QEFF_LAB_QAIC_ROOT", str(root))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    info = detect_sdk()
    assert not info.present
    assert "holds no qaic-compile or qaic-exec" in choose_backend(None, info)[1]


def test_fake_new_sdk_is_detected_with_version_and_devices(fake_sdk):
    info = detect_sdk()
    assert info.present and info.root == fake_sdk.root
    assert info.compiler == [str(fake_sdk.root / "exec" / "qaic-compile")] and not info.legacy_compiler
    assert info.version == "1.23.0" and info.takes_named_specializations
    assert info.device_ids == [0, 1] and info.hw_version == "0.2.0.0" and all(d.ready for d in info.devices)
    assert repr(info) == "<SdkInfo qaic-compile (SDK 1.23.0); devices 0:Ready, 1:Ready>"
    assert choose_backend(None, info)[0] == "qaic"


def test_fake_old_sdk_uses_qaic_exec_compile_only(fake_sdk_factory):
    sdk = fake_sdk_factory("qaic-exec", devices=1)
    info = detect_sdk()
    assert info.compiler == [str(sdk.root / "exec" / "qaic-exec"), "-compile-only"] and info.legacy_compiler
    assert info.device_ids == [0]


def test_qaic_util_failure_is_recorded_not_raised(fake_sdk):
    (fake_sdk.root / "tools" / "qaic-util").write_text("#!/bin/sh\necho 'no driver loaded' >&2\nexit 4\n")
    info = detect_sdk()
    assert info.present and info.devices == []
    assert "exited 4" in info.util_error and "no driver loaded" in info.util_error


def test_default_root_is_opt_qti_aic(monkeypatch):
    monkeypatch.delenv("QEFF_LAB_QAIC_ROOT", raising=False)
    assert detect_sdk(query_devices=False).root == Path("/opt/qti-aic")
