"""`analyze(model, prompts)`: profile calibration inputs in fp32, then list the findings; one report for both."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from qeff_lab.pipeline import HtmlRepr, timed
from qeff_lab.precision.findings import Findings, find_issues
from qeff_lab.precision.numerics import tensor_stats
from qeff_lab.precision.profile import ROOT, RangeProfile, RangeProfiler


@dataclass
class PrecisionReport(HtmlRepr):
    """A profile (every site's ranges), the findings drawn from it, and the weights' own ranges."""

    profile: RangeProfile
    findings: Findings
    weights: pd.DataFrame = field(default_factory=pd.DataFrame)
    inputs: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def sites(self) -> int:
        """Distinct places profiled (module path + op + intermediate [+ ONNX node])."""
        return self.profile.sites

    def summary(self) -> str:
        """One line: what was profiled (sites) and the findings' headline (causes over places; see findings.py)."""
        where = "" if self.profile.source == "pytorch" else f" on the {self.profile.source.upper()} graph"
        return (f"{self.inputs} input(s), {self.tokens} tokens{where}, {self.sites} sites profiled; "
                f"findings: {self.findings.headline()}")

    def __repr__(self) -> str:
        return f"<PrecisionReport {self.summary()}>"


def weight_ranges(model: torch.nn.Module) -> pd.DataFrame:
    """Per parameter: abs max, smallest non-zero, share subnormal / flushing to zero in fp16."""
    rows = []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        n, hi, lo, over, sub, flush, _ = tensor_stats(p)
        rows.append({"parameter": name, "shape": tuple(p.shape), "abs_max": hi, "min_nonzero": lo, "n_over": over,
                     "frac_subnormal": sub / n if n else 0.0, "frac_flush": flush / n if n else 0.0})
    return pd.DataFrame(rows, columns=["parameter", "shape", "abs_max", "min_nonzero", "n_over", "frac_subnormal",
                                       "frac_flush"])


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or bool(getattr(getattr(model, "config", None),
                                                                       "is_decoder", False))


def _inputs_list(inputs: Any, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Normalise prompts / token tensors / tokenizer outputs to a list of {input_ids, attention_mask}."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        ids = torch.as_tensor(inputs["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids)))
        mask = mask[None] if mask.dim() == 1 else mask
        return [{"input_ids": ids, "attention_mask": mask}]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(p, str) for p in inputs):
        if tokenizer is None:
            raise ValueError("analyze() got text prompts but no tokenizer: pass tokenizer=..., or token ids.")
        out = []
        for p in inputs:
            enc = tokenizer(p, return_tensors="pt")
            if enc["input_ids"].shape[1] == 0:
                raise ValueError(f"Prompt {p!r} tokenizes to nothing; give non-empty prompts.")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out
    if isinstance(inputs, Sequence) and inputs:
        return [x for item in inputs for x in _inputs_list(item, tokenizer)]
    raise ValueError(f"analyze() needs prompts (list of str), token ids or tokenizer output; got {type(inputs).__name__}"
                     + (" (empty)" if isinstance(inputs, Sequence) and not inputs else ""))


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(out, "past_key_values",
                                                                                                None)


ANALYZE_ON = ("pytorch", "onnx")


