"""What both model kinds share: loading through `loading.resolve`, the step record, option checks."""
from __future__ import annotations

import difflib
from collections import OrderedDict

import torch
from transformers import AutoConfig, AutoTokenizer

from qeff_lab.loading import ResolvedModel, resolve
from qeff_lab.pipeline import StepReport, state_dict_fingerprint


class UnsupportedModelError(ValueError):
    """An architecture this model class has no transforms for."""


def check_options(given: dict, known: set[str], where: str) -> None:
    """Reject unknown keyword options, suggesting the closest known name (QEfficient passes them on silently)."""
    for name in given:
        if name not in known:
            close = [k for k in sorted(known) if k.startswith(name) or name.startswith(k)]
            close = close or difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{where}() got an unknown option {name!r}.{hint} Known: {', '.join(sorted(known))}.")


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class QEFFBaseModel:
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

    def _record(self, report: StepReport) -> StepReport:
        self.steps[report.step] = report
        return report

    def __repr__(self) -> str:
        done = ", ".join(self.steps) or "nothing yet"
        return f"{type(self).__name__}({self.model_name!r}; steps: {done})"

    def _repr_html_(self) -> str:
        from qeff_lab.views import render_steps

        return render_steps(self)

    def report(self, path: str = "report.html", title: str | None = None):
        """Write a self-contained HTML report of every step so far (tables, plots, findings; opens offline)."""
        from qeff_lab.views.report import write_report

        return write_report(self, path, title=title)

    def dashboard(self):
        """The pipeline dashboard widget: each step's status, time and summary; click one to open its view."""
        from qeff_lab.views.dashboard import dashboard

        return dashboard(self)
