"""Run a compiled graph: one session interface; the embedded ONNX Runtime implementation lives here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


class ShapeNotCompiledError(ValueError):
    """An input whose shape matches none of the compiled specializations."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The embedded backend's ONNX Runtime options (one place for every session it opens)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or int(os.environ.get("QEFF_LAB_THREADS", "0")) or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    return opts


class OrtSession:
    """ONNX Runtime over the exported graph, accepting only the compiled shapes (as a device would).

    `allowed` is the list of specializations: dicts of symbol -> size (e.g. batch_size, seq_len).
    """

    backend = "onnxruntime"
    keeps_retained_state = False  # the caller feeds X_RetainedState outputs back as X inputs (QaicSession: True)

    def __init__(self, onnx_path: Path, allowed: list[dict[str, int]] | None = None, threads: int | None = None,
                 external_data_dir: Path | None = None):
        opts = session_options(threads)
        if external_data_dir is not None:  # a graph whose weights live in another folder (the export's)
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(external_data_dir))
            self.session = ort.InferenceSession(Path(onnx_path).read_bytes(), opts, providers=["CPUExecutionProvider"])
        else:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
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
