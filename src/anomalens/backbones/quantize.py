"""INT8 post-training static quantization of a backbone's ONNX graph (ONNX Runtime's quantizer).

Convolution weights become INT8 per output channel (symmetric) and their input activations UINT8
with ranges calibrated (min/max) on the images given: a detector passes training goods only. The
result is a QDQ graph that ONNX Runtime and OpenVINO both run with INT8 kernels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .extractor import BackboneError

#: calibration images at most: more barely moves min/max ranges and costs a forward pass each
MAX_CALIBRATION_IMAGES = 64


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol: one image per call, then None."""

    def __init__(self, input_name: str, pixels: np.ndarray) -> None:
        self._name = input_name
        self._items = iter(np.ascontiguousarray(pixels, dtype=np.float32))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._items, None)
        return None if x is None else {self._name: x[None]}


def quantize_int8(fp32_path: str | Path, pixels: np.ndarray, input_name: str = "input") -> bytes:
    """The INT8 (QDQ) ONNX graph of the fp32 file at `fp32_path`, calibrated on `pixels` (the
    graph's input batch, e.g. normalized (N, 3, H, W) training goods), as bytes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(pixels) == 0:
        raise BackboneError("INT8 calibration needs at least one image")
    with tempfile.TemporaryDirectory() as tmp:
        prepared, out = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "int8.onnx")
        try:
            # shape inference and graph cleanup the quantizer expects (the image size is fixed)
            quant_pre_process(str(fp32_path), prepared, skip_symbolic_shape=True)
            quantize_static(
                prepared,
                out,
                _Reader(input_name, pixels),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as exc:  # the quantizer raises many error types
            first_line = (str(exc).splitlines() or [""])[0][:300]
            raise BackboneError(f"INT8 quantization failed ({type(exc).__name__}: {first_line})") from exc
        return Path(out).read_bytes()
