"""The one path from a detector's output to what an inspector is told.

`decide(score, map, calibration)` turns a raw image score and its anomaly map into the verdict,
the normalized score and the defect regions. `predict`, `score`, the service, the review page,
the HTML report and `explain` all call it, so an image is judged the same way wherever it is
scored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from anomalens.data.drift import DriftFlag
from anomalens.thresholds import Calibration

#: smallest defect region reported by default, in pixels: specks from smoothing are not defects
MIN_REGION_AREA = 16


@dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    area: int  # pixels above threshold
    peak: float  # highest normalized score inside
    area_share: float = 0.0  # area as a fraction of the whole image
    mean: float = 0.0  # mean normalized score inside

    def to_dict(self) -> dict:
        return asdict(self)


def find_regions(
    normalized_map: np.ndarray,
    min_area: int = MIN_REGION_AREA,
    min_share: float = 0.0,
    threshold: float = 1.0,
) -> list[Region]:
    """Connected areas where the normalized map reaches `threshold` (1.0 = the calibrated pixel
    threshold), largest first; specks under `min_area` pixels or `min_share` of the image are
    noise from smoothing, not defects."""
    if min_area < 0 or not 0.0 <= min_share < 1.0:
        raise ValueError(
            f"smallest region: min_area must be >= 0 and min_share in [0, 1), got {min_area} and {min_share}"
        )
    labeled, _ = ndimage.label(normalized_map >= threshold, structure=np.ones((3, 3), bool))
    smallest = max(min_area, min_share * normalized_map.size)
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labeled), start=1):
        inside = labeled[sl] == i
        area = int(inside.sum())
        if area >= smallest:
            values = normalized_map[sl][inside]
            regions.append(
                Region(
                    sl[1].start,
                    sl[0].start,
                    sl[1].stop,
                    sl[0].stop,
                    area,
                    float(values.max()),
                    round(area / normalized_map.size, 6),
                    float(values.mean()),
                )
            )
    return sorted(regions, key=lambda r: -r.area)


@dataclass(frozen=True)
class Verdict:
    """What one image was judged: its scores, whether it is flagged, its normalized map and regions."""

    score: float  # the detector's raw score
    normalized_score: float  # calibration median at 0, the deciding threshold at 1.0
    anomalous: bool
    normalized_map: np.ndarray = field(repr=False)  # at the image's own resolution; 1.0 = pixel threshold
    regions: list[Region] = field(default_factory=list)
    #: the image's statistics outside the training goods' range: a warning beside the verdict
    drift: list[DriftFlag] = field(default_factory=list)

    @property
    def decision(self) -> str:
        return "defect" if self.anomalous else "good"

    @property
    def drift_text(self) -> str:
        """The drift warnings in one line ('' when there are none)."""
        return "; ".join(flag.message for flag in self.drift)

    def to_dict(self) -> dict:
        """JSON-safe: scores, verdict, regions and drift warnings (the map stays out)."""
        return {
            "drift": [asdict(flag) for flag in self.drift],
            "score": self.score,
            "normalized_score": self.normalized_score,
            "anomalous": self.anomalous,
            "decision": self.decision,
            "regions": [r.to_dict() for r in self.regions],
        }


def decide(
    score: float,
    anomaly_map: np.ndarray,
    calibration: Calibration,
    *,
    localizes: bool = True,
    min_area: int = MIN_REGION_AREA,
    min_share: float = 0.0,
    drift: list[DriftFlag] | None = None,
) -> Verdict:
    """The verdict on one image from its raw score and raw anomaly map (at the image's resolution).

    `calibration` is the one that decides (a model's `decision_calibration`: its threshold moved to
    the operating point when one is set). Detectors that do not localize (`localizes` False) have
    constant maps: they get no regions. `drift`: the image's drift flags (`Scored.drift`), carried
    beside the verdict; they never change it.
    """
    normalized_map = calibration.normalize_map(anomaly_map)
    regions = find_regions(normalized_map, min_area, min_share) if localizes else []
    return Verdict(
        score=float(score),
        normalized_score=float(calibration.normalize(score)),
        anomalous=bool(calibration.is_anomalous(score)),
        normalized_map=normalized_map,
        regions=regions,
        drift=list(drift or []),
    )
