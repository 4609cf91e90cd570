"""compile_graph: choose the backend, write the content-addressed compile folder, run the AI 100 compiler into it."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

import qeff_lab
from qeff_lab.compile.command import QPC_DIR, QPC_FILE, Plan, plan_compile
from qeff_lab.compile.options import OPTIONS, CompileOptionError, CompileOptions, validate_options
from qeff_lab.compile import ort_encoder
from qeff_lab.compile.ort_rewrite import graph_choice_key, ort_graph_summary, plan_ort_graph
from qeff_lab.compile.runner import CompileError, FailureContext, explain_failure, make_sink, run_streaming
from qeff_lab.compile.sdk import ROOT_ENV, SdkInfo, detect_sdk
from qeff_lab.pipeline import HtmlRepr, build_artifact, cache_root, file_sha256, fingerprint
from qeff_lab.onnx.inspect import load_skeleton

BACKENDS = ("qaic", "onnxruntime")
QCONFIG = "qconfig.json"
LOG = "compile.log"
_PID_FILE = ".build.pid"


@dataclass
class CompileResult(HtmlRepr):
    """A compile folder and what made it. `backend` picks the session that runs it (see qeff_lab.runtime)."""

    folder: Path
    backend: str
    reason: str
    specializations: list[dict[str, int]]
    command: list[str] = field(default_factory=list)
    reused: bool = False
    onnx_path: Path | None = None
    dry_run: bool = False
    spec_names: list[str] | None = None
    custom_io: dict[str, str] | None = None
    options: CompileOptions | None = None
    sdk: SdkInfo | None = None
    seconds: float = 0.0  # time the compiler ran (0 when reused or nothing ran)
    # the embedded backend's session creation once it opened (seconds, peak_rss_gb, rss_increase_gb, weights_gb,
    # weights_mapped; see runtime.session.OrtSession.creation); None before that and for qaic
    session: dict | None = None

    @property
    def qpc_path(self) -> Path:
        return self.folder / QPC_DIR

    @property
    def num_devices(self) -> int:
        return self.options.num_devices if self.options else 1

    @property
    def command_line(self) -> str:
        """The command as one shell line, ready to paste into a terminal on a machine with the SDK."""
        return shlex.join(self.command)

    @property
    def artifacts(self) -> list[str]:
        """The files in the compile folder (relative names), the QPC's content summarised as one entry."""
        names = sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*")
                       if p.is_file() and p.parent.name != QPC_DIR)
        if self.qpc_path.is_dir():
            names.append(f"{QPC_DIR}/ ({sum(1 for p in self.qpc_path.rglob('*') if p.is_file())} file(s))")
        return names

    @property
    def qconfig(self) -> dict:
        return json.loads((self.folder / QCONFIG).read_text())

    @property
    def ort_graph(self) -> dict | None:
        """The embedded backend's own compile result: which graph it runs and why (qeff_lab.compile.ort_rewrite for
        decoders, qeff_lab.compile.ort_encoder for encoders); None for the qaic backend."""
        return self.qconfig.get("ort_graph") if self.backend == "onnxruntime" and not self.dry_run else None

    def __repr__(self) -> str:
        what = "qaic dry run" if self.dry_run else self.backend
        # no cache state here: a notebook's stored text must not depend on what ran before on the machine
        return f"<CompileResult {what}: {len(self.specializations)} specialization(s), {self.folder.name}>"


def choose_backend(backend: str | None, sdk: SdkInfo | None = None) -> tuple[str, str]:
    """(backend, why). None means qaic when the SDK is present, else onnxruntime."""
    sdk = sdk or detect_sdk(query_devices=False)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {BACKENDS} or None (automatic).")
    missing = (f"no Cloud AI 100 SDK at {sdk.root}" if not sdk.root.exists()
               else f"{sdk.root} exists but holds no qaic-compile or qaic-exec (in exec/ or on PATH)")
    if backend is None:
        if sdk.present:
            return "qaic", f"Cloud AI 100 SDK found at {sdk.root} ({sdk.compiler_name}, SDK {sdk.version or '?'})"
        return "onnxruntime", f"{missing}: using the embedded ONNX Runtime backend"
    if backend == "qaic" and not sdk.present:
        raise RuntimeError(
            f"backend='qaic' needs the Cloud AI 100 SDK, but there is {missing}. Install the SDK (or set "
            f"{ROOT_ENV} to its root), use backend='onnxruntime' (or None to choose automatically), or pass "
            "dry_run=True to get every artifact and the exact compiler command without compiling.")
    return backend, "asked for explicitly"


