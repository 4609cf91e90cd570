"""Detect the Cloud AI 100 SDK (`/opt/qti-aic`): compiler binary, devices, hardware version."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SdkInfo:
    present: bool
    root: Path
    compiler: list[str] = field(default_factory=list)  # the command prefix, e.g. [qaic-compile] or [qaic-exec, -compile-only]
    devices: list[int] = field(default_factory=list)
    hw_version: str | None = None

    def __repr__(self) -> str:
        if not self.present:
            return f"<SdkInfo: no Cloud AI 100 SDK at {self.root}>"
        return f"<SdkInfo {' '.join(self.compiler)}; devices {self.devices or 'none'}>"


def sdk_root() -> Path:
    return Path(os.environ.get("QEFF_LAB_QAIC_ROOT", "/opt/qti-aic"))


def detect_sdk() -> SdkInfo:
    """The SDK is present when its root exists and holds a compiler (or one is on PATH)."""
    root = sdk_root()
    if not root.exists():
        return SdkInfo(False, root)
    exec_dir = root / "exec"
    compiler: list[str] = []
    for name, prefix in (("qaic-compile", []), ("qaic-exec", ["-compile-only"])):
        found = exec_dir / name if (exec_dir / name).exists() else shutil.which(name)
        if found:
            compiler = [str(found), *prefix]
            break
    info = SdkInfo(bool(compiler), root, compiler)
    util = exec_dir / "qaic-util"
    if util.exists():
        try:
            out = subprocess.run([str(util), "-q"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("QID"):
                try:
                    info.devices.append(int(line.split()[1]))
                except (IndexError, ValueError):
                    pass
            elif line.startswith("Hw Version") and ":" in line:
                info.hw_version = line.split(":", 1)[1].strip()
    return info
