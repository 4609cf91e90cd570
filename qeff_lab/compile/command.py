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
from qeff_lab.compile.sdk import DEFAULT_HW_VERSION

SPECIALIZATIONS = "specializations.json"
CUSTOM_IO = "custom_io.yaml"
MDP = "mdp_partition.json"
NPI = "node_precision_info.yaml"
QPC_DIR = "qpc"
QPC_FILE = "programqpc.bin"


def specialization_name(spec: dict, index: int) -> str:
    """A graph name for a specialization without one. Source: QEfficient/utils/_utils.py
    _infer_specialization_name (#904): seq_len 1 -> "Decode", other seq_len -> "Prefill", else "Graph_<i>"; an
    encoder's entry (seq_len, no ctx_len) -> "Embedding", the name QEfficient's embedding compile paths tag."""
    if "seq_len" not in spec:
        return f"Graph_{index}"
    if "ctx_len" not in spec:
        return "Embedding"
    return "Decode" if int(spec["seq_len"]) == 1 else "Prefill"


def dedup_specializations(specializations: list[dict[str, int]], names: list[str] | None = None
                          ) -> tuple[list[dict[str, int]], list[str] | None]:
    """Drop exact duplicate specializations (e.g. Prefill and Decode when prefill_seq_len=1), keeping the first.

    A kept entry that stood for differently named duplicates is named by its shape (seq_len 1 -> "Decode"): the
    compiler gets one graph per shape. Source: QEfficient keeps a single specialization when prefill_seq_len == 1
    (transformers/models/modeling_auto.py, QEFFAutoModelForCausalLM.compile: no decode entry when
    `prefill_seq_len == 1`) and names it Decode (#1006, 2026-05-22, "fix PL=1 specialization naming")."""
    if names is not None and len(names) != len(specializations):
        raise ValueError(f"{len(names)} specialization name(s) {names} for {len(specializations)} specialization(s).")
    kept: list[dict[str, int]] = []
    groups: list[list[str]] = []  # the names each kept entry stands for, in order
    for i, spec in enumerate(specializations):
        key = {k: int(v) for k, v in spec.items()}
        if key not in kept:
            kept.append(key)
            groups.append([])
        if names is not None:
            groups[kept.index(key)].append(names[i])
    if names is None:
        return kept, None
    return kept, [g[0] if len(set(g)) == 1 else specialization_name(spec, j)
                  for j, (spec, g) in enumerate(zip(kept, groups))]


def specializations_json(specializations: list[dict[str, int]], names: list[str] | None = None,
                         fmt: str = "named") -> dict:
    """`{"specializations": [...]}`: entries `{"name", "symbols"}` (fmt "named") or flat objects of strings (fmt
    "flat", what SDKs before named entries take). Sizes are written as strings: a flat-only compiler rejects any
    other JSON type ("[json.exception.type_error.302] type must be string", QEfficient issue #1129). Missing names
    are inferred as QEfficient does; a repeated name gets positional suffixes (`Decode_0`, `Decode_1`), as in
    QEfficient/utils/_utils.py to_named_specializations, so the compiler never sees two graphs with one name."""
    if names is not None and len(names) != len(specializations):
        raise ValueError(f"{len(names)} specialization name(s) {names} for {len(specializations)} specialization(s).")
    entries = []
    for i, spec in enumerate(specializations):
        symbols = {k: str(int(v)) for k, v in spec.items()}
        if fmt == "named":
            entries.append({"name": names[i] if names else specialization_name(spec, i), "symbols": symbols})
        else:
            entries.append(symbols)
    if fmt == "named":
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["name"]] = counts.get(e["name"], 0) + 1
        seen: dict[str, int] = {}
        for e in entries:
            n = e["name"]
            if counts[n] > 1:
                e["name"] = f"{n}_{seen.get(n, 0)}"
                seen[n] = seen.get(n, 0) + 1
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


def resolve_specializations_format(opts: CompileOptions, takes_named: bool) -> str:
    """The option when given; otherwise what the SDK generation takes (SdkInfo.takes_named_specializations: the
    version decides, not the mere presence of qaic-compile)."""
    if opts.specializations_format:
        return opts.specializations_format
    return "named" if takes_named else "flat"


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
    specializations: list[dict[str, int]]  # after dropping exact duplicates
    spec_names: list[str] | None
    aic_hw_version: str

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
    takes_named: bool = False,
    spec_names: list[str] | None = None,
    custom_io: dict[str, str] | None = None,
    hw_version: str | None = None,
) -> Plan:
    """Decide every artifact and flag. Flag order is fixed (what the docs show), so commands compare as text.

    `takes_named`: the SDK reads named specializations (SdkInfo.takes_named_specializations). `hw_version`: the
    card's -aic-hw-version (SdkInfo.aic_hw_version), used unless the aic_hw_version option is set; "ai100"
    without either. Exact duplicate specializations are dropped (see dedup_specializations)."""
    if not specializations:
        raise ValueError("At least one specialization (a dict of symbol -> size) is needed to compile.")
    specializations, spec_names = dedup_specializations(specializations, spec_names)
    fmt = resolve_specializations_format(opts, takes_named)
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

    hw = opts.aic_hw_version or hw_version or DEFAULT_HW_VERSION
    flags = ["-aic-hw", f"-aic-hw-version={hw}", "-m={onnx}"]
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
    return Plan(files, list(compiler), flags, retained, opts.num_devices, fmt, specializations, spec_names, hw)