def check_compile_request(backend: str | None, options: dict | CompileOptions | None,
                          where: str = "compile") -> CompileOptions:
    """What a model's compile() calls before exporting (which can take minutes): the options are valid and, unless
    it is a dry run, the backend asked for is available. Raises what compile_graph would, only sooner."""
    opts = validate_options(options, where=where)
    if not opts.dry_run:
        choose_backend(backend)
    elif backend == "onnxruntime":
        raise ValueError("dry_run=True writes the AI 100 compiler's artifacts and command; with "
                         "backend='onnxruntime' there is no compiler to dry-run. Use backend=None or 'qaic'.")
    return opts


_ONNX_HASHES: dict[tuple, tuple[dict, str]] = {}  # (path, size, mtime) -> (external files' stats, digest)


def _stat_key(p: Path) -> tuple | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def onnx_fingerprint(path: Path) -> str:
    """sha256 over the ONNX file and every external-data file it references (the weights may live there).
    Remembered within the process while none of those files changes (size, mtime)."""
    memo = (str(path.resolve()), *_stat_key(path))
    hit = _ONNX_HASHES.get(memo)
    if hit and all(_stat_key(path.parent / loc) == st for loc, st in hit[0].items()):
        return hit[1]
    h = hashlib.sha256(file_sha256(path).encode())
    proto = load_skeleton(path)  # names and external-data refs only: no weights in memory
    locations = sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    stats = {}
    for loc in locations:
        ext = path.parent / loc
        if not ext.is_file():
            raise FileNotFoundError(f"{path} refers to external data {loc!r}, which is missing next to it. "
                                    "Export the model again.")
        stats[loc] = _stat_key(ext)
        h.update(f"{loc}:{file_sha256(ext)}".encode())
    _ONNX_HASHES[memo] = (stats, h.hexdigest())
    return h.hexdigest()


