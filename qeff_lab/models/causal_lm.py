"""QEFFAutoModelForCausalLM: decoders with a retained-state KV cache: transform, export, compile, generate."""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qeff_lab.compile import CompileResult, check_compile_request, compile_graph
from qeff_lab.models.base import QEFFBaseModel, UnsupportedModelError, param_count
from qeff_lab.onnx.export import ExportResult, export_module
from qeff_lab.pipeline import StepReport, timed
from qeff_lab.runtime.generation import GenerationResult, TorchKVRunner, generate_ids
from qeff_lab.runtime.kv_session import RETAINED_SUFFIX, OrtKVSession
from qeff_lab.transforms.families import FAMILIES
from qeff_lab.transforms.kv_cache import Family, SwapResult, kv_cache_transform

RUNTIMES = ("compiled", "pytorch")


def supported_families() -> str:
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())


def _code_fingerprint(family: Family) -> str:
    """Hash of the source that shapes the exported graph: the ops, the shared blocks, the family's file."""
    import importlib

    names = ["qeff_lab.ops.ctx", "qeff_lab.ops.rms_norm", "qeff_lab.transforms.kv_cache",
             next(iter(family.swaps.values())).__module__]
    h = hashlib.sha256()
    for name in names:  # by module name: qeff_lab.ops.rms_norm the attribute is the function, not the module
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


