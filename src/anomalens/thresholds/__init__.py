"""Decision thresholds fitted on good images only."""
from anomalens.thresholds.calibrate import Calibration, calibrate

__all__ = ["Calibration", "calibrate"]