def check_npi_names(npi: Path | str, onnx_path: Path) -> None:
    """Every name in the NPI YAML must be a node output of this graph: a stale NPI (from another export) would
    otherwise fail deep in the compiler, or silently keep nothing in fp32."""
    import yaml

    data = yaml.safe_load(Path(npi).read_text()) or {}
    names = {n for v in data.values() for n in (v or [])}
    proto = load_skeleton(Path(onnx_path))
    outputs = {o for node in proto.graph.node for o in node.output}
    unknown = sorted(names - outputs)
    if unknown:
        raise ValueError(f"{npi} lists {len(unknown)} node output name(s) that {onnx_path.name} does not have, e.g. "
                         f"{unknown[:3]}. Write the NPI YAML for this export (qeff_lab.precision.npi.write_npi_yaml "
                         "with this ONNX), or remove those names.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(folder: Path) -> None:
    """Temporary build folders left by a killed process (its pid is gone) are removed; live ones are left alone."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            pid = int((tmp / _PID_FILE).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _qpc_complete(folder: Path) -> bool:
    p = folder / QPC_DIR / QPC_FILE
    return p.is_file() and p.stat().st_size > 0


def _merge_keywords(options, **keywords: tuple[Any, Any]) -> dict:
    """compile_graph's explicit keywords (num_cores=..., ...) and the options dict, which must not disagree."""
    given = options.non_default() if isinstance(options, CompileOptions) else dict(options or {})
    for name, (value, default) in keywords.items():
        if name in given and value != default and given[name] != value:
            raise CompileOptionError(f"compile(): {name} given twice with different values "
                                     f"({value!r} and {given[name]!r} in the options).")
        if name not in given and value != default:
            given[name] = value
    return given


def compile_graph(
    onnx_path: Path | str,
    specializations: list[dict[str, int]],
    *,
    backend: str | None = None,
    num_cores: int = 16,
    spec_names: list[str] | None = None,
    custom_io: dict[str, str] | None = None,
    mxfp6_matmul: bool = False,
    options: dict | CompileOptions | None = None,
    dry_run: bool = False,
    model_info: dict | None = None,
    sdk: SdkInfo | None = None,
) -> CompileResult:
    """Write the compile folder and, for the qaic backend, run the compiler into it.

    The folder (under the artifact cache, or `compile_dir`) is named `<kind>-<hash>`, the hash covering the
    command (with placeholder paths), every file the compiler reads (specializations, custom IO, MDP partition,
    NPI), the ONNX file's own hash (external data included) and, for qaic, the SDK version. kind is `qaic`
    (a finished QPC inside), `dryrun` (every artifact, no QPC) or `onnxruntime` (the same artifacts; the
    embedded backend runs the ONNX itself). A qaic folder is reused only with a complete QPC and a manifest that
    checks out; anything else is removed and rebuilt. `options` are validated (see qeff_lab.compile.options)."""
    opts = validate_options(_merge_keywords(options, num_cores=(num_cores, 16), mxfp6_matmul=(mxfp6_matmul, False),
                                            dry_run=(dry_run, False)))
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"No ONNX file at {onnx_path}: export the model first (model.export()).")
    specializations = [dict(s) for s in specializations]
    if opts.npi is not None:
        check_npi_names(opts.npi, onnx_path)
    sdk = sdk or detect_sdk()
    if opts.dry_run:
        if backend == "onnxruntime":
            raise ValueError("dry_run=True writes the AI 100 compiler's artifacts and command; with "
                             "backend='onnxruntime' there is no compiler to dry-run. Use backend=None or 'qaic'.")
        used, reason = "qaic", ("dry run: artifacts and command written, compiler not run"
                                + ("" if sdk.present else f" (no SDK at {sdk.root})"))
    else:
        used, reason = choose_backend(backend, sdk)
    plan = plan_compile(opts, specializations, compiler=sdk.command_prefix(),
                        takes_named=sdk.takes_named_specializations, spec_names=spec_names, custom_io=custom_io,
                        hw_version=sdk.aic_hw_version)
    specializations, spec_names = plan.specializations, plan.spec_names  # exact duplicates dropped
    compiles = used == "qaic" and not opts.dry_run
    key = {
        "command": plan.template,
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(plan.files.items())},
        "onnx_sha256": onnx_fingerprint(onnx_path),
        "sdk_version": sdk.version if compiles else None,
    }
    runs_ort = used == "onnxruntime" and not opts.dry_run
    encoder = ort_encoder.is_encoder_compile(specializations)  # its own rewrite (compile/ort_encoder.py)
    if runs_ort:
        key["ort_graph"] = ort_encoder.graph_choice_key() if encoder else graph_choice_key()
    kind = "dryrun" if opts.dry_run else used
    parent = Path(opts.compile_dir) if opts.compile_dir else cache_root() / "compile"
    folder = parent / f"{kind}-{fingerprint(key)}"
    command = plan.command(onnx_path, folder)
    ran = {"seconds": 0.0}

    if folder.exists() and compiles and not _qpc_complete(folder):
        shutil.rmtree(folder)  # half-written or tampered: never trusted
    if folder.parent.exists():
        _remove_stale_builds(folder)

    def build(tmp: Path) -> None:
        (tmp / _PID_FILE).write_text(str(os.getpid()))
        for name, text in plan.files.items():
            (tmp / name).write_text(text)
        qconfig = _qconfig(model_info, opts, used, reason, onnx_path, key, specializations, spec_names, custom_io,
                           plan, sdk, command)
        if runs_ort:  # the embedded backend's own compile result (the graph for the device is unchanged)
            plan_graph = ort_encoder.plan_encoder_graph if encoder else plan_ort_graph
            qconfig["ort_graph"] = plan_graph(onnx_path, tmp, specializations).to_json()
        (tmp / QCONFIG).write_text(json.dumps(qconfig, indent=2, default=str) + "\n")
        if compiles:
            _run_compiler(plan, onnx_path, tmp, folder, opts, sdk, ran)
        (tmp / _PID_FILE).unlink()

    folder, reused = build_artifact(folder, key, build)
    if compiles and not _qpc_complete(folder):  # cannot happen unless the folder changed under us
        shutil.rmtree(folder, ignore_errors=True)
        raise CompileError(f"{folder} has no complete QPC after compiling; it was removed. Compile again.")
    if runs_ort:  # which graph the embedded backend runs, also for a reused folder
        graph = json.loads((folder / QCONFIG).read_text()).get("ort_graph", {})
        reason = f"{reason}; {(ort_encoder.summary if graph.get('graph') == 'packed' else ort_graph_summary)(graph)}"
    return CompileResult(folder, used, reason, specializations, command, reused, onnx_path, opts.dry_run,
                         spec_names, custom_io, opts, sdk, ran["seconds"])


