"""Compile an exported graph for a backend: the AI 100 compiler (qaic) or the embedded ONNX Runtime.

Either way the compile folder holds what a device compile needs (specializations.json, custom_io.yaml for
decoders) and a backend.json saying which backend was chosen and why.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qeff_lab.compile.sdk import SdkInfo, detect_sdk
from qeff_lab.pipeline import build_artifact, cache_root, file_sha256, fingerprint

BACKENDS = ("qaic", "onnxruntime")


@dataclass
class CompileResult:
    folder: Path
    backend: str
    reason: str
    specializations: list[dict[str, int]]
    command: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def qpc_path(self) -> Path:
        return self.folder / "qpc"

    def __repr__(self) -> str:
        return f"<CompileResult {self.backend}: {len(self.specializations)} specialization(s), {self.folder.name}>"


def choose_backend(backend: str | None, sdk: SdkInfo | None = None) -> tuple[str, str]:
    """(backend, why). None means qaic when the SDK is present, else onnxruntime."""
    sdk = sdk or detect_sdk()
    if backend is None:
        if sdk.present:
            return "qaic", f"Cloud AI 100 SDK found at {sdk.root}"
        return "onnxruntime", f"no Cloud AI 100 SDK at {sdk.root}: using the embedded ONNX Runtime backend"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {BACKENDS} or None (automatic).")
    if backend == "qaic" and not sdk.present:
        raise RuntimeError(f"backend='qaic' needs the Cloud AI 100 SDK, which is not installed at {sdk.root}. "
                           "Install the SDK, or use backend='onnxruntime' (or None to choose automatically).")
    return backend, "asked for explicitly"


def specializations_json(specializations: list[dict[str, int]], names: list[str] | None = None) -> dict:
    entries = []
    for i, spec in enumerate(specializations):
        symbols = {k: str(v) for k, v in spec.items()}
        entries.append({"name": names[i], "symbols": symbols} if names else symbols)
    return {"specializations": entries}


def qaic_command(sdk: SdkInfo, onnx_path: Path, folder: Path, num_cores: int, retained_state: bool,
                 mxfp6_matmul: bool = False, extra: list[str] | None = None) -> list[str]:
    cmd = [*(sdk.compiler or ["qaic-compile"]), "-aic-hw", f"-aic-hw-version={sdk.hw_version or 'ai100'}",
           f"-m={onnx_path}", "-convert-to-fp16", f"-aic-num-cores={num_cores}",
           f"-network-specialization-config={folder / 'specializations.json'}"]
    if retained_state:
        cmd += ["-retained-state", f"-custom-IO-list-file={folder / 'custom_io.yaml'}"]
    if mxfp6_matmul:
        cmd.append("-mxfp6-matmul")
    cmd += list(extra or [])
    cmd.append(f"-aic-binary-dir={folder / 'qpc'}")
    return cmd


def compile_graph(
    onnx_path: Path,
    specializations: list[dict[str, int]],
    *,
    backend: str | None = None,
    num_cores: int = 16,
    spec_names: list[str] | None = None,
    custom_io: dict[str, str] | None = None,
    mxfp6_matmul: bool = False,
    options: dict | None = None,
) -> CompileResult:
    """Write the compile folder (content-addressed) and, for qaic, run the compiler into it."""
    sdk = detect_sdk()
    backend, reason = choose_backend(backend, sdk)
    key = {
        "onnx_sha256": file_sha256(onnx_path),
        "backend": backend,
        "specializations": specializations,
        "names": spec_names,
        "custom_io": custom_io,
        "num_cores": num_cores,
        "mxfp6_matmul": mxfp6_matmul,
        "options": options or {},
    }
    folder = cache_root() / "compile" / f"{backend}-{fingerprint(key)}"
    command: list[str] = []

    def build(tmp: Path) -> None:
        nonlocal command
        (tmp / "specializations.json").write_text(json.dumps(specializations_json(specializations, spec_names), indent=2))
        if custom_io:
            (tmp / "custom_io.yaml").write_text(yaml.safe_dump(
                [{"IOName": k, "Precision": v} for k, v in custom_io.items()], sort_keys=False))
        if backend == "qaic":
            # The compiler is given the final folder's paths: the temporary folder is renamed on success.
            command = qaic_command(sdk, onnx_path, tmp, num_cores, bool(custom_io), mxfp6_matmul)
            proc = subprocess.run(command, capture_output=True, text=True)
            (tmp / "compile.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0 or not (tmp / "qpc" / "programqpc.bin").is_file():
                raise RuntimeError(f"qaic compile failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        else:
            command = qaic_command(sdk, onnx_path, folder, num_cores, bool(custom_io), mxfp6_matmul)
        (tmp / "backend.json").write_text(json.dumps(
            {"backend": backend, "reason": reason, "onnx": str(onnx_path), "device_command": command}, indent=2))

    folder, reused = build_artifact(folder, key, build)
    meta = json.loads((folder / "backend.json").read_text())
    return CompileResult(folder, backend, reason, specializations, meta["device_command"], reused)
