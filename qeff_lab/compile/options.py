"""Compile options: one table of every option qeff_lab models (type, default, compiler flag), and its validation.

Unlike QEfficient, which turns any unknown keyword into a compiler flag, an unknown option here is an error that
names the closest known one; raw flags go through `extra_flags=[...]`, on purpose and visibly.
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MAX_CORES = 16  # NSP cores on one AI 100 SoC


class CompileOptionError(TypeError, ValueError):
    """An unknown compile option, or a value of the wrong type or range (both a TypeError and a ValueError)."""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    types: tuple  # accepted types (bool is never accepted as an int)
    default: Any
    help: str
    flag: str | None = None  # "-mos={}" (valued) or "-aic-enable-depth-first" (switch); None: not a plain flag
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    shapes_output: bool = True  # False for options that only steer the run (dry_run, stream, compile_dir, ...)


def _positive(v) -> str | None:
    return None if v is None or v >= 1 else "must be >= 1"


def _cores(v) -> str | None:
    return None if 1 <= v <= MAX_CORES else f"must be between 1 and {MAX_CORES} (NSP cores per AI 100 device)"


def _choice(*allowed):
    return lambda v: None if v is None or v in allowed else f"must be one of {allowed}"


def _existing_file(v) -> str | None:
    return None if v is None or Path(v).is_file() else f"file not found: {v}"


NPI_KEYS = ("FP32NodeInstanceNames", "FP16NodeInstanceNames")


def _npi_file(v) -> str | None:
    """An NPI YAML: a mapping of FP32NodeInstanceNames / FP16NodeInstanceNames to lists of node output names."""
    if v is None:
        return None
    missing = _existing_file(v)
    if missing:
        return missing + " (write one with qeff_lab.precision.npi.write_npi_yaml)"
    import yaml

    try:
        data = yaml.safe_load(Path(v).read_text())
    except yaml.YAMLError as e:
        return f"is not valid YAML ({e})"
    if not isinstance(data, dict) or not data or set(data) - set(NPI_KEYS):
        return f"must be a mapping with keys among {NPI_KEYS}, got {sorted(data) if isinstance(data, dict) else data!r}"
    for key, names in data.items():
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            return f"{key} must be a list of node output names"
    return None


def _mdp_config(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (str, Path)):
        return _existing_file(v)
    if not isinstance(v.get("partitions"), list) or not v["partitions"]:
        return "must hold a non-empty 'partitions' list (see mdp_partition_config())"
    return None


def _flags(v) -> str | None:
    for f in v:
        if not isinstance(f, str):
            return f"must be a list of strings, got {f!r}"
        if not f.startswith("-"):
            return f"each item must be a compiler flag starting with '-', got {f!r}"
        if any(c.isspace() for c in f.split("=", 1)[0]):
            return f"give each flag as its own item (no spaces in a flag name), got {f!r}"
    return None


PATH = (str, Path)
NONE = (type(None),)
SPECS: list[OptionSpec] = [
    OptionSpec("num_cores", (int,), 16, "NSP cores per device to compile for", "-aic-num-cores={}", _cores),
    # None: read from the card (FW IMAGE_VARIANT in `qaic-util -q`), "ai100" without one; values per QEfficient #528
    OptionSpec("aic_hw_version", (str,) + NONE, None,
               "target hardware (-aic-hw-version): 'ai100' or 'ai200'; None: the card's, else ai100",
               "-aic-hw-version={}", _choice("ai100", "ai200")),
    OptionSpec("convert_to_fp16", (bool,), True, "run fp32 parts of the graph in fp16", "-convert-to-fp16"),
    OptionSpec("mxfp6_matmul", (bool,), False, "compress constant MatMul weights to MXFP6", "-mxfp6-matmul"),
    OptionSpec("retained_state", (bool,) + NONE, None,
               "keep X_RetainedState outputs on the device; None: on when custom IO is given (decoders)",
               "-retained-state"),
    OptionSpec("mos", (int,) + NONE, None, "memory-optimisation effort (-mos)", "-mos={}", _positive),
    OptionSpec("mdts_mos", (int,) + NONE, None, "memory-optimisation effort across devices (-mdts-mos)",
               "-mdts-mos={}", _positive),
    OptionSpec("aic_enable_depth_first", (bool,), False, "depth-first scheduling (-aic-enable-depth-first)",
               "-aic-enable-depth-first"),
    OptionSpec("aic_perf_metrics", (bool,), False, "collect performance metrics (-aic-perf-metrics)",
               "-aic-perf-metrics"),
    OptionSpec("num_devices", (int,), 1, "devices to split the model over (writes an MDP partition JSON)",
               None, _positive),
    OptionSpec("mdp_config", (dict,) + PATH + NONE, None,
               "your own MDP partition config (dict or JSON path) instead of the generated one", None, _mdp_config),
    OptionSpec("npi", PATH + NONE, None, "node-precision-info YAML (from the precision lab)", None, _npi_file),
    OptionSpec("specializations_format", (str,) + NONE, None,
               "'named' ({name, symbols}) or 'flat'; None: what the SDK version takes (named from SDK 1.23)",
               None, _choice("named", "flat")),
    OptionSpec("extra_flags", (list, tuple), (), "raw compiler flags qeff_lab does not model", None, _flags),
    # steer the run, do not shape the output
    OptionSpec("dry_run", (bool,), False, "write every artifact and return the command without running it",
               shapes_output=False),
    OptionSpec("compile_dir", PATH + NONE, None, "parent folder for compile folders (default: the artifact cache)",
               shapes_output=False),
    OptionSpec("stream", (bool,) + NONE + (Callable,), None,
               "compiler output: None/True live (notebook or terminal), False quiet, or a function of each line",
               shapes_output=False),
    OptionSpec("timeout_s", (int, float) + NONE, None, "stop the compiler after this many seconds",
               shapes_output=False, check=lambda v: None if v is None or v > 0 else "must be > 0"),
]
OPTIONS: dict[str, OptionSpec] = {s.name: s for s in SPECS}

# Names people bring from QEfficient or from the flags themselves: say which option means that here.
ALIASES = {
    "mxfp6": "mxfp6_matmul",
    "mxint8": "mxint8_kv_cache",
    "device_group": "num_devices (at compile; device_ids at run)",
    "aic_num_cores": "num_cores",
    "node_precision_info": "npi",
    "mdp_load_partition_config": "mdp_config",
    "mdp_ts_num_devices": "num_devices",
    "enable_depth_first": "aic_enable_depth_first",
    "compiler_flags": "extra_flags",
    "flags": "extra_flags",
    "qpc_path": "compile_dir",
    "custom_io_file": "custom_io (the model writes it)",
}

# Flags qeff_lab sets itself: extra_flags may not repeat them (the option, or the artifact, says it).
OWNED_FLAGS = {
    "-m": "the exported ONNX", "-aic-binary-dir": "the compile folder's qpc/",
    "-network-specialization-config": "the specializations", "-custom-IO-list-file": "custom_io",
    "-mdp-load-partition-config": "num_devices / mdp_config", "-node-precision-info": "npi",
    "-compile-only": "the SDK detection (added for qaic-exec)", "-aic-hw": "always set",
    **{s.flag.split("=")[0]: s.name for s in SPECS if s.flag},
}


def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    for t in types:
        if t is int and isinstance(value, numbers.Integral):
            return True
        if t is float and isinstance(value, numbers.Real):
            return True
        if t is Callable and callable(value):
            return True
        if isinstance(t, type) and t is not Callable and isinstance(value, t):
            return True
    return False


def _type_names(types: tuple) -> str:
    return " or ".join("None" if t is type(None) else ("callable" if t is Callable else t.__name__) for t in types)


def suggest(name: str, known) -> str | None:
    """The closest known option to `name`, or an alias's meaning."""
    if name in ALIASES:
        return ALIASES[name]
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    starts = [k for k in known if k.startswith(name) or name.startswith(k) or name in k]
    return starts[0] if starts else (difflib.get_close_matches(name, known, n=1, cutoff=0.45) or [None])[0]


