"""Run a compiled graph: one session interface; the embedded ONNX Runtime implementation lives here."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# the embedded backend's ONNX Runtime options: one function (below runtime) for the compile step's checks and here
from qeff_lab.compile.ort_rewrite import session_options

# Weights larger than this are mapped from the external-data file instead of copied: ONNX Runtime maps external
# data by default, but prepacking MatMul weights and constant-folding Transpose(weight) make anonymous copies of
# every weight (on SmolLM2-135M +0.56-0.65 GB at creation; mapped: +0.03 GB). The copies buy speed (prepacked
# kernels), so small models keep them. QEFF_LAB_MAP_WEIGHTS=1 / 0 forces either way.
MAP_WEIGHTS_ABOVE = 1 << 30


def external_data_bytes(onnx_path: Path) -> int:
    """Size of the external-data files next to an exported graph (0 when the weights are inline)."""
    return sum(p.stat().st_size for p in Path(onnx_path).parent.glob(Path(onnx_path).name + ".data*"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set size seen while the `with` block runs (sampled every few milliseconds)."""

    def __enter__(self):
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


class ShapeNotCompiledError(ValueError):
    """An input whose shape matches none of the compiled specializations."""


class OrtSession:
    """ONNX Runtime over the exported graph, accepting only the compiled shapes (as a device would).

    `allowed` is the list of specializations: dicts of symbol -> size (e.g. batch_size, seq_len).
    """

    backend = "onnxruntime"
    keeps_retained_state = False  # the caller feeds X_RetainedState outputs back as X inputs (QaicSession: True)

    def __init__(self, onnx_path: Path, allowed: list[dict[str, int]] | None = None, threads: int | None = None,
                 external_data_dir: Path | None = None, map_weights: bool | None = None):
        # the embedded backend's session options, one place for every session it opens (the compile step's too);
        # with external_data_dir, a graph whose weights live in another folder (the export's)
        opts = session_options(threads, external_data_dir)
        if external_data_dir is not None:
            weights = sum(p.stat().st_size for p in Path(external_data_dir).glob("*.onnx.data*"))
            model = Path(onnx_path).read_bytes()
        else:
            weights, model = external_data_bytes(onnx_path), str(onnx_path)
        if map_weights is None:
            env = os.environ.get("QEFF_LAB_MAP_WEIGHTS")
            map_weights = env == "1" if env in ("0", "1") else weights > MAP_WEIGHTS_ABOVE
        extra = {}
        if map_weights:  # no anonymous copy of any weight: they stay pages of the mapped file
            opts.add_session_config_entry("session.disable_prepacking", "1")
            extra["disabled_optimizers"] = ["ConstantFolding"]
        with PeakRSS() as rss:
            start = time.perf_counter()
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], **extra)
        # what creating the session cost: the compile report shows it (CompileResult.session)
        self.creation = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gb": round(rss.peak / 1e9, 3),
                         "rss_increase_gb": round((rss.peak - rss.before) / 1e9, 3),
                         "weights_gb": round(weights / 1e9, 3), "weights_mapped": bool(map_weights)}
        self.onnx_path = Path(onnx_path)  # the graph it runs (the exported one, or the embedded backend's own)
        self.allowed = allowed or []
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._symbols = {i.name: i.shape for i in self.session.get_inputs()}

    def check_shapes(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """The symbol sizes these inputs bind; raises ShapeNotCompiledError if no specialization has them."""
        bound: dict[str, int] = {}
        for name, value in feeds.items():
            for dim, size in zip(self._symbols[name], value.shape):
                if isinstance(dim, str):
                    bound[dim] = size
        if self.allowed and not any(all(spec.get(k) in (None, v) for k, v in bound.items()) for spec in self.allowed):
            raise ShapeNotCompiledError(f"Input shapes {bound} match no compiled specialization {self.allowed}.")
        return bound

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_shapes(feeds)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
