"""Decision thresholds fitted on good images only."""
from anomalens.thresholds.calibrate import Calibration, calibrate
from anomalens.thresholds.operating import (OperatingPoint, ThresholdCurve, apply_operating_point,
                                             select_operating_point, threshold_curve)

__all__ = ["Calibration", "OperatingPoint", "ThresholdCurve", "apply_operating_point", "calibrate",
           "select_operating_point", "threshold_curve"]
