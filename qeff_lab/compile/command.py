"""The compiler command and the files it reads (specializations, custom IO, MDP partition, NPI), built from options.

Everything here is a pure function of its arguments, so the command and the artifacts can be pinned by golden
tests and the compile folder can be named by their hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from qeff_lab.compile.options import CompileOptions

SPECIALIZATIONS = "specializations.json"
CUSTOM_IO = "custom_io.yaml"
MDP = "mdp_partition.json"
NPI = "node_precision_info.yaml"
QPC_DIR = "qpc"
QPC_FILE = "programqpc.bin"


def specializations_json(specializations: list[dict[str, int]], names: list[str] | None = None,
                         fmt: str = "named") -> dict:
    """`{"specializations": [...]}`: entries `{"name", "symbols"}` (fmt "named", needs names) or flat objects of
    strings (fmt "flat", what older SDKs take). Sizes are written as strings, as the compiler expects."""
    if names is not None and len(names) != len(specializations):
        raise ValueError(f"{len(names)} specialization name(s) {names} for {len(specializations)} specialization(s).")
    entries = []
    for i, spec in enumerate(specializations):
        symbols = {k: str(int(v)) for k, v in spec.items()}
        if fmt == "named":
            entries.append({"name": names[i] if names else f"Specialization{i}", "symbols": symbols})
        else:
            entries.append(symbols)
    return {"specializations": entries}


def custom_io_yaml(custom_io: dict[str, str]) -> str:
    """Blocks of `- IOName: past_key.0` / `Precision: float16`, in the given order."""
    return yaml.safe_dump([{"IOName": k, "Precision": v} for k, v in custom_io.items()], sort_keys=False)


def mdp_partition_config(num_devices: int, num_cores: int) -> dict:
    """One partition over `num_devices` devices (tensor slicing), all connected peer to peer."""
    return {
        "connections": [{"devices": list(range(num_devices)), "type": "p2p"}],
        "partitions": [{"name": "Partition0",
                        "devices": [{"deviceId": d, "numCores": num_cores} for d in range(num_devices)]}],
    }


def resolve_specializations_format(opts: CompileOptions, legacy_compiler: bool, names: list[str] | None) -> str:
    if opts.specializations_format:
        return opts.specializations_format
    return "flat" if legacy_compiler or not names else "named"


@dataclass
class Plan:
    """The files a compile folder holds besides the QPC (name -> text) and the command that uses them.

    `command(onnx, folder)` fills in real paths; `template` is the same command with placeholders, which (with the
    files' text) names the folder."""

    files: dict[str, str]
    compiler: list[str]
    flags: list[str]  # with {folder} and {onnx} placeholders
    retained_state: bool
    num_devices: int
    specializations_format: str

    def command(self, onnx: Path | str, folder: Path | str) -> list[str]:
        return [*self.compiler, *(f.replace("{onnx}", str(onnx)).replace("{folder}", str(folder)) for f in self.flags)]

    @property
    def template(self) -> list[str]:
        return self.command("<onnx>", "<compile-folder>")


def plan_compile(
    opts: CompileOptions,
    specializations: list[dict[str, int]],
    *,
    compiler: list[str],
    legacy_compiler: bool = False,
    spec_names: list[str] | None = None,
    custom_io: dict[str, str] | None = None,
) -> Plan:
    """Decide every artifact and flag. Flag order is fixed (what the docs show), so commands compare as text."""
    if not specializations:
        raise ValueError("At least one specialization (a dict of symbol -> size) is needed to compile.")
    fmt = resolve_specializations_format(opts, legacy_compiler, spec_names)
    files = {SPECIALIZATIONS: json.dumps(specializations_json(specializations, spec_names, fmt), indent=2) + "\n"}
    retained = bool(custom_io) if opts.retained_state is None else opts.retained_state
    if custom_io:
        files[CUSTOM_IO] = custom_io_yaml(custom_io)
    if opts.mdp_config is not None:
        mdp = opts.mdp_config if isinstance(opts.mdp_config, dict) else json.loads(Path(opts.mdp_config).read_text())
        files[MDP] = json.dumps(mdp, indent=2) + "\n"
    elif opts.num_devices > 1:
        files[MDP] = json.dumps(mdp_partition_config(opts.num_devices, opts.num_cores), indent=2) + "\n"
    if opts.npi is not None:
        files[NPI] = Path(opts.npi).read_text()  # a copy, so the folder is self-contained and hashed by content

    flags = ["-aic-hw", f"-aic-hw-version={opts.aic_hw_version}", "-m={onnx}"]
    if retained:
        flags.append("-retained-state")
    if opts.convert_to_fp16:
        flags.append("-convert-to-fp16")
    if opts.mxfp6_matmul:
        flags.append("-mxfp6-matmul")
    flags.append(f"-aic-num-cores={opts.num_cores}")
    if opts.mos is not None:
        flags.append(f"-mos={opts.mos}")
    if opts.mdts_mos is not None:
        flags.append(f"-mdts-mos={opts.mdts_mos}")
    if opts.aic_enable_depth_first:
        flags.append("-aic-enable-depth-first")
    if opts.aic_perf_metrics:
        flags.append("-aic-perf-metrics")
    if NPI in files:
        flags.append(f"-node-precision-info={{folder}}/{NPI}")
    if MDP in files:
        flags.append(f"-mdp-load-partition-config={{folder}}/{MDP}")
    flags.append(f"-network-specialization-config={{folder}}/{SPECIALIZATIONS}")
    if CUSTOM_IO in files:
        flags.append(f"-custom-IO-list-file={{folder}}/{CUSTOM_IO}")
    flags.extend(opts.extra_flags)
    flags.append(f"-aic-binary-dir={{folder}}/{QPC_DIR}")
    return Plan(files, list(compiler), flags, retained, opts.num_devices, fmt)