@torch.no_grad()
def analyze(model: torch.nn.Module | None, inputs: Any, tokenizer=None, *, on: str = "pytorch", onnx_model=None,
            decode_steps: int = 0, per_step: bool = False, module_outputs: bool = True, progress: bool = True,
            max_outputs: int = 512, **finding_options) -> PrecisionReport:
    """Run `inputs` (text prompts with `tokenizer`, token ids, or tokenizer output) through `model` in fp32
    with a RangeProfiler, then draw the findings (options go to `find_issues`).

    For causal LMs, `decode_steps > 0` also profiles that many greedy decode steps after each prompt
    (with the model's cache); with `per_step=True` the profile keeps them apart (step 0 = the prompt).

    `on="onnx"`: profile the exported graph `onnx_model` (path or ModelProto) in ONNX Runtime instead, its
    functions' bodies inlined, `max_outputs` values fetched per run (precision.onnx_profile); `model` (the
    PyTorch model it was exported from, or None) names each node's module and class. Retained-state graphs
    run each prompt as one prefill (no decode steps)."""
    from tqdm.auto import tqdm

    if on not in ANALYZE_ON:
        raise ValueError(f"on must be one of {ANALYZE_ON}, got {on!r}")
    batches = _inputs_list(inputs, tokenizer)
    if on == "onnx":
        if onnx_model is None:
            raise ValueError("analyze(on='onnx') needs the exported graph: pass onnx_model=<path or ModelProto> "
                             "(e.g. qeff_model.export()), or use qeff_model.analyze(prompts, on='onnx').")
        return _analyze_onnx(model, onnx_model, batches, max_outputs, progress, finding_options)
    if model is None:
        raise ValueError("analyze() needs the PyTorch model (or on='onnx' with onnx_model=...).")
    if hasattr(model, "new_kv_cache"):  # a retained-state (KV-transformed) model: its own calling convention
        return _analyze_retained(model, batches, decode_steps, per_step, module_outputs, progress, finding_options)
    causal = _is_causal_lm(model)
    was_training = model.training
    model.eval()
    tokens = 0
    with timed() as elapsed, RangeProfiler(model, per_step=per_step, module_outputs=module_outputs) as prof:
        for enc in tqdm(batches, desc="profiling", disable=not progress or len(batches) < 2, leave=False):
            if per_step:
                prof.step = 0
            out = model(**enc) if not (causal and decode_steps) else model(**enc, use_cache=True)
            tokens += int(enc["attention_mask"].sum())
            if causal and decode_steps:
                cache, mask = _cache_of(out), enc["attention_mask"]
                for step in range(1, decode_steps + 1):
                    nxt = out.logits[:, -1:].argmax(-1)
                    mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                    if per_step:
                        prof.step = step
                    out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                    cache = _cache_of(out)
                    tokens += nxt.shape[0]
    model.train(was_training)
    profile = prof.profile()
    findings = find_issues(profile, **finding_options)
    return PrecisionReport(profile, findings, weight_ranges(model), len(batches), tokens, elapsed())


@torch.no_grad()
def _analyze_retained(model, batches, decode_steps, per_step, module_outputs, progress, finding_options):
    """`model(input_ids, position_ids, past) -> (logits, past)` over fixed-size cache buffers, row by row."""
    from tqdm.auto import tqdm

    tokens = 0
    model.eval()
    with timed() as elapsed, RangeProfiler(model, per_step=per_step, module_outputs=module_outputs) as prof:
        for enc in tqdm(batches, desc="profiling", disable=not progress or len(batches) < 2, leave=False):
            for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
                ids = row[mask.bool()][None]
                n = ids.shape[1]
                cache = model.new_kv_cache(1, n + decode_steps)
                if per_step:
                    prof.step = 0
                logits, cache = model(ids, torch.arange(n)[None], cache)
                tokens += n
                for step in range(1, decode_steps + 1):
                    if per_step:
                        prof.step = step
                    nxt = logits[:, -1:].argmax(-1)
                    logits, cache = model(nxt, torch.tensor([[n + step - 1]]), cache)
                    tokens += 1
    profile = prof.profile()
    return PrecisionReport(profile, find_issues(profile, **finding_options), weight_ranges(model), len(batches),
                           tokens, elapsed())



def _analyze_onnx(model, onnx_model, batches, max_outputs, progress, finding_options) -> PrecisionReport:
    """The exported graph in ONNX Runtime: decoders (a position_ids input) one unpadded prompt per run,
    encoders one batch per run."""
    from tqdm.auto import tqdm

    from qeff_lab.contracts import POSITION_IDS
    from qeff_lab.precision.onnx_profile import OnnxRangeProfiler, onnx_feeds

    modules = {path or ROOT: type(m).__name__ for path, m in model.named_modules()} if model is not None else None
    tokens = 0
    with timed() as elapsed:
        prof = OnnxRangeProfiler(onnx_model, modules, max_outputs)
        decoder = POSITION_IDS in prof.input_names
        for enc in tqdm(batches, desc="profiling (ONNX)", disable=not progress or len(batches) < 2, leave=False):
            ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
            rows = [(r[m.astype(bool)][None], None) for r, m in zip(ids, mask)] if decoder else [(ids, mask)]
            for row_ids, row_mask in rows:
                prof.run(onnx_feeds(prof.graph_inputs, row_ids, row_mask))
                tokens += int(row_ids.size if row_mask is None else row_mask.sum())
    profile = prof.profile(type(model).__name__ if model is not None else "")
    weights = weight_ranges(model) if model is not None else pd.DataFrame()
    return PrecisionReport(profile, find_issues(profile, **finding_options), weights, len(batches), tokens,
                           elapsed())