class CompileOptions:
    """Validated compile options: every modeled option with its value (defaults filled in).

    >>> CompileOptions.validate({"mxfp6_matmul": True}).mxfp6_matmul
    True
    """

    def __init__(self, values: dict[str, Any]):
        self._values = values

    @classmethod
    def validate(cls, given: dict[str, Any] | "CompileOptions" | None = None, *, where: str = "compile",
                 also_known: set[str] | frozenset = frozenset()) -> "CompileOptions":
        """Check names, types and ranges. `also_known`: names the caller handles itself (they are ignored here
        but count as known, so they are not reported as unknown)."""
        if isinstance(given, CompileOptions):
            return given
        given = dict(given or {})
        values = {s.name: s.default for s in SPECS}
        for name, value in given.items():
            if name in also_known:
                continue
            spec = OPTIONS.get(name)
            if spec is None:
                hint = suggest(name, set(OPTIONS) | set(also_known))
                raise CompileOptionError(
                    f"{where}() got an unknown option {name!r}." + (f" Did you mean {hint!r}?" if hint else "")
                    + f" Known options: {', '.join(sorted(set(OPTIONS) | set(also_known)))}. "
                    "A compiler flag qeff_lab does not model can be passed as extra_flags=['-flag=value'].")
            if not _type_ok(value, spec.types):
                raise CompileOptionError(f"{where}(): option {name}={value!r} has type {type(value).__name__}; "
                                         f"expected {_type_names(spec.types)} ({spec.help}).")
            problem = spec.check(value) if spec.check else None
            if problem:
                raise CompileOptionError(f"{where}(): option {name}={value!r} {problem}.")
            values[name] = list(value) if name == "extra_flags" else value
        for flag in values["extra_flags"]:
            owner = OWNED_FLAGS.get(flag.split("=", 1)[0])
            if owner:
                raise CompileOptionError(
                    f"{where}(): extra_flags has {flag!r}, which qeff_lab sets itself from {owner}: "
                    "use that instead, so the command, the artifacts and the folder's hash agree.")
        if isinstance(values["mdp_config"], dict):
            n = len({d.get("deviceId") for p in values["mdp_config"]["partitions"] for d in p.get("devices", [])})
            if "num_devices" in given and values["num_devices"] != n:
                raise CompileOptionError(f"{where}(): num_devices={values['num_devices']} but mdp_config places "
                                         f"the model on {n} device(s).")
            values["num_devices"] = max(n, 1)
        return cls(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> "CompileOptions":
        return CompileOptions.validate({**self.non_default(), **changes})

    def non_default(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if v != OPTIONS[k].default}

    def to_json(self) -> dict[str, Any]:
        """Every option as JSON data (paths as strings, a stream function by name)."""
        out = {}
        for k, v in self._values.items():
            if isinstance(v, Path):
                v = str(v)
            elif callable(v) and not isinstance(v, bool):
                v = getattr(v, "__name__", "callable")
            out[k] = v
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, CompileOptions) and self._values == other._values

    def __repr__(self) -> str:
        nd = self.non_default()
        return "CompileOptions(" + ", ".join(f"{k}={v!r}" for k, v in sorted(nd.items())) + ")"


def validate_options(given: dict[str, Any] | None, where: str = "compile", also_known=frozenset()) -> CompileOptions:
    return CompileOptions.validate(given, where=where, also_known=also_known)


def options_table():
    """Every option as a DataFrame (name, type, default, flag, what it does): for the notebook and the docs."""
    import pandas as pd

    return pd.DataFrame([{"option": s.name, "type": _type_names(s.types), "default": repr(s.default),
                          "flag": s.flag.split("=")[0] if s.flag else "", "what": s.help} for s in SPECS])
