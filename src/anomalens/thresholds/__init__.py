"""Decision thresholds fitted on good images only."""

from anomalens.thresholds.calibrate import Calibration, NonFiniteScoreError, calibrate
from anomalens.thresholds.operating import (
    OperatingPoint,
    ThresholdCurve,
    apply_operating_point,
    check_operating_point,
    decision_calibration,
    image_digests,
    select_operating_point,
    threshold_curve,
    threshold_source,
)

__all__ = [
    "Calibration",
    "NonFiniteScoreError",
    "OperatingPoint",
    "ThresholdCurve",
    "apply_operating_point",
    "calibrate",
    "check_operating_point",
    "decision_calibration",
    "image_digests",
    "select_operating_point",
    "threshold_curve",
    "threshold_source",
]
