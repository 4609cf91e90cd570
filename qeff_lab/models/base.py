"""What both model kinds share: loading through `loading.resolve`, the step record, option checks."""
from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import AutoConfig, AutoTokenizer

from qeff_lab.loading import ResolvedModel, resolve
from qeff_lab.pipeline import HtmlRepr, StepReport, show, state_dict_fingerprint


class UnsupportedModelError(ValueError):
    """An architecture this model class has no transforms for."""


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class QEFFBaseModel(HtmlRepr):
    """A HF model on its way to the device. Each step's report is kept in `steps` (in order)."""

    def __init__(self, model: torch.nn.Module, resolved: ResolvedModel):
        self.model = model
        self.resolved = resolved
        self.model_name = resolved.name
        self.steps: "OrderedDict[str, StepReport]" = OrderedDict()
        self._tokenizer = None
        self._weights_fp: str | None = None

    @staticmethod
    def _resolve_config(name_or_path: str):
        resolved = resolve(name_or_path)
        return resolved, AutoConfig.from_pretrained(resolved.path)

    @property
    def tokenizer(self):
        """The model's own tokenizer, from the same resolved folder (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        return self._tokenizer

    def weights_fingerprint(self) -> str:
        if self._weights_fp is None:
            self._weights_fp = state_dict_fingerprint(self.model)
        return self._weights_fp

    def analyze(self, prompts, **options):
        """Profile calibration `prompts` (text, or token ids) in fp32 and list where fp16 would overflow or
        underflow, by module path and op (qeff_lab.precision.analyze; options: decode_steps, per_step, ...).
        Works before or after transforms; recorded as the "analyze" step. Returns a PrecisionReport."""
        from qeff_lab.precision import analyze

        texts = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                             and all(isinstance(p, str) for p in prompts))
        report = analyze(self.model, prompts, self.tokenizer if texts else None, **options)
        self.precision_report = report
        self._record(StepReport("analyze", "done", report.seconds, report.summary(), report))
        return report

    def fix_precision(self, report=None) -> StepReport:
        """Apply the precision fixes the findings call for: the overflow-safe RMSNorm / LayerNorm on the norms
        `report` (default: the last analyze) flags, or on every norm when there is no report. Recorded as the
        "precision-fixes" step; a later export includes them; `unfix_precision()` switches them off."""
        from qeff_lab.pipeline import timed
        from qeff_lab.precision import safe_norm_transform

        report = report if report is not None else getattr(self, "precision_report", None)
        only = report.findings.modules("norm-square") if report is not None else None
        reasons = {f.module: f"{f.place}: {f.reason}" for f in report.findings.of_kind("norm-square")} if report else {}
        with timed() as elapsed:
            result = safe_norm_transform(self.model, only=only, reasons=reasons)
        self._forget_artifacts()
        return self._record(StepReport("precision-fixes", "done", elapsed(), result.summary(), [result]))

    def unfix_precision(self) -> StepReport:
        """Switch the precision fixes off again (original norm classes; weights untouched)."""
        from qeff_lab.precision import revert_safe_norm

        result = revert_safe_norm(self.model)
        self._forget_artifacts()
        self.steps.pop("precision-fixes", None)
        return StepReport("precision-fixes", "skipped", 0.0, result.summary(), [result])

    def precision_fix_key(self) -> list[str]:
        """What the precision fixes changed, for export cache keys (a fixed graph is a different file)."""
        return [f"SafeNorm:{path}" for path, m in self.model.named_modules() if getattr(type(m), "_qeff_safe_norm", False)]

    def _forget_artifacts(self) -> None:
        for name in ("export_result", "compile_result", "_session"):
            if hasattr(self, name):
                setattr(self, name, None)

    @staticmethod
    def _load_summary(hf: torch.nn.Module, config, resolved: ResolvedModel) -> str:
        """The load step's one line, the same for every model kind."""
        return (f"{type(hf).__name__}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{param_count(hf) / 1e6:.1f}M params, from {resolved.source}")

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
