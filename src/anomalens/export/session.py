"""The runtimes an exported ONNX file opens in (ONNX Runtime, OpenVINO), with the model-file error."""

from __future__ import annotations

from pathlib import Path

from anomalens.backbones.runtimes import OpenVinoSession, openvino_available
from anomalens.backbones.runtimes import onnx_session as _onnx_session
from anomalens.models.base import ModelFileError

__all__ = ["OpenVinoSession", "onnx_session", "openvino_available", "ort_session"]


def ort_session(path: str | Path | bytes, threads: int | None = None):
    """A CPU ONNX Runtime session; `threads` intra-op threads (None: ONNX Runtime's default, one per core)."""
    return _onnx_session(path, "onnx", threads, ModelFileError)


def onnx_session(path: str | Path | bytes, runtime: str = "onnx", threads: int | None = None):
    """An ONNX Runtime session, or an `OpenVinoSession` for runtime="openvino"."""
    return _onnx_session(path, runtime, threads, ModelFileError)
