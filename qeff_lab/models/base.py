"""The one model pipeline every kind runs: load, record steps, transform, export, compile, open a session, and
the cache keys that cover everything shaping an artifact.

A kind (encoder, causal LM, sequence classifier, ...) is a small subclass that declares what differs, as
QEfficient's `_hf_auto_class` / `_pytorch_transforms` and optimum's per-architecture `inputs` / `outputs` do:

    _hf_auto_class        the transformers Auto class that loads it
    check_supported()     which configs it takes (a clear UnsupportedModelError otherwise)
    _pytorch_transforms() the transforms, each `fn(model) -> TransformResult`
    export_spec()         the module to export, example inputs, output names, dynamic axes, key options
    _compile_plan(...)    specializations (and names, custom IO) for compile(...)
    _open_runtime()       the session kind that runs the compile result
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from qeff_lab.contracts import Step
from qeff_lab.loading import ResolvedModel, resolve
from qeff_lab.pipeline import HtmlRepr, StepReport, TransformResult, show, state_dict_fingerprint, timed


class UnsupportedModelError(ValueError):
    """An architecture this model class cannot prepare."""


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def safe_name(name: str) -> str:
    """A folder-name-safe short form of a card or path (its last component)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split("/")[-1])[:60]


@dataclass
class ExportSpec:
    """What a kind exports: `module(**example_inputs) -> outputs`, with names and dynamic axes, and the kind's
    own options that shape the file (pooling, ...) for the cache key."""

    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    options: dict = field(default_factory=dict)
    layers: Any = None  # a qeff_lab.onnx.streamed.LayerStack when the kind has repeated layers the streamed route may clone

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)


@dataclass
class CompilePlan:
    """The specializations a kind compiles, their names, the device dtypes of custom IO, and the summary text."""

    specializations: list[dict[str, int]]
    summary: str
    spec_names: list[str] | None = None
    custom_io: dict[str, str] | None = None
    model_info: dict = field(default_factory=dict)


# Packages whose code never ends up in an exported graph: not followed when collecting a graph's source.
_NOT_IN_GRAPH = ("qeff_lab.views", "qeff_lab.runtime", "qeff_lab.compile", "qeff_lab.accuracy", "qeff_lab.cli",
                 "qeff_lab.commands", "qeff_lab.models")


def code_fingerprint(model: nn.Module, *extra: Any) -> tuple[str, list[str]]:
    """(hash, module names) of the source that shapes an export: the modules defining every class in the MRO
    of any submodule (swapped blocks, their mixins, and the transformers modeling code the generic path runs),
    the modules of `extra` objects (transform functions, the export wrapper), everything in qeff_lab those
    import (custom ops, contracts, ...), the export passes and the transformers version."""
    roots = {"qeff_lab.onnx.export", "qeff_lab.onnx.passes", "qeff_lab.ops.registry", "qeff_lab.contracts"}
    for module in model.modules():
        roots.update(k.__module__ for k in type(module).__mro__
                     if k.__module__.startswith(("qeff_lab.", "transformers.models.")))
    for obj in extra:
        mod = getattr(obj, "__module__", None) or type(obj).__module__
        inner = getattr(obj, "func", None)  # functools.partial
        roots.update(m for m in (mod, getattr(inner, "__module__", None)) if m)
    names = _with_qeff_imports(roots)
    h = hashlib.sha256(f"transformers {importlib.import_module('transformers').__version__}".encode())
    for name in sorted(names):
        h.update(name.encode())
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16], sorted(names)


