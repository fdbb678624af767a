"""Calibrate a decision threshold on held-out good images, never on the test set.

Normalized scores map the calibration median to 0 and the threshold to 1.0, so
"normalized score >= 1" means "flagged" for every method, whatever its raw scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np


class NonFiniteScoreError(ValueError):
    """A score that is NaN: the model cannot judge the image, which must never read as a pass."""


@dataclass(frozen=True)
class Calibration:
    threshold: float  # raw image score at which an image is flagged
    center: float  # median raw score of the calibration goods (normalized to 0)
    pixel_threshold: float  # raw map value at which a pixel belongs to a defect region
    pixel_center: float
    quantile: float
    n_images: int

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.center) / _scale(self.threshold, self.center)

    def is_anomalous(self, scores: np.ndarray | float) -> np.ndarray | bool:
        """The decision rule, for every method and every path: flagged when the raw score reaches the
        threshold. A NaN score raises `NonFiniteScoreError` (NaN >= t is False: it would pass)."""
        values = np.asarray(scores, dtype=np.float64)
        if np.isnan(values).any():
            raise NonFiniteScoreError(
                f"{int(np.isnan(values).sum())} score(s) are NaN: the model cannot judge "
                "these images (a broken model file or non-finite pixels)"
            )
        return values >= self.threshold

    def normalize_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        return ((anomaly_map - self.pixel_center) / _scale(self.pixel_threshold, self.pixel_center)).astype(
            np.float32
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """The calibration `to_dict` wrote; ValueError names the first field that is missing,
        unknown, of the wrong type or not finite (it comes from a file)."""
        if not isinstance(d, dict):
            raise ValueError(f"calibration must be an object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        if sorted(d) != sorted(names):
            raise ValueError(
                f"calibration needs exactly the fields {', '.join(names)}, got {', '.join(map(str, d))}"
            )
        for name in names:
            value = d[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"calibration {name}={value!r} is not a finite number")
        if not 0.0 < d["quantile"] <= 1.0:
            raise ValueError(f"calibration quantile={d['quantile']!r} is not in (0, 1]")
        if not isinstance(d["n_images"], int) or d["n_images"] < 1:
            raise ValueError(f"calibration n_images={d['n_images']!r} is not a positive count")
        return cls(**{k: float(v) if k != "n_images" else v for k, v in d.items()})


def _scale(threshold: float, center: float) -> float:
    # all calibration goods scoring the same leaves no spread to scale by
    return threshold - center if threshold > center else 1.0


def calibrate(
    scores: np.ndarray, maps: list[np.ndarray] | None = None, quantile: float = 0.99
) -> Calibration:
    """Threshold = `quantile` of the calibration goods' scores (linear interpolation).

    The pixel threshold is the same quantile of each good's map maximum, so a good image at the
    image threshold shows no region either; its center is the median of all good pixels.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one good image")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"calibration quantile must be in (0, 1], got {quantile}")
    if maps:
        peaks = np.array([float(m.max()) for m in maps])
        pixel_threshold = float(np.quantile(peaks, quantile))
        pixel_center = float(np.median(np.concatenate([m.ravel()[:: max(1, m.size // 4096)] for m in maps])))
    else:
        pixel_threshold, pixel_center = float(np.quantile(scores, quantile)), float(np.median(scores))
    return Calibration(
        threshold=float(np.quantile(scores, quantile)),
        center=float(np.median(scores)),
        pixel_threshold=pixel_threshold,
        pixel_center=pixel_center,
        quantile=quantile,
        n_images=int(scores.size),
    )
