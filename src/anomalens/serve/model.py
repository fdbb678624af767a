"""The model behind the service: any `Inferencer` (the torch detector or its ONNX export) and
what the endpoints report about it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.inference import MIN_REGION_AREA, Verdict, decide
from anomalens.models.base import Inferencer
from anomalens.thresholds import Calibration


@dataclass
class ServedModel:
    """The model behind the service, whatever runs it (any `Inferencer`: the torch detector or its
    ONNX export), with what the endpoints report about it."""

    model: Inferencer
    runtime: str
    metadata: dict[str, Any]
    # one call at a time: requests decode in parallel, but concurrent model calls on a few cores
    # only oversubscribe them (the runtime already uses `threads` for one image)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def calibration(self) -> Calibration:
        """The calibration that decides (its threshold at the model's operating point when one is set)."""
        return self.model.decision_calibration

    @property
    def localizes(self) -> bool:
        return self.model.localizes

    def verdict(self, image: np.ndarray, min_area: int = MIN_REGION_AREA) -> Verdict:
        """Score one image (H, W[, C]) in [0, 1] and judge it as every other path does."""
        with self.lock:
            result = self.model.predict([image], calibrated=False)
        return decide(
            result.scores[0],
            result.maps[0],
            self.calibration,
            localizes=self.localizes,
            min_area=min_area,
            drift=result.drift[0],
        )


def load_inferencer(path: Path, runtime: str = "onnx", threads: int | None = None) -> ServedModel:
    """Load a model for serving through ONNX Runtime (default), OpenVINO or torch on the CPU (see
    `anomalens.export.load_model`: a model file is exported once and cached, an exported .onnx
    file is used as it is)."""
    from anomalens.export import RUNTIMES, ExportError, load_model

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    try:
        # the service is the CPU path; batch jobs use `score`
        model = load_model(path, runtime, threads=threads, device="cpu")
    except ExportError as err:
        raise ValueError(f"{err}; serve this model with --runtime torch") from None
    fit_info = model.metadata.get("fit_info", {}) if runtime != "torch" else model.fit_info
    calibration = model.decision_calibration
    if calibration is None:
        raise ValueError(
            f"model '{path}' is not calibrated: fit it with calibration images before serving it"
        )
    metadata = {
        "detector": model.name,
        "options": model.options,
        "fit_info": fit_info,
        "calibration": calibration.to_dict(),
        "operating_point": model.operating_point,
        # when `anomalens refine` last trained the model on labels (None: never)
        "refined_at": None if model.refiner is None else model.refiner.info.get("refined_at"),
    }
    return ServedModel(model, runtime, metadata)
