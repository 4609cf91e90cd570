"""Sessions behind one interface (input_names, output_names, allowed, check_shapes, run, keeps_retained_state):
OrtSession (embedded ONNX Runtime) and QaicSession (Cloud AI 100 via qaicrt), chosen by open_session."""
from __future__ import annotations


def open_session(compile_result, *, device_ids: list[int] | None = None, threads: int | None = None):
    """The session for a CompileResult, picked by its backend: qaic -> QaicSession on `device_ids` (default the
    first num_devices cards), onnxruntime -> OrtSession over the exported ONNX (`device_ids` must then be None)."""
    backend = compile_result.backend
    if getattr(compile_result, "dry_run", False):
        raise RuntimeError(
            f"{compile_result.folder.name} is a dry run: its artifacts and command exist but nothing was compiled. "
            "Run the command on a machine with the AI 100 SDK, or compile without dry_run (backend=None picks the "
            "embedded ONNX Runtime backend when there is no SDK).")
    if backend == "qaic":
        from qeff_lab.runtime.qaic_session import QaicSession

        return QaicSession(compile_result.qpc_path, device_ids=device_ids,
                           num_devices=getattr(compile_result, "num_devices", 1),
                           allowed=compile_result.specializations)
    if backend == "onnxruntime":
        if device_ids is not None:
            raise ValueError(f"device_ids={device_ids} selects AI 100 cards, but this compile is for the embedded "
                             "ONNX Runtime backend (CPU). Leave device_ids out, or compile with backend='qaic'.")
        from qeff_lab.runtime.session import OrtSession

        graph = getattr(compile_result, "ort_graph", None) or {}
        if graph.get("graph") == "packed":  # the embedded backend's encoder rewrite (qeff_lab.compile.ort_encoder)
            return OrtSession(compile_result.folder / graph["path"], compile_result.specializations, threads=threads,
                              external_data_dir=compile_result.onnx_path.parent)
        return OrtSession(compile_result.onnx_path, compile_result.specializations, threads=threads)
    raise ValueError(f"No session for backend {backend!r}: expected 'qaic' or 'onnxruntime'.")


def open_kv_runner(compile_result, *, device_ids: list[int] | None = None, threads: int | None = None):
    """The decoder's KV runner for runtime.generation, picked by the compile's backend: OrtKVSession (the cache in
    ONNX Runtime buffers) or QaicKVRunner (the cache retained on the card)."""
    if compile_result.backend == "onnxruntime" and not getattr(compile_result, "dry_run", False):
        if device_ids is not None:
            open_session(compile_result, device_ids=device_ids)  # raises the explanation
        graph = getattr(compile_result, "ort_graph", None) or {}
        if graph.get("graph") == "gqa":  # the embedded backend's rewrite (qeff_lab.compile.ort_rewrite)
            from qeff_lab.runtime.ort_gqa_session import OrtGqaKVSession

            return OrtGqaKVSession(compile_result.folder / graph["path"], compile_result.specializations,
                                   threads=threads, weights_dir=compile_result.onnx_path.parent)
        from qeff_lab.runtime.kv_session import OrtKVSession

        return OrtKVSession(compile_result.onnx_path, compile_result.specializations, threads=threads)
    session = open_session(compile_result, device_ids=device_ids, threads=threads)
    from qeff_lab.runtime.qaic_session import QaicKVRunner

    return QaicKVRunner(session, compile_result.specializations)


__all__ = ["open_kv_runner", "open_session"]
