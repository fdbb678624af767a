"""Score images with an exported ONNX file through ONNX Runtime or OpenVINO, as the torch detector does;
`load_model` opens a model for any of the three runtimes."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomalens.data.drift import DriftProfile
from anomalens.data.inputs import Preprocess
from anomalens.export.onnx_export import FORMAT_VERSION, INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, cached_export
from anomalens.export.session import onnx_session
from anomalens.models.base import (
    Detector,
    Inferencer,
    ModelFileError,
    Prediction,
    Scored,
    check_model_path,
    iter_predict,
    predict,
)
from anomalens.models.refine import Refiner
from anomalens.registry import available, get_class
from anomalens.thresholds import Calibration, check_operating_point, decision_calibration


def _arrays_from_json(part: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        name: np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)
        for name, data in part["arrays"].items()
    }


RUNTIMES = ("torch", "onnx", "openvino")


def _onnx_metadata(path: Path, session) -> str | None:
    if hasattr(session, "get_modelmeta"):  # ONNX Runtime reads it with the graph
        return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    import onnx

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
    except Exception:  # noqa: BLE001 - a file OpenVINO read but onnx cannot is not an anomalens export
        return None
    return {p.key: p.value for p in props}.get(METADATA_KEY)


class OnnxDetector:
    """A fitted detector running from its exported ONNX file, in ONNX Runtime (runtime="onnx") or
    OpenVINO's CPU plugin ("openvino"): `predict` and `iter_predict` return what the torch
    detector's do (raw scores, maps at each image's own size, its calibration).

        det = OnnxDetector.load("tile.onnx", threads=2)   # or a model file: exported once, cached
        result = det.predict(["part.png"])                 # result.normalized_scores, result.maps
    """

    def __init__(self, path: Path, session, metadata: dict[str, Any], runtime: str = "onnx") -> None:
        self.path = path
        self.session = session
        self.runtime = runtime
        self.metadata = metadata
        self.name: str = metadata["detector"]
        self.options: dict[str, Any] = dict(metadata["options"])
        self.localizes: bool = metadata["localizes"]
        self.calibration = Calibration.from_dict(metadata["calibration"]) if metadata["calibration"] else None
        self.operating_point: dict[str, Any] | None = metadata["operating_point"]
        drift = metadata.get("drift")
        self.drift_profile: DriftProfile | None = (
            None
            if drift is None
            else DriftProfile.from_arrays_and_meta(_arrays_from_json(drift), drift["meta"])
        )
        refine = metadata.get("refine")
        self.refiner: Refiner | None = (
            None
            if refine is None
            else Refiner.from_arrays_and_meta(_arrays_from_json(refine), refine["meta"])
        )
        roi = metadata.get("roi_png")
        self.roi: np.ndarray | None = None
        if roi is not None:
            self.roi = np.asarray(Image.open(io.BytesIO(base64.b64decode(roi)))) > 0

    @classmethod
    def load(
        cls,
        path: str | Path,
        threads: int | None = None,
        batch_size: int | None = None,
        runtime: str = "onnx",
    ) -> OnnxDetector:
        """Open an exported .onnx file, or a model file (exported on first use and cached), in
        ONNX Runtime (runtime="onnx") or OpenVINO ("openvino")."""
        path = check_model_path(path)
        if path.suffix.lower() != ".onnx":
            path = cached_export(path)
        session = onnx_session(path, runtime, threads)
        raw = _onnx_metadata(path, session)
        try:
            metadata = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            raise ModelFileError(
                f"'{path}' is not an anomalens ONNX export (no '{METADATA_KEY}' metadata)"
            ) from None
        if not isinstance(metadata, dict):
            raise ModelFileError(f"'{path}': its '{METADATA_KEY}' metadata is not a JSON object")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"'{path}' has ONNX export format {metadata.get('format_version')!r:.40}, "
                f"this anomalens reads format {FORMAT_VERSION}"
            )
        detector = cls._checked(path, session, metadata, runtime)
        if batch_size:
            detector.options["batch_size"] = int(batch_size)
        return detector

    @classmethod
    def _checked(cls, path: Path, session, metadata: dict[str, Any], runtime: str) -> OnnxDetector:
        """The detector of an export whose metadata passes the model file's checks (known detector
        and options, finite calibration and operating point); ModelFileError otherwise."""
        name = metadata.get("detector")
        if not isinstance(name, str) or name not in available():
            raise ModelFileError(f"'{path}': unknown detector {name!r:.60}")
        get_class(name).check_file_options(metadata.get("options"), path)
        try:
            check_operating_point(metadata.get("operating_point"))
            return cls(path, session, metadata, runtime)
        except Exception as err:  # the file is what failed: one line, whatever broke
            raise ModelFileError(f"'{path}' does not hold a usable {name} export: {err}") from None

    def preprocess(self) -> Preprocess:
        """The torch detector's preprocessing minus mean/std, which the graph applies."""
        return Preprocess.from_dict(self.metadata["preprocess"], normalize=False)

    @property
    def map_score(self) -> dict[str, Any]:
        return self.metadata["map_score"]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All graph outputs for float32 (B, C, S, S) images in [0, 1]: score, normalized_score,
        anomaly_map, normalized_map (maps at the model resolution)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        p = self.metadata["preprocess"]
        expected = (p["channels"], *self.preprocess().input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"{self.path}: expected images of shape (B, {', '.join(map(str, expected))}), got {x.shape}"
            )
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})))

    def score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self.run(pixels.numpy())
        return out["score"], out["anomaly_map"]

    @property
    def decision_calibration(self) -> Calibration | None:
        return decision_calibration(self.calibration, self.operating_point)

    # the loops every `Inferencer` shares: reading, batching, skip-and-log, map resizing and the
    # Prediction are the same for both runtimes
    def iter_predict(self, images, **options: Any) -> Iterator[Scored]:
        """As `Detector.iter_predict` (same options)."""
        return iter_predict(self, images, **options)

    def predict(self, images, **options: Any) -> Prediction:
        """As `Detector.predict` (same options)."""
        return predict(self, images, **options)

    def __repr__(self) -> str:
        return f"OnnxDetector({self.name!r}, path='{self.path}', runtime={self.runtime!r})"


def load_model(
    path: str | Path,
    runtime: str = "torch",
    *,
    threads: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
) -> Inferencer:
    """A model file (or, for onnx and openvino, an exported .onnx file) ready to score in `runtime`:
    the torch `Detector` on `device`, or its ONNX export (made once and cached) in ONNX Runtime or
    OpenVINO. `threads` caps the runtime's threads for one call."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    path = Path(path)
    if runtime != "torch":
        return OnnxDetector.load(path, threads=threads, batch_size=batch_size, runtime=runtime)
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"'{path}' is an ONNX file: score it with --runtime onnx or --runtime openvino")
    detector = Detector.load(path)
    detector.options["device"] = device
    if batch_size:
        detector.options["batch_size"] = int(batch_size)
    if threads:
        torch.set_num_threads(threads)
    return detector
