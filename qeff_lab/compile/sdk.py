"""Detect the Cloud AI 100 SDK: its root (`/opt/qti-aic`, or $QEFF_LAB_QAIC_ROOT), compiler, version, devices."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT_ENV = "QEFF_LAB_QAIC_ROOT"
DEFAULT_ROOT = "/opt/qti-aic"
# Newer SDKs ship `qaic-compile`; older ones only `qaic-exec`, which compiles when given -compile-only.
COMPILERS = (("qaic-compile", ()), ("qaic-exec", ("-compile-only",)))


@dataclass
class DeviceInfo:
    """One card (SoC) as `qaic-util -q` lists it."""

    qid: int
    status: str = "unknown"
    hw_version: str | None = None
    nsp_total: int | None = None
    nsp_free: int | None = None

    @property
    def ready(self) -> bool:
        return self.status.lower() == "ready"


@dataclass
class SdkInfo:
    """What was found under the SDK root. `present` means a compiler was found (the root alone is not enough)."""

    present: bool
    root: Path
    compiler: list[str] = field(default_factory=list)  # command prefix: [.../qaic-compile] or [.../qaic-exec, -compile-only]
    version: str | None = None  # Apps SDK version (versions/apps.xml), e.g. "1.20.2"
    devices: list[DeviceInfo] = field(default_factory=list)
    util_error: str | None = None  # why `qaic-util -q` gave nothing, when it did not

    @property
    def compiler_name(self) -> str | None:
        return Path(self.compiler[0]).name if self.compiler else None

    @property
    def legacy_compiler(self) -> bool:
        """True for `qaic-exec -compile-only` (older SDKs), which also take flat specializations."""
        return self.compiler_name == "qaic-exec"

    @property
    def device_ids(self) -> list[int]:
        return [d.qid for d in self.devices]

    @property
    def hw_version(self) -> str | None:
        return self.devices[0].hw_version if self.devices else None

    def command_prefix(self) -> list[str]:
        """The compiler to put in a command, also when the SDK is absent (a dry run shows the usual path)."""
        return list(self.compiler) if self.compiler else [str(self.root / "exec" / "qaic-compile")]

    def to_json(self) -> dict:
        return {"root": str(self.root), "present": self.present, "compiler": self.compiler, "version": self.version,
                "devices": [vars(d) for d in self.devices]}

    def __repr__(self) -> str:
        if not self.present:
            return f"<SdkInfo: no Cloud AI 100 SDK at {self.root}>"
        devs = ", ".join(f"{d.qid}:{d.status}" for d in self.devices) or "none found"
        return f"<SdkInfo {self.compiler_name} (SDK {self.version or 'version unknown'}); devices {devs}>"


def sdk_root() -> Path:
    return Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT))


def _read_version(root: Path) -> str | None:
    """`<base_version>1.20</base_version> <build_id>2</build_id>` in versions/apps.xml (else platform.xml)."""
    for name in ("apps.xml", "platform.xml"):
        p = root / "versions" / name
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        base = re.search(r"<base_version>\s*([^<\s]+)\s*</base_version>", text)
        build = re.search(r"<build_id>\s*([^<\s]+)\s*</build_id>", text)
        if base:
            return base.group(1) + (f".{build.group(1)}" if build else "")
    return None


def parse_qaic_util(text: str) -> list[DeviceInfo]:
    """Parse `qaic-util -q`: a `QID <n>` line per device, then indented `Key:Value` lines."""
    devices: list[DeviceInfo] = []
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"QID\s+(\d+)", line)
        if m:
            devices.append(DeviceInfo(int(m.group(1))))
            continue
        if not devices or ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        key = key.lower()
        dev = devices[-1]
        if key == "status":
            dev.status = value
        elif key == "hw version":
            dev.hw_version = value
        elif key in ("nsp total", "nsp free"):
            try:
                setattr(dev, key.replace(" ", "_"), int(value))
            except ValueError:
                pass
    return devices


def _find_tool(root: Path, name: str) -> str | None:
    for sub in ("exec", "tools"):
        if (root / sub / name).is_file():
            return str(root / sub / name)
    return shutil.which(name)


def detect_sdk(root: Path | str | None = None, query_devices: bool = True) -> SdkInfo:
    """Look for the SDK under `root` (default $QEFF_LAB_QAIC_ROOT or /opt/qti-aic).

    The SDK counts as present when the root exists and a compiler is found in `<root>/exec` (or on PATH).
    With `query_devices`, `qaic-util -q` (in exec/ or tools/) lists the cards; its failure is recorded, not raised:
    a compile-only machine has a compiler and no card."""
    root = Path(root) if root is not None else sdk_root()
    if not root.exists():
        return SdkInfo(False, root)
    compiler: list[str] = []
    for name, prefix in COMPILERS:
        found = _find_tool(root, name)
        if found:
            compiler = [found, *prefix]
            break
    info = SdkInfo(bool(compiler), root, compiler, _read_version(root))
    if query_devices:
        util = _find_tool(root, "qaic-util")
        if util is None:
            info.util_error = f"qaic-util not found under {root}/exec or {root}/tools"
        else:
            try:
                proc = subprocess.run([util, "-q"], capture_output=True, text=True, timeout=30)
                info.devices = parse_qaic_util(proc.stdout)
                if proc.returncode != 0:
                    info.util_error = f"qaic-util -q exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as e:
                info.util_error = f"qaic-util -q failed: {e}"
    return info
