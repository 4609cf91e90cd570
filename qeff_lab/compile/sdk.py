"""Detect the Cloud AI 100 SDK: its root (`/opt/qti-aic`, or $QEFF_LAB_QAIC_ROOT), compiler, version, devices, and
what that SDK generation accepts (specializations format, hardware version).

Every rule below names its public source (QEfficient = github.com/quic/efficient-transformers)."""
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
# Source: QEfficient/utils/constants.py COMPILER: ["qaic-exec", "-aic-hw", "-compile-only"] from #669 (2025-12-20),
# ["qaic-compile", "-aic-hw"] from #703 (2026-02-03); -compile-only "deprecated from the compiler and no longer
# supported" for qaic-compile (#946, 2026-04-29; #1140, 2026-06-30).
COMPILERS = (("qaic-compile", ()), ("qaic-exec", ("-compile-only",)))

# The first SDK whose qaic-compile takes named specializations ({"name", "symbols"}). Sources: named entries were
# requested by the compiler team and written by QEfficient from #904 (2026-04-21, after the revert #902); SDK
# 1.22.0.17 was QEfficient's documented image before that (docs/source/finetune.md, #764, 2026-01-29) and took
# flat entries; issue #1129 (2026-06-26): qaic-compile of a then-current SDK exits 255 on named entries with
# "[json.exception.type_error.302] type must be string, but is object", "fixed in latest release SDK" (2026-08-15).
# No public note names the exact first version: 1.23 is the first release after the 1.22 line that fails, and an
# unknown version gets flat entries (which every SDK generation takes). specializations_format= overrides.
NAMED_SPECIALIZATIONS_SINCE = (1, 23)
# The -aic-hw-version values: "ai100" / "ai200" (QEfficient #528, 2025-09-05, "previously ... 2.0, which implicitly
# referred to AI100. This value is now deprecated").
HW_VERSIONS = ("ai100", "ai200")
DEFAULT_HW_VERSION = "ai100"  # QEfficient's fallback when no card answers (utils/constants.py)


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """"1.20.2" -> (1, 20, 2); None for a missing or unreadable version."""
    if not version:
        return None
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts) if parts else None


def hw_version_from_variant(variant: str | None) -> str | None:
    """The -aic-hw-version for a card from its `FW IMAGE_VARIANT` (qaic-util -q): "ai200" when it names AIC200,
    else "ai100". Source: QEfficient/utils/constants.py get_default_aic_hw_version (v1.22.0, #1029)."""
    if not variant:
        return None
    return "ai200" if "AIC200" in variant.upper() else "ai100"


@dataclass
class DeviceInfo:
    """One card (SoC) as `qaic-util -q` lists it."""

    qid: int
    status: str = "unknown"
    hw_version: str | None = None  # the "HW Version" field (e.g. 0.2.0.0): the board revision, not -aic-hw-version
    nsp_total: int | None = None
    nsp_free: int | None = None
    fw_image_variant: str | None = None  # "FW IMAGE_VARIANT", e.g. AIC100.REL

    @property
    def ready(self) -> bool:
        return self.status.lower() == "ready"

    @property
    def aic_hw_version(self) -> str | None:
        """What to pass as -aic-hw-version for this card ("ai100" / "ai200"), None when the firmware did not say."""
        return hw_version_from_variant(self.fw_image_variant)

    def usable(self, num_cores: int | None) -> bool:
        """Ready, and (when qaic-util reports it) at least `num_cores` NSP cores free."""
        return self.ready and (num_cores is None or self.nsp_free is None or self.nsp_free >= num_cores)

    def describe(self) -> str:
        free = f"{self.nsp_free}/{self.nsp_total} NSP free" if self.nsp_free is not None else "NSP free unknown"
        return f"QID {self.qid}: {self.status}, {free}"


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

    @property
    def aic_hw_version(self) -> str | None:
        """-aic-hw-version read from the first card (QID 0, as QEfficient does); None without a card."""
        return self.devices[0].aic_hw_version if self.devices else None

    @property
    def takes_named_specializations(self) -> bool:
        """Whether this SDK's compiler reads named specializations ({"name", "symbols"}): qaic-compile of SDK
        >= NAMED_SPECIALIZATIONS_SINCE. qaic-exec never does; an unknown version is treated as not."""
        v = version_tuple(self.version)
        return self.compiler_name == "qaic-compile" and v is not None and v[:2] >= NAMED_SPECIALIZATIONS_SINCE

    def command_prefix(self) -> list[str]:
        """The compiler to put in a command, also when the SDK is absent (a dry run shows the usual path)."""
        return list(self.compiler) if self.compiler else [str(self.root / "exec" / "qaic-compile")]

    def to_json(self) -> dict:
        return {"root": str(self.root), "present": self.present, "compiler": self.compiler, "version": self.version,
                "devices": [vars(d) for d in self.devices], "aic_hw_version": self.aic_hw_version,
                "takes_named_specializations": self.takes_named_specializations}

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
    """Parse `qaic-util -q`: a `QID <n>` line per device, then indented `Key:Value` lines (`Status:Ready`,
    `HW Version:0.2.0.0`, `FW IMAGE_VARIANT:AIC100.REL`, `Nsp Total:16`, `Nsp Free:16`, ...), the format the
    Platform SDK's tool prints (see tests/compile/test_sdk.py for a full record)."""
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
        elif key == "fw image_variant":
            dev.fw_image_variant = value or None
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
