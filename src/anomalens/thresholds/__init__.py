"""Decision thresholds fitted on good images only."""

from anomalens.thresholds.calibrate import Calibration, calibrate
from anomalens.thresholds.operating import (
    OperatingPoint,
    ThresholdCurve,
    apply_operating_point,
    decision_calibration,
    select_operating_point,
    threshold_curve,
)

__all__ = [
    "Calibration",
    "OperatingPoint",
    "ThresholdCurve",
    "apply_operating_point",
    "calibrate",
    "decision_calibration",
    "select_operating_point",
    "threshold_curve",
]