def _qconfig(model_info, opts, backend, reason, onnx_path, key, specializations, spec_names, custom_io, plan, sdk,
             command) -> dict:
    return {
        "qeff_lab": qeff_lab.__version__,
        "model": model_info or {},
        "backend": backend,
        "reason": reason,
        "dry_run": opts.dry_run,
        "onnx": {"path": str(onnx_path), "sha256": key["onnx_sha256"]},
        "options": {k: v for k, v in opts.to_json().items() if OPTIONS[k].shapes_output},
        "specializations": specializations,
        "specialization_names": spec_names,
        "specializations_format": plan.specializations_format,
        "custom_io": custom_io or {},
        "retained_state": plan.retained_state,
        "num_devices": plan.num_devices,
        "sdk": {**sdk.to_json(), "hw_version": sdk.hw_version},
        "aic_hw_version": plan.aic_hw_version,
        "command": command,
    }


def _run_compiler(plan: Plan, onnx_path: Path, tmp: Path, folder: Path, opts: CompileOptions, sdk: SdkInfo,
                  ran: dict) -> None:
    """Run the compiler into tmp/qpc, streaming its output; on failure keep the log beside the cache and raise."""
    log = tmp / LOG
    log.write_text(f"# qeff_lab compile into {folder.name} (built in {tmp.name}, renamed when the QPC is complete)\n")
    outcome = run_streaming(plan.command(onnx_path, tmp), log, make_sink(opts.stream, f"{sdk.compiler_name}: "
                                                                                      f"{folder.name}"),
                            timeout_s=opts.timeout_s)
    ran["seconds"] = outcome.seconds
    if outcome.returncode == 0 and _qpc_complete(tmp):
        return
    kept = folder.parent / f"failed-{folder.name}.log"
    shutil.copyfile(log, kept)
    flag_sources = {f.split("=")[0]: "extra_flags" for f in opts.extra_flags}
    for name, value in opts.non_default().items():
        if OPTIONS[name].flag:
            flag_sources.setdefault(OPTIONS[name].flag.split("=")[0], f"{name}={value!r}")
    ctx = FailureContext(sdk.compiler_name or "qaic-compile", sdk.version, plan.specializations_format, flag_sources,
                         opts.timeout_s)
    output = "\n".join(line for line in log.read_text(errors="replace").splitlines()
                       if not line.startswith(("$ ", "# ")))  # the compiler's own words, not our command line
    advice = explain_failure(output, outcome.returncode, ctx)
    if outcome.timed_out:
        advice.insert(0, f"Stopped after timeout_s={opts.timeout_s}: give it more time (large models take tens of "
                         "minutes) or reduce the work (fewer specializations, smaller ctx_len).")
    tail = "\n".join("    " + line for line in outcome.lines[-25:])
    status = "was stopped (timeout)" if outcome.timed_out else f"exited {outcome.returncode}"
    msg = (f"The AI 100 compiler {status} for {onnx_path.name}; the half-written compile folder was removed.\n"
           + ("".join(f"  - {a}\n" for a in advice) if advice else
              "  - No known failure pattern matched: read the compiler output below and the full log.\n")
           + f"Last lines of the compiler output:\n{tail}\nFull log: {kept}\nCommand: {shlex.join(plan.command(onnx_path, folder))}")
    raise CompileError(msg, outcome.returncode, advice, kept, plan.command(onnx_path, folder))
