"""One file per method; each registers itself in anomalens.registry."""

from anomalens.models.base import Detector, ModelFileError, Prediction

__all__ = ["Detector", "ModelFileError", "Prediction"]