def _with_qeff_imports(roots: set[str]) -> set[str]:
    """`roots` (qeff_lab and transformers modeling modules) plus every qeff_lab module they import, transitively
    (skipping the packages in _NOT_IN_GRAPH beyond the roots themselves)."""
    import sys

    seen: set[str] = set()
    todo = [r for r in roots if r.startswith(("qeff_lab.", "transformers.models."))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in vars(sys.modules.get(name) or importlib.import_module(name)).values():
            dep = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if (isinstance(dep, str) and dep.startswith("qeff_lab.") and dep not in seen
                    and not dep.startswith(_NOT_IN_GRAPH)):
                todo.append(dep)
    return seen


class QEFFBaseModel(HtmlRepr):
    """A HF model on its way to the device. Each step's report is kept in `steps` (in order)."""

    _hf_auto_class: ClassVar[str] = "AutoModel"  # name in transformers; imported when loading
    _kind: ClassVar[str] = "base"

    def __init__(self, model: nn.Module, resolved: ResolvedModel):
        self.model = model
        self.resolved = resolved
        self.model_name = resolved.name
        self.steps: "OrderedDict[str, StepReport]" = OrderedDict()
        self.export_result = None
        self.compile_result = None
        self._session = None
        self._session_devices: list[int] | None = None
        self._tokenizer = None
        self._weights_fp: str | None = None
        self._applied: list[Callable] = []

    # ------------------------------------------------------------------ what a kind declares
    @classmethod
    def check_supported(cls, config, what: str) -> None:
        """Raise UnsupportedModelError (model type, obstacle, what to do) for a config this kind cannot take."""

    def _pytorch_transforms(self) -> list[Callable[[nn.Module], TransformResult]]:
        return []

    def export_spec(self) -> ExportSpec:
        raise NotImplementedError

    def _open_runtime(self, device_ids: list[int] | None):
        from qeff_lab.runtime import open_session

        return open_session(self.compile_result, device_ids=device_ids)

    def _load_details(self, config) -> dict:
        return {}

    # ------------------------------------------------------------------ load
    @classmethod
    def _hf_class(cls):
        import transformers

        return getattr(transformers, cls._hf_auto_class)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, transform: bool = True, **kwargs: Any):
        """Load a card or local folder (fp32 unless `dtype` says otherwise) and, by default, transform it.
        Keyword arguments the kind takes (pooling, ...) go to the kind; the rest to the HF `from_pretrained`."""
        kind_options = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._kind_options()}
        cls._check_kind_options(**kind_options)
        from transformers import AutoConfig

        with timed() as elapsed:
            resolved = resolve(pretrained_model_name_or_path)
            config = AutoConfig.from_pretrained(resolved.path)
            cls.check_supported(config, repr(pretrained_model_name_or_path))
            kwargs.setdefault("dtype", torch.float32)
            hf = cls._hf_class().from_pretrained(resolved.path, **{**cls._load_kwargs(config), **kwargs}).eval()
        obj = cls(hf, resolved, **kind_options)
        details = {"model": resolved.name, "path": str(resolved.path), "source": resolved.source,
                   "class": type(hf).__name__, "layers": getattr(config, "num_hidden_layers", None),
                   "hidden": getattr(config, "hidden_size", None),
                   "heads": getattr(config, "num_attention_heads", None), "parameters": param_count(hf),
                   **obj._load_details(config)}
        obj._record(StepReport(Step.LOAD, "done", elapsed(), cls._load_summary(hf, config, resolved), details))
        if transform:
            obj.transform()
        return obj

    @classmethod
    def from_model(cls, model: nn.Module, *, name: str = "in-memory", transform: bool = True, **kind_options: Any):
        """Wrap an already-built HF model (e.g. a tiny random config in a test). It is changed in place."""
        cls.check_supported(model.config, type(model).__name__)
        cls._check_kind_options(**kind_options)
        obj = cls(model.eval(), ResolvedModel(name, Path("."), "in memory"), **kind_options)
        obj._record(StepReport(Step.LOAD, "done", 0.0, f"{type(model).__name__} (in memory)",
                               {"model": name, "class": type(model).__name__, **obj._load_details(model.config)}))
        if transform:
            obj.transform()
        return obj

    @classmethod
    def _kind_options(cls) -> set[str]:
        """Names of the keyword arguments of this kind's __init__ beyond (model, resolved)."""
        params = list(inspect.signature(cls.__init__).parameters)
        return set(params[3:])

    @classmethod
    def _check_kind_options(cls, **options: Any) -> None:
        """Validate kind options before the (slow) load."""

    @classmethod
    def _load_kwargs(cls, config) -> dict:
        return {}

    @staticmethod
    def _load_summary(hf: nn.Module, config, resolved: ResolvedModel) -> str:
        """The load step's one line, the same for every model kind."""
        return (f"{type(hf).__name__}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{param_count(hf) / 1e6:.1f}M params, from {resolved.source}")

    @property
    def tokenizer(self):
        """The model's own tokenizer, from the same resolved folder (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        return self._tokenizer

    def weights_fingerprint(self) -> str:
        if self._weights_fp is None:
            self._weights_fp = state_dict_fingerprint(self.model)
        return self._weights_fp

    # ------------------------------------------------------------------ transform
    def transform(self) -> StepReport:
        """Apply this kind's PyTorch transforms once; each reports what it changed (recorded as "transform")."""
        if Step.TRANSFORM in self.steps:
            return self.steps[Step.TRANSFORM]
        with timed() as elapsed:
            results = []
            for fn in self._pytorch_transforms():
                results.append(fn(self.model))
                self._applied.append(fn)
        n = sum(len(r.changes) for r in results)
        summary = self._transform_summary(results) or f"{n} change(s) in {len(results)} transform(s)"
        self._forget_artifacts()
        return self._record(StepReport(Step.TRANSFORM, "done", elapsed(), summary, results))

    def _transform_summary(self, results: list[TransformResult]) -> str | None:
        return None

    @property
    def transforms_applied(self) -> list[str]:
        rep = self.steps.get(Step.TRANSFORM)
        return [r.name for r in rep.details if r.modified] if rep else []

    def artifact_key(self, spec: ExportSpec, weights: Any = None) -> dict:
        """Everything that shapes the exported file: kind, config, weights (`weights`, when given, stands for
        them: the streamed route names its checkpoint instead of reading every byte), transforms applied (and the
        source of the code they run), precision fixes, the kind's options."""
        code, code_modules = code_fingerprint(self.model, spec.module, *self._applied)
        weights = weights if weights is not None else self.weights_fingerprint()
        return {"kind": self._kind, "config": self.model.config.to_dict(), "weights": weights,
                "transforms": self.transforms_applied + self.precision_fix_key(), "code": code,
                "code_modules": code_modules, "options": spec.options}

    # ------------------------------------------------------------------ export
    def export(self, external_data: bool | None = None, route: str | None = None) -> Path:
        """Export to ONNX into the content-addressed cache (reused when nothing that shapes it changed).
        `route`: "streamed" (weights never all in memory), "traced" (today's TorchScript export with the
        weights), or None to let export_route() choose; the export report says which ran and why."""
        from qeff_lab.onnx.export import export_module
        from qeff_lab.onnx.streamed import checkpoint_identity

        self._require(Step.TRANSFORM, "transform()")
        with timed() as elapsed:
            spec = self.export_spec()
            plan, why = self.export_route(spec, route)
            # from a checkpoint: its identity stands for the weights (hashing them would read every byte)
            weights = checkpoint_identity(plan.checkpoint) if plan is not None and plan.checkpoint else None
            result = export_module(spec.module.eval(), spec.example_inputs, spec.output_names, spec.dynamic_axes,
                                   self.artifact_key(spec, weights), name=safe_name(self.model_name),
                                   external_data=external_data, stream=plan, traced_reason=why if plan is None else "")
        self.export_result = result
        self._session = None
        n_clip = sum(len(p.changes) for p in result.passes if p.name == "FP16ClipConstants")
        ops = ", ".join(f"{k} x{v}" for k, v in result.custom_ops.items()) or "none"
        self._record(StepReport(Step.EXPORT, "reused" if result.reused else "done", elapsed(),
                                f"{result.folder.name}/{result.path.name}; {len(spec.input_names)} inputs, "
                                f"{len(spec.output_names)} outputs; custom ops: {ops}; {n_clip} constant(s) "
                                f"clipped to fp16; {result.route} route", result))
        return result.path

    def export_route(self, spec: ExportSpec, route: str | None = None):
        """(StreamPlan or None for the traced route, why). The streamed route needs a kind that declares its layer
        stack; it takes the weights from the safetensors checkpoint the model was loaded from. The traced route
        stays for models built in memory, precision-fixed models (their fixes may differ between layers) and
        kinds without a declared stack (encoders, the generic decoder path)."""
        from qeff_lab.onnx import export as export_mod
        from qeff_lab.onnx.export import STREAMED, TRACED, StreamPlan
        from qeff_lab.onnx.streamed import layer_signature, safetensors_files

        if route not in (None, STREAMED, TRACED):
            raise ValueError(f"route must be {STREAMED!r}, {TRACED!r} or None (choose), got {route!r}")
        if route == TRACED:
            return None, "asked for (route='traced')"
        files = safetensors_files(self.resolved.path) if self.resolved.source != "in memory" else []
        obstacle = None
        if spec.layers is None:
            obstacle = f"{self._kind} ({getattr(self, 'path', 'this kind')}) declares no repeated layer stack"
        elif Step.PRECISION_FIXES in self.steps:
            obstacle = "precision fixes are applied (they may differ between layers)"
        elif not files and route is None:
            obstacle = "the model was built in memory: no checkpoint to stream the weights from"
        size = sum(f.stat().st_size for f in files)
        if obstacle is None and route is None and files and size < export_mod.STREAM_ABOVE:
            obstacle = (f"the checkpoint ({size / 1e9:.2f} GB) is under {export_mod.STREAM_ABOVE / 2**30:g} GiB: the "
                        "traced route: its peak still fits, and its weights feed the MatMuls directly (the streamed graph "
                        "transposes each one; route='streamed' forces streaming)")
        if obstacle is not None:
            if route == STREAMED:
                raise ValueError(f"route='streamed' cannot apply: {obstacle}. Use route='traced' or None.")
            return None, obstacle
        owner_path, attr = spec.layers.path.rsplit(".", 1)
        layers = list(getattr(spec.module.get_submodule(owner_path), attr))
        same = all(layer_signature(m) == layer_signature(layers[0]) for m in layers[1:])
        prefix = next(p for p, m in spec.module.named_modules() if m is self.model)
        why = (f"{len(layers)} identical layers: traced on meta weights, layers cloned" if same else
               f"{len(layers)} layers that differ: every layer traced on meta weights")
        why += f", weights streamed from {len(files)} safetensors file(s)" if files else ", weights from memory"
        return StreamPlan(why, spec.layers if same else None, files or None, prefix + "." if prefix else ""), why

    def onnx_io(self):
        """The exported graph's inputs and outputs: name, direction, element type, shape (symbols kept)."""
        import onnx
        import pandas as pd

        if self.export_result is None:
            raise RuntimeError("Call export() (or compile()) first: there is no graph yet.")
        graph = onnx.load(str(self.export_result.path), load_external_data=False).graph
        rows = []
        for direction, values in (("input", graph.input), ("output", graph.output)):
            for v in values:
                t = v.type.tensor_type
                dims = [d.dim_param or d.dim_value for d in t.shape.dim]
                rows.append({"name": v.name, "direction": direction,
                             "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": str(dims)})
        return pd.DataFrame(rows, columns=["name", "direction", "dtype", "shape"])

    # ------------------------------------------------------------------ compile
    def _compile(self, plan: CompilePlan, *, backend: str | None, num_cores: int, options: dict,
                 mxfp6_matmul: bool = False) -> Path:
        """Compile the exported graph (exporting first when needed) for `plan`; records the "compile" step."""
        from qeff_lab.compile import check_compile_request, compile_graph

        options = check_compile_request(backend, options)  # fail fast: before the (slow) export
        if self.export_result is None:
            self.export()
        with timed() as elapsed:
            info = {"name": self.model_name, "class": type(self.model).__name__, "kind": self._kind,
                    "config": self.model.config.to_dict(), "transforms": self.transforms_applied, **plan.model_info}
            result = compile_graph(self.export_result.path, plan.specializations, backend=backend,
                                   num_cores=num_cores, spec_names=plan.spec_names, custom_io=plan.custom_io,
                                   mxfp6_matmul=mxfp6_matmul, options=options, model_info=info)
        self.compile_result = result
        self._session = None
        self._record(StepReport(Step.COMPILE, "reused" if result.reused else "done", elapsed(),
                                f"{result.backend} ({result.reason}); {plan.summary}", result))
        return result.folder

    def compile_artifacts(self) -> dict[str, str]:
        """The text of the compile folder's files a device compile reads (specializations, custom IO, ...)."""
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) first: there is no compile folder yet.")
        folder = self.compile_result.folder
        return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.suffix in (".json", ".yaml")
                and p.name != "manifest.json"}

    # ------------------------------------------------------------------ run
    def session(self, device_ids: list[int] | None = None):
        """The session (or KV runner) over the compiled graph, opened on first use and kept."""
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) before generate(...): nothing is compiled yet.")
        if self._session is None or self._session_devices != device_ids:
            self._session = self._open_runtime(device_ids)  # by the compile's backend
            creation = getattr(getattr(self._session, "ort", self._session), "creation", None)
            if creation is not None:  # the embedded backend: what opening it cost goes into the compile report
                self.compile_result.session = creation
            self._session_devices = device_ids
        return self._session

    # ------------------------------------------------------------------ precision
    def analyze(self, prompts, on: str = "pytorch", **options):
        """Profile calibration `prompts` (text, or token ids) in fp32 and list where fp16 would overflow or
        underflow, by module path and op (qeff_lab.precision.analyze; options: decode_steps, per_step, ...).
        Works before or after transforms; recorded as the "analyze" step. Returns a PrecisionReport.
        `on="onnx"`: the exported graph (exported first when needed) in ONNX Runtime, functions inlined, each
        finding naming its ONNX node, op type, function and module (what the compiler gets)."""
        from qeff_lab.precision import analyze

        if on == "onnx":
            options["onnx_model"] = self._exported_path()
        report = analyze(self.model, prompts, self._tokenizer_for(prompts), on=on, **options)
        self.precision_report = report
        self._record(StepReport(Step.ANALYZE, "done", report.seconds, report.summary(), report))
        return report

    def find_fp32_islands(self, prompts, metric: str = "token_match", target: float | None = None,
                          weights: str | None = None, npi_path: str | Path | None = None, **options):
        """Search the fewest modules to keep in fp32 so emulated fp16 (`weights="mxfp6"`: + MXFP6 weights)
        reaches `target` in `metric` ("token_match", "kl", "cosine") against fp32 on `prompts` (a few short
        ones), then write the NPI YAML for the exported graph (exported first when needed) to `npi_path`
        (default: the artifact cache's npi/ folder). Delegates to qeff_lab.precision.islands; returns its
        IslandSearch (islands, reasons, the accuracy of every step, the YAML's path and nodes)."""
        from qeff_lab.pipeline import cache_root
        from qeff_lab.precision.islands import find_fp32_islands

        onnx_path = self._exported_path()
        npi_path = npi_path or cache_root() / "npi" / f"{safe_name(self.model_name)}-{onnx_path.parent.name}-fp32-islands.yaml"
        return find_fp32_islands(self.model, prompts, self._tokenizer_for(prompts), metric=metric, target=target,
                                 weights=weights, onnx_model=onnx_path, npi_path=npi_path, **options)

    def _tokenizer_for(self, prompts):
        """The tokenizer when `prompts` are text (a string or a list of strings), None for token ids."""
        texts = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                             and all(isinstance(p, str) for p in prompts))
        return self.tokenizer if texts else None

    def _exported_path(self) -> Path:
        """The exported graph, exported first when needed."""
        return self.export() if self.export_result is None else self.export_result.path

    def fix_precision(self, report=None) -> StepReport:
        """Apply the exact fixes the findings call for (qeff_lab.precision.apply_fixes: overflow-safe norms,
        pre-scaled attention scores, safe tanh-GELU) on the modules `report` (default: the last analyze) names,
        or every fixable module when there is no report. Findings without an exact fix are left to the NPI YAML.
        Recorded as the "precision-fixes" step; a later export includes them; `unfix_precision()` undoes them."""
        from qeff_lab.precision import apply_fixes

        report = report if report is not None else getattr(self, "precision_report", None)
        with timed() as elapsed:
            results = apply_fixes(self.model, report.findings if report is not None else None)
        self._forget_artifacts()
        n = sum(len(r.changes) for r in results)
        summary = ", ".join(r.summary() for r in results) if n else results[0].summary()
        return self._record(StepReport(Step.PRECISION_FIXES, "done", elapsed(), summary, results))

    def unfix_precision(self) -> StepReport:
        """Switch the precision fixes off again (original classes and scales; weights untouched)."""
        from qeff_lab.precision import revert_fixes

        results = revert_fixes(self.model)
        self._forget_artifacts()
        self.steps.pop(Step.PRECISION_FIXES, None)
        return StepReport(Step.PRECISION_FIXES, "skipped", 0.0, "; ".join(r.summary() for r in results), results)

    def precision_fix_key(self) -> list[str]:
        """What the precision fixes changed, for export cache keys (a fixed graph is a different file)."""
        from qeff_lab.transforms.base import swapped_by

        fixes = ("SafeNorm", "SafeGELU", "PrescaledAttention")
        return [f"{name}:{path}" for path, m in self.model.named_modules() for name in swapped_by(m) if name in fixes]

    # ------------------------------------------------------------------ record and show
    def _forget_artifacts(self) -> None:
        self.export_result = self.compile_result = self._session = None

    def _require(self, step: str, call: str) -> None:
        if step not in self.steps:
            raise RuntimeError(f"Call {call} first: this step needs it ({', '.join(self.steps) or 'no steps'} done).")

    def _record(self, report: StepReport) -> StepReport:
        self.steps[report.step] = report
        return report

    def __repr__(self) -> str:
        done = ", ".join(self.steps) or "nothing yet"
        return f"{type(self).__name__}({self.model_name!r}; steps: {done})"

    def report(self, path: str = "report.html", title: str | None = None):
        """Write a self-contained HTML report of every step so far (tables, plots, findings; opens offline)."""
        return show(self, "report", path, title=title)

    def dashboard(self):
        """The pipeline dashboard widget: each step's status, time and summary; click one to open its view."""
        return show(self, "dashboard")
