"""ONNX export of fitted detectors and an ONNX Runtime inferencer with the same predictions.

from anomalens.export import OnnxDetector, export_onnx
export_onnx(detector, "tile.onnx")                  # checks parity with torch, raises if > 1e-4
result = OnnxDetector.load("tile.onnx", threads=2).predict(["part.png"])
"""

from .onnx_export import ExportError, NotExportableError, cached_export, check_parity, export_onnx
from .runtime import OnnxDetector
from .session import ort_session

__all__ = [
    "ExportError",
    "NotExportableError",
    "OnnxDetector",
    "cached_export",
    "check_parity",
    "export_onnx",
    "ort_session",
]