class KVExportWrapper(nn.Module):
    """Flat signature for export: (input_ids, position_ids, past_key.0, past_value.0, ...) ->
    (logits, past_key.0_RetainedState, past_value.0_RetainedState, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *past):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, new_past = self.model(input_ids, position_ids, pairs)
        return (logits, *[t for pair in new_past for t in pair])


class QEFFAutoModelForCausalLM(QEFFBaseModel):
    """A causal LM prepared for Cloud AI 100 (or the embedded ONNX Runtime backend), its KV cache kept on the
    device between steps.

    >>> model = QEFFAutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> model.compile(prefill_seq_len=32, ctx_len=256, num_cores=16)
    >>> model.generate(tokenizer, prompts=["What is the capital of France?"], generation_len=32).texts
    """

    def __init__(self, model: nn.Module, resolved, family: Family):
        super().__init__(model, resolved)
        self.family = family
        self.export_result: ExportResult | None = None
        self.compile_result: CompileResult | None = None
        self.compile_shapes: dict[str, int] | None = None
        self._session: OrtKVSession | None = None

    # ------------------------------------------------------------------ load
    @staticmethod
    def family_for(config, what: str) -> Family:
        family = FAMILIES.get(getattr(config, "model_type", None))
        if family is None:
            archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
            raise UnsupportedModelError(
                f"{what} is a {getattr(config, 'model_type', None)!r} model ({archs}); QEFFAutoModelForCausalLM "
                f"supports {supported_families()}. For encoders use QEFFAutoModel.")
        return family

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, transform: bool = True,
                        **kwargs: Any) -> "QEFFAutoModelForCausalLM":
        """Load a card or local folder (fp32, eager attention) and, by default, apply the KV-cache transform."""
        with timed() as elapsed:
            resolved, config = cls._resolve_config(pretrained_model_name_or_path)
            family = cls.family_for(config, repr(pretrained_model_name_or_path))
            kwargs.setdefault("dtype", torch.float32)
            kwargs.setdefault("attn_implementation", "eager")
            hf = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs).eval()
        obj = cls(hf, resolved, family)
        obj._record(StepReport(
            "load", "done", elapsed(), cls._load_summary(hf, config, resolved),
            {"model": resolved.name, "path": str(resolved.path), "source": resolved.source, "family": family.name,
             "class": type(hf).__name__, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
             "heads": config.num_attention_heads,
             "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
             "vocab": config.vocab_size, "parameters": param_count(hf)}))
        if transform:
            obj.transform()
        return obj

    @classmethod
    def from_model(cls, model: nn.Module, name: str = "in-memory", transform: bool = True) -> "QEFFAutoModelForCausalLM":
        """Wrap an already-built HF causal LM (e.g. a tiny random config in a test). It is changed in place."""
        from qeff_lab.loading import ResolvedModel

        family = cls.family_for(model.config, type(model).__name__)
        if not isinstance(model, family.causal_lm):
            raise UnsupportedModelError(f"{type(model).__name__} is a {family.name} model but not its causal LM "
                                        f"class {family.causal_lm.__name__}.")
        obj = cls(model.eval(), ResolvedModel(name, Path("."), "in memory"), family)
        obj._record(StepReport("load", "done", 0.0, f"{type(model).__name__} (in memory)",
                               {"model": name, "family": family.name}))
        if transform:
            obj.transform()
        return obj

    # ------------------------------------------------------------------ transform
    def transform(self) -> StepReport:
        if "transform" in self.steps:
            return self.steps["transform"]
        with timed() as elapsed:
            result = kv_cache_transform(self.model, self.family)
        return self._record(StepReport("transform", "done", elapsed(),
                                       f"{len(result.changes)} module(s) swapped, {len(result.kept)} kept", [result]))

    @property
    def swap_report(self) -> SwapResult:
        self._require("transform", "transform()")
        return self.steps["transform"].details[0]

    def _require(self, step: str, call: str) -> None:
        if step not in self.steps:
            raise RuntimeError(f"Call {call} first: this step needs it ({', '.join(self.steps) or 'no steps'} done).")

    @property
    def num_layers(self) -> int:
        return len(self.model.kv_cache_layout())

    # ------------------------------------------------------------------ export
    def io_names(self) -> tuple[list[str], list[str]]:
        n = self.num_layers
        past = [f"past_{kind}.{i}" for i in range(n) for kind in ("key", "value")]
        return ["input_ids", "position_ids", *past], ["logits", *[p + RETAINED_SUFFIX for p in past]]

    def export(self, external_data: bool | None = None) -> Path:
        """Export to ONNX (dynamic batch_size, seq_len, ctx_len) into the content-addressed cache."""
        self._require("transform", "transform()")
        with timed() as elapsed:
            inputs, outputs = self.io_names()
            batch, seq, ctx = 2, 8, 32
            example: dict[str, torch.Tensor] = {
                "input_ids": torch.ones(batch, seq, dtype=torch.long),
                "position_ids": torch.arange(seq, dtype=torch.long)[None].repeat(batch, 1)}
            for (heads, dim), i in zip(self.model.kv_cache_layout(), range(self.num_layers)):
                example[f"past_key.{i}"] = torch.zeros(batch, heads, ctx, dim)
                example[f"past_value.{i}"] = torch.zeros(batch, heads, ctx, dim)
            axes = {"input_ids": {0: "batch_size", 1: "seq_len"}, "position_ids": {0: "batch_size", 1: "seq_len"},
                    "logits": {0: "batch_size"}}
            for name in inputs[2:]:
                axes[name] = {0: "batch_size", 2: "ctx_len"}
                axes[name + RETAINED_SUFFIX] = {0: "batch_size", 2: "ctx_len"}
            key = {"kind": "causal_lm", "family": self.family.model_type, "config": self.model.config.to_dict(),
                   "weights": self.weights_fingerprint(),
                   "transforms": ["RetainedStateKVCache", *self.precision_fix_key()],
                   "code": _code_fingerprint(self.family)}
            result = export_module(KVExportWrapper(self.model).eval(), example, outputs, axes, key,
                                   name=_safe_name(self.model_name), external_data=external_data)
        self.export_result = result
        self._session = None
        n_clip = sum(len(p.changes) for p in result.passes if p.name == "FP16ClipConstants")
        self._record(StepReport("export", "reused" if result.reused else "done", elapsed(),
                                f"{result.folder.name}/{result.path.name}; {len(inputs)} inputs, {len(outputs)} "
                                f"outputs; {n_clip} constant(s) clipped to fp16", result))
        return result.path

    def onnx_io(self) -> pd.DataFrame:
        """The exported graph's inputs and outputs: name, direction, element type, shape (symbols kept)."""
        import onnx

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
    def compile(self, prefill_seq_len: int = 32, ctx_len: int = 128, batch_size: int = 1, num_cores: int = 16,
                mxfp6_matmul: bool = False, mxint8_kv_cache: bool = False, backend: str | None = None,
                **compiler_options: Any) -> Path:
        """Compile two specializations, Prefill (seq_len=prefill_seq_len) and Decode (seq_len=1), both at
        `ctx_len` and `batch_size`. Always writes specializations.json and custom_io.yaml (KV in the device
        dtype: float16, or mxint8 with mxint8_kv_cache, which is not a compiler flag) into the compile folder.
        Other `compiler_options` go to qeff_lab.compile, which validates them. Returns the folder."""
        for name, value in (("prefill_seq_len", prefill_seq_len), ("ctx_len", ctx_len), ("batch_size", batch_size),
                            ("num_cores", num_cores)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if prefill_seq_len > ctx_len:
            raise ValueError(f"prefill_seq_len ({prefill_seq_len}) cannot exceed ctx_len ({ctx_len}).")
        limit, why = self.family.max_ctx_len(self.model.config)
        if limit and ctx_len > limit:
            raise ValueError(f"ctx_len={ctx_len} exceeds this model's {why} ({limit}); compile with ctx_len <= {limit}.")
        check_compile_request(backend, compiler_options)  # options and backend checked before the (slow) export
        if self.export_result is None:
            self.export()
        with timed() as elapsed:
            specs = [{"batch_size": batch_size, "seq_len": prefill_seq_len, "ctx_len": ctx_len},
                     {"batch_size": batch_size, "seq_len": 1, "ctx_len": ctx_len}]
            kv_dtype = "mxint8" if mxint8_kv_cache else "float16"
            inputs, outputs = self.io_names()
            custom_io = {}
            for name in inputs[2:]:
                custom_io[name] = kv_dtype
                custom_io[name + RETAINED_SUFFIX] = kv_dtype
            result = compile_graph(self.export_result.path, specs, backend=backend, num_cores=num_cores,
                                   spec_names=["Prefill", "Decode"], custom_io=custom_io, mxfp6_matmul=mxfp6_matmul,
                                   options=compiler_options or None, model_info={
                                       "name": self.model_name, "class": type(self.model).__name__,
                                       "config": self.model.config.to_dict(), "transforms": ["RetainedStateKVCache"],
                                       "mxint8_kv_cache": mxint8_kv_cache})
        self.compile_result = result
        self.compile_shapes = {"prefill_seq_len": prefill_seq_len, "ctx_len": ctx_len, "batch_size": batch_size}
        self._session = None
        self._record(StepReport("compile", "reused" if result.reused else "done", elapsed(),
                                f"{result.backend} ({result.reason}); prefill {prefill_seq_len}, decode 1, ctx {ctx_len}, "
                                f"batch {batch_size}, KV {kv_dtype}", result))
        return result.folder

    def compile_artifacts(self) -> dict[str, str]:
        """The text of the compile folder's files a device compile reads (specializations, custom IO)."""
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) first: there is no compile folder yet.")
        folder = self.compile_result.folder
        return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.suffix in (".json", ".yaml")
                and p.name != "manifest.json"}

    # ------------------------------------------------------------------ run
    def runner(self, runtime: str = "compiled", device_ids: list[int] | None = None):
        """The KV runner generate uses: the compiled graph ("compiled") or the transformed PyTorch model
        ("pytorch", same shapes and schedule; compile()'s shapes, or its defaults when not compiled)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "pytorch":
            self._require("transform", "transform()")
            shapes = self.compile_shapes or {"prefill_seq_len": 32, "ctx_len": 128, "batch_size": 1}
            return TorchKVRunner(self.model, shapes["batch_size"], shapes["prefill_seq_len"], shapes["ctx_len"])
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) before generate(...): nothing is compiled yet "
                               "(or pass runtime='pytorch' to run the transformed PyTorch model).")
        if self._session is None or getattr(self, "_session_devices", None) != device_ids:
            from qeff_lab.runtime import open_kv_runner  # by the compile's backend: ORT buffers or the card's

            self._session = open_kv_runner(self.compile_result, device_ids=device_ids)
            self._session_devices = device_ids
        return self._session

    def eos_token_ids(self, tokenizer=None) -> list[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.update([value] if isinstance(value, int) else list(value))
        return sorted(ids)

    def generate(self, tokenizer, prompts: Sequence[str] | str, generation_len: int | None = None,
                 stream: bool = False, *, runtime: str = "compiled", verbose: bool = True,
                 device_ids: list[int] | None = None) -> GenerationResult:
        """Greedy generation for `prompts` (chat templates are the caller's job). Prompts beyond the compiled
        batch size run in successive batches. `generation_len=None`: as long as the context allows; longer
        than `ctx_len - prompt_len` is clamped with a warning. Returns texts, ids and metrics; prints the
        metrics like QEfficient (verbose) and streams text as it comes (stream=True: the first prompt of each
        batch live, the others when their batch ends)."""
        runner = self.runner(runtime, device_ids)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() got no prompts: pass a non-empty list of prompts.")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"Prompt {i} is a {type(p).__name__}, not a str.")
            if not p:
                raise ValueError(f"Prompt {i} is an empty string: a causal LM needs at least one prompt token.")
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        streamer = _Streamer(tokenizer, prompts, runner.batch_size) if stream else None
        ids, stopped, metrics = generate_ids(
            runner, prompt_ids, generation_len, self.eos_token_ids(tokenizer),
            on_tokens=streamer.on_tokens if streamer else None,
            pad_token_id=tokenizer.pad_token_id or 0)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        if streamer:
            streamer.finish(texts)
        result = GenerationResult(ids, [list(p) for p in prompt_ids], metrics, texts, prompts, stopped)
        if verbose:
            print(metrics.report())
        return result

    def generate_from_ids(self, prompt_ids: Sequence[Sequence[int]], generation_len: int | None = None,
                          eos_token_ids: Sequence[int] | None = None, *, runtime: str = "compiled") -> GenerationResult:
        """Token ids in, token ids out (no tokenizer): the loop parity tests drive."""
        runner = self.runner(runtime)
        ids, stopped, metrics = generate_ids(runner, prompt_ids, generation_len, eos_token_ids)
        return GenerationResult(ids, [list(p) for p in prompt_ids], metrics, None, None, stopped)


class _Streamer:
    """Prints the first prompt of each batch as its tokens arrive; the others when the batch is done."""

    def __init__(self, tokenizer, prompts: list[str], batch_size: int):
        self.tokenizer, self.prompts, self.batch_size = tokenizer, prompts, batch_size
        self.printed: dict[int, int] = {}

    def on_tokens(self, index: int, new_ids: list[int]) -> None:
        if index % self.batch_size:
            return
        if index not in self.printed:
            print(f"\nPrompt {index}: {self.prompts[index]}\nCompletion: ", end="", flush=True)
            self.printed[index] = 0
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        print(text[self.printed[index]:], end="", flush=True)
        self.printed[index] = len(text)

    def finish(self, texts: list[str]) -> None:
        for i, text in enumerate(texts):
            if i in self.printed:
                if self.printed[i] < len(text):
                    print(text[self.printed[i]:], end="")
            else:
                print(f"\nPrompt {i}: {self.prompts[i]}\nCompletion: {text}", end="")
        print(flush=True)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split("/")[-1])[:60]
