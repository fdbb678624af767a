"""One way to open an ONNX file in ONNX Runtime on the CPU, for the export's parity check and the runtime."""

from __future__ import annotations

from pathlib import Path

from anomalens.models.base import ModelFileError


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU ONNX Runtime session; `threads` intra-op threads (None: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle workers would otherwise spin and steal cores from image decoding and other requests
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, non-exported exception types
        first_line = (str(exc).splitlines() or [""])[0]
        raise ModelFileError(f"'{path}' is not a loadable ONNX file ({first_line})") from None
