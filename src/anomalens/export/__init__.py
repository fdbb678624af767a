"""ONNX export of fitted detectors, and inferencers in ONNX Runtime or OpenVINO with the same predictions.

from anomalens.export import OnnxDetector, export_onnx
export_onnx(detector, "tile.onnx")                  # checks parity with torch, raises if > 1e-4
result = OnnxDetector.load("tile.onnx", threads=2).predict(["part.png"])
model = load_model("tile.model", runtime="openvino")  # torch, onnx or openvino; an Inferencer
"""

from .onnx_export import ExportError, NotExportableError, cached_export, check_parity, export_onnx
from .runtime import RUNTIMES, OnnxDetector, load_model
from .session import OpenVinoSession, onnx_session, openvino_available, ort_session

__all__ = [
    "ExportError",
    "NotExportableError",
    "OnnxDetector",
    "OpenVinoSession",
    "RUNTIMES",
    "cached_export",
    "check_parity",
    "export_onnx",
    "load_model",
    "onnx_session",
    "openvino_available",
    "ort_session",
]
